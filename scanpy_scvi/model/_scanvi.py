"""scANVI: the semi-supervised model object (label transfer from labelled to unlabelled cells)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from ..data._setup import BoundData, DataSetup, _categories
from ..nn._scanvae import SCANVAE
from ._scvi import SCVI, _check_module_kwargs, _np, split_groups

if TYPE_CHECKING:
    from anndata import AnnData


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
    linear_classifier
        A single linear layer from the latent space to the labels instead of an MLP.
    **kwargs
        Every other argument of :class:`SCVI` (``layer``, ``genes``, ``batch_key``,
        covariates, architecture, ``random_state``). ``dispersion='gene-label'`` is not
        available (unlabelled cells have no label to index the dispersion with).
    """

    _kind = "scANVI"
    _module_class = SCANVAE

    def __init__(
        self,
        adata: AnnData,
        *,
        labels_key: str,
        unlabeled_category: str,
        layer: str | None = None,
        genes: Sequence[str] | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        size_factor_key: str | None = None,
        check_counts: bool = True,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        latent_distribution: Literal["normal", "ln"] = "normal",
        use_observed_lib_size: bool = True,
        linear_classifier: bool = False,
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: Literal["encoder", "decoder", "both", "none"] = "both",
        use_layer_norm: Literal["encoder", "decoder", "both", "none"] = "none",
        random_state: int | None = 0,
    ):
        module_kwargs = {
            "n_hidden": n_hidden,
            "n_latent": n_latent,
            "n_layers": n_layers,
            "dropout_rate": dropout_rate,
            "dispersion": dispersion,
            "gene_likelihood": gene_likelihood,
            "latent_distribution": latent_distribution,
            "use_observed_lib_size": use_observed_lib_size,
            "linear_decoder": False,
            "encode_covariates": encode_covariates,
            "deeply_inject_covariates": deeply_inject_covariates,
            "use_batch_norm": use_batch_norm,
            "use_layer_norm": use_layer_norm,
        }
        _check_scanvi_kwargs(module_kwargs)
        module_kwargs["linear_classifier"] = bool(linear_classifier)
        setup = DataSetup.from_adata(
            adata,
            genes=genes,
            layer=layer,
            batch_key=batch_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            size_factor_key=size_factor_key,
            check_counts=check_counts,
        )
        setup = _with_labels(setup, adata, labels_key, unlabeled_category)
        self._pretrained = False
        self._init_on(adata, setup, module_kwargs, random_state=random_state)

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
        if type(scvi_model) is not SCVI:
            msg = f"scvi_model must be an SCVI model, got {type(scvi_model).__name__}."
            raise TypeError(msg)
        if not scvi_model.is_trained:
            msg = "scvi_model is not trained; train it first (`scvi_model.train()`)."
            raise ValueError(msg)
        kwargs = dict(scvi_model.module_kwargs)
        if kwargs["linear_decoder"]:
            msg = "scANVI cannot start from an LDVAE (linear decoder) model."
            raise ValueError(msg)
        _check_scanvi_kwargs(kwargs)
        adata = scvi_model.adata if adata is None else adata
        if adata is None:
            msg = "scvi_model holds no AnnData (it was loaded without one); pass `adata=`."
            raise ValueError(msg)
        base = dataclasses.replace(scvi_model.setup, labels_key=None, label_categories=["0"])
        setup = _with_labels(base, adata, labels_key, unlabeled_category)
        model = cls.__new__(cls)
        model._pretrained = True
        model._init_on(
            adata, setup, {**kwargs, "linear_classifier": bool(linear_classifier)}, random_state=random_state
        )
        state = scvi_model.module.state_dict()
        missing, unexpected = model.module.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(("classifier.", "u_encoder.", "z_decoder.")) for k in missing):
            msg = f"scVI weights do not fit the scANVI module (missing {missing[:5]}, unexpected {unexpected[:5]})."
            raise ValueError(msg)
        return model

    def __repr__(self) -> str:
        k = self.module_kwargs
        return (
            f"SCANVI: {len(self.setup.genes)} genes, {self.setup.n_batch} batches, "
            f"{self.setup.n_labels} labels ({self.setup.labels_key!r}, unlabelled = {self.setup.unlabeled_category!r}), "
            f"n_latent={k['n_latent']}, n_hidden={k['n_hidden']}, n_layers={k['n_layers']}, "
            f"{k['gene_likelihood']} likelihood; trained: {self.is_trained}"
        )

    # -- training ------------------------------------------------------------------------------
    def train(self, max_epochs: int | None = None, *, classification_ratio: float = 50.0, **kwargs) -> None:
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
        **kwargs
            Every other argument of :meth:`SCVI.train`.
        """
        if not classification_ratio >= 0:
            msg = f"classification_ratio must be >= 0, got {classification_ratio}."
            raise ValueError(msg)
        super().train(max_epochs, loop_settings={"classification_ratio": float(classification_ratio)}, **kwargs)

    def _default_epochs(self, n_obs: int) -> int:
        heuristic = super()._default_epochs(n_obs)
        return min(10, max(2, round(heuristic / 3))) if getattr(self, "_pretrained", False) else heuristic

    def _labelled(self, bound: BoundData) -> np.ndarray:
        return bound.source.obs["labels"] < self.setup.n_labels

    def _split(self, bound: BoundData, train_size: float, random_state: int | None) -> tuple[np.ndarray, np.ndarray]:
        labelled = self._labelled(bound)  # labelled and unlabelled cells are split separately
        return split_groups([np.flatnonzero(labelled), np.flatnonzero(~labelled)], train_size, random_state)

    def _loop_inputs(self, bound: BoundData, train_idx: np.ndarray) -> dict[str, Any]:
        return {"labelled_idx": train_idx[self._labelled(bound)[train_idx]]}

    # -- prediction ------------------------------------------------------------------------------
    def predict(
        self,
        adata: AnnData | None = None,
        indices=None,
        soft: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predicted cell types, from the classifier at the posterior mean of z.

        Returns
        -------
        ``soft=False``: an array of label names, one per cell. ``soft=True``: a DataFrame of
        class probabilities (rows: cells, indexed by ``obs_names``; columns: the known labels).
        """
        bound, idx = self._select(adata, indices)
        probs = self._label_probabilities(bound, idx, batch_size)
        labels = np.asarray(self.setup.label_categories, dtype=object)
        if not soft:
            return labels[probs.argmax(axis=1)]
        target = self.adata if adata is None else adata
        return pd.DataFrame(probs, index=target.obs_names[idx], columns=pd.Index(labels))

    def _calls(self) -> tuple[pd.Categorical, np.ndarray]:
        """For the model's own cells: predicted labels (categorical over the known labels) and
        the probability of each call."""
        bound, idx = self._select(None, None)
        probs = self._label_probabilities(bound, idx)
        names = np.asarray(self.setup.label_categories, dtype=object)
        return pd.Categorical(names[probs.argmax(1)], categories=names), probs.max(1)

    def _label_probabilities(self, bound: BoundData, idx: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        out = np.empty((len(idx), self.setup.n_labels), dtype=np.float32)
        with self._inference():
            for rows, t in self._minibatches(bound, idx, batch_size, encoder_only=True):
                out[rows] = _np(torch.softmax(self.module.classify(t), dim=-1))
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
    known = [c for c in _categories(adata, labels_key, "labels_key") if c != unlabeled]
    if len(known) < 2:
        msg = f"obs[{labels_key!r}] has {len(known)} known label(s) besides {unlabeled!r}; scANVI needs at least 2."
        raise ValueError(msg)
    return dataclasses.replace(setup, labels_key=labels_key, label_categories=known, unlabeled_category=unlabeled)


def _check_scanvi_kwargs(k: dict[str, Any]) -> None:
    _check_module_kwargs(k)
    if k["dispersion"] == "gene-label":
        msg = "scANVI does not support dispersion='gene-label' (unlabelled cells have no label); use 'gene' or 'gene-batch'."
        raise ValueError(msg)
