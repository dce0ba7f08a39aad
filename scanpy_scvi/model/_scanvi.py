"""scANVI: the semi-supervised model object (label transfer from labelled to unlabelled cells)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .._settings import check_positive_int, keyword_settings, split_settings
from ..data import BoundData, DataSetup, SetupArguments, categories
from ..nn import SCANVAE, SCANVIArchitecture, to_numpy
from ..train import Objective, Terms, TrainContext, minibatches
from ._scvi import SCVI
from ._selection import split_groups

if TYPE_CHECKING:
    from anndata import AnnData
    from torch import nn


@keyword_settings(SetupArguments, SCANVIArchitecture)
class SCANVI(SCVI):
    """scANVI (Xu et al. 2021): scVI with a cell-type classifier and a label-aware latent prior.

    Cells whose ``labels_key`` value is ``unlabeled_category`` are unlabelled; the others
    teach the classifier, whose predictions (:meth:`predict`) transfer the labels. Every
    method of :class:`SCVI` works the same way (latent space, expression, DE, save/load).

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` or ``layer``.
    labels_key
        ``obs`` column of cell types, with ``unlabeled_category`` for unlabelled cells.
    unlabeled_category
        The value that marks an unlabelled cell (it need not occur). It is not a class:
        ``n_labels`` counts the other categories, and at least two are needed.
    genes
        Genes (``var_names``) to model, in order. Default: all genes of ``adata``.
    {SetupArguments}
    {SCANVIArchitecture}
    random_state
        Seed of the weight initialisation.

    ``dispersion='gene-label'`` is not available (unlabelled cells have no label to index the
    dispersion with).
    """

    name = "scANVI"
    uns_key = "scanvi"
    module_class = SCANVAE
    classification_ratio = 50.0  # set by train()
    n_samples_per_label: int | None = None  # set by train()

    def __init__(
        self,
        adata: AnnData,
        *,
        labels_key: str,
        unlabeled_category: str,
        genes: Sequence[str] | None = None,
        random_state: int | None = 0,
        **settings,
    ):
        setup_args, architecture = split_settings(settings, SetupArguments)
        architecture = SCANVIArchitecture(**architecture)
        setup = DataSetup.from_adata(adata, genes=genes, **setup_args)
        setup = _with_labels(setup, adata, labels_key, unlabeled_category)
        self._assemble(setup, architecture, adata=adata, random_state=random_state)

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: SCVI,
        *,
        labels_key: str,
        unlabeled_category: str,
        adata: AnnData | None = None,
        linear_classifier: bool = False,
        random_state: int | None = 0,
    ) -> SCANVI:
        """Initialise scANVI from a trained scVI model (scvi-tools' ``from_scvi_model``).

        The genes, layer, batches, covariates and architecture are the scVI model's; its
        weights are copied, and the classifier and the label-prior networks start fresh.
        :meth:`train` then defaults to few epochs (``min(10, max(2, round(heuristic / 3)))``).

        Parameters
        ----------
        scvi_model
            A trained :class:`SCVI` (not LDVAE).
        labels_key, unlabeled_category
            As in :class:`SCANVI`.
        adata
            The AnnData to train on; default the scVI model's own.
        linear_classifier
            As in :class:`SCANVI`.
        random_state
            Seed of the new networks' initialisation.
        """
        if not isinstance(scvi_model, SCVI) or scvi_model.module_class is not SCVI.module_class:  # not trVAE, scANVI
            msg = f"scvi_model must be an SCVI model, got {type(scvi_model).__name__}."
            raise TypeError(msg)
        if not scvi_model.is_trained:
            msg = "scvi_model is not trained; train it first (`scvi_model.train()`)."
            raise ValueError(msg)
        if scvi_model.architecture.linear_decoder:
            msg = "scANVI cannot start from an LDVAE (linear decoder) model."
            raise ValueError(msg)
        architecture = SCANVIArchitecture(
            **scvi_model.architecture.to_dict(), linear_classifier=bool(linear_classifier)
        )
        adata = scvi_model.adata if adata is None else adata
        if adata is None:
            msg = "scvi_model holds no AnnData (it was loaded without one); pass `adata=`."
            raise ValueError(msg)
        base = dataclasses.replace(scvi_model.setup, labels_key=None, label_categories=["0"])
        setup = _with_labels(base, adata, labels_key, unlabeled_category)
        model = cls._assembled(setup, architecture, adata=adata, random_state=random_state, initialised_from="SCVI")
        state = scvi_model.module.state_dict()
        missing, unexpected = model.module.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(("classifier.", "u_encoder.", "z_decoder.")) for k in missing):
            msg = f"scVI weights do not fit the scANVI module (missing {missing[:5]}, unexpected {unexpected[:5]})."
            raise ValueError(msg)
        return model

    def __repr__(self) -> str:
        a = self.architecture
        return (
            f"SCANVI: {len(self.setup.genes)} genes, {self.setup.n_batch} batches, "
            f"{self.setup.n_labels} labels ({self.setup.labels_key!r}, unlabelled = {self.setup.unlabeled_category!r}), "
            f"n_latent={a.n_latent}, n_hidden={a.n_hidden}, n_layers={a.n_layers}, "
            f"{a.gene_likelihood} likelihood; trained: {self.is_trained}"
        )

    # -- training ------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        classification_ratio: float = 50.0,
        n_samples_per_label: int | None = None,
        **kwargs,
    ) -> None:
        """Semi-supervised training: the ELBO of all cells plus a cross-entropy on labelled cells.

        Labelled and unlabelled cells are split into training and validation sets separately
        (the same ``train_size`` for both); each minibatch of all cells comes with a minibatch
        of labelled cells, cycled. The history adds ``classification_loss_*`` and
        ``accuracy_*``.

        Parameters
        ----------
        max_epochs
            ``None``: scvi-tools' heuristic, or ``min(10, max(2, round(heuristic / 3)))``
            for a model made by :meth:`from_scvi_model`.
        classification_ratio
            Weight of the classification loss (reference default 50).
        n_samples_per_label
            Draw the labelled minibatches of each epoch from at most this many training cells
            of each label, drawn anew every epoch (scvi-tools' option); ``None``: all of them.
        **kwargs
            Every other argument of :meth:`SCVI.train`.
        """
        if not classification_ratio >= 0:
            msg = f"classification_ratio must be >= 0, got {classification_ratio}."
            raise ValueError(msg)
        if n_samples_per_label is not None:
            check_positive_int(n_samples_per_label=n_samples_per_label)
        self.classification_ratio = float(classification_ratio)
        self.n_samples_per_label = n_samples_per_label
        super().train(max_epochs, **kwargs)
        self.train_config["classification_ratio"] = self.classification_ratio
        if n_samples_per_label is not None:
            self.train_config["n_samples_per_label"] = n_samples_per_label

    def default_max_epochs(self, n_obs: int) -> int:
        heuristic = super().default_max_epochs(n_obs)
        return min(10, max(2, round(heuristic / 3))) if self.initialised_from == "SCVI" else heuristic

    def _labelled(self, bound: BoundData) -> np.ndarray:
        return bound.source.obs["labels"] < self.setup.n_labels

    def split(self, bound: BoundData, train_size: float, random_state: int | None) -> tuple[np.ndarray, np.ndarray]:
        labelled = self._labelled(bound)  # labelled and unlabelled cells are split separately
        return split_groups([np.flatnonzero(labelled), np.flatnonzero(~labelled)], train_size, random_state)

    def objective(self, bound: BoundData, train_idx: np.ndarray) -> Objective:
        labelled = train_idx[self._labelled(bound)[train_idx]]
        per_label = None
        if self.n_samples_per_label is not None:
            per_label = (bound.source.obs["labels"][labelled], self.n_samples_per_label)
        return SemiSupervisedObjective(labelled, self.classification_ratio, per_label)

    # -- prediction ------------------------------------------------------------------------------
    def predict(
        self,
        adata: AnnData | None = None,
        indices=None,
        soft: bool = False,
        batch_size: int | None = None,
        use_posterior_mean: bool = True,
    ) -> np.ndarray | pd.DataFrame:
        """Predicted cell types, from the classifier at the posterior mean of z
        (``use_posterior_mean=False``: at one draw of z per cell, from torch's global RNG).

        Returns
        -------
        ``soft=False``: an array of label names, one per cell. ``soft=True``: a DataFrame of
        class probabilities (rows: cells, indexed by ``obs_names``; columns: the known labels).
        """
        bound, idx = self.select(adata, indices)
        probs = self._label_probabilities(bound, idx, batch_size, use_posterior_mean)
        labels = np.asarray(self.setup.label_categories, dtype=object)
        if not soft:
            return labels[probs.argmax(axis=1)]
        target = self.adata if adata is None else adata
        return pd.DataFrame(probs, index=target.obs_names[idx], columns=pd.Index(labels))

    def label_calls(self) -> tuple[pd.Categorical, np.ndarray]:
        """For the model's own cells: predicted labels (categorical over the known labels) and
        the probability of each call."""
        bound, idx = self.select(None, None)
        probs = self._label_probabilities(bound, idx)
        names = np.asarray(self.setup.label_categories, dtype=object)
        return pd.Categorical(names[probs.argmax(1)], categories=names), probs.max(1)

    def _label_probabilities(
        self, bound: BoundData, idx: np.ndarray, batch_size: int | None = None, use_posterior_mean: bool = True
    ) -> np.ndarray:
        out = np.empty((len(idx), self.setup.n_labels), dtype=np.float32)
        with self.inference_mode():
            for rows, t in self.minibatches(bound, idx, batch_size, encoder_only=True):
                out[rows] = to_numpy(torch.softmax(self.module.classify(t, use_posterior_mean), dim=-1))
        return out


def _with_labels(setup: DataSetup, adata: AnnData, labels_key: str, unlabeled_category) -> DataSetup:
    """``setup`` with scANVI labels: the known categories of ``labels_key`` minus the unlabelled one."""
    if not isinstance(labels_key, str):
        msg = f"labels_key must be an obs column name, got {labels_key!r}."
        raise TypeError(msg)
    if unlabeled_category is None:
        msg = "unlabeled_category is required (the obs value that marks unlabelled cells, e.g. 'Unknown')."
        raise ValueError(msg)
    unlabeled = str(unlabeled_category)
    known = [c for c in categories(adata, labels_key, "labels_key") if c != unlabeled]
    if len(known) < 2:
        msg = f"obs[{labels_key!r}] has {len(known)} known label(s) besides {unlabeled!r}; scANVI needs at least 2."
        raise ValueError(msg)
    return dataclasses.replace(setup, labels_key=labels_key, label_categories=known, unlabeled_category=unlabeled)


class SemiSupervisedObjective(Objective):
    """scANVI's objective: the ELBO of every cell plus ``classification_ratio`` times the
    cross-entropy of a minibatch of labelled cells drawn alongside each minibatch (cycled,
    reshuffled on every pass). The history gains ``classification_loss_*`` and ``accuracy_*``;
    validation cells are scored on their own known labels."""

    capturable = False  # draws labelled cells on the host at every step

    def __init__(
        self,
        labelled_idx: np.ndarray,
        classification_ratio: float,
        per_label: tuple[np.ndarray, int] | None = None,
    ):
        """``per_label``: the labels of ``labelled_idx`` and ``n``, to draw each epoch's labelled
        minibatches from at most ``n`` cells of each label (drawn anew every epoch)."""
        self.labelled_idx = labelled_idx
        self.classification_ratio = classification_ratio
        self.per_label = per_label
        self._stream = None
        self._context: TrainContext | None = None

    def begin(self, context: TrainContext) -> None:
        self._context = context
        if len(self.labelled_idx) and self.per_label is None:
            self._stream = _cycle(self.labelled_idx, context.config.batch_size, context.rng)

    def epoch_start(self, module: nn.Module, epoch: int) -> None:
        if self.per_label is None or not len(self.labelled_idx):
            return
        labels, n = self.per_label
        rng = self._context.rng
        chosen = [rng.permutation(self.labelled_idx[labels == y])[:n] for y in np.unique(labels)]
        self._stream = _cycle(np.sort(np.concatenate(chosen)), self._context.config.batch_size, rng)

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms:
        labelled = None
        if self._stream is not None:
            labelled = self._context.source.get(next(self._stream), self._context.device)
        return self._terms(module, batch, kl_weight, labelled)

    def evaluate(self, module: nn.Module, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms:
        return self._terms(module, batch, kl_weight, batch)  # the known labels among these cells

    def _terms(self, module, batch, kl_weight, labelled) -> Terms:
        out = module.loss(batch, kl_weight=kl_weight)
        terms = Terms(out["loss"], out["reconstruction_loss"], out["kl_z"] + out["kl_l"])
        if labelled is not None:
            c = module.classification(labelled)
            n = c["n_labelled"]
            if n > 0:
                terms.loss = terms.loss + self.classification_ratio * c["classification_loss"]
            terms.extra = {
                "classification_loss": (c["classification_loss"].item() * n, n),
                "accuracy": (float(c["n_correct"]), n),
            }
        return terms


def _cycle(idx: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Endless minibatches of ``idx``, reshuffled on every pass."""
    while True:
        yield from minibatches(rng.permutation(idx), batch_size)
