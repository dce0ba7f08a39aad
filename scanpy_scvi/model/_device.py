"""Where a model runs, and seeded random streams on that device."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'`` -> CUDA if available else CPU; raise if CUDA is asked for but missing."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        msg = f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        raise ValueError(msg) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device={device!r} but CUDA is not available; use device='cpu' or 'auto'."
        raise ValueError(msg)
    return dev


@contextmanager
def seeded_on(seed: int | None, device: torch.device):
    """Seed torch inside the block and restore the global RNG state afterwards."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
