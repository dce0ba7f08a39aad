"""What the training loop optimises: a model's objective, its loss terms and its hooks.

The loop (``train/_loop.py``) knows minibatches, the optimiser, the KL schedule, early
stopping and the history, and nothing of any model. A model brings an :class:`Objective`:

- :meth:`Objective.loss` turns a minibatch into :class:`Terms` (the scalar to minimise, the
  per-cell reconstruction and KL terms that make the ELBO, and named extra metrics);
- :meth:`Objective.evaluate` does the same for validation cells (default: ``loss``);
- hooks, each a no-op by default: :meth:`begin` (once, with the :class:`TrainContext`),
  :meth:`epoch_start` (e.g. prototype updates), :meth:`after_step` (after each optimiser step,
  e.g. a proximal group-lasso step). A penalty between conditions (e.g. MMD) is part of ``loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from ..data import MinibatchSource
    from ._loop import TrainConfig


@dataclass
class Terms:
    """One minibatch's loss terms.

    ``loss`` is minimised; ``reconstruction`` and ``kl`` are per-cell (their sum is the
    negative ELBO, recorded as ``elbo_<split>``); ``extra`` maps a metric name to ``(sum,
    count)`` over this minibatch, recorded as ``<name>_<split>`` = total sum / total count
    (NaN when the count is 0). A sum given as a 0-d tensor is added up on the device (no
    host read per step, so a captured step can produce it).
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    extra: dict[str, tuple[float | torch.Tensor, int]] = field(default_factory=dict)


@dataclass
class TrainContext:
    """What hooks may need: the data, the training cells, the device, the loop's random generator
    (shared, so that a seed reproduces everything), the settings and the optimiser (its current
    learning rate, e.g. for a proximal step)."""

    source: MinibatchSource
    train_idx: np.ndarray
    device: torch.device
    rng: np.random.Generator
    config: TrainConfig
    optimizer: torch.optim.Optimizer


class Objective:
    """The ELBO of a module whose ``loss(batch, kl_weight)`` returns ``loss``,
    ``reconstruction_loss``, ``kl_z`` and ``kl_l`` (scVI). Subclass to add terms or hooks.

    ``capturable``: the loss is a function of the minibatch tensors and ``kl_weight`` (which
    may be a 0-d tensor) alone, with no host reads and no hooks, so that the loop may capture
    the training step as a CUDA graph. Subclasses with hooks or side state set it False.
    """

    capturable: bool = True
    #: The loss can train across processes (strategy='ddp'): it trains only the module's
    #: parameters, whose gradients DDP all-reduces (not, e.g., a classifier of its own).
    distributable: bool = True
    #: Early stopping and the learning-rate schedule watch the ELBO from this epoch on (e.g. once
    #: a loss term that starts later is in, so that no earlier epoch's weights are restored).
    monitor_from: int = 0

    def begin(self, context: TrainContext) -> None:
        """Called once before the first epoch."""

    def epoch_start(self, module: nn.Module, epoch: int) -> None:
        """Called at the start of every epoch, the module in training mode."""

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms:
        out = module.loss(batch, kl_weight=kl_weight)
        return Terms(out["loss"], out["reconstruction_loss"], out["kl_z"] + out["kl_l"])

    def evaluate(self, module: nn.Module, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms:
        """Terms of validation cells (eval mode, no gradients); default :meth:`loss`."""
        return self.loss(module, batch, kl_weight)

    def after_step(self, module: nn.Module) -> None:
        """Called after every optimiser step."""
