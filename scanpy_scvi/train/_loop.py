"""A plain training loop: Adam, KL warm-up, per-epoch history, early stopping."""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .._compat import logg
from ..data import ResidentSource, epoch_minibatches, minibatches, resident_source, stream
from ._distributed import Distributed
from ._graphs import GraphedStep
from ._objective import Objective, Terms, TrainContext

if TYPE_CHECKING:
    from torch import nn

    from ..data import MinibatchSource


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are those of scvi-tools' ``TrainingPlan``."""

    max_epochs: int = 400
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    batch_size: int = 128
    n_epochs_kl_warmup: int | None = 400
    n_steps_kl_warmup: int | None = None  # if given, the warm-up counts optimiser steps instead
    min_kl_weight: float = 0.0
    max_kl_weight: float = 1.0
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_min: float = 0.0
    counts_on_device: bool | None = None  # None: on a GPU when they fit (see data.resident_source)

    def kl_weight(self, epoch: int, step: int = 0) -> float:
        """Linear warm-up from ``min_kl_weight`` to ``max_kl_weight``: per epoch (constant within
        one), or per optimiser step when ``n_steps_kl_warmup`` is set."""
        done, length = (step, self.n_steps_kl_warmup) if self.n_steps_kl_warmup else (epoch, self.n_epochs_kl_warmup)
        if not length or done >= length:
            return self.max_kl_weight
        return self.min_kl_weight + (self.max_kl_weight - self.min_kl_weight) * done / length


