"""Tensors back to numpy."""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A detached float32 numpy copy of ``t`` on the CPU (the dtype outputs are written in)."""
    return t.detach().to("cpu", torch.float32).numpy()
