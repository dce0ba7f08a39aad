"""A plain training loop: Adam, KL warm-up, per-epoch history, early stopping."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .._compat import logg
from ..data._batches import MinibatchSource
from ..nn._vae import VAE


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are those of scvi-tools' ``TrainingPlan``."""

    max_epochs: int = 400
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    batch_size: int = 128
    n_epochs_kl_warmup: int | None = 400
    min_kl_weight: float = 0.0
    max_kl_weight: float = 1.0
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    classification_ratio: float = 50.0  # scANVI only: weight of the labelled cross-entropy

    def kl_weight(self, epoch: int) -> float:
        """Linear warm-up from ``min_kl_weight`` to ``max_kl_weight``, constant within an epoch."""
        if not self.n_epochs_kl_warmup or epoch >= self.n_epochs_kl_warmup:
            return self.max_kl_weight
        return self.min_kl_weight + (self.max_kl_weight - self.min_kl_weight) * epoch / self.n_epochs_kl_warmup


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


def train_vae(
    module: VAE,
    source: MinibatchSource,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    *,
    device: torch.device,
    seed: int | None,
    progress_bar: bool = True,
    labelled_idx: np.ndarray | None = None,
    grad_masks: dict[str, torch.Tensor] | None = None,
    desc: str = "Training scVI",
) -> tuple[dict[str, list[float]], int | None]:
    """Train ``module`` in place; return the per-epoch history and the restored best epoch.

    Metrics follow scvi-tools: ``elbo_*`` = mean over cells of recon + unweighted KL;
    ``reconstruction_loss_*``, ``kl_local_*`` (z and library KL), ``kl_weight`` and
    ``train_loss`` (the warm-up weighted objective). With early stopping the weights of the
    best epoch (by ``elbo_validation``, or ``elbo_train`` without a validation set) are
    restored at the end.

    A semi-supervised module (scANVI) also gets, with every minibatch, a minibatch of the
    labelled cells ``labelled_idx`` (cycled, reshuffled on every pass), and the history gains
    ``classification_loss_*`` and ``accuracy_*``.

    ``grad_masks`` (parameter name -> boolean mask of trainable entries) freezes parts of
    parameters (reference mapping): masked-out entries get exactly zero gradient and no
    weight decay, so Adam leaves them bit-identical. Parameters with ``requires_grad=False``
    are not optimised at all.
    """
    module.to(device)
    grad_masks = {k: m.to(device) for k, m in (grad_masks or {}).items()}
    named = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    masked = [(p, grad_masks[k]) for k, p in named if k in grad_masks]
    groups = [{"params": [p for k, p in named if k not in grad_masks], "weight_decay": config.weight_decay}]
    if masked:  # their L2 term is added to the masked gradient by hand, below
        groups.append({"params": [p for p, _ in masked], "weight_decay": 0.0})
    optimizer = _adam([g for g in groups if g["params"]], lr=config.lr, eps=config.eps)
    shuffle_rng = np.random.default_rng(seed)
    semi = getattr(module, "is_semisupervised", False)
    labelled_stream = (
        _cycle(labelled_idx, config.batch_size, shuffle_rng)
        if semi and labelled_idx is not None and len(labelled_idx)
        else None
    )
    history: dict[str, list[float]] = {}
    monitor = "elbo_validation" if len(val_idx) else "elbo_train"
    best, best_state, best_epoch, since_best = math.inf, None, -1, 0

    bar = tqdm(range(config.max_epochs), desc=desc, unit="epoch", disable=not progress_bar)
    for epoch in bar:
        kl_weight = config.kl_weight(epoch)
        module.train()
        sums = _Sums()
        for idx in minibatches(shuffle_rng.permutation(train_idx), config.batch_size):
            extra = {}
            if labelled_stream is not None:
                extra = {
                    "labelled": source.get(next(labelled_stream), device),
                    "classification_ratio": config.classification_ratio,
                }
            out = module.loss(source.get(idx, device, nonzero=True), kl_weight=kl_weight, **extra)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            for p, mask in masked:
                if p.grad is not None:
                    p.grad.add_(p.detach(), alpha=config.weight_decay).masked_fill_(~mask, 0.0)
            optimizer.step()
            sums.add(out)
        metrics = {**sums.metrics("train"), "kl_weight": kl_weight}
        if len(val_idx):
            metrics.update(
                evaluate(module, source, val_idx, config.batch_size, device, kl_weight).metrics("validation")
            )
        for k, v in metrics.items():
            history.setdefault(k, []).append(v)
        bar.set_postfix(elbo=f"{metrics[monitor]:.1f}", refresh=False)

        if config.early_stopping:
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
    module.eval()
    return history, (best_epoch if best_state is not None else None)


def _cycle(idx: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Endless minibatches of ``idx``, reshuffled on every pass (the labelled stream of scANVI)."""
    while True:
        yield from minibatches(rng.permutation(idx), batch_size)


def _adam(params, **kwargs) -> torch.optim.Adam:
    """Adam with the fused single-kernel update where this torch supports it (same algorithm)."""
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without a fused kernel
        return torch.optim.Adam(params, **kwargs)


@torch.inference_mode()
def evaluate(
    module: VAE, source: MinibatchSource, idx: np.ndarray, batch_size: int, device: torch.device, kl_weight: float = 1.0
) -> _Sums:
    """Loss terms summed over ``idx`` in eval mode (one posterior sample per cell)."""
    was_training = module.training
    module.eval()
    sums = _Sums()
    semi = getattr(module, "is_semisupervised", False)
    for start in range(0, len(idx), batch_size):
        tensors = source.get(idx[start : start + batch_size], device, nonzero=True)
        extra = {"labelled": tensors} if semi else {}  # known labels among these cells
        sums.add(module.loss(tensors, kl_weight=kl_weight, **extra))
    module.train(was_training)
    return sums


class _Sums:
    """Accumulates per-cell loss terms over an epoch."""

    def __init__(self):
        self.n = self.n_labelled = self.n_correct = 0
        self.recon = self.kl = self.loss = self.ce = 0.0
        self.semi = False

    def add(self, out: dict[str, torch.Tensor]) -> None:
        n = out["reconstruction_loss"].shape[0]
        self.n += n
        self.recon += out["reconstruction_loss"].sum().item()
        self.kl += (out["kl_z"] + out["kl_l"]).sum().item()
        self.loss += out["loss"].item() * n
        if "n_labelled" in out:
            self.semi = True
            self.n_labelled += out["n_labelled"]
            self.n_correct += out["n_correct"]
            self.ce += out["classification_loss"].item() * out["n_labelled"]

    def metrics(self, split: str) -> dict[str, float]:
        m = {
            f"elbo_{split}": (self.recon + self.kl) / self.n,
            f"reconstruction_loss_{split}": self.recon / self.n,
            f"kl_local_{split}": self.kl / self.n,
            f"{split}_loss": self.loss / self.n,
        }
        if self.semi:
            m[f"classification_loss_{split}"] = self.ce / self.n_labelled if self.n_labelled else math.nan
            m[f"accuracy_{split}"] = self.n_correct / self.n_labelled if self.n_labelled else math.nan
        return m
