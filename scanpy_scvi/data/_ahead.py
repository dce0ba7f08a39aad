"""Minibatches assembled ahead by a background thread while the model trains on earlier ones.

Assembling a minibatch (gathering rows, densifying, finding the nonzero entries) is numpy and
scipy work that releases the GIL, and much of a CPU training step is small single-threaded
kernels, so the second core is often free to do it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import torch

_DONE = object()


def read_ahead(
    items: Iterator[dict[str, torch.Tensor]], ahead: int, device: torch.device | str = "cpu"
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``items`` in order, moved to ``device``, while a background thread produces up to
    ``ahead`` of the next ones; an error raised by ``items`` is raised here."""
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(ready, item, stop):
                    return
            _put(ready, _DONE, stop)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            _put(ready, err, stop)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield {k: v.to(device, non_blocking=True) for k, v in item.items()}
    finally:
        stop.set()
        worker.join(timeout=60)


def _put(ready: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` on ``ready``, waiting for room unless the consumer stopped; False if it did."""
    while not stop.is_set():
        with contextlib.suppress(queue.Full):
            ready.put(item, timeout=0.1)
            return True
    return False
