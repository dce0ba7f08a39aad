"""What a call selects: cell positions from ``indices``, feature masks from name lists, the
training/validation split."""

from __future__ import annotations

import math

import numpy as np


def cell_positions(indices, n_obs: int) -> np.ndarray:
    if indices is None:
        return np.arange(n_obs)
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n_obs,):
            msg = f"A boolean `indices` mask must have length n_obs={n_obs}, got {idx.shape}."
            raise ValueError(msg)
        return np.flatnonzero(idx)
    if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= n_obs):
        msg = f"`indices` must be integer positions in [0, {n_obs}) or a boolean mask."
        raise ValueError(msg)
    return idx.astype(np.int64)


def names_mask(names: list[str], chosen, arg: str, what: str) -> np.ndarray:
    """Boolean mask over ``names`` of ``chosen`` (a name or names; None: all); an unknown name is
    a ``ValueError`` naming the argument ``arg``."""
    names = np.asarray(names)
    if chosen is None:
        return np.ones(len(names), dtype=bool)
    chosen = [chosen] if isinstance(chosen, str) else list(chosen)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        msg = f"{arg} has {len(unknown)} {what} the model was not trained on: {unknown[:10]}."
        raise ValueError(msg)
    return np.isin(names, chosen)


def split_groups(groups: list[np.ndarray], train_size: float, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Split each group of positions by one seeded permutation, ceil(train_size * size) to train;
    return the sorted union of the training and of the validation parts."""
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for group in groups:
        n_val = len(group) - math.ceil(train_size * len(group))
        perm = group[rng.permutation(len(group))]
        train_parts.append(perm[n_val:])
        val_parts.append(perm[:n_val])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts))
