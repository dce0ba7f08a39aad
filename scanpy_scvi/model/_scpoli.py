"""SCPOLI: the scPoli model object (condition embeddings, cell-type prototypes, label transfer)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .._settings import keyword_settings, split_settings
from ..data import BoundData, DataSetup, SetupArguments, categories
from ..nn import EmbeddingVAE, SCPOLIArchitecture, to_numpy
from ..train import Terms, TrainContext
from ._selection import cell_positions
from ._trvae import TRVAE, MMDObjective, several_conditions

if TYPE_CHECKING:
    from anndata import AnnData
    from torch import nn

    from ._base import BaseModel


@keyword_settings(SetupArguments, SCPOLIArchitecture)
class SCPOLI(TRVAE):
    """scPoli (De Donno et al. 2023), as in scArches: a conditional VAE whose conditions (samples,
    studies, ...) are learned embeddings, with one prototype per cell type in the latent space.

    Cells are classified by their nearest prototype; the distance to it is their uncertainty
    (novel cell types lie far from every prototype). The condition embeddings place the samples
    themselves in a space of their own (:meth:`get_conditional_embeddings`). Every method of
    :class:`TRVAE` works the same way.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` or ``layer``.
    condition_keys
        ``obs`` column(s) of the conditions, each with its own embedding (scArches'
        ``condition_keys``); the first is the model's ``batch_key``, the others its
        ``categorical_covariate_keys``.
    cell_type_keys
        ``obs`` column of cell types (one; scArches' ``cell_type_keys``). Without it the model
        trains without prototypes.
    unknown_ct_names
        Values of ``cell_type_keys`` that mean "not labelled" (e.g. ``['unknown']``).
    labeled_indices
        Cells whose labels the model may use (positions, names or a boolean mask; default all):
        the others count as unlabelled.
    genes
        Genes (``var_names``) to model, in order. Default: all genes of ``adata``.
    {SetupArguments}
    {SCPOLIArchitecture}
    random_state
        Seed of the weight initialisation.
    """

    name = "scPoli"
    uns_key = "scpoli"
    module_class = EmbeddingVAE
    balanced_sampling = False
    pretraining_epochs: int | None = None  # set by train()
    eta = 1.0

    def __init__(
        self,
        adata: AnnData,
        *,
        condition_keys: str | Sequence[str] | None = None,
        cell_type_keys: str | Sequence[str] | None = None,
        unknown_ct_names: Sequence[str] | None = None,
        labeled_indices=None,
        genes: Sequence[str] | None = None,
        random_state: int | None = 0,
        **settings,
    ):
        setup_args, architecture = split_settings(settings, SetupArguments)
        keys = [condition_keys] if isinstance(condition_keys, str) else list(condition_keys or [])
        if keys:
            if setup_args.get("batch_key") not in (None, keys[0]) or setup_args.get("categorical_covariate_keys"):
                msg = "Pass the conditions as condition_keys, or as batch_key / categorical_covariate_keys, not both."
                raise ValueError(msg)
            setup_args.update(batch_key=keys[0], categorical_covariate_keys=keys[1:])
        genes = list(adata.var_names if genes is None else genes)
        architecture = SCPOLIArchitecture(**architecture).for_genes(len(genes))
        if architecture.gene_likelihood == "mse":
            setup_args["check_counts"] = False
        setup = DataSetup.from_adata(adata, genes=genes, **setup_args)
        self.labeled_mask = labelled_mask(adata, labeled_indices)
        setup = with_cell_types(setup, adata, cell_type_keys, unknown_ct_names, self.labeled_mask)
        self._assemble(setup, architecture, adata=adata, random_state=random_state)

    n_reference_prototypes = 0  # a query model keeps the reference's prototypes

    def attach(self, adata: AnnData, *, bound: BoundData | None = None) -> None:
        super().attach(adata, bound=bound)
        self._mask_unlabelled()

    def _mask_unlabelled(self) -> None:
        """Cells outside ``labeled_mask`` get the unlabelled code in the model's bound data."""
        mask = getattr(self, "labeled_mask", None)
        if mask is not None and len(mask) == self._bound.n_obs and not mask.all():
            labels = self._bound.source.obs["labels"].copy()  # the model's own copy: the AnnData is not touched
            labels[~mask] = self.setup.n_labels
            self._bound.source.obs["labels"] = labels

    def new_cell_types(self, query: AnnData, labeled_indices) -> list[str]:
        """Cell types of the labelled query cells that this (reference) model does not know."""
        mask = labelled_mask(query, labeled_indices)
        key = self.setup.labels_key
        if mask is None or not mask.any() or key is None:
            return []
        if key not in query.obs.columns:
            msg = f"labeled_indices given, but the query has no obs[{key!r}] (the reference's cell_type_keys)."
            raise KeyError(msg)
        values = query.obs[key].to_numpy()[mask]
        if pd.isna(values).any():
            msg = f"obs[{key!r}] of labelled query cells has missing values; leave those cells out of labeled_indices."
            raise ValueError(msg)
        return sorted({str(v) for v in values} - set(self.setup.label_categories))

    def query_changes(self, query: AnnData, *, labeled_indices=None, **options) -> tuple[dict, dict]:
        """trVAE's; the cell types of the labelled query cells (``labeled_indices``) that this
        reference lacks are added as new prototypes."""
        _, architecture = super().query_changes(query, **options)
        return {
            "label_categories": self.setup.label_categories + self.new_cell_types(query, labeled_indices)
        }, architecture

    def adopt_query(self, query: AnnData, reference: BaseModel, *, labeled_indices=None, **options) -> None:
        """Query cells are unlabelled unless in ``labeled_indices``; the reference's prototypes stay."""
        mask = labelled_mask(query, labeled_indices)
        self.labeled_mask = np.zeros(query.n_obs, dtype=bool) if mask is None else mask
        self.n_reference_prototypes = reference.setup.n_labels
        self._mask_unlabelled()

    def __repr__(self) -> str:
        a = self.architecture
        return (
            f"SCPOLI: {len(self.setup.genes)} genes, conditions {[self.setup.batch_key, *self.setup.categorical_covariate_keys]}, "
            f"{self.setup.n_labels if self.setup.labels_key else 0} cell types ({self.setup.labels_key!r}), "
            f"hidden {list(a.hidden_layer_sizes)}, n_latent={a.n_latent}, embeddings {a.embedding_dims}; "
            f"trained: {self.is_trained}"
        )

    # -- training ------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        pretraining_epochs: int | None = None,
        eta: float = 1.0,
        n_epochs_kl_warmup: int | None = 100,
        early_stopping: bool = True,
        reduce_lr_on_plateau: bool = True,
        balanced_sampling: bool = False,
        **kwargs,
    ) -> None:
        """Train with scArches' scPoli defaults: the trVAE loss, plus ``eta`` x the prototype loss
        once ``pretraining_epochs`` are done.

        Parameters
        ----------
        max_epochs
            ``None``: ``min(100, round(20000 / n_cells * 400))`` (scArches: 100).
        pretraining_epochs
            Epochs before prototypes exist (default ``floor(0.9 * max_epochs)``; all epochs
            without cell types). Then, at every epoch start, each cell type's prototype is the
            mean latent of its labelled training cells, and each labelled cell is pulled towards
            its prototype.
        eta
            Weight of the prototype loss (scArches' default 1).
        n_epochs_kl_warmup
            Epochs of linear KL warm-up (scArches' ``alpha_epoch_anneal``, default 100).
        early_stopping, reduce_lr_on_plateau
            As :meth:`TRVAE.train`, watching the ELBO only from the end of pretraining on
            (scArches), so that the restored weights have been trained with the prototypes.
        balanced_sampling
            Off by default for scPoli (scArches' default).
        **kwargs
            Every other argument of :meth:`TRVAE.train`.
        """
        bound = self.bind()
        epochs = max_epochs if max_epochs is not None else self.default_max_epochs(bound.n_obs)
        if pretraining_epochs is None:
            pretraining_epochs = int(np.floor(0.9 * epochs)) if self.setup.labels_key else epochs
        if not 0 <= pretraining_epochs <= epochs:
            msg = f"pretraining_epochs must be in [0, max_epochs={epochs}], got {pretraining_epochs}."
            raise ValueError(msg)
        if not eta >= 0:
            msg = f"eta must be >= 0, got {eta}."
            raise ValueError(msg)
        self.pretraining_epochs, self.eta = int(pretraining_epochs), float(eta)
        super().train(
            epochs, n_epochs_kl_warmup=n_epochs_kl_warmup, early_stopping=early_stopping,
            reduce_lr_on_plateau=reduce_lr_on_plateau, balanced_sampling=balanced_sampling, **kwargs,
        )  # fmt: skip
        self.train_config.update(pretraining_epochs=self.pretraining_epochs, eta=self.eta)
        self.update_prototypes(bound, self.train_indices)  # from the final (or restored best) weights

    def default_max_epochs(self, n_obs: int) -> int:
        """scArches' 100 epochs, fewer above 80k cells (scvi-tools' heuristic)."""
        return min(100, super().default_max_epochs(n_obs))

    def objective(self, bound: BoundData, train_idx: np.ndarray) -> PrototypeObjective:
        return PrototypeObjective(self, bound, train_idx)

    def update_prototypes(self, bound: BoundData, idx: np.ndarray, *, unlabeled: bool = True) -> None:
        """Cell-type prototypes = mean latent (posterior means) of the labelled cells among ``idx``
        (a type without such cells, or a reference's type in a query model, keeps its prototype);
        with ``unlabeled``, the unlabelled prototypes = k-means centroids of the unlabelled cells'
        latent."""
        if not self.setup.labels_key or len(idx) == 0:
            return
        with self.seeded(0):
            z = torch.as_tensor(self.latent(bound, idx), device=self.device)
        labels = torch.as_tensor(bound.source.obs["labels"][idx], device=self.device)
        n = self.setup.n_labels
        labelled = labels < n
        counts = torch.bincount(labels[labelled], minlength=n)
        sums = torch.zeros(n, z.shape[1], device=self.device).index_add_(0, labels[labelled], z[labelled])
        has = (counts > 0) & (torch.arange(n, device=self.device) >= self.n_reference_prototypes)
        with torch.no_grad():
            self.module.prototypes[has] = sums[has] / counts[has].unsqueeze(1).to(z.dtype)
        if unlabeled:
            self._cluster_unlabeled(to_numpy(z[~labelled]))

    def _cluster_unlabeled(self, z: np.ndarray) -> None:
        from sklearn.cluster import KMeans

        k = self.architecture.n_unlabeled_prototypes or 2 * self.setup.n_labels
        centres = np.zeros((0, z.shape[1]), dtype=np.float32)
        if len(z) >= k:
            centres = KMeans(n_clusters=k, n_init=3, random_state=0).fit(z).cluster_centers_.astype(np.float32)
        self.module.unlabeled_prototypes = torch.as_tensor(centres, device=self.device)
        self.architecture = self.architecture.replace(n_unlabeled_prototypes=len(centres) or None)
        self.module.architecture = self.architecture

    # -- label transfer ------------------------------------------------------------------------------
    def classify(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None) -> pd.DataFrame:
        """Nearest cell-type prototype of each cell in the latent space (posterior means).

        Returns
        -------
        DataFrame indexed by ``obs_names``: ``pred`` (categorical cell type), ``uncertainty`` (the
        Euclidean distance to that prototype: large for cells of a type the model does not
        know), ``probability`` (softmax over minus the distances to all prototypes).
        """
        self._require_prototypes()
        bound, idx = self.select(adata, indices)
        z = torch.as_tensor(self.latent(bound, idx, batch_size=batch_size), device=self.device)
        with torch.no_grad():
            d = self.module.prototype_distances(z)
            prob = torch.softmax(-d, dim=-1)
        best = d.argmin(1).cpu().numpy()
        names = np.asarray(self.setup.label_categories, dtype=object)
        target = self.adata if adata is None else adata
        return pd.DataFrame(
            {
                "pred": pd.Categorical(names[best], categories=names),
                "uncertainty": to_numpy(d.min(1).values),
                "probability": to_numpy(prob.max(1).values),
            },
            index=target.obs_names[idx],
        )

    def predict(self, adata: AnnData | None = None, indices=None, soft: bool = False) -> np.ndarray | pd.DataFrame:
        """Predicted cell types (nearest prototype); ``soft``: softmax over minus the distances to
        every prototype, a DataFrame (cells x cell types)."""
        self._require_prototypes()
        if not soft:
            return self.classify(adata, indices)["pred"].to_numpy()
        bound, idx = self.select(adata, indices)
        z = torch.as_tensor(self.latent(bound, idx), device=self.device)
        with torch.no_grad():
            prob = to_numpy(torch.softmax(-self.module.prototype_distances(z), dim=-1))
        target = self.adata if adata is None else adata
        return pd.DataFrame(prob, index=target.obs_names[idx], columns=pd.Index(self.setup.label_categories))

    def _require_prototypes(self) -> None:
        if not self.setup.labels_key or not self.is_trained:
            msg = "This scPoli model has no prototypes: train it with cell_type_keys= to classify cells."
            raise ValueError(msg)

    def add_new_cell_type(self, name: str, prototypes: Sequence[int]) -> None:
        """Add cell type ``name`` as a new prototype: the mean of the unlabelled prototypes
        ``prototypes`` (positions in ``module.unlabeled_prototypes``, e.g. the clusters of a
        query's high-uncertainty cells). :meth:`classify` then predicts it."""
        if name in self.setup.label_categories:
            msg = f"{name!r} is already a cell type of the model."
            raise ValueError(msg)
        rows = np.asarray(list(prototypes), dtype=np.int64)
        n_unlab = self.module.unlabeled_prototypes.shape[0]
        if rows.size == 0 or rows.min() < 0 or rows.max() >= n_unlab:
            msg = f"prototypes must be positions among the {n_unlab} unlabelled prototypes, got {list(rows)}."
            raise ValueError(msg)
        new = self.module.unlabeled_prototypes[torch.as_tensor(rows, device=self.device)].mean(0, keepdim=True)
        self.module.prototypes = torch.cat([self.module.prototypes, new])
        self.module.n_labels += 1
        self.setup = dataclasses.replace(self.setup, label_categories=[*self.setup.label_categories, name])

    def copy_condition(self, source: str, target: str) -> None:
        """Give condition ``target`` of the first condition key (``batch_key``) the embedding and the
        dispersions of condition ``source`` (scArches' ``shot_surgery`` starts a query's condition
        at its nearest reference condition so)."""
        s, t = self.setup.batch_code(source), self.setup.batch_code(target)
        with torch.no_grad():
            table = self.module.embeddings[0].weight
            table[t] = table[s]
            if self.module.counts:
                self.module.log_theta[:, t] = self.module.log_theta[:, s]

    # -- samples ----------------------------------------------------------------------------------
    def get_conditional_embeddings(self, key: str | None = None) -> AnnData:
        """The embeddings of one condition key as an AnnData: one row per condition (sample),
        ``X`` = its embedding as the networks see it, ``obs`` = the columns of the model's AnnData
        that are constant within the condition (its metadata). ``sc.pp.neighbors`` /
        ``sc.tl.umap`` work on it as on cells.

        Parameters
        ----------
        key
            A condition key (default: the first, ``batch_key``).
        """
        import anndata as ad

        keys = [self.setup.batch_key, *self.setup.categorical_covariate_keys]
        key = keys[0] if key is None else key
        if key not in keys:
            msg = f"{key!r} is not a condition key of the model ({keys})."
            raise ValueError(msg)
        table = keys.index(key)
        names = self.setup.batch_categories if table == 0 else self.setup.categorical_covariate_categories[table - 1]
        X = to_numpy(self.module.condition_embeddings()[table])
        if self.adata is not None and key in self.adata.obs.columns:
            obs = sample_metadata(self.adata.obs, key, names)
        else:
            obs = pd.DataFrame(index=pd.Index(names))
        obs.index = pd.Index([str(n) for n in names])
        return ad.AnnData(X=X.astype(np.float32), obs=obs)


def labelled_mask(adata: AnnData, labeled_indices) -> np.ndarray | None:
    """Boolean mask of the cells whose labels count: ``labeled_indices`` as positions, a boolean
    mask or ``obs_names`` (None: all cells)."""
    if labeled_indices is None:
        return None
    values = np.asarray(labeled_indices)
    if values.dtype.kind in "USO":
        positions = adata.obs_names.get_indexer(values.astype(str))
        if np.any(positions < 0):
            msg = f"labeled_indices names not in adata.obs_names: {list(values[positions < 0][:5])}."
            raise KeyError(msg)
    else:
        positions = cell_positions(values, adata.n_obs)
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[positions] = True
    return mask


def with_cell_types(setup: DataSetup, adata: AnnData, cell_type_keys, unknown_ct_names, mask) -> DataSetup:
    """``setup`` with scPoli's cell types: the known values of ``cell_type_keys`` among the
    labelled cells (``mask``; None: all), minus ``unknown_ct_names``; any other value marks an
    unlabelled cell."""
    keys = [cell_type_keys] if isinstance(cell_type_keys, str) else list(cell_type_keys or [])
    if not keys:
        return setup
    if len(keys) > 1:
        msg = "scPoli here takes one cell_type_keys column; train one model per annotation level."
        raise ValueError(msg)
    unknown = {str(u) for u in (unknown_ct_names or [])}
    values = adata[mask].obs if mask is not None else adata.obs
    known = [c for c in categories(adata, keys[0], "cell_type_keys") if c not in unknown]
    present = set(values[keys[0]].astype(str))
    known = [c for c in known if c in present]
    if not known:
        msg = f"obs[{keys[0]!r}] has no labelled cell type (all are unknown_ct_names or unlabelled cells)."
        raise ValueError(msg)
    return dataclasses.replace(setup, labels_key=keys[0], label_categories=known, unknown_labels_unlabelled=True)


def sample_metadata(obs: pd.DataFrame, key: str, names: list[str]) -> pd.DataFrame:
    """Per value of ``obs[key]``: the columns constant within it (their value), in ``names`` order."""
    groups = obs.groupby(key, observed=True)
    constant = [c for c in obs.columns if c != key and (groups[c].nunique(dropna=False) <= 1).all()]
    meta = groups[constant].first() if constant else pd.DataFrame(index=groups.size().index)
    meta.index = meta.index.astype(str)
    return meta.reindex(names)


class PrototypeObjective(MMDObjective):
    """scPoli's loss: the trVAE loss (MMD when on), plus, after pretraining, ``eta`` x the labelled
    prototype loss of the minibatch; prototypes are recomputed at every later epoch start.
    The history gains ``prototype_loss_*``."""

    capturable = False  # prototypes recomputed at epoch starts; the prototype term starts mid-training

    def __init__(self, model: SCPOLI, bound: BoundData, train_idx: np.ndarray):
        super().__init__(with_mmd=several_conditions(bound, train_idx))
        self.model, self.bound, self.train_idx = model, bound, train_idx
        self.monitor_from = model.pretraining_epochs if model.setup.labels_key else 0  # scArches
        self.active = False

    def begin(self, context: TrainContext) -> None:
        self.active = False

    def epoch_start(self, module: nn.Module, epoch: int) -> None:
        if self.model.setup.labels_key and epoch >= self.model.pretraining_epochs:
            self.model.update_prototypes(self.bound, self.train_idx, unlabeled=False)
            module.train()
            self.active = True

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms:
        out = module.loss(batch, kl_weight=kl_weight, with_mmd=self.with_mmd)
        terms = self.terms(out)
        if self.active:  # the prototype loss of the same draw of z (scArches)
            proto = module.prototype_loss(out["z"], batch["labels"])
            terms.loss = terms.loss + self.model.eta * proto
            n = terms.reconstruction.shape[0]
            terms.extra["prototype_loss"] = (float(proto.detach()) * n, n)
        return terms
