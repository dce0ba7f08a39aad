"""Model files: weights in safetensors, everything else in JSON. Loading never runs code."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "scanpy-scvi-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def write_model_dir(
    dir_path: str | os.PathLike, config: dict[str, Any], state: dict[str, torch.Tensor], *, overwrite: bool
) -> None:
    """Write ``config`` and ``state`` to ``dir_path`` atomically.

    Files are written to a temporary sibling directory which then replaces ``dir_path`` by
    renames, so a crash mid-save leaves the previous save (if any) intact.
    """
    from safetensors.torch import save_file

    target = Path(dir_path)
    if target.exists() and not target.is_dir():
        msg = f"{target} exists and is not a directory."
        raise ValueError(msg)
    if target.exists() and any(target.iterdir()) and not overwrite:
        msg = f"{target} already exists and is not empty; pass overwrite=True to replace it."
        raise ValueError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, tmp / WEIGHTS, metadata={"format": FORMAT})
        with open(tmp / CONFIG, "w") as f:
            json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, **config}, f, indent=1)
        for name in (WEIGHTS, CONFIG):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_model_dir(dir_path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a model directory, raising ``ValueError`` with the reason if anything is off."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(dir_path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            msg = f"{path} is not a scanpy-scvi model directory: {name} is missing."
            raise ValueError(msg)
    try:
        with open(path / CONFIG) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{path / CONFIG} is corrupt (not valid JSON: {e}). Re-save the model."
        raise ValueError(msg) from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        msg = f"{path / CONFIG} is not a scanpy-scvi model configuration."
        raise ValueError(msg)
    if config.get("format_version", 0) > FORMAT_VERSION:
        msg = (
            f"{path} was saved with a newer model format (version {config['format_version']}); "
            "upgrade scanpy-scvi to load it."
        )
        raise ValueError(msg)
    try:
        state = load_file(path / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        msg = f"{path / WEIGHTS} is corrupt or not a safetensors file ({e}). Re-save the model."
        raise ValueError(msg) from e
    return config, state
