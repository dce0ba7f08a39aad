"""scArches' ``scPoli`` over our :class:`~scanpy_scvi.SCPOLI`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ... import model as _ours
from ...nn import to_numpy
from . import _common as common

if TYPE_CHECKING:
    from anndata import AnnData

#: scArches' scPoli trainer keywords (``trainers/scpoli/trainer.py``) beyond the ``Trainer``'s
SCPOLI_TRAINER = {"clustering": None, "clustering_res": 2, "n_clusters": None, "unlabeled_weight": 0,
                  "p_prototype_loss": 2}  # fmt: skip
#: scArches' constructor arguments that carry a reloaded or mapped model's state
RELOAD_STATE = ("obs_metadata", "conditions_combined", "cell_types", "prototypes_labeled", "prototypes_unlabeled")


class SCPOLI(common.DoorMethods, _ours.SCPOLI, register=False):
    """scArches' ``scPoli`` (also importable under that name): our :class:`~scanpy_scvi.SCPOLI`
    under scArches' names and defaults. Unlike scArches, the AnnData is not modified (scArches
    writes ``obs['conditions_combined']``).

    Parameters
    ----------
    adata
        Raw counts in ``X``, dense or sparse.
    share_metadata
        :meth:`get_conditional_embeddings` gives each condition the ``obs`` columns constant
        within it (``False``: none).
    condition_keys
        ``obs`` column(s) of the conditions, each with its own embedding; the first also sets the
        dispersions (scArches: the combination of all keys).
    conditions
        Per condition key, the conditions in the order of their codes (a dict; a list for one
        key); default the values in ``adata``, as :class:`TRVAE
        <scanpy_scvi.compat.scarches.models.TRVAE>`'s ``conditions``.
    inject_condition
        Where the embeddings enter: ``['encoder', 'decoder']`` (default), ``['encoder']`` or ``['decoder']``.
    cell_type_keys, unknown_ct_names, labeled_indices
        As ours (one cell-type key).
    hidden_layer_sizes, latent_dim, embedding_dims, embedding_max_norm, dr_rate
        Ours (``latent_dim``: ``n_latent``; ``dr_rate``: ``dropout_rate``; one embedding size).
    use_mmd, mmd_on, mmd_boundary, beta, recon_loss, use_bn, use_ln
        As :class:`TRVAE <scanpy_scvi.compat.scarches.models.TRVAE>`'s.
    obs_metadata, conditions_combined, cell_types, prototypes_labeled, prototypes_unlabeled
        ``None`` only: scArches passes them when it reloads or maps a model; here the model file
        and :meth:`load_query_data` keep that state.
    """

    share_metadata = True

    def __init__(
        self,
        adata: AnnData,
        *,
        share_metadata: bool = True,
        obs_metadata=None,
        condition_keys: str | Sequence[str] | None = None,
        conditions: Mapping[str, Sequence] | Sequence | None = None,
        conditions_combined=None,
        inject_condition: Sequence[str] = ("encoder", "decoder"),
        cell_type_keys: str | Sequence[str] | None = None,
        cell_types=None,
        unknown_ct_names: Sequence[str] | None = None,
        labeled_indices=None,
        prototypes_labeled=None,
        prototypes_unlabeled=None,
        hidden_layer_sizes: Sequence[int] | None = None,
        latent_dim: int = 10,
        embedding_dims: int | Sequence[int] = 10,
        embedding_max_norm: float = 1.0,
        dr_rate: float = 0.05,
        use_mmd: bool = False,
        mmd_on: str = "z",
        mmd_boundary: int | None = None,
        recon_loss: str = "nb",
        beta: float = 1,
        use_bn: bool = False,
        use_ln: bool = True,
    ):
        state = {"obs_metadata": obs_metadata, "conditions_combined": conditions_combined, "cell_types": cell_types,
                 "prototypes_labeled": prototypes_labeled, "prototypes_unlabeled": prototypes_unlabeled}  # fmt: skip
        for name in RELOAD_STATE:
            common.must_be(name, state[name], None, "scArches passes it when it reloads or maps a model; here the "
                           "model file (load) and load_query_data keep that state.")  # fmt: skip
        keys = [condition_keys] if isinstance(condition_keys, str) else list(condition_keys or [])
        settings = {
            "hidden_layer_sizes": None if hidden_layer_sizes is None else tuple(hidden_layer_sizes),
            "n_latent": latent_dim, "embedding_dims": embedding_size(embedding_dims, keys),
            "embedding_max_norm": embedding_max_norm, "dropout_rate": dr_rate, "use_mmd": use_mmd, "mmd_on": mmd_on,
            "mmd_boundary": mmd_boundary, "beta": beta, "inject_condition": injection(inject_condition),
            "gene_likelihood": common.recon_likelihood(recon_loss, ("nb", "zinb", "mse"), "scPoli"),
            **common.norm_settings(use_bn, use_ln),
        }  # fmt: skip
        source = common.with_categories(adata, condition_orders(adata, keys, conditions, mmd_boundary))
        super().__init__(source, condition_keys=keys or None, cell_type_keys=cell_type_keys,
                         unknown_ct_names=unknown_ct_names, labeled_indices=labeled_indices, **settings)  # fmt: skip
        if source is not adata:
            self.attach(adata, bound=self._bound)
        self.share_metadata = bool(share_metadata)

    # -- scArches' attributes ------------------------------------------------------------------
    @property
    def condition_keys_(self) -> list[str]:
        return condition_keys(self)

    @property
    def conditions_(self) -> dict[str, list[str]]:
        """Per condition key, its conditions in the order of their codes (and embedding rows)."""
        return conditions_of(self)

    @property
    def cell_type_keys_(self) -> list[str] | None:
        return [self.setup.labels_key] if self.setup.labels_key else None

    # -- training ------------------------------------------------------------------------------
    def train(
        self,
        n_epochs: int | None = 100,
        pretraining_epochs: int | None = None,
        eta: float = 1,
        lr: float = 1e-3,
        eps: float = 0.01,
        alpha_epoch_anneal: float | None = 1e2,
        reload_best: bool | None = None,
        prototype_training: bool = True,
        unlabeled_prototype_training: bool = True,
        **kwargs,
    ) -> None:
        """Train with scArches' scPoli trainer names and defaults: ``pretraining_epochs``
        (``floor(0.9 * n_epochs)``), ``eta``, ``alpha_epoch_anneal`` (100), the ``Trainer``
        keywords of :meth:`TRVAE.train <scanpy_scvi.compat.scarches.models.TRVAE.train>`
        (``use_stratified_sampling`` off) and ``n_clusters`` (unlabelled prototypes, by k-means);
        see :doc:`/compat-scarches`. ``reload_best``: under early stopping the best epoch's
        weights are always restored (scArches' scPoli keeps the last by default).
        ``prototype_training=False`` trains without the prototype loss (the prototypes are still
        computed at the end, so :meth:`classify` works); ``unlabeled_prototype_training`` changes
        nothing here (the unlabelled prototypes are clustered once, after training)."""
        extra = {**SCPOLI_TRAINER, **{k: kwargs.pop(k) for k in list(kwargs) if k in SCPOLI_TRAINER}}
        if extra["clustering"] not in (None, "kmeans"):
            msg = (
                f"clustering={extra['clustering']!r}: the unlabelled prototypes here are k-means centroids of the "
                "unlabelled cells' latent space (clustering='kmeans', n_clusters=...); Leiden is not implemented."
            )
            raise ValueError(msg)
        common.must_be("clustering_res", extra["clustering_res"], 2, "Leiden clustering is not implemented here; "
                       "set the number of unlabelled prototypes with n_clusters.")  # fmt: skip
        common.must_be("unlabeled_weight", extra["unlabeled_weight"], 0, "the loss here has no unlabelled-prototype "
                       "term.")  # fmt: skip
        common.must_be("p_prototype_loss", extra["p_prototype_loss"], 2, "prototype distances here are Euclidean.")
        given = dict(kwargs, reload_best=reload_best)
        if "n_epochs_kl_warmup" not in kwargs:
            given["alpha_epoch_anneal"] = alpha_epoch_anneal
        elif alpha_epoch_anneal != 1e2:
            msg = "alpha_epoch_anneal (scArches) and n_epochs_kl_warmup (scanpy-scvi) are the same setting; pass one."
            raise TypeError(msg)
        epochs = n_epochs if n_epochs is not None else self.default_max_epochs(self.bind().n_obs)
        args = common.train_arguments(self, epochs, lr, eps, given, {"use_stratified_sampling": False})
        if not prototype_training:
            pretraining_epochs = epochs
        if extra["n_clusters"] is not None:
            self.architecture = self.architecture.replace(n_unlabeled_prototypes=int(extra["n_clusters"]))
            self.module.architecture = self.architecture
        super().train(pretraining_epochs=pretraining_epochs, eta=eta, **args)

    # -- cells -----------------------------------------------------------------------------------
    def get_latent(self, adata: AnnData, mean: bool = False) -> np.ndarray:
        """scArches' ``get_latent``: one draw of z per cell (default, as scArches) or the
        posterior mean (``mean=True``: :meth:`get_latent_representation`)."""
        return common.latent(self, adata, mean=mean, mean_var=False)

    def get_recon_loss(
        self, adata: AnnData, batch_size: int = 128, condition_encoders=None, conditions_combined_encoder=None
    ) -> float:
        """Mean reconstruction loss per cell of ``adata`` (one posterior draw each;
        :meth:`get_reconstruction_error`)."""
        for name, value in (("condition_encoders", condition_encoders),
                            ("conditions_combined_encoder", conditions_combined_encoder)):  # fmt: skip
            common.must_be(name, value, None, "conditions are read from adata.obs; relabel cells there to decode "
                           "them as another condition.")  # fmt: skip
        return float(self.get_reconstruction_error(adata, batch_size=batch_size)["reconstruction_loss"])

    # -- prototypes ------------------------------------------------------------------------------
    def classify(
        self,
        adata: AnnData | np.ndarray | None = None,
        prototype: bool = False,
        p: float = 2,
        get_prob: bool = False,
        log_distance: bool = True,
        scale_uncertainties: bool = False,
    ):
        """scArches' ``classify``: ``{cell_type_key: {'preds', 'uncert', 'weighted_distances'}}``.

        ``preds``: the nearest prototype's cell type; ``uncert``: the distance to it (scArches'
        ``log_distance`` has no effect there and none here), or with ``get_prob`` the largest of
        the softmax over minus the distances (``weighted_distances``: those probabilities, else the
        distances to every prototype); ``scale_uncertainties``: robust-scaled, then min-max to
        [0, 1]. Cells are placed at their posterior mean (scArches: one draw, so its calls vary
        from call to call). ``prototype=True``: ``adata`` holds latent points to classify.
        Without ``adata`` (as :func:`~scanpy_scvi.tl.map_query` calls it) this is
        :meth:`SCPOLI.classify <scanpy_scvi.SCPOLI.classify>` of the model's cells (a DataFrame).
        """
        common.must_be("p", p, 2, "prototype distances here are Euclidean.")
        if adata is None and not prototype:
            if get_prob or scale_uncertainties:
                msg = "Pass the cells to classify (adata)."
                raise ValueError(msg)
            return super().classify()
        self._require_prototypes()
        z = np.asarray(adata, dtype=np.float32) if prototype else self.get_latent_representation(adata)
        with torch.no_grad():
            d = to_numpy(self.module.prototype_distances(torch.as_tensor(z, device=self.device)))
        if get_prob:
            weighted = to_numpy(torch.softmax(-torch.as_tensor(d), dim=-1))
            best, uncert = weighted.argmax(1), weighted.max(1)
        else:
            weighted, best, uncert = d, d.argmin(1), d.min(1)
        if scale_uncertainties:
            from sklearn.preprocessing import MinMaxScaler, RobustScaler

            uncert = RobustScaler().fit_transform(uncert.reshape(-1, 1))
            uncert = MinMaxScaler(feature_range=(0, 1)).fit_transform(uncert).reshape(-1)
        names = np.asarray(self.setup.label_categories)
        return {self.setup.labels_key: {"preds": names[best], "uncert": uncert, "weighted_distances": weighted}}

    def get_prototypes_info(self, prototype_set: str = "labeled") -> AnnData:
        """The prototypes as an AnnData: ``X`` their latent positions, ``obs['batch']`` the set's
        name, ``obs[cell_type_key]`` their cell type (unlabelled: their position; scArches 0.6.1
        gives every prototype its position), ``_pred`` and ``_uncert`` as :meth:`classify` gives
        them."""
        import anndata as ad

        self._require_prototypes()
        if prototype_set == "labeled":
            points, name, truth = self.module.prototypes, "prototype-Set Labeled", list(self.setup.label_categories)
        elif prototype_set == "unlabeled":
            points, name = self.module.unlabeled_prototypes, "prototype-Set Unlabeled"
            truth = [str(i) for i in range(len(points))]
        else:
            msg = f"prototype_set={prototype_set!r}: 'labeled' or 'unlabeled'."
            raise ValueError(msg)
        points = to_numpy(points).astype(np.float32)
        info = ad.AnnData(points)
        info.obs["batch"] = name
        key = self.setup.labels_key
        calls = self.classify(points, prototype=True)[key]
        info.obs[key] = truth
        info.obs[f"{key}_pred"] = calls["preds"]
        info.obs[f"{key}_uncert"] = calls["uncert"]
        return info

    def add_new_cell_type(self, cell_type_name: str, obs_key: str, prototypes: Sequence[int], x=None, c=None) -> None:
        """Add a cell type as a new prototype, the mean of the unlabelled ``prototypes``
        (:meth:`SCPOLI.add_new_cell_type <scanpy_scvi.SCPOLI.add_new_cell_type>`); ``obs_key``:
        the model's cell-type key. ``x`` / ``c`` fed scArches' prototype covariance, which this
        model does not keep: ``None`` only."""
        if obs_key != self.setup.labels_key:
            msg = f"obs_key={obs_key!r}: the model's cell types are in {self.setup.labels_key!r}."
            raise ValueError(msg)
        for name, value in (("x", x), ("c", c)):
            common.must_be(name, value, None, "the new prototype is the mean of the chosen unlabelled prototypes; "
                           "scArches uses x and c only for a covariance this model does not keep.")  # fmt: skip
        super().add_new_cell_type(cell_type_name, prototypes)

    def get_conditional_embeddings(self, key: str | None = None):
        """The condition embeddings as an AnnData per condition key (scArches: one AnnData for one
        key, else a dict by key; ``key``: that key's); ``obs`` holds each condition's metadata
        unless ``share_metadata=False``."""
        keys = [key] if key is not None else self.condition_keys_
        import anndata as ad

        out = {}
        for k in keys:
            emb = super().get_conditional_embeddings(k)
            out[k] = emb if self.share_metadata else ad.AnnData(emb.X, obs=pd.DataFrame(index=emb.obs_names))
        return out[keys[0]] if len(keys) == 1 else out

    # -- surgery -----------------------------------------------------------------------------------
    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model,
        labeled_indices=None,
        unknown_ct_names: Sequence[str] | None = None,
        freeze: bool = True,
        freeze_expression: bool = True,
        remove_dropout: bool = True,
        return_new_conditions: bool = False,
        map_location=None,
    ):
        """scArches' surgery (see :meth:`TRVAE.load_query_data
        <scanpy_scvi.compat.scarches.models.TRVAE.load_query_data>`): the query's new conditions
        get new embedding rows (started at the reference rows' mean; only they and their
        dispersions learn).

        Parameters
        ----------
        labeled_indices
            Query cells whose ``cell_type_keys`` labels the query model may use (default none;
            scArches 0.6.1 fails without it); their cell types the reference lacks become new
            prototypes.
        unknown_ct_names
            Cell types that count as unlabelled among those cells.
        return_new_conditions
            Also return, per condition key, the query's new conditions.
        """
        reference = common.reference_of(cls, reference_model, map_location)
        labelled = labelled_cells(adata, reference.setup.labels_key, labeled_indices, unknown_ct_names)
        options = {} if labelled is None else {"labeled_indices": labelled}
        model = common.surgery(
            cls, adata, reference, freeze=freeze, freeze_expression=freeze_expression, remove_dropout=remove_dropout,
            orders=dict.fromkeys(condition_keys(reference)), **options,
        )  # fmt: skip
        if not return_new_conditions:
            return model
        known = conditions_of(reference)
        new = {k: [c for c in cats if c not in known[k]] for k, cats in model.conditions_.items()}
        return model, new

    @classmethod
    def shot_surgery(
        cls,
        adata: AnnData,
        reference_model,
        labeled_indices=None,
        unknown_ct_names: Sequence[str] | None = None,
        train_epochs: int = 0,
        batch_size: int = 128,
        subsample: float = 1.0,
        force_cuda: bool = True,
        *,
        random_state: int | None = 0,
        **kwargs,
    ):
        """scArches' one-shot surgery: each new condition of the query starts as its nearest
        reference condition, the one whose embedding and dispersions decode its cells with the
        lowest reconstruction loss (:meth:`get_recon_loss` of the cells relabelled as it, from
        posterior draws seeded with ``random_state``; a ``subsample`` share of the cells, drawn
        with it too). Then, with ``train_epochs``,
        the query model trains (``kwargs``: :meth:`train`'s).

        Returns
        -------
        (the query model, {new condition: reference condition}).
        """
        if not 0 < subsample <= 1:
            msg = f"subsample must be in (0, 1], got {subsample}."
            raise ValueError(msg)
        model, new = cls.load_query_data(adata, reference_model, labeled_indices, unknown_ct_names,
                                         freeze=train_epochs > 0, return_new_conditions=True)  # fmt: skip
        if len(model.condition_keys_) != 1:
            msg = "shot_surgery takes a model with one condition key."
            raise ValueError(msg)
        if force_cuda and torch.cuda.is_available():
            model.to_device("cuda")
        key = model.condition_keys_[0]
        known = [c for c in model.conditions_[key] if c not in new[key]]
        rng = np.random.default_rng(random_state)
        mapping = {}
        for cond in new[key]:
            rows = np.flatnonzero(adata.obs[key].astype(str).to_numpy() == cond)
            if subsample < 1:
                rows = np.sort(rng.choice(rows, max(1, int(subsample * len(rows))), replace=False))
            losses = {}
            for old in known:
                with model.seeded(random_state):  # the same posterior draws for every candidate
                    losses[old] = model.get_recon_loss(relabelled(adata, rows, key, old), batch_size)
            mapping[cond] = min(losses, key=losses.get)
        for cond, old in mapping.items():
            model.copy_condition(old, cond)
        if train_epochs > 0:
            model.train(n_epochs=train_epochs, **kwargs)
        return model, mapping


def condition_keys(model: _ours.SCPOLI) -> list[str]:
    """The model's condition keys (scArches' ``condition_keys_``)."""
    return [model.setup.batch_key, *model.setup.categorical_covariate_keys] if model.setup.batch_key else []


def conditions_of(model: _ours.SCPOLI) -> dict[str, list[str]]:
    """Per condition key, its conditions in code order (scArches' ``conditions_``)."""
    cats = [model.setup.batch_categories, *model.setup.categorical_covariate_categories]
    return {k: list(c) for k, c in zip(condition_keys(model), cats, strict=False)}


def embedding_size(embedding_dims, keys: Sequence[str]) -> int:
    """scArches' ``embedding_dims`` (one, or one per condition key) as our single size."""
    if isinstance(embedding_dims, (int, np.integer)):
        return int(embedding_dims)
    sizes = list(embedding_dims)
    if len(sizes) != len(keys) or len(set(sizes)) != 1:
        msg = f"embedding_dims={sizes}: one size, shared by the condition keys ({keys}), is supported here."
        raise ValueError(msg)
    return int(sizes[0])


def injection(inject_condition) -> str:
    """scArches' ``inject_condition`` list as ours (``'both'``, ``'encoder'``, ``'decoder'``)."""
    parts = {inject_condition} if isinstance(inject_condition, str) else set(inject_condition)
    for name, parts_of in (("both", {"encoder", "decoder"}), ("encoder", {"encoder"}), ("decoder", {"decoder"})):
        if parts == parts_of:
            return name
    msg = f"inject_condition={inject_condition!r}: ['encoder', 'decoder'], ['encoder'] or ['decoder']."
    raise ValueError(msg)


def condition_orders(adata: AnnData, keys: list[str], conditions, mmd_boundary) -> dict[str, list[str] | None]:
    """Per condition key, the order of its conditions (see :func:`._trvae.condition_order`)."""
    if conditions is not None and not isinstance(conditions, Mapping):
        if len(keys) != 1:
            msg = "conditions: with several condition keys, pass a dict of key -> conditions."
            raise ValueError(msg)
        conditions = {keys[0]: conditions}
    conditions = dict(conditions or {})
    unknown = sorted(set(conditions) - set(keys))
    if unknown:
        msg = f"conditions has keys that are not condition_keys: {unknown}."
        raise ValueError(msg)
    orders = {}
    for i, key in enumerate(keys):
        if key in conditions:
            orders[key] = common.checked_order(adata, key, conditions[key])
        else:  # the MMD boundary counts the first key's conditions in scArches' order of appearance
            orders[key] = common.present_values(adata, key) if mmd_boundary is not None and i == 0 else None
    return orders


def labelled_cells(adata: AnnData, labels_key: str | None, labeled_indices, unknown_ct_names) -> np.ndarray | None:
    """``labeled_indices`` as a boolean mask, without the cells of ``unknown_ct_names``."""
    if labeled_indices is None:
        return None
    values = np.asarray(labeled_indices)
    if values.dtype == bool:
        if values.shape != (adata.n_obs,):
            msg = f"A boolean labeled_indices must have one value per cell ({adata.n_obs}), got {values.shape}."
            raise ValueError(msg)
        mask = values.copy()
    else:
        mask = np.zeros(adata.n_obs, dtype=bool)
        if values.dtype.kind in "USO":
            positions = adata.obs_names.get_indexer(values.astype(str))
        else:
            positions = values.astype(np.int64)
        if values.size and (positions.min() < 0 or positions.max() >= adata.n_obs):
            msg = "labeled_indices must be cell positions, cell names or a boolean mask of adata's cells."
            raise ValueError(msg)
        mask[positions] = True
    if unknown_ct_names and labels_key is not None and labels_key in adata.obs.columns:
        mask &= ~adata.obs[labels_key].astype(str).isin([str(u) for u in unknown_ct_names]).to_numpy()
    return mask


def relabelled(adata: AnnData, rows: np.ndarray, key: str, condition: str) -> AnnData:
    """The cells ``rows`` of ``adata`` with ``obs[key]`` set to ``condition`` (a stand-in sharing their counts)."""
    import anndata as ad

    obs = adata.obs.iloc[rows].copy()
    obs[key] = condition
    return ad.AnnData(X=adata.X[rows], obs=obs, var=pd.DataFrame(index=adata.var_names))