def train(
    module: nn.Module,
    source: MinibatchSource,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    objective: Objective | None = None,
    *,
    device: torch.device,
    seed: int | None,
    progress_bar: bool = True,
    grad_masks: dict[str, torch.Tensor] | None = None,
    desc: str = "Training",
    distributed: Distributed | None = None,
    sample_weights: np.ndarray | None = None,
) -> tuple[dict[str, list[float]], int | None]:
    """Train ``module`` in place on ``objective`` (default the ELBO); return the per-epoch
    history and the restored best epoch.

    Metrics follow scvi-tools: ``elbo_*`` = mean over cells of recon + unweighted KL;
    ``reconstruction_loss_*``, ``kl_local_*``, ``kl_weight``, ``train_loss`` (and ``lr`` with
    ``reduce_lr_on_plateau``) (the
    the objective's weighted loss), plus the objective's extra metrics. With early stopping the
    weights of the best epoch (by ``elbo_validation``, or ``elbo_train`` without a validation
    set) are restored at the end; the learning-rate schedule watches the same metric.

    A module's ``no_weight_decay`` (parameter-name prefixes, optional) trains those parameters
    without weight decay. ``grad_masks`` (parameter name -> boolean mask of trainable entries) freezes parts of
    parameters (reference mapping): masked-out entries get exactly zero gradient and no
    weight decay, so Adam leaves them bit-identical. Parameters with ``requires_grad=False``
    are not optimised at all.

    ``sample_weights`` (probabilities over ``train_idx``): each epoch draws ``len(train_idx)``
    cells with replacement by these probabilities instead of taking every cell once.

    ``distributed`` (a torchrun launch): every rank draws the same global minibatches of
    ``batch_size`` x world size cells and trains on its share; gradients, epoch sums and
    validation sums are all-reduced, so every rank records the same history and keeps the same
    weights (rank 0's batch-norm statistics at the end).
    """
    objective = objective or Objective()
    module.to(device)
    if config.counts_on_device is not False and distributed is None:
        source = resident_source(source, device, required=bool(config.counts_on_device))
    if isinstance(source, ResidentSource):
        logg.info(f"    counts held on {device} for training (minibatches gathered there)")
    grad_masks = {k: m.to(device) for k, m in (grad_masks or {}).items()}
    named = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    masked = [(p, grad_masks[k]) for k, p in named if k in grad_masks]
    exempt = getattr(module, "no_weight_decay", ())  # parameter-name prefixes trained without weight decay
    groups = [
        {"params": [p for k, p in named if k not in grad_masks and not k.startswith(exempt)],
         "weight_decay": config.weight_decay},
        {"params": [p for k, p in named if k not in grad_masks and k.startswith(exempt)], "weight_decay": 0.0},
    ]  # fmt: skip
    if masked:  # their L2 term is added to the masked gradient by hand, below
        groups.append({"params": [p for p, _ in masked], "weight_decay": 0.0})
    graphed = (
        distributed is None
        and device.type == "cuda"
        and isinstance(source, ResidentSource)  # every minibatch gathered on the device
        and objective.capturable
        and not masked
    )
    # a captured step reads the learning rate from a device tensor, which the schedule fills
    lr = torch.tensor(config.lr, device=device) if graphed and config.reduce_lr_on_plateau else config.lr
    optimizer = _adam([g for g in groups if g["params"]], lr=lr, eps=config.eps, capturable=graphed)
    scheduler = _plateau_scheduler(optimizer, config) if config.reduce_lr_on_plateau else None
    graphed = GraphedStep(module, objective, optimizer, config.batch_size) if graphed else None
    loss_of = functools.partial(objective.loss, module)
    if distributed is not None:
        if not objective.distributable:
            msg = f"{type(objective).__name__} cannot train across processes (strategy='ddp')."
            raise ValueError(msg)
        loss_of = distributed.wrap(module, objective)
    shuffle_rng = np.random.default_rng(seed)
    objective.begin(TrainContext(source, train_idx, device, shuffle_rng, config, optimizer))
    history: dict[str, list[float]] = {}
    monitor = "elbo_validation" if len(val_idx) else "elbo_train"
    best, best_state, best_epoch, since_best = math.inf, None, -1, 0
    step = 0

    bar = tqdm(range(config.max_epochs), desc=desc, unit="epoch", disable=not progress_bar)
    for epoch in bar:
        module.train()
        objective.epoch_start(module, epoch)
        sums = Sums()
        batches = epoch_minibatches(
            train_idx, shuffle_rng, config.batch_size, **_reading(source),
            rank=0 if distributed is None else distributed.rank,
            world_size=1 if distributed is None else distributed.world_size, weights=sample_weights,
        )  # fmt: skip
        for idx, batch in zip(batches, stream(source, batches, device), strict=True):
            kl_weight = config.kl_weight(epoch, step)
            terms = None
            if graphed is not None and graphed.takes(len(idx)):
                terms = graphed.step({k: v for k, v in batch.items() if k != "nz_index"}, kl_weight)
            if terms is None:
                terms = loss_of(batch, kl_weight)
                optimizer.zero_grad(set_to_none=True)
                terms.loss.backward()
                for p, mask in masked:
                    if p.grad is not None:
                        p.grad.add_(p.detach(), alpha=config.weight_decay).masked_fill_(~mask, 0.0)
                optimizer.step()
            objective.after_step(module)
            sums.add(terms)
            step += 1
        if distributed is not None:
            sums.reduce(distributed)
        metrics = {**sums.metrics("train"), "kl_weight": kl_weight}
        if scheduler is not None:
            metrics["lr"] = float(optimizer.param_groups[0]["lr"])
        if len(val_idx):
            shard = (
                val_idx if distributed is None else np.array_split(val_idx, distributed.world_size)[distributed.rank]
            )
            val = evaluate(module, source, shard, config.batch_size, device, kl_weight, objective)
            if distributed is not None:
                val.reduce(distributed)
            metrics.update(val.metrics("validation"))
        for k, v in metrics.items():
            history.setdefault(k, []).append(v)
        bar.set_postfix(elbo=f"{metrics[monitor]:.1f}", refresh=False)
        watching = epoch >= objective.monitor_from
        if scheduler is not None and watching:
            scheduler.step(metrics[monitor])

        if config.early_stopping and watching:
            if metrics[monitor] < best - config.early_stopping_min_delta:
                best, best_epoch, since_best = metrics[monitor], epoch, 0
                best_state = copy.deepcopy(module.state_dict())
            else:
                since_best += 1
                if since_best >= config.early_stopping_patience:
                    logg.info(f"    early stopping at epoch {epoch}: no {monitor} improvement since epoch {best_epoch}")
                    break
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    if distributed is not None:
        distributed.broadcast_buffers(module)
    module.eval()
    return history, (best_epoch if best_state is not None else None)


