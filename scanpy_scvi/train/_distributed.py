"""Data-parallel training over the processes of a ``torchrun`` launch (``torch.distributed``).

Every rank runs the same program on the same data; the training loop draws the same global
minibatches on every rank (one seeded shuffle) and each rank reads and trains on its own
share of each. ``DistributedDataParallel`` all-reduces the gradients, so that the weights
stay identical on every rank; the epoch's loss sums and the validation ELBO are all-reduced,
so that the history, the KL schedule, early stopping and the learning-rate schedule agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._compat import logg
from ._objective import Objective, Terms

LAUNCH_HINT = "torchrun --standalone --nproc-per-node 2 your_script.py"


def launched() -> bool:
    """Whether this process belongs to a ``torchrun`` launch (or an initialised process group)."""
    return (dist.is_available() and dist.is_initialized()) or {"RANK", "WORLD_SIZE"} <= set(os.environ)


def rank() -> int:
    """This process's rank (0 outside a launch): the rank that writes outputs and files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


class Distributed:
    """The process group of this launch, initialised on first use (gloo on CPU, NCCL on CUDA).

    ``device`` is this rank's: ``cuda:<LOCAL_RANK>`` for a CUDA device, the CPU otherwise.
    """

    def __init__(self, device: torch.device):
        if not launched():
            msg = f"strategy='ddp' needs the processes of a torchrun launch, e.g. `{LAUNCH_HINT}`."
            raise ValueError(msg)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        logg.info(f"    rank {self.rank} of {self.world_size} ({dist.get_backend()}) on {device}")

    @classmethod
    def for_strategy(cls, strategy: str | None, device: torch.device) -> Distributed | None:
        """The process group for ``strategy`` (``'ddp'``), or None (one process)."""
        if strategy is None:
            return None
        if strategy != "ddp":
            msg = f"strategy must be None or 'ddp', got {strategy!r}."
            raise ValueError(msg)
        return cls(device)

    def torch_seed(self, random_state: int | None) -> int | None:
        """This rank's torch seed: its own dropout and sampling draws (the shuffles, drawn from
        ``random_state`` itself, are the same on every rank); rank 0 draws as one process does."""
        return None if random_state is None else random_state + self.rank

    def shard(self, global_batches: list[np.ndarray]) -> list[np.ndarray]:
        """This rank's part of each global minibatch (parts differ in size by at most one)."""
        return [np.array_split(b, self.world_size)[self.rank] for b in global_batches]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (in place; returned)."""
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def wrap(self, module: nn.Module, objective: Objective) -> Callable[[dict, float], Terms]:
        """``objective.loss`` of ``module`` through DDP: its backward all-reduces the gradients."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        # static graph: the same parameters take part in every step (DDP finds unused ones once)
        ddp = DistributedDataParallel(_ObjectiveLoss(module, objective), device_ids=ids, static_graph=True)
        return lambda batch, kl_weight: Terms(*ddp(batch, kl_weight))

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics) on every rank."""
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def same_everywhere(self, value: float) -> bool:
        """Whether ``value`` is equal on every rank (a cheap consistency check)."""
        t = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0] == value and t[1] == -value)


class _ObjectiveLoss(nn.Module):
    """``objective.loss(module, batch, kl_weight)`` as a forward, the form DDP synchronises."""

    def __init__(self, module: nn.Module, objective: Objective):
        super().__init__()
        self.module = module
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor], kl_weight: float) -> tuple:
        terms = self.objective.loss(self.module, batch, kl_weight)
        # a tuple, which DDP looks into (its hooks attach to the output tensors), not a dataclass
        return terms.loss, terms.reconstruction, terms.kl, terms.extra
