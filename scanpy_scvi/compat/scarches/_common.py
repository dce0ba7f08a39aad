"""What the three scArches doors share: the trainers' argument names, the networks' switches,
stand-in AnnDatas (for ``x``/``c`` matrices and for scArches' order of conditions), files and
surgery."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..._compat import warn
from ...model import BaseModel, query_model

if TYPE_CHECKING:
    from anndata import AnnData

# -- the networks ---------------------------------------------------------------------------------


def norm_settings(use_bn: bool, use_ln: bool) -> dict[str, str]:
    """scArches' ``use_bn`` / ``use_ln`` (batch norm, else layer norm, in every hidden layer) as
    our ``use_batch_norm`` / ``use_layer_norm``."""
    return {"use_batch_norm": "both" if use_bn else "none", "use_layer_norm": "both" if use_ln else "none"}


def recon_likelihood(recon_loss, allowed: Sequence[str], model: str) -> str:
    """scArches' ``recon_loss`` as our ``gene_likelihood`` (the same names)."""
    if recon_loss not in allowed:
        msg = f"recon_loss={recon_loss!r}: {model} here reconstructs with one of {list(allowed)}."
        raise ValueError(msg)
    return recon_loss


def must_be(name: str, value, expected, why: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is ``expected`` (a number or a string:
    equal to it)."""
    same = value is expected or (expected is not None and isinstance(value, (int, float, str)) and value == expected)
    if not same:
        msg = f"{name}={value!r}: {why}"
        raise ValueError(msg)


# -- conditions in scArches' order -----------------------------------------------------------------


def present_values(adata: AnnData, key: str) -> list[str]:
    """The values of ``obs[key]`` in the cells, in order of first appearance (scArches'
    ``unique().tolist()``)."""
    if key not in adata.obs.columns:
        msg = f"{key!r} not found in adata.obs (columns: {list(adata.obs.columns)[:20]})."
        raise KeyError(msg)
    return [str(v) for v in pd.unique(adata.obs[key].dropna().astype(str))]


def checked_order(adata: AnnData, key: str, conditions: Sequence) -> list[str]:
    """scArches' ``conditions`` of ``key``: every value of the cells, no repeats."""
    order = [str(c) for c in conditions]
    if len(set(order)) != len(order):
        msg = f"conditions for {key!r} repeat values: {order}."
        raise ValueError(msg)
    missing = sorted(set(present_values(adata, key)) - set(order))
    if missing:
        msg = f"conditions for {key!r} lack values of adata.obs[{key!r}]: {missing[:10]}."
        raise ValueError(msg)
    return order


def with_categories(
    adata: AnnData, orders: Mapping[str, Sequence[str] | None], *, varm: Mapping[str, np.ndarray] | None = None
) -> AnnData:
    """``adata``, or a stand-in sharing its counts whose ``obs[key]`` have the categories
    ``orders[key]`` (default: the values present, in our order: a categorical column's
    categories, else sorted) and whose ``varm`` has ``varm`` (expiMap's ``mask``).

    scArches knows the conditions present in the cells; categories without cells would be
    conditions of our setup (a query's new conditions would then look known). The stand-in is
    only read to build the setup; the model then binds ``adata``.
    """
    import anndata as ad

    from ...data import categories

    obs, changed = adata.obs, False
    for key, order in orders.items():
        if key is None:
            continue
        present = set(present_values(adata, key))
        ours = categories(adata, key, "condition_keys") if adata.obs[key].notna().all() else sorted(present)
        wanted = list(order) if order is not None else [c for c in ours if c in present]
        if wanted != ours:
            if not changed:
                obs, changed = adata.obs.copy(), True
            obs[key] = pd.Categorical(adata.obs[key].astype(str).where(adata.obs[key].notna()), categories=wanted)
    if not changed and varm is None:
        return adata
    return ad.AnnData(
        X=adata.X, obs=obs, var=pd.DataFrame(index=adata.var_names), varm={**adata.varm, **(varm or {})},
        uns=dict(adata.uns),
    )  # fmt: skip


def matrix_adata(x, obs: Mapping[str, Any], genes: Sequence[str]) -> AnnData:
    """An AnnData of the counts ``x`` (cells x the model's genes, in its order) with ``obs``
    columns (scArches' ``x`` / ``c`` arguments)."""
    import anndata as ad

    x = x if hasattr(x, "tocsr") else np.asarray(x)
    if x.ndim != 2 or x.shape[1] != len(genes):
        msg = f"x must be (cells, {len(genes)} model genes) in the model's gene order, got shape {x.shape}."
        raise ValueError(msg)
    index = pd.Index(np.arange(x.shape[0]).astype(str))
    columns = {}
    for key, values in obs.items():
        values = np.asarray(values)
        if values.shape != (x.shape[0],):
            msg = f"c must give one condition per cell of x ({x.shape[0]}), got shape {values.shape}."
            raise ValueError(msg)
        columns[key] = values.astype(str)
    return ad.AnnData(X=x, obs=pd.DataFrame(columns, index=index), var=pd.DataFrame(index=pd.Index(genes)))


def cells(model: BaseModel, x, c, keys: Sequence[str]) -> AnnData | None:
    """The AnnData that scArches' ``x`` and ``c`` stand for (None: the model's own); ``x`` may
    also be an AnnData."""
    from anndata import AnnData

    if isinstance(x, AnnData):
        if c is not None:
            msg = "c is for a matrix x; an AnnData x carries its conditions in obs."
            raise ValueError(msg)
        return x
    if x is None and c is None:
        return None
    if x is None:
        msg = "c was given without x: pass the cells' counts as x (cells x model genes)."
        raise ValueError(msg)
    if c is None and keys:
        msg = f"x was given without c: pass the cells' conditions ({list(keys)}) as c."
        raise ValueError(msg)
    if c is not None and not keys:
        msg = "c was given, but the model has no conditions (it was built without a condition key)."
        raise ValueError(msg)
    values = {} if c is None else (dict(c) if isinstance(c, Mapping) else {keys[0]: c})
    return matrix_adata(x, values, model.setup.genes)


def latent(model, target: AnnData | None, *, mean: bool, mean_var: bool, **kwargs):
    """scArches' ``get_latent``: a draw of z (default), its mean (``mean``) or its mean and
    variance (``mean_var``)."""
    if mean:
        return model.get_latent_representation(target, **kwargs)
    if mean_var:
        return model.get_latent_representation(target, return_dist=True, **kwargs)
    return model.get_latent_representation(target, give_mean=False, **kwargs)


# -- training --------------------------------------------------------------------------------------

#: scArches' ``Trainer`` keywords and their defaults (``trainers/trvae/trainer.py``)
TRAINER = {
    "batch_size": 128, "alpha_epoch_anneal": None, "alpha_kl": 1.0, "use_early_stopping": True, "reload_best": None,
    "early_stopping_kwargs": None, "alpha_iter_anneal": None, "n_samples": None, "train_frac": 0.9,
    "use_stratified_sampling": True, "weight_decay": 0.04, "clip_value": 0.0, "n_workers": 0, "seed": 2020,
    "monitor": True, "monitor_only_val": True,
}  # fmt: skip
#: scArches' ``EarlyStopping`` arguments and defaults (``utils/monitor.py``)
EARLY_STOPPING = {
    "early_stopping_metric": "val_unweighted_loss", "mode": "min", "threshold": 0.0, "patience": 20,
    "reduce_lr": True, "lr_patience": 13, "lr_factor": 0.1,
}  # fmt: skip
#: the losses scArches' trainers log (prefixed ``epoch_`` / ``val_``), any of which it may watch
LOGGED = {
    "loss", "unweighted_loss", "recon_loss", "kl_loss", "mmd_loss", "hsic_loss", "cvae_loss", "prototype_loss",
    "labeled_loss", "unlabeled_loss",
}  # fmt: skip
#: scArches' trainer name -> ours (a call may use either vocabulary, not both for one setting)
SAME_AS = {
    "seed": "random_state", "monitor": "progress_bar", "train_frac": "train_size",
    "use_stratified_sampling": "balanced_sampling", "alpha_kl": "max_kl_weight",
    "alpha_epoch_anneal": "n_epochs_kl_warmup", "alpha_iter_anneal": "n_steps_kl_warmup",
    "use_early_stopping": "early_stopping",
}  # fmt: skip
EARLY_SAME_AS = ("early_stopping_patience", "early_stopping_min_delta", "reduce_lr_on_plateau", "lr_patience",
                 "lr_factor")  # fmt: skip


def our_train_names(base: type) -> set[str]:
    """Keyword names our ``base.train`` takes, through its chain of ``**kwargs``."""
    names: set[str] = set()
    for klass in base.__mro__:
        if "train" in vars(klass):
            params = inspect.signature(vars(klass)["train"]).parameters.values()
            names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names - {"self", "max_epochs"}


def train_arguments(
    model: BaseModel, n_epochs, lr: float, eps: float, given: dict[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Our ``train`` arguments for a scArches trainer call: ``n_epochs``, ``lr``, ``eps`` and the
    trainer keywords ``given`` (scArches' ``TRAINER`` names with the model's ``defaults``); our own
    ``train`` names pass through, so that our tools (``tl.map_query``) can train a door too."""
    ours = our_train_names(base_of(type(model)))
    foreign = {k: v for k, v in given.items() if k in TRAINER}
    own = {k: v for k, v in given.items() if k in ours and k not in TRAINER}
    unknown = sorted(set(given) - set(foreign) - set(own))
    if unknown:
        msg = f"{type(model).__name__}.train() got an unexpected keyword argument {unknown[0]!r}"
        raise TypeError(msg)
    for name, our in SAME_AS.items():
        if name in foreign and our in own:
            msg = f"{name} (scArches) and {our} (scanpy-scvi) are the same setting; pass one."
            raise TypeError(msg)
    if "early_stopping_kwargs" in foreign and any(k in own for k in EARLY_SAME_AS):
        msg = f"early_stopping_kwargs (scArches) and {[k for k in EARLY_SAME_AS if k in own]} set the same; pass one."
        raise TypeError(msg)
    s = {**TRAINER, **defaults, **foreign}
    must_be("n_samples", s["n_samples"], None, "every epoch here draws as many cells as there are training cells; "
            "subsample the AnnData to train on fewer.")  # fmt: skip
    must_be("clip_value", s["clip_value"], 0.0, "gradient clipping is not implemented here; leave clip_value=0.")
    if not isinstance(s["n_workers"], int) or s["n_workers"] < 0:
        msg = f"n_workers must be a non-negative integer, got {s['n_workers']!r}."
        raise ValueError(msg)
    use_es = bool(s["use_early_stopping"])
    stopping = early_stopping(s["early_stopping_kwargs"], train_frac=s["train_frac"], used=use_es)
    if use_es and s["reload_best"] is False:
        msg = (
            "reload_best=False keeps the last epoch's weights under early stopping; training here always restores "
            "the best epoch's. Pass use_early_stopping=False to train every epoch and keep the last weights."
        )
        raise ValueError(msg)
    anneal, per_step = s["alpha_epoch_anneal"], s["alpha_iter_anneal"]
    out = {
        "max_epochs": None if n_epochs is None else int(n_epochs), "lr": lr, "eps": eps,
        "batch_size": s["batch_size"], "weight_decay": s["weight_decay"], "train_size": s["train_frac"],
        "random_state": s["seed"], "progress_bar": bool(s["monitor"]),
        "balanced_sampling": bool(s["use_stratified_sampling"]), "max_kl_weight": s["alpha_kl"],
        # scArches anneals by epochs when both are given; 0 epochs: no warm-up
        "n_epochs_kl_warmup": 0 if anneal is None else int(anneal),
        "n_steps_kl_warmup": int(per_step) if anneal is None and per_step is not None else None,
        "early_stopping": use_es, "early_stopping_patience": stopping["patience"],
        "early_stopping_min_delta": stopping["threshold"],
        # scArches changes the learning rate in its early-stopping step only
        "reduce_lr_on_plateau": use_es and bool(stopping["reduce_lr"]), "lr_patience": stopping["lr_patience"],
        "lr_factor": stopping["lr_factor"],
    }  # fmt: skip
    out.update(own)
    return out


def early_stopping(kwargs: Mapping[str, Any] | None, *, train_frac: float, used: bool) -> dict[str, Any]:
    """scArches' ``early_stopping_kwargs`` checked, with its defaults; a watched loss other than
    ``unweighted_loss`` is watched as the ELBO, with a warning (when ``used``)."""
    unknown = sorted(set(kwargs or {}) - set(EARLY_STOPPING))
    if unknown:
        msg = (
            f"early_stopping_kwargs: unknown setting {unknown[0]!r} (scArches' EarlyStopping takes "
            f"{list(EARLY_STOPPING)})."
        )
        raise TypeError(msg)
    s = {**EARLY_STOPPING, **(kwargs or {})}
    must_be("mode", s["mode"], "min", "early stopping here minimises a loss; mode must be 'min'.")
    metric = str(s["early_stopping_metric"])
    prefix, _, name = metric.partition("_")
    if prefix not in ("val", "epoch") or name not in LOGGED:
        msg = f"early_stopping_metric={metric!r} is not a loss scArches logs (e.g. 'val_unweighted_loss')."
        raise ValueError(msg)
    watched = "the validation ELBO" if train_frac < 1 else "the training ELBO (train_frac=1: no validation cells)"
    if used and name != "unweighted_loss":
        warn(
            f"early_stopping_metric={metric!r}: early stopping and the learning-rate schedule here watch {watched} "
            "(scArches' val_unweighted_loss without its MMD, HSIC and prototype terms)."
        )
    return s


# -- files and surgery -----------------------------------------------------------------------------


def device_of(map_location) -> str | torch.device:
    """scArches' (torch's) ``map_location`` as our ``device``."""
    if map_location is None:
        return "auto"
    if isinstance(map_location, (str, torch.device)):
        return map_location
    msg = f"map_location={map_location!r}: pass a device ('cpu', 'cuda', a torch.device), not a function or a dict."
    raise TypeError(msg)


def base_of(door: type) -> type:
    """Our model class a door stands on."""
    return next(k for k in door.__mro__[1:] if issubclass(k, BaseModel))


def as_door(model: BaseModel, door: type) -> BaseModel:
    """``model`` (an object of the door's base class) as an object of the door: a door adds
    methods, never state, so the same object serves."""
    if type(model) is not door:
        if type(model) is not base_of(door):
            msg = (
                f"This is a {type(model).__name__} model; a {door.__name__} door takes {base_of(door).__name__} models."
            )
            raise TypeError(msg)
        model.__class__ = door
    return model


def save(model: BaseModel, dir_path, overwrite: bool, save_anndata: bool, anndata_write_kwargs: dict) -> None:
    """scArches' ``save``: our model files, and with ``save_anndata`` the model's AnnData as ``adata.h5ad``."""
    if save_anndata and model.adata is None:
        msg = "save_anndata=True, but this model holds no AnnData."
        raise ValueError(msg)
    BaseModel.save(model, dir_path, overwrite=overwrite)
    if save_anndata:
        model.adata.write_h5ad(Path(dir_path) / "adata.h5ad", **anndata_write_kwargs)
    elif anndata_write_kwargs:
        msg = f"{sorted(anndata_write_kwargs)} are for the AnnData written with save_anndata=True."
        raise TypeError(msg)


def reference_of(door: type, reference_model, map_location) -> BaseModel:
    """scArches' ``reference_model``: a trained model of the door's kind, or its directory."""
    if isinstance(reference_model, (str, os.PathLike)):
        return door.load(reference_model, map_location=map_location)
    if type(reference_model) not in (door, base_of(door)):
        msg = f"reference_model must be a {door.__name__} model or its directory, got {type(reference_model).__name__}."
        raise TypeError(msg)
    return reference_model


def surgery(
    door: type,
    adata: AnnData,
    reference: BaseModel,
    *,
    freeze: bool,
    freeze_expression: bool,
    remove_dropout: bool,
    orders: Mapping[str, None],
    **options,
) -> BaseModel:
    """scArches' ``load_query_data`` over our ``query_model``: the query's new conditions are new
    categories whose weights learn; everything else is the reference's, frozen unless
    ``freeze=False`` (every weight then learns from the reference's values)."""
    if not reference.is_trained:
        msg = "The reference model is not trained."
        raise ValueError(msg)
    source = with_categories(adata, orders)
    model, added = query_model(reference, source, freeze_expression=freeze_expression, remove_dropout=remove_dropout,
                               **options)  # fmt: skip
    if not added:
        warn(
            "Every query condition is known to the reference (e.g. listed in its conditions=), so the query has no "
            "new condition weights to learn; its cells are embedded with the reference's."
        )
    model = as_door(model, door)
    if source is not adata:
        model.attach(adata, bound=model.bind(source))
    if not freeze:
        momentum = {name: m.momentum for name, m in reference.module.named_modules() if hasattr(m, "momentum")}
        for name, m in model.module.named_modules():
            if name in momentum:
                m.momentum = momentum[name]  # surgery froze the batch-norm statistics
        for p in model.module.parameters():
            p.requires_grad_(True)
        model.trainable_masks = None
    return model


class DoorMethods:
    """What every scArches door adds: its attributes and ``save`` / ``load`` (``BaseMixin``)."""

    @property
    def model(self):
        """The torch module (scArches' ``model``; ours is ``module``)."""
        return self.module

    @property
    def is_trained_(self) -> bool:
        return self.is_trained

    def save(
        self, dir_path: str | os.PathLike, overwrite: bool = False, save_anndata: bool = False, **anndata_write_kwargs
    ) -> None:
        """Save the model (our files: they load with this class and with ours); with
        ``save_anndata`` also its AnnData as ``adata.h5ad`` (``anndata_write_kwargs`` go to
        ``write_h5ad``)."""
        save(self, dir_path, overwrite, save_anndata, anndata_write_kwargs)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData | None = None, map_location=None, *, device=None):
        """Load a model directory (scArches' ``load``): ``adata`` to bind, else the
        ``adata.h5ad`` saved with it, if any; ``map_location`` (or ``device``): ``'cpu'``,
        ``'cuda'`` or a torch device (default: CUDA if available)."""
        if device is not None and map_location is not None:
            msg = "map_location (scArches) and device (scanpy-scvi) are the same setting; pass one."
            raise TypeError(msg)
        if adata is None and (Path(dir_path) / "adata.h5ad").is_file():
            import anndata as ad

            adata = ad.read_h5ad(Path(dir_path) / "adata.h5ad")
        # our loader gives a door the files of its base class
        return super().load(dir_path, adata=adata, device=device_of(device if device is not None else map_location))