def _reading(source) -> dict:
    """How ``source`` is read: in blocks when on disk (with its geometry), else cell by cell."""
    if not getattr(source, "backed", False):
        return {"blocks": False}
    return {"blocks": True, "block_rows": source.block_rows, "buffer_blocks": source.buffer_blocks}


def _adam(params, *, capturable: bool = False, **kwargs) -> torch.optim.Adam:
    """Adam with the fused single-kernel update where this torch supports it (same algorithm);
    ``capturable`` keeps its step counts on the device, as a CUDA graph needs."""
    if capturable:
        kwargs["capturable"] = True
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without a fused kernel
        return torch.optim.Adam(params, **kwargs)


def _plateau_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """scvi-tools' schedule: multiply the learning rate by ``lr_factor`` when the monitored ELBO
    has not improved by ``lr_threshold`` (absolute) for ``lr_patience`` epochs."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=config.lr_factor,
        patience=config.lr_patience,
        threshold=config.lr_threshold,
        threshold_mode="abs",
        min_lr=config.lr_min,
    )


@torch.inference_mode()
def evaluate(
    module: nn.Module,
    source: MinibatchSource,
    idx: np.ndarray,
    batch_size: int,
    device: torch.device,
    kl_weight: float = 1.0,
    objective: Objective | None = None,
) -> Sums:
    """Loss terms summed over ``idx`` in eval mode (one posterior sample per cell)."""
    objective = objective or Objective()
    was_training = module.training
    module.eval()
    sums = Sums()
    for batch in stream(source, minibatches(idx, batch_size, min_size=1), device):
        sums.add(objective.evaluate(module, batch, kl_weight))
    module.train(was_training)
    return sums


class Sums:
    """Accumulates per-cell loss terms and extra metrics over an epoch."""

    def __init__(self):
        self.n = 0
        self._sums = None  # float64 (recon, kl, loss) on the device: no synchronisation per step
        self.extra: dict[str, list[float]] = {}

    def add(self, terms: Terms) -> None:
        n = terms.reconstruction.shape[0]
        self.n += n
        step = torch.stack(  # no tensor from the host: a pageable copy would wait for the device
            [
                terms.reconstruction.detach().sum().double(),
                terms.kl.detach().sum().double(),
                terms.loss.detach().double() * n,
            ]
        )
        self._sums = step if self._sums is None else self._sums + step
        for name, (total, count) in terms.extra.items():
            acc = self.extra.setdefault(name, [0.0, 0])
            acc[0] = acc[0] + (total.detach().double() if isinstance(total, torch.Tensor) else total)
            acc[1] += count

    def reduce(self, distributed: Distributed) -> None:
        """Sum this epoch's totals over the ranks (every rank then holds the same)."""
        names = sorted(self.extra)
        sums = self._sums if self._sums is not None else torch.zeros(3, dtype=torch.float64)
        local = torch.cat(
            [
                torch.tensor([float(self.n)], dtype=torch.float64),
                sums.detach().cpu(),
                torch.tensor([float(v) for name in names for v in self.extra[name]], dtype=torch.float64),
            ]
        ).to(distributed.device)
        total = distributed.sum(local).cpu()
        self.n = int(total[0])
        self._sums = total[1:4]
        for i, name in enumerate(names):
            self.extra[name] = [float(total[4 + 2 * i]), int(total[5 + 2 * i])]

    @property
    def recon(self) -> float:
        return self._totals()[0]

    @property
    def kl(self) -> float:
        return self._totals()[1]

    @property
    def loss(self) -> float:
        return self._totals()[2]

    def _totals(self) -> list[float]:
        return [0.0, 0.0, 0.0] if self._sums is None else self._sums.tolist()

    @property
    def elbo(self) -> float:
        """Mean negative ELBO per cell (what ``elbo_*`` records)."""
        return (self.recon + self.kl) / self.n

    def metrics(self, split: str) -> dict[str, float]:
        m = {
            f"elbo_{split}": self.elbo,
            f"reconstruction_loss_{split}": self.recon / self.n,
            f"kl_local_{split}": self.kl / self.n,
            f"{split}_loss": self.loss / self.n,
        }
        for name, (total, count) in self.extra.items():
            m[f"{name}_{split}"] = float(total) / count if count else math.nan
        return m
