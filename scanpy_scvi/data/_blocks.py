"""Minibatches of counts on disk, from whole blocks of rows read ahead by a background thread.

A minibatch of an on-disk epoch (see ``_order.py``) draws its cells from a few blocks of
consecutive rows. Reading those rows one by one would be thousands of small reads; instead a
thread reads each block whole (one slice of the file) when the epoch first needs it and
assembles the minibatches ahead, while the model trains on the ones already assembled. A block
is dropped after the last minibatch that needs it, so memory holds about one buffer of blocks
plus the minibatches ahead.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from ._batches import MinibatchSource, flat_nonzero


class BlockReader:
    """Serves minibatches of ``source`` (a backed matrix) from blocks of ``block_rows`` rows,
    assembled by a background thread up to ``ahead`` minibatches in advance."""

    def __init__(self, source: MinibatchSource, block_rows: int | None = None, ahead: int | None = None):
        self.source = source
        self.block_rows = block_rows or source.block_rows
        self.ahead = ahead or 16

    def stream(
        self, batches: list[np.ndarray], device: torch.device | str = "cpu", nonzero: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The tensors of each minibatch in turn (as :meth:`MinibatchSource.get` gives them).

        A background thread reads the blocks and assembles the minibatches ahead (up to
        ``ahead`` of them), so that the training thread only moves them to the device.
        """
        ready = queue.Queue(maxsize=self.ahead)
        stop = threading.Event()
        worker = threading.Thread(target=self._assemble, args=(batches, nonzero, ready, stop), daemon=True)
        worker.start()
        try:
            for _ in batches:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield {k: v.to(device, non_blocking=True) for k, v in item.items()}
        finally:
            stop.set()
            worker.join(timeout=60)

    def _assemble(self, batches: list[np.ndarray], nonzero: bool, ready: queue.Queue, stop: threading.Event) -> None:
        """Read the blocks each minibatch needs (each once, dropped after its last use) and put
        the minibatches' tensors on ``ready``, in order."""
        try:
            needs = [np.unique(np.asarray(b) // self.block_rows) for b in batches]
            last_use = {b: i for i, blocks in enumerate(needs) for b in blocks.tolist()}
            cache: dict[int, sp.csr_matrix] = {}
            for i, (rows, blocks) in enumerate(zip(batches, needs, strict=True)):
                for b in blocks.tolist():
                    if b not in cache:
                        cache[b] = self._read_block(b)
                item = self._batch(np.asarray(rows), cache, nonzero)
                for b in blocks.tolist():
                    if last_use[b] == i:
                        del cache[b]
                if not _put(ready, item, stop):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            _put(ready, err, stop)

    def _read_block(self, b: int) -> sp.csr_matrix:
        """Rows ``[b * block_rows, (b + 1) * block_rows)``, model columns, as float32 CSR."""
        start = b * self.block_rows
        return self.source.csr_rows(slice(start, min(start + self.block_rows, self.source.n_obs)))

    def _batch(self, rows: np.ndarray, cache: dict[int, sp.csr_matrix], nonzero: bool) -> dict[str, torch.Tensor]:
        """The tensors of the cells ``rows``, gathered from the cached blocks."""
        block_of = rows // self.block_rows
        order = np.argsort(block_of, kind="stable")
        sorted_blocks = block_of[order]
        parts = []
        for b in np.unique(sorted_blocks).tolist():
            members = order[sorted_blocks == b]
            parts.append(cache[b][rows[members] - b * self.block_rows])
        stacked = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[order] = np.arange(len(rows))
        csr = stacked[inverse]  # back to the minibatch's order
        dense = csr.toarray()
        out = {"X": torch.from_numpy(dense)}
        if nonzero:
            out["nz_index"] = torch.from_numpy(flat_nonzero(csr, dense))
        for key, values in self.source.obs.items():
            out[key] = torch.from_numpy(np.ascontiguousarray(values[rows]))
        return out


def _put(ready: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` on ``ready``, waiting for room unless the consumer stopped; False if it did."""
    while not stop.is_set():
        with contextlib.suppress(queue.Full):
            ready.put(item, timeout=0.1)
            return True
    return False


def stream(source, batches: list[np.ndarray], device: torch.device | str = "cpu", nonzero: bool = True):
    """The tensors of each of ``batches`` in turn: from blocks read ahead when ``source`` is on
    disk, else one ``source.get`` per minibatch."""
    if isinstance(source, MinibatchSource) and source.backed:
        yield from BlockReader(source).stream(batches, device, nonzero)
    else:
        for rows in batches:
            yield source.get(rows, device, nonzero=nonzero)
