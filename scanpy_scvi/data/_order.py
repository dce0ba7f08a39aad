"""The minibatches of an epoch: which cells, in which order, on which process.

Counts in memory are shuffled cell by cell. Counts on disk are read in blocks of consecutive
rows, so that an epoch reads the file once, in large reads: the blocks come in a random
order, and the cells of each buffer of ``BUFFER_BLOCKS`` consecutive blocks (in that order)
are shuffled together. Across processes (DDP), in-memory epochs deal each global minibatch
out to the ranks; on-disk epochs deal the blocks, so that each rank reads only its own.
"""

from __future__ import annotations

import math

import numpy as np

#: Rows per block read from disk, and blocks whose cells are shuffled together.
BLOCK_ROWS = 1024
BUFFER_BLOCKS = 16


def minibatches(indices: np.ndarray, batch_size: int, min_size: int = 3) -> list[np.ndarray]:
    """Split ``indices`` into minibatches; a tail smaller than ``min_size`` joins the previous one.

    BatchNorm cannot train on a single cell (the classic "Expected more than 1 value per
    channel" crash); merging the tail keeps every cell in every epoch.
    """
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_size:
        tail = batches.pop()
        batches[-1] = np.concatenate([batches[-1], tail])
    return batches


def epoch_minibatches(
    cells: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    *,
    blocks: bool = False,
    rank: int = 0,
    world_size: int = 1,
    block_rows: int = BLOCK_ROWS,
    buffer_blocks: int = BUFFER_BLOCKS,
    weights: np.ndarray | None = None,
) -> list[np.ndarray]:
    """This process's minibatches of one epoch over ``cells`` (sorted row positions).

    ``blocks=False``: one permutation of every cell (the same on every rank), cut into global
    minibatches of ``batch_size`` x ``world_size`` cells, each dealt out to the ranks.
    ``blocks=True``: :func:`block_order`; each rank takes every ``world_size``-th block and cuts
    its cells into as many minibatches as the rank with the fewest cells makes (DDP needs the
    same number of steps on every rank), each of about ``batch_size`` cells.
    ``weights`` (probabilities over ``cells``): the epoch is ``len(cells)`` cells drawn with
    replacement by these probabilities; in memory in the order drawn, on disk read by blocks as
    above (a cell drawn twice comes twice, blocks without a drawn cell are not read).
    Every rank draws the same numbers from ``rng``.
    """
    drawn = None if weights is None else rng.choice(cells, size=len(cells), p=weights)
    if not blocks:
        perm = rng.permutation(cells) if drawn is None else drawn
        if world_size == 1:
            return minibatches(perm, batch_size)
        whole = minibatches(perm, batch_size * world_size, min_size=3 * world_size)
        return [np.array_split(b, world_size)[rank] for b in whole]
    if drawn is not None:
        cells = np.sort(drawn)
    block_of = cells // block_rows
    ids, starts, counts = np.unique(block_of, return_index=True, return_counts=True)
    order = rng.permutation(len(ids))
    local = np.random.default_rng(rng.integers(2**62) + rank)  # this rank's within-buffer shuffles
    mine = order[rank::world_size]
    parts = []
    for i in range(0, len(mine), buffer_blocks):
        group = mine[i : i + buffer_blocks]
        parts.append(local.permutation(np.concatenate([cells[starts[g] : starts[g] + counts[g]] for g in group])))
    sequence = np.concatenate(parts) if parts else cells[:0]
    if world_size == 1:
        return minibatches(sequence, batch_size)
    fewest = min(int(counts[order[r::world_size]].sum()) for r in range(world_size))
    n_steps = max(1, math.ceil(fewest / batch_size))
    if fewest < 3 * n_steps:
        msg = f"too few cells ({fewest}) on some of the {world_size} processes for a minibatch each."
        raise ValueError(msg)
    return np.array_split(sequence, n_steps)
