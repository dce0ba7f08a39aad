"""An adversarial batch classifier on the latent space (scvi-tools' ``AdversarialTrainingPlan``).

A small classifier learns to tell the batch from z; the model is rewarded for fooling it
(uniform predictions over the other batches), which pushes batch information out of the
latent space. scvi-tools turns it on for totalVI when some batches miss proteins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..nn import Classifier
from ..train import Objective, Terms

if TYPE_CHECKING:
    from torch import nn

    from ..train import TrainContext

CLASSIFIER = {"n_hidden": 32, "n_layers": 2, "dropout_rate": 0.1}  # scvi-tools' adversarial classifier
CLASSIFIER_OPTIMIZER = {"lr": 1e-3, "eps": 0.01}


class AdversarialObjective(Objective):
    """The module's ELBO plus ``kappa`` times the cross-entropy of fooling a batch classifier,
    ``kappa = 1 - kl_weight`` (scvi-tools' ``scale_adversarial_loss='auto'``).

    After every optimiser step of the model, the classifier takes one Adam step of its own on
    the minibatch's (detached) z, to predict the true batch. The module's ``loss`` must return
    the z it drew (``'z'``). The classifier is part of the training, not of the model: it is
    not saved.
    """

    capturable = False  # hooks and a classifier of its own
    distributable = False  # its classifier's optimiser would differ between processes

    def __init__(self, n_latent: int, n_batch: int, weight_decay: float = 1e-6):
        self.n_batch = n_batch
        self.classifier = Classifier(n_latent, n_batch, linear=False, **CLASSIFIER)
        self.optimizer = torch.optim.Adam(
            self.classifier.parameters(), weight_decay=weight_decay, **CLASSIFIER_OPTIMIZER
        )
        self._last: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def begin(self, context: TrainContext) -> None:
        self.classifier.to(context.device)

    def epoch_start(self, module: nn.Module, epoch: int) -> None:
        self.classifier.train()

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms:
        out = module.loss(batch, kl_weight=kl_weight)
        terms = Terms(out["loss"], out["reconstruction_loss"], out["kl_z"] + out["kl_l"])
        kappa = 1.0 - kl_weight
        fool = self.classification_loss(out["z"], batch["batch"], true_batch=False)
        if kappa > 0:
            terms.loss = terms.loss + kappa * fool
        terms.extra = {"adversarial_loss": (fool.item(), 1)}  # recorded every epoch, weighted or not
        self._last = (out["z"].detach(), batch["batch"], kappa)
        return terms

    def evaluate(self, module: nn.Module, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms:
        out = module.loss(batch, kl_weight=kl_weight)
        return Terms(out["loss"], out["reconstruction_loss"], out["kl_z"] + out["kl_l"])

    def after_step(self, module: nn.Module) -> None:
        z, batch, kappa = self._last
        if kappa <= 0:
            return
        self.optimizer.zero_grad(set_to_none=True)
        (kappa * self.classification_loss(z, batch, true_batch=True)).backward()
        self.optimizer.step()

    def classification_loss(self, z: torch.Tensor, batch: torch.Tensor, *, true_batch: bool) -> torch.Tensor:
        """Cross-entropy of the classifier against the true batch, or (fooling) against the
        uniform distribution over the other batches."""
        log_probs = F.log_softmax(self.classifier(z), dim=-1)
        target = F.one_hot(batch, self.n_batch).to(log_probs.dtype)
        if not true_batch:
            target = (1 - target) / (self.n_batch - 1)
        return -(log_probs * target).sum(-1).mean()
