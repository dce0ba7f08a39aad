"""Minibatches of counts on disk, from whole blocks of rows read ahead by a background thread.

A minibatch of an on-disk epoch (see ``_order.py``) draws its cells from a few blocks of
consecutive rows. Reading those rows one by one would be thousands of small reads; instead a
thread reads each block whole (one slice of the file), in the order the epoch first needs
them, while the model trains on the blocks already read. A block is dropped after the last
minibatch that needs it, so memory holds about two buffers of blocks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from ._batches import MinibatchSource, flat_nonzero

_DONE = object()


class BlockReader:
    """Serves ``minibatches`` of ``source`` (a backed matrix) from blocks of ``block_rows`` rows."""

    def __init__(self, source: MinibatchSource, block_rows: int | None = None, ahead: int | None = None):
        self.source = source
        self.block_rows = block_rows or source.block_rows
        self.ahead = ahead or 2 * source.buffer_blocks

    def stream(
        self, batches: list[np.ndarray], device: torch.device | str = "cpu", nonzero: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The tensors of each minibatch in turn (as :meth:`MinibatchSource.get` gives them)."""
        needs = [np.unique(np.asarray(b) // self.block_rows) for b in batches]
        last_use: dict[int, int] = {}
        sequence: list[int] = []
        for i, blocks in enumerate(needs):
            for b in blocks.tolist():
                if b not in last_use:
                    sequence.append(b)
                last_use[b] = i
        read = queue.Queue(maxsize=self.ahead)
        stop = threading.Event()
        reader = threading.Thread(target=self._read_ahead, args=(sequence, read, stop), daemon=True)
        reader.start()
        cache: dict[int, sp.csr_matrix] = {}
        try:
            for i, (rows, blocks) in enumerate(zip(batches, needs, strict=True)):
                while any(b not in cache for b in blocks.tolist()):
                    item = read.get()
                    if isinstance(item, BaseException):
                        raise item
                    cache[item[0]] = item[1]
                yield self._batch(np.asarray(rows), cache, device, nonzero)
                for b in blocks.tolist():
                    if last_use[b] == i:
                        del cache[b]
        finally:
            stop.set()
            reader.join(timeout=60)

    def _read_ahead(self, sequence: list[int], read: queue.Queue, stop: threading.Event) -> None:
        try:
            for b in sequence:
                block = self._read_block(b)
                while not stop.is_set():
                    try:
                        read.put((b, block), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            read.put(err)

    def _read_block(self, b: int) -> sp.csr_matrix:
        """Rows ``[b * block_rows, (b + 1) * block_rows)``, model columns, as float32 CSR."""
        src = self.source
        start = b * self.block_rows
        block = src.X[start : min(start + self.block_rows, src.n_obs)]
        if src.gene_idx is not None:
            block = block[:, src.gene_idx]
        block = sp.csr_matrix(block, dtype=np.float32)
        if src.positions is not None:
            block = sp.csr_matrix(
                (block.data, src.positions[block.indices], block.indptr), shape=(block.shape[0], src.n_vars)
            )
        return block

    def _batch(
        self, rows: np.ndarray, cache: dict[int, sp.csr_matrix], device, nonzero: bool
    ) -> dict[str, torch.Tensor]:
        block_of = rows // self.block_rows
        order = np.argsort(block_of, kind="stable")
        sorted_blocks = block_of[order]
        parts = []
        for b in np.unique(sorted_blocks).tolist():
            members = order[sorted_blocks == b]
            parts.append(cache[b][rows[members] - b * self.block_rows])
        stacked = sp.vstack(parts, format="csr")
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[order] = np.arange(len(rows))
        csr = stacked[inverse]  # back to the minibatch's order
        dense = csr.toarray()
        out = {"X": torch.from_numpy(dense)}
        if nonzero:
            out["nz_index"] = torch.from_numpy(flat_nonzero(csr, dense))
        for key, values in self.source.obs.items():
            out[key] = torch.from_numpy(np.ascontiguousarray(values[rows]))
        return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def stream(source, batches: list[np.ndarray], device: torch.device | str = "cpu", nonzero: bool = True):
    """The tensors of each of ``batches`` in turn: from blocks read ahead when ``source`` is on
    disk, else one ``source.get`` per minibatch."""
    if isinstance(source, MinibatchSource) and source.backed:
        yield from BlockReader(source).stream(batches, device, nonzero)
    else:
        for rows in batches:
            yield source.get(rows, device, nonzero=nonzero)
