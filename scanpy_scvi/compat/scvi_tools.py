"""The door for code written for scvi-tools 1.x: ``scvi.model.SCVI``, ``LinearSCVI``, ``SCANVI``, ``TOTALVI``.

Such code runs with only its import changed::

    from scanpy_scvi.compat import scvi_tools as scvi

    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    vae = scvi.model.SCVI(adata, n_latent=10)
    vae.train(max_epochs=100, accelerator="cpu", plan_kwargs={"lr": 1e-3})
    adata.obsm["X_scVI"] = vae.get_latent_representation()

The classes here are subclasses of this package's models (declared with ``register=False``, so
the files they save are plain files of our classes and load with either). They translate
scvi-tools' setup, constructor and ``train`` arguments (``accelerator``, ``devices``,
``plan_kwargs``, Lightning's trainer options) into ours and add scvi-tools' methods, each a few
lines over our public model API and ``tl`` functions. A foreign argument without a meaning here
raises a ``TypeError`` / ``ValueError`` that names it and says why; a method that cannot mean
anything in our design raises ``NotImplementedError`` naming what to use instead. The setup of
``setup_anndata`` is recorded, as JSON, in ``adata.uns['_scvi_setup']`` (one entry per model
class), so it survives ``write_h5ad``. docs/compat-scvi-tools.rst tables every name.

This module is longer than 600 lines: it holds scvi-tools' whole model surface (four classes,
about forty methods and the argument tables of ``train``) in one place, as the door design asks.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .. import model as _ours
from .. import tl
from .._compat import logg, warn
from ..data import DataSetup, is_mudata
from ..model import BaseModel, query_model
from ..nn import to_numpy

if TYPE_CHECKING:
    from anndata import AnnData

SETUP_KEY = "_scvi_setup"  # adata.uns entry: {model class name: JSON of its setup}
# a minified AnnData (scvi-tools' names): the counts dropped, each cell's q(z | x) and total counts kept
MINIFY_TYPE_KEY = "_scvi_adata_minify_type"  # adata.uns: how it was minified
LATENT_POSTERIOR = "latent_posterior_parameters"  # the one minification type read here
OBSERVED_LIB_SIZE_KEY = "observed_lib_size"  # adata.obs: each cell's total counts over the model genes
REFERENCE_GENE_RATIO = 0.8  # scvi-tools warns when a query has fewer of the reference's genes


# -- scvi.settings -------------------------------------------------------------------------------------
class ScviToolsSettings:
    """The parts of scvi-tools' ``scvi.settings`` that mean something here.

    ``seed``
        The ``random_state`` of every model construction and training (and of differential
        expression); default 0, as scvi-tools'. ``None``: unseeded.
    ``num_threads``
        torch's CPU threads (``torch.set_num_threads``).
    ``dl_num_workers``, ``dl_pin_memory``, ``verbosity``
        Accepted and without effect: minibatches are read without a torch ``DataLoader``, and
        logging follows scanpy's ``sc.settings.verbosity``.

    Setting any other attribute is an ``AttributeError``.
    """

    __slots__ = ("_seed", "dl_num_workers", "dl_pin_memory", "verbosity")

    def __init__(self) -> None:
        self._seed: int | None = 0
        self.dl_num_workers = 0
        self.dl_pin_memory = False
        self.verbosity = 20

    @property
    def seed(self) -> int | None:
        return self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            msg = f"settings.seed must be an integer or None, got {value!r}."
            raise TypeError(msg)
        self._seed = None if value is None else int(value)

    @property
    def num_threads(self) -> int:
        return torch.get_num_threads()

    @num_threads.setter
    def num_threads(self, value: int) -> None:
        torch.set_num_threads(int(value))


settings = ScviToolsSettings()


# -- the setup recorded in the AnnData ----------------------------------------------------------------
def _record_setup(data, cls_name: str, method: str, args: Mapping[str, Any]) -> None:
    entry = dict(data.uns.get(SETUP_KEY, {}))
    entry[cls_name] = json.dumps({"setup_method": method, "setup_args": dict(args)})
    data.uns[SETUP_KEY] = entry


def _recorded_setup(data, cls_name: str) -> tuple[str, dict[str, Any]]:
    entry = data.uns.get(SETUP_KEY, {}) if data is not None else {}
    raw = entry.get(cls_name) if isinstance(entry, Mapping) else None
    if raw is None:
        others = sorted(entry) if isinstance(entry, Mapping) else []
        hint = f" (it is set up for {', '.join(others)})" if others else ""
        method = "setup_mudata` (or `setup_anndata" if cls_name == "TOTALVI" else "setup_anndata"
        msg = f"The data is not set up for {cls_name}{hint}. Call `scvi.model.{cls_name}.{method}(adata, ...)` first."
        raise ValueError(msg)
    record = json.loads(str(raw))
    return record["setup_method"], dict(record["setup_args"])


def _setup_args(setup: DataSetup, kind: str) -> dict[str, Any]:
    """scvi-tools' setup arguments of a model's data setup (what its setup_anndata would be called with)."""
    args: dict[str, Any] = {"layer": setup.layer, "batch_key": setup.batch_key}
    if kind == "TOTALVI":
        args.update(
            protein_expression_obsm_key=setup.protein_expression_obsm_key,
            protein_names_uns_key=setup.protein_names_uns_key,
        )
    else:
        args["labels_key"] = setup.labels_key
    if kind == "SCANVI":
        args["unlabeled_category"] = setup.unlabeled_category
    args.update(
        size_factor_key=setup.size_factor_key,
        categorical_covariate_keys=list(setup.categorical_covariate_keys) or None,
        continuous_covariate_keys=list(setup.continuous_covariate_keys) or None,
    )
    return args


def _clean_keys(**args) -> dict[str, Any]:
    """Setup arguments as JSON: sequences of keys as lists."""
    out = {}
    for k, v in args.items():
        if k.endswith("_covariate_keys") and v is not None:
            v = [v] if isinstance(v, str) else [str(x) for x in v]
        out[k] = v
    return out


# -- argument translation -------------------------------------------------------------------------------
# scvi-tools module arguments that are set from the data (setup_anndata and the AnnData) here
_DERIVED = (
    "n_input", "n_batch", "n_labels", "n_continuous_cov", "n_cats_per_cov", "n_input_genes", "n_input_proteins",
    "use_size_factor_key", "library_log_means", "library_log_vars", "protein_batch_mask",
    "protein_background_prior_mean", "protein_background_prior_scale",
)  # fmt: skip
# argument: (the values built here, why another cannot be)
_FIXED_MODULE = {
    "log_variational": ((True,), "the encoder always reads log1p counts"),
    "var_activation": ((None,), "posterior variances are exp of the encoder output (scvi-tools' default)"),
    "batch_representation": (("one-hot",), "batches are one-hot covariates (there are no batch embeddings)"),
    "extra_encoder_kwargs": ((None, {}), "the networks take only this package's architecture settings"),
    "extra_decoder_kwargs": ((None, {}), "the networks take only this package's architecture settings"),
}
_PLAN = (
    "lr", "weight_decay", "eps", "n_epochs_kl_warmup", "n_steps_kl_warmup", "min_kl_weight", "max_kl_weight",
    "reduce_lr_on_plateau", "lr_factor", "lr_patience",
)  # fmt: skip
_PLAN_FIXED = {
    "lr_threshold": ((0, 0.0), "the plateau schedule counts any improvement (threshold 0)"),
    "lr_min": ((0, 0.0), "the plateau schedule has no minimum learning rate"),
    "optimizer": (("Adam",), "the loop optimises with Adam (AdamW or a custom optimizer are not available)"),
    "optimizer_creator": ((None,), "the loop optimises with Adam (AdamW or a custom optimizer are not available)"),
    "lr_scheduler_metric": (("elbo_validation",), "the plateau schedule watches the validation ELBO"),
    "update_only_decoder": ((False,), "freezing the encoder is reference mapping here (load_query_data)"),
    "compile": ((False,), "torch.compile is not used (on a GPU the loop captures its step as a CUDA graph)"),
    "compile_kwargs": ((None, {}), "torch.compile is not used"),
    "scale_adversarial_loss": (("auto",), "the adversarial loss is weighted by 1 - kl_weight (scvi-tools' 'auto')"),
    "on_step": ((False, None), "metrics are recorded per epoch"),
    "on_epoch": ((True, None), "metrics are recorded per epoch"),
}
_TRAINER = {
    "early_stopping": "early_stopping",
    "early_stopping_patience": "early_stopping_patience",
    "early_stopping_min_delta": "early_stopping_min_delta",
    "enable_progress_bar": "progress_bar",
}
_TRAINER_FIXED = {
    "early_stopping_monitor": (
        ("elbo_validation",),
        "early stopping watches the validation ELBO (the training ELBO without a validation set)",
    ),
    "early_stopping_mode": (("min",), "early stopping watches the validation ELBO, which decreases"),
    "early_stopping_warmup_epochs": ((0,), "early stopping watches every epoch"),
    "enable_checkpointing": ((False,), "no checkpoints are written; early stopping restores the best epoch in memory"),
    "precision": ((32, "32", "32-true"), "training is in float32"),
    "logger": ((None, False, True), "the per-epoch metrics are in model.history"),
    "callbacks": ((None, []), "the loop is not Lightning's: it takes no callbacks"),
}
# accepted and without effect: they change only logging, display, validation frequency or speed
_NO_EFFECT = (
    "check_val_every_n_epoch", "simple_progress_bar", "progress_bar_refresh_rate", "log_every_n_steps",
    "enable_model_summary", "benchmark", "deterministic", "num_sanity_val_steps", "default_root_dir",
    "learning_rate_monitor", "log_save_dir", "load_sparse_tensor", "num_workers", "pin_memory", "persistent_workers",
)  # fmt: skip
_DDP = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def _same(value, allowed) -> bool:
    """``value`` is ``allowed`` (booleans and None by identity: ``0`` is not ``False``)."""
    if value is None or allowed is None or isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    return type(value) is type(allowed) and value == allowed


def _check_fixed(where: str, name: str, value, allowed: tuple, why: str) -> None:
    if not any(_same(value, a) for a in allowed):
        shown = " or ".join(repr(a) for a in allowed)
        msg = f"{where}{name}={value!r} is not available: {why} (only {shown})."
        raise ValueError(msg)


def _model_kwargs(cls_name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """scvi-tools module keywords minus those set from the data or fixed here (checked)."""
    out = {}
    for name, value in kwargs.items():
        if name in _DERIVED:
            msg = (
                f"{cls_name}(..., {name}=...): set from the data here (setup_anndata and the AnnData), not an argument."
            )
            raise TypeError(msg)
        if name in _FIXED_MODULE:
            _check_fixed(f"{cls_name}(...): ", name, value, *_FIXED_MODULE[name])
            continue
        out[name] = value
    return out


def _devices_of(device) -> Any:
    """``load``'s ``device`` (an index or 'auto') as Lightning's ``devices``."""
    return [device] if isinstance(device, (int, np.integer)) and not isinstance(device, bool) else device


def _device(accelerator="auto", devices="auto") -> tuple[str, bool]:
    """Our device for Lightning's ``accelerator`` and ``devices``, and whether several were asked for."""
    if not isinstance(accelerator, str):
        msg = "accelerator must be 'cpu', 'gpu', 'cuda' or 'auto'; Lightning accelerator objects are not used here."
        raise TypeError(msg)
    acc = accelerator.lower()
    if acc in ("mps", "tpu", "ipu", "hpu", "xla"):
        msg = f"accelerator={accelerator!r}: this package trains on CPUs and CUDA GPUs only ('cpu', 'gpu', 'auto')."
        raise ValueError(msg)
    if acc not in ("cpu", "gpu", "cuda", "auto"):
        msg = f"Unknown accelerator {accelerator!r}; use 'cpu', 'gpu' or 'auto'."
        raise ValueError(msg)
    if acc == "auto":
        acc = "gpu" if torch.cuda.is_available() else "cpu"
    index, several = None, False
    if isinstance(devices, str) and devices != "auto":
        parts = [p.strip() for p in devices.split(",") if p.strip()]
        devices = [int(p) for p in parts] if "," in devices else int(devices)
    if isinstance(devices, bool) or devices is None or devices == "auto":
        pass
    elif isinstance(devices, (int, np.integer)):
        if devices == 0:
            msg = "devices=0 asks for no device; use accelerator='cpu' for the CPU."
            raise ValueError(msg)
        several = devices == -1 or devices > 1
    elif isinstance(devices, Sequence):
        several, index = len(devices) > 1, (int(devices[0]) if len(devices) == 1 else None)
    else:
        msg = f"devices={devices!r}: use 'auto', a count, or a list of device indices."
        raise TypeError(msg)
    if acc == "cpu":
        return "cpu", several
    return ("cuda" if index is None else f"cuda:{index}"), several


def _train_kwargs(
    *,
    explicit: dict[str, Any],
    defaults: dict[str, Any],
    extra_plan: tuple[str, ...] = (),
    accelerator,
    devices,
    train_size,
    validation_size,
    shuffle_set_split,
    datasplitter_kwargs,
    plan_kwargs,
    plan_config=None,
    datamodule=None,
    trainer_config=None,
    trainer_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """scvi-tools' ``train`` arguments as the keywords of our ``train`` (each checked).

    ``explicit``: the door's own arguments that are ours too (``batch_size``, ...), ``defaults``
    their scvi-tools defaults. A ``plan_kwargs`` entry overrides an argument left at its default;
    set to different values in both, it is an error (scvi-tools let a train argument silently
    overwrite ``plan_kwargs``, even its default: ``TOTALVI.train(plan_kwargs={'lr': 1e-2})``
    trained at 4e-3).
    """
    if datamodule is not None:
        msg = "datamodule: a Lightning data module cannot feed this package's training loop; pass the AnnData."
        raise TypeError(msg)
    out = dict(explicit)
    for name, value in {**dict(plan_config or {}), **dict(plan_kwargs or {})}.items():
        if name in _PLAN_FIXED:
            _check_fixed("plan_kwargs: ", name, value, *_PLAN_FIXED[name])
            continue
        if name not in _PLAN and name not in extra_plan:
            msg = (
                f"plan_kwargs: {name!r} is not a training-plan option here (options: {', '.join(_PLAN + extra_plan)})."
            )
            raise TypeError(msg)
        if name in explicit and explicit[name] != defaults[name]:
            if explicit[name] != value:
                msg = f"{name} is given twice, as {explicit[name]!r} and as plan_kwargs[{name!r}] = {value!r}."
                raise ValueError(msg)
            continue
        out[name] = value
    trainer = {**dict(trainer_config or {}), **dict(trainer_kwargs)}
    strategy = trainer.pop("strategy", None)
    for name, value in trainer.items():
        if name in _TRAINER:
            out[_TRAINER[name]] = value
        elif name in _TRAINER_FIXED:
            _check_fixed("train(): ", name, value, *_TRAINER_FIXED[name])
        elif name not in _NO_EFFECT:
            msg = (
                f"train() got {name!r}: a Lightning Trainer option without a counterpart here (the training loop "
                "is this package's own, not Lightning's). See docs/compat-scvi-tools.rst for the options it maps."
            )
            raise TypeError(msg)
    for name, value in dict(datasplitter_kwargs or {}).items():
        if name in _NO_EFFECT or (name == "drop_last" and not value) or (name == "shuffle" and value):
            continue
        msg = f"datasplitter_kwargs: {name}={value!r} is not available (minibatches are shuffled, none dropped)."
        raise TypeError(msg)
    if strategy not in (None, "auto", *_DDP):
        msg = f"strategy={strategy!r}: only 'ddp' (under torchrun) trains across processes here."
        raise ValueError(msg)
    out["strategy"] = "ddp" if strategy in _DDP else None
    out["device"], several = _device(accelerator, devices)
    if several and out["strategy"] is None:
        msg = (
            f"devices={devices!r} asks for several devices: launch the script with torchrun and pass strategy='ddp' "
            "(one process per device), or train on one device."
        )
        raise ValueError(msg)
    train_size = 0.9 if train_size is None else float(train_size)
    if not shuffle_set_split:
        msg = "shuffle_set_split=False: the training/validation split is always a seeded permutation here."
        raise ValueError(msg)
    if validation_size is not None and not math.isclose(train_size + validation_size, 1.0):
        msg = (
            f"train_size={train_size} + validation_size={validation_size} != 1: a test set is not made here; "
            "the cells not trained on are the validation set."
        )
        raise ValueError(msg)
    out["train_size"] = train_size
    out["random_state"] = settings.seed
    return out


def _as_cells_mask(idx, adata: AnnData):
    """scvi-tools' ``idx1`` / ``idx2``: a mask, positions, or an ``obs.query`` string (as a mask)."""
    if isinstance(idx, str):
        return adata.obs_names.isin(adata.obs.query(idx).index)
    return idx


# -- the methods every door shares ---------------------------------------------------------------------
class _Door:
    """scvi-tools' ``BaseModelClass``, ``RNASeqMixin``, ``VAEMixin`` and ``ArchesMixin`` methods over our model API."""

    _kind: ClassVar[str] = "SCVI"  # the scvi-tools class this door stands for
    _base: ClassVar[type]  # our model class it is a door of
    # obsm keys of the cached posterior in a minified AnnData (scvi-tools' per class); None: not minified here
    _LATENT_QZM_KEY: ClassVar[str | None] = "scvi_latent_qzm"
    _LATENT_QZV_KEY: ClassVar[str | None] = "scvi_latent_qzv"

    @classmethod
    def _setup_of(cls, adata) -> dict[str, Any]:
        """The setup arguments recorded for this class in ``adata`` (an error naming the call if none)."""
        if adata is None:
            msg = (
                f"{cls.__name__}(adata=None) (lazy construction with a datamodule) is not available: pass the AnnData."
            )
            raise TypeError(msg)
        _method, args = _recorded_setup(adata, cls.__name__)
        return args

    # -- attributes of scvi-tools models ------------------------------------------------------------
    @property
    def summary_string(self) -> str:
        """The model summary (its ``repr``) and, as scvi-tools', whether its AnnData is minified."""
        return f"{self!r}\nModel's adata is minified?: {self.minified_data_type is not None}"

    @property
    def test_indices(self) -> np.ndarray:
        """Test-set cells: none (cells not trained on are the validation set)."""
        return np.arange(0)

    @property
    def minified_data_type(self) -> str | None:
        """How the model's AnnData was minified (``'latent_posterior_parameters'``, see
        :meth:`minify_adata`), or ``None``."""
        return _minify_type(self.adata)

    # -- setup: the record in adata.uns ----------------------------------------------------------------
    @classmethod
    def _record(cls, data, args: Mapping[str, Any], method: str = "setup_anndata") -> None:
        _record_setup(data, cls.__name__, method, args)

    def view_anndata_setup(self, adata: AnnData | None = None, hide_state_registries: bool = False) -> None:
        """Print the model's data setup and, checked against it, ``adata``'s summary (default: the model's AnnData)."""
        bound = self.bind(adata)
        s = self.setup
        lines = [
            f"{type(self).__name__} data setup (scanpy-scvi):",
            f"  setup arguments: {json.dumps(_setup_args(s, self._kind))}",
            f"  n_cells: {bound.n_obs}, n_vars: {len(s.genes)}, n_batch: {s.n_batch}, n_labels: {s.n_labels}, "
            f"n_extra_categorical_covs: {len(s.categorical_covariate_keys)}, "
            f"n_extra_continuous_covs: {len(s.continuous_covariate_keys)}"
            + (f", n_proteins: {len(s.protein_names)}" if s.protein_names else ""),
        ]
        if not hide_state_registries:
            lines.append(f"  batch ({s.batch_key!r}): {dict(enumerate(s.batch_categories))}")
            lines.append(f"  labels ({s.labels_key!r}): {dict(enumerate(s.label_categories))}")
            for key, cats in zip(s.categorical_covariate_keys, s.categorical_covariate_categories, strict=True):
                lines.append(f"  {key!r}: {dict(enumerate(cats))}")
        print("\n".join(lines))

    @staticmethod
    def load_registry(dir_path: str | os.PathLike, prefix: str | None = None) -> dict[str, Any]:
        """The registry of a saved model, in scvi-tools' layout, built from its data setup."""
        _no_prefix(prefix)
        saved = BaseModel.load(dir_path, device="cpu")
        s = saved.setup
        kind = type(saved).__name__
        name = "LinearSCVI" if kind == "SCVI" and saved.architecture.linear_decoder else kind
        fields = {
            "X": {"state_registry": {"n_vars": len(s.genes), "column_names": list(s.genes)}},
            "batch": {"state_registry": {"categorical_mapping": list(s.batch_categories), "original_key": s.batch_key}},
            "labels": {
                "state_registry": {"categorical_mapping": list(s.label_categories), "original_key": s.labels_key}
            },
        }
        if s.protein_names:
            fields["proteins"] = {"state_registry": {"column_names": list(s.protein_names)}}
        return {
            "model_name": name,
            "setup_method_name": "setup_anndata",
            "setup_args": _setup_args(s, "TOTALVI" if s.protein_names else name),
            "field_registries": fields,
        }

    @staticmethod
    def view_setup_args(dir_path: str | os.PathLike, prefix: str | None = None) -> None:
        """Print the setup arguments of a saved model."""
        registry = _Door.load_registry(dir_path, prefix)
        print(f"{registry['model_name']} setup arguments: {json.dumps(registry['setup_args'], indent=2)}")

    def get_from_registry(self, adata: AnnData, registry_key: str):
        """The data the model reads under scvi-tools' registry key: ``'X'`` (the counts matrix),
        ``'batch'`` / ``'labels'`` (codes, shape (cells, 1)), ``'size_factor'``,
        ``'extra_categorical_covs'`` (codes) / ``'extra_continuous_covs'`` (DataFrames), ``'proteins'``."""
        bound = self.bind(adata)
        obs, s = bound.source.obs, self.setup
        if registry_key == "X":
            return adata.layers[s.layer] if s.layer is not None else adata.X
        if registry_key in ("batch", "labels"):
            return obs[registry_key][:, None]
        if registry_key == "size_factor" and "size_factor" in obs:
            return obs["size_factor"]
        if registry_key == "extra_categorical_covs" and "cat_covs" in obs:
            return pd.DataFrame(obs["cat_covs"], index=adata.obs_names, columns=s.categorical_covariate_keys)
        if registry_key == "extra_continuous_covs" and "cont_covs" in obs:
            return pd.DataFrame(obs["cont_covs"], index=adata.obs_names, columns=s.continuous_covariate_keys)
        if registry_key == "proteins" and "Y" in obs:
            return adata.obsm[s.protein_expression_obsm_key]
        msg = f"registry_key={registry_key!r} is not registered for this model."
        raise KeyError(msg)

    def get_anndata_manager(self, adata: AnnData | None = None, required: bool = False):
        """Not available: there are no ``AnnDataManager`` objects here."""
        raise NotImplementedError(_NO_MANAGER)

    @classmethod
    def register_manager(cls, adata_manager) -> None:
        """Not available: there are no ``AnnDataManager`` objects here."""
        raise NotImplementedError(_NO_MANAGER)

    def deregister_manager(self, adata: AnnData | None = None) -> None:
        """Not available: there are no ``AnnDataManager`` objects here."""
        raise NotImplementedError(_NO_MANAGER)

    # -- device and files ----------------------------------------------------------------------------
    def to_device(self, device: str | int | torch.device = "auto") -> None:
        """Move the model to ``device``: ``'cpu'``, ``'cuda'``, ``'cuda:N'``, a GPU index ``N`` or a torch device."""
        if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
            device = f"cuda:{int(device)}"
        super().to_device(device)

    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        legacy_mudata_format: bool = False,
        datamodule=None,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model (``model.safetensors``, ``config.json``; with ``save_anndata`` also
        ``adata.h5ad``, which :meth:`load` reads when no ``adata`` is passed). The files are
        this package's model files, not scvi-tools' ``model.pt``."""
        _no_prefix(prefix)
        if save_kwargs or legacy_mudata_format or datamodule is not None:
            msg = "save_kwargs, legacy_mudata_format and datamodule: weights are written with safetensors here."
            raise TypeError(msg)
        if anndata_write_kwargs and not save_anndata:
            msg = f"{sorted(anndata_write_kwargs)}: AnnData write options need save_anndata=True."
            raise TypeError(msg)
        if save_anndata and self.adata is None:
            msg = "save_anndata=True, but the model holds no AnnData."
            raise ValueError(msg)
        super().save(dir_path, overwrite=overwrite)
        if save_anndata:
            self.adata.write_h5ad(Path(dir_path) / "adata.h5ad", **anndata_write_kwargs)

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
        datamodule=None,
    ):
        """Load a model saved here (by either class), onto ``accelerator`` / ``device`` (an index).

        ``adata`` (default: the directory's ``adata.h5ad``, if saved) is checked against the
        model, and its setup recorded as ``setup_anndata`` would. Without either, the model holds
        no AnnData (scvi-tools refuses; here pass ``adata=`` to its methods).
        """
        _no_prefix(prefix)
        if backup_url is not None or datamodule is not None:
            msg = "backup_url and datamodule are not available: load from a local directory with an AnnData."
            raise TypeError(msg)
        target, several = _device(accelerator, _devices_of(device))
        if several:
            msg = f"device={device!r}: a model is loaded onto one device."
            raise ValueError(msg)
        saved = Path(dir_path) / "adata.h5ad"
        if adata is None and saved.is_file():
            import anndata

            adata = anndata.read_h5ad(saved)
        loaded = super().load(dir_path, adata=adata, device=target)
        cls._check_loaded(loaded)
        if adata is not None:
            cls._record(adata, _setup_args(loaded.setup, cls._kind))
        return loaded

    @classmethod
    def _check_loaded(cls, loaded) -> None:
        """Subclasses refuse files of another kind (LinearSCVI vs SCVI)."""

    @classmethod
    def convert_legacy_save(cls, dir_path, output_dir_path, overwrite: bool = False, prefix=None, **save_kwargs):
        """Not available: scvi-tools' own model files (``model.pt``, any version) are not read here."""
        msg = (
            "convert_legacy_save converts scvi-tools' own model files, which this package does not read; a loader "
            "for scvi-tools model files is a separate feature (see the changelog). Retrain here, or load a model "
            "saved here with `load`."
        )
        raise NotImplementedError(msg)

    # -- minified AnnData -------------------------------------------------------------------------------
    def minify_adata(
        self,
        minified_data_type: str = LATENT_POSTERIOR,
        use_latent_qzm_key: str = "X_latent_qzm",
        use_latent_qzv_key: str = "X_latent_qzv",
    ) -> None:
        """Give the model a minified copy of its AnnData: the counts dropped, the posterior of z kept.

        As scvi-tools: the copy (``raw`` dropped) has ``X`` and every layer replaced by an empty
        sparse matrix of the same shape, each cell's posterior mean and variance of z in
        ``obsm[use_latent_qzm_key]`` / ``obsm[use_latent_qzv_key]`` and in the class's own keys
        (``'scvi_latent_qzm'`` / ``'scvi_latent_qzv'``; LinearSCVI ``'ldvae_...'``, SCANVI
        ``'scanvi_...'``), the total counts in ``obs['observed_lib_size']`` and the type in
        ``uns['_scvi_adata_minify_type']``; it becomes ``model.adata`` (the AnnData passed in
        is not changed). The posterior is read from ``obsm[use_latent_qzm_key]`` /
        ``obsm[use_latent_qzv_key]``, or, where they are absent, computed
        (``get_latent_representation(return_dist=True)``; scvi-tools raised a ``KeyError``).

        Then the methods that need only z and the library work from the cached posterior, with
        the draws the counts would give: ``get_latent_representation``,
        ``get_normalized_expression``, ``get_likelihood_parameters``,
        ``posterior_predictive_sample``, ``get_latent_library_size``, ``differential_expression``
        (its raw-count columns come from the empty counts, as in scvi-tools, which warns),
        SCANVI's ``predict``. Those that need the counts (``train``, ``get_elbo``,
        ``get_reconstruction_error``, ``get_marginal_ll``, ``load_query_data``,
        ``SCANVI.from_scvi_model``) raise a ``ValueError`` on a minified AnnData. It survives
        ``write_h5ad`` and ``save(save_anndata=True)``; ``load`` with it gives a minified model.

        ``'latent_posterior_parameters_with_counts'`` (for scvi-tools' decoder-only training) is
        not available, and, as in scvi-tools, a model with a learned library size cannot be
        minified (its q(l | x) needs the counts).
        """
        if minified_data_type != LATENT_POSTERIOR:
            why = (
                "it keeps the counts for decoder-only training on the cached latent (scvi-tools' "
                "plan_kwargs update_only_decoder), which is not available here"
                if minified_data_type == "latent_posterior_parameters_with_counts"
                else "it is not a minification type"
            )
            msg = f"minified_data_type={minified_data_type!r} is not available: {why} (only {LATENT_POSTERIOR!r})."
            raise ValueError(msg)
        self._check_minifiable()
        if self.adata is None:
            msg = "The model holds no AnnData to minify (it was loaded without one)."
            raise ValueError(msg)
        if self.minified_data_type is not None:
            msg = "The model's AnnData is already minified."
            raise ValueError(msg)
        adata = self.adata
        if use_latent_qzm_key in adata.obsm and use_latent_qzv_key in adata.obsm:
            qz_m, qz_v = (np.asarray(adata.obsm[k], dtype=np.float32) for k in (use_latent_qzm_key, use_latent_qzv_key))
        else:
            qz_m, qz_v = self.get_latent_representation(return_dist=True)
        import anndata

        empty = sp.csr_matrix(adata.shape, dtype=np.float32)
        mini = anndata.AnnData(
            X=empty, obs=adata.obs.copy(), var=adata.var.copy(), uns=copy.deepcopy(dict(adata.uns)),
            obsm=_copied(adata.obsm), varm=_copied(adata.varm), obsp=_copied(adata.obsp), varp=_copied(adata.varp),
            layers={k: empty.copy() for k in adata.layers},
        )  # fmt: skip
        mini.uns[MINIFY_TYPE_KEY] = LATENT_POSTERIOR
        mini.obsm[use_latent_qzm_key], mini.obsm[use_latent_qzv_key] = qz_m.copy(), qz_v.copy()
        mini.obsm[self._LATENT_QZM_KEY], mini.obsm[self._LATENT_QZV_KEY] = qz_m, qz_v
        mini.obs[OBSERVED_LIB_SIZE_KEY] = self.bind().library
        self.attach(mini)  # checks the cached posterior; on an error the model keeps its AnnData

    def attach(self, adata: AnnData, *, bound=None) -> None:
        """Our ``attach``; a minified ``adata`` is bound through its cached posterior of z."""
        if bound is None and _minify_type(adata) is not None:
            bound = self._bind_minified(adata)
        super().attach(adata, bound=bound)

    def bind(self, adata: AnnData | None = None):
        """Our ``bind``; a minified ``adata`` is bound through its cached posterior of z."""
        if adata is not None and adata is not self.adata and _minify_type(adata) is not None:
            return self._bind_minified(adata)
        return super().bind(adata)

    def _bind_minified(self, adata: AnnData):
        kind = _minify_type(adata)
        if kind != LATENT_POSTERIOR:
            msg = f"adata.uns[{MINIFY_TYPE_KEY!r}] is {kind!r}: only {LATENT_POSTERIOR!r} minified data is read here."
            raise ValueError(msg)
        self._check_minifiable()
        missing = [f"obsm[{k!r}]" for k in (self._LATENT_QZM_KEY, self._LATENT_QZV_KEY) if k not in adata.obsm]
        if OBSERVED_LIB_SIZE_KEY not in adata.obs:
            missing.append(f"obs[{OBSERVED_LIB_SIZE_KEY!r}]")
        if missing:
            msg = (
                f"The minified AnnData lacks {', '.join(missing)}: it was minified by another model class "
                f"than {type(self).__name__}, or its cached posterior was removed."
            )
            raise ValueError(msg)
        qz_m = np.asarray(adata.obsm[self._LATENT_QZM_KEY])
        if qz_m.ndim != 2 or qz_m.shape[1] != self.module.n_latent:
            msg = (
                f"obsm[{self._LATENT_QZM_KEY!r}] has shape {qz_m.shape}; the model has n_latent={self.module.n_latent}."
            )
            raise ValueError(msg)
        posterior = {
            "qz_m": qz_m, "qz_v": adata.obsm[self._LATENT_QZV_KEY], "library": adata.obs[OBSERVED_LIB_SIZE_KEY].to_numpy()
        }  # fmt: skip
        return self.setup.bind(adata, posterior=posterior)

    def _check_minifiable(self) -> None:
        if self._LATENT_QZM_KEY is None:
            raise NotImplementedError(_NO_TOTALVI_MINIFY)
        if not getattr(self.module, "use_observed_lib_size", True):
            msg = (
                "Minification is not supported for models that do not use observed library size, as in scvi-tools: "
                "a learned library is drawn from q(l | x), which needs the counts (use_observed_lib_size=True)."
            )
            raise ValueError(msg)

    def _refuse_minified(self, adata: AnnData | None, method: str) -> None:
        """A ``ValueError`` when the data ``method`` would read (``adata``, default the model's) is minified."""
        if _minify_type(self.adata if adata is None else adata) is not None:
            msg = (
                f"{method} needs the counts, and the AnnData is minified (minify_adata replaced them by each "
                "cell's posterior of z): pass the AnnData with the counts (adata=...)."
            )
            raise ValueError(msg)

    def train(self, *args, **kwargs) -> None:
        """Our ``train`` (after the door's translation), refused on a minified AnnData."""
        self._refuse_minified(None, "train")
        super().train(*args, **kwargs)

    def get_elbo(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None) -> float:
        """Our ``get_elbo`` (refused on a minified AnnData)."""
        self._refuse_minified(adata, "get_elbo")
        return super().get_elbo(adata, indices, batch_size)

    def get_reconstruction_error(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None):
        """Our ``get_reconstruction_error`` (refused on a minified AnnData)."""
        self._refuse_minified(adata, "get_reconstruction_error")
        return super().get_reconstruction_error(adata, indices, batch_size)

    def get_marginal_ll(self, adata: AnnData | None = None, indices=None, *args, **kwargs):
        """Our ``get_marginal_ll`` (refused on a minified AnnData)."""
        self._refuse_minified(adata, "get_marginal_ll")
        return super().get_marginal_ll(adata, indices, *args, **kwargs)

    # -- differential expression -------------------------------------------------------------------
    def differential_expression(
        self,
        adata: AnnData | None = None,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1=None,
        idx2=None,
        mode: Literal["vanilla", "change"] = "vanilla",
        delta: float = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1: Sequence[str] | None = None,
        batchid2: Sequence[str] | None = None,
        fdr_target: float = 0.05,
        silent: bool = False,
        weights: Literal["uniform", "importance"] | None = "uniform",
        filter_outlier_cells: bool = False,
        importance_weighting_kwargs: dict | None = None,
        **kwargs,
    ) -> pd.DataFrame:
        """scvi-tools' DataFrame of :func:`scanpy_scvi.tl.differential_expression` (``inplace=False``).

        Parameters
        ----------
        adata, groupby, group1, group2, idx1, idx2
            As in scvi-tools (``idx1`` / ``idx2`` may be an ``adata.obs.query`` string).
        mode
            ``'vanilla'`` (scvi-tools' default for SCVI and SCANVI) or ``'change'`` (TOTALVI's).
        delta, batch_size, batch_correction, batchid1, batchid2, fdr_target
            As in :func:`~scanpy_scvi.tl.differential_expression`.
        all_stats
            ``False`` leaves out the raw-count columns.
        silent
            No progress bar.
        weights, filter_outlier_cells, importance_weighting_kwargs
            Only ``'uniform'``, ``False`` and none: cells are drawn uniformly.
        **kwargs
            scvi-tools' ``get_bayes_factors`` options: ``n_samples_overall`` (our ``n_samples``,
            default 5000), ``pseudocounts``, ``m_permutation`` (no effect: the pairs are the
            draws), ``use_permutation=False``, ``test_mode='three'``, ``change_fn='log-fold'``.

        Returns
        -------
        scvi-tools' columns in its order (``proba_de``, ``proba_not_de``, ``bayes_factor``,
        ``scale1``, ``scale2``, ``pseudocounts``, ``delta``, ``lfc_*``, raw-count columns,
        ``is_de_fdr_<fdr_target>``, ``comparison``, ``group1``, ``group2`` in change mode;
        ``proba_m1``, ``proba_m2``, ``bayes_factor``, ``scale1``, ``scale2``, raw-count columns,
        ``comparison``, ``group1``, ``group2`` in vanilla mode), then the columns only ours has
        (``proba_up`` / ``proba_down``; ``pseudocounts``, ``delta``, ``lfc_*`` in vanilla mode).
        One-vs-all comparisons name the rest ``'Rest'``; with ``idx1`` there are no
        ``comparison`` / ``group`` columns, as in scvi-tools. Indexed by gene.
        """
        return self._differential_expression(
            adata, groupby, group1, group2, idx1, idx2, mode, delta, batch_size, all_stats, batch_correction,
            batchid1, batchid2, fdr_target, silent, weights, filter_outlier_cells, importance_weighting_kwargs,
            kwargs, {},
        )  # fmt: skip

    def _differential_expression(
        self, adata, groupby, group1, group2, idx1, idx2, mode, delta, batch_size, all_stats, batch_correction,
        batchid1, batchid2, fdr_target, silent, weights, filter_outlier_cells, importance_weighting_kwargs,
        bayes_kwargs, protein_options,
    ) -> pd.DataFrame:  # fmt: skip
        if weights not in (None, "uniform") or filter_outlier_cells or importance_weighting_kwargs:
            msg = "weights='importance', filter_outlier_cells and importance_weighting_kwargs are not available."
            raise ValueError(msg)
        options = dict(bayes_kwargs)
        n_samples = options.pop("n_samples_overall", 5000)
        pseudocounts = options.pop("pseudocounts", None)
        options.pop("m_permutation", None)  # the number of pairs: here every draw is paired once
        for name, allowed in {
            "use_permutation": (False,), "test_mode": ("three",), "change_fn": (None, "log-fold"),
            "m1_domain_fn": (None,), "threshold_counts": (0.01,), "cred_interval_lvls": (None,),
            "dataloader": (None,),
        }.items():  # fmt: skip
            if name in options and options.pop(name) not in allowed:
                msg = f"differential_expression: {name} other than {allowed[0]!r} is not available here."
                raise ValueError(msg)
        if options:
            msg = f"differential_expression() got unexpected keyword arguments {sorted(options)}."
            raise TypeError(msg)
        if delta is None:
            msg = "delta=None (estimated by scvi-tools) is not available: pass a positive log2 fold change."
            raise ValueError(msg)
        adata = self.adata if adata is None else adata
        if all_stats and _minify_type(adata) is not None:
            warn("Count statistics make no sense for minified model. Consider disabling all_stats.")  # scvi-tools'
        df = tl.differential_expression(
            adata, groupby=None if idx1 is not None else groupby, group1=group1, group2=group2,
            idx1=None if idx1 is None else _as_cells_mask(idx1, adata),
            idx2=None if idx2 is None else _as_cells_mask(idx2, adata),
            mode=mode, delta=delta, fdr_target=fdr_target, pseudocounts=pseudocounts,
            batch_correction=batch_correction, batchid1=batchid1, batchid2=batchid2, n_samples=n_samples,
            model=self, inplace=False, random_state=settings.seed, progress_bar=not silent, batch_size=batch_size,
            **protein_options,
        )  # fmt: skip
        return _scvi_tools_table(df, mode, fdr_target, all_stats=all_stats, by_idx=idx1 is not None, adata=adata)

    # -- reference mapping (scArches) ----------------------------------------------------------------
    @classmethod
    def _door_of(cls, reference):
        """``reference`` (a model of this door or of its base class, or a saved directory) as a door model."""
        if isinstance(reference, (str, os.PathLike)):
            return cls.load(reference, accelerator="cpu")
        if isinstance(reference, cls):
            return reference
        if type(reference) is cls._base:  # our model: a door model sharing its state
            door = cls.__new__(cls)
            door.__dict__.update(vars(reference))
            return door
        msg = f"reference_model must be a {cls.__name__} model or a directory it was saved to, got {type(reference).__name__}."
        raise TypeError(msg)

    @staticmethod
    def prepare_query_anndata(
        adata: AnnData, reference_model, return_reference_var_names: bool = False, inplace: bool = True
    ) -> AnnData | pd.Index | None:
        """The query with the reference's genes, in the reference's order: missing genes as zero
        counts (in ``X`` and every layer), extra genes dropped; ``obs``, ``obsm``, ``obsp`` and
        ``uns`` kept (``varm`` and ``varp`` dropped). ``inplace``: ``adata`` becomes it (it must
        not be a view); else it is returned."""
        reference = (
            BaseModel.load(reference_model, device="cpu")
            if isinstance(reference_model, (str, os.PathLike))
            else reference_model
        )
        genes = pd.Index(reference.setup.genes)
        if return_reference_var_names:
            return genes
        pos = adata.var_names.get_indexer(genes)
        found = pos >= 0
        if not found.any():
            msg = "None of the reference's genes are in the query; check the gene identifiers (symbols vs Ensembl IDs)."
            raise ValueError(msg)
        logg.info(f"found {100 * found.mean():.1f}% of the reference's genes in the query")
        if found.mean() < REFERENCE_GENE_RATIO:
            warn(f"The query has fewer than {REFERENCE_GENE_RATIO:.0%} of the reference's genes; mapping may be poor.")
        if inplace and adata.is_view:
            msg = "adata is a view; pass a copy (`adata.copy()`) or inplace=False."
            raise ValueError(msg)

        def padded(matrix):
            # a 0/1 selection matrix: each reference gene's column from the query, or zeros (exact)
            select = sp.csr_matrix(
                (np.ones(int(found.sum()), dtype=matrix.dtype), (pos[found], np.flatnonzero(found))),
                shape=(adata.n_vars, len(genes)),
            )
            return (matrix @ select).tocsr() if sp.issparse(matrix) else np.asarray(matrix @ select)

        import anndata

        new = anndata.AnnData(
            X=None if adata.X is None else padded(adata.X), obs=adata.obs.copy(), var=adata.var.reindex(genes),
            uns=dict(adata.uns), obsm=dict(adata.obsm), obsp=dict(adata.obsp),
            layers={k: padded(v) for k, v in adata.layers.items()},
        )  # fmt: skip
        if not inplace:
            return new
        adata._init_as_actual(
            new.X, obs=new.obs, var=new.var, uns=new.uns, obsm=new.obsm, obsp=new.obsp, layers=new.layers, raw=adata.raw
        )
        return None

    @classmethod
    def load_query_data(
        cls,
        adata: AnnData | None = None,
        reference_model=None,
        inplace_subset_query_vars: bool = False,
        accelerator: str = "auto",
        device: int | str = "auto",
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_expression: bool = True,
        freeze_decoder_first_layer: bool = True,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = False,
        freeze_classifier: bool = True,
        transfer_batch: bool = True,
        registry: dict | None = None,
        datamodule=None,
    ):
        """scArches surgery: the query model of ``adata`` on ``reference_model`` (a model or a directory).

        Over :func:`scanpy_scvi.model.query_model`: the query's new batches (and covariate
        values) get new columns, starting at the mean of the reference's; they, the library
        encoder and (unless ``freeze_batchnorm_decoder``) the decoder's batch-norm scale and
        shift learn; every other weight stays the reference's bit for bit, weight decay included
        (scvi-tools' weight decay moved the reference's batch columns, hence its tutorials'
        ``weight_decay=0.0``). Train it with :meth:`train`. The query's setup (the
        reference's) is recorded in ``adata.uns``; ``adata`` needs all reference genes (see
        :meth:`prepare_query_anndata`). scANVI query cells are treated as unlabelled.

        Only the freezing scvi-tools does by default is available, plus ``freeze_dropout``,
        ``freeze_expression=False`` (the encoder's expression inputs learn too) and
        ``freeze_batchnorm_decoder``; ``unfrozen``, ``freeze_decoder_first_layer=False``,
        ``freeze_batchnorm_encoder=False`` and ``freeze_classifier=False`` raise.
        """
        for name, value, ok, what in (
            ("unfrozen", unfrozen, False, "the reference weights stay frozen; train a new model on the joint data"),
            ("freeze_decoder_first_layer", freeze_decoder_first_layer, True, "the decoder's first layer stays frozen"),
            ("freeze_batchnorm_encoder", freeze_batchnorm_encoder, True, "the encoder's batch norm stays frozen"),
            ("freeze_classifier", freeze_classifier, True, "scANVI's classifier stays the reference's"),
            ("transfer_batch", transfer_batch, True, "query batches always become new categories"),
        ):
            if bool(value) is not ok:
                msg = f"load_query_data({name}={value!r}) is not available: {what}."
                raise ValueError(msg)
        if registry is not None or datamodule is not None or adata is None:
            msg = "load_query_data needs the query AnnData (registry and datamodule are not available)."
            raise TypeError(msg)
        if reference_model is None:
            msg = "Pass reference_model: a model or a directory it was saved to."
            raise ValueError(msg)
        if _minify_type(adata) is not None:
            msg = "load_query_data needs the query's counts (to train on), and the query AnnData is minified."
            raise ValueError(msg)
        target, several = _device(accelerator, _devices_of(device))
        if several:
            msg = f"device={device!r}: a model is loaded onto one device."
            raise ValueError(msg)
        reference = cls._door_of(reference_model)
        missing = reference.setup.missing_genes(adata)
        if missing:
            msg = (
                f"The query lacks {len(missing)} of the reference's {len(reference.setup.genes)} genes (e.g. "
                f"{missing[:5]}); run `{cls.__name__}.prepare_query_anndata(adata, reference_model)` first."
            )
            raise ValueError(msg)
        if inplace_subset_query_vars:
            adata._inplace_subset_var(list(reference.setup.genes))
        query, _added = query_model(
            reference, adata, max_missing_genes=0.0, freeze_expression=freeze_expression,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder, random_state=settings.seed,
            remove_dropout=freeze_dropout,
        )  # fmt: skip
        query.to_device(target)
        cls._record(adata, _setup_args(query.setup, cls._kind))
        return query


_NO_TOTALVI_MINIFY = (
    "minify_adata is not available for TOTALVI here: this package's totalVI module encodes the RNA and protein "
    "counts together and has no inference from a cached posterior of z (scvi-tools minifies totalVI since 1.2.2). "
    "Keep the counts; `get_latent_representation(return_dist=True)` gives the posterior to store in obsm."
)


def _minify_type(data) -> str | None:
    """``uns['_scvi_adata_minify_type']`` of an AnnData (None: not minified, or no AnnData)."""
    value = None if data is None else data.uns.get(MINIFY_TYPE_KEY)
    return None if value is None else str(value)


def _copied(mapping) -> dict[str, Any]:
    return {k: v.copy() for k, v in mapping.items()}


_NO_MANAGER = (
    "There are no AnnDataManager objects here: a model's data setup is `model.setup` (JSON-able), the setup "
    "of setup_anndata is recorded in adata.uns['_scvi_setup']; see view_anndata_setup and get_from_registry."
)


def _no_prefix(prefix) -> None:
    if prefix is not None:
        msg = "prefix is not available: a model directory holds model.safetensors and config.json."
        raise ValueError(msg)


_CHANGE_COLUMNS = (
    "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta",
    "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max",
)  # fmt: skip
_VANILLA_COLUMNS = ("proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2")
_RAW_COLUMNS = (
    "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
    "raw_normalized_mean2",
)  # fmt: skip


def _scvi_tools_table(df: pd.DataFrame, mode: str, fdr_target: float, *, all_stats: bool, by_idx: bool, adata):
    """Our DE DataFrame in scvi-tools' layout (its columns first, in its order; ours after)."""
    df = df.copy()
    if "group2" in df and (df["group2"] == "rest").all():
        df["group2"] = "Rest"
        df["comparison"] = df["group1"].astype(str) + " vs Rest"
    first = list(_CHANGE_COLUMNS if mode == "change" else _VANILLA_COLUMNS)
    if all_stats:
        first += _RAW_COLUMNS
    if mode == "change":
        first.append(f"is_de_fdr_{fdr_target}")
    labels = ["comparison", "group1", "group2"]
    ours_only = [c for c in df.columns if c not in first and c not in labels and c not in _RAW_COLUMNS]
    out = df[first + ([] if by_idx else labels) + ours_only]
    out.index = pd.Index(out.index, name=adata.var_names.name)
    return out


# -- the model classes ----------------------------------------------------------------------------------
def _scvi_setup(cls, adata: AnnData, kwargs: Mapping[str, Any], **keys) -> None:
    """Check and record ``setup_anndata``'s arguments ``keys`` (``kwargs``: the unknown ones)."""
    if kwargs:
        msg = f"{cls.__name__}.setup_anndata() got unexpected keyword arguments {sorted(kwargs)}."
        raise TypeError(msg)
    if is_mudata(adata):
        msg = f"{cls.__name__}.setup_anndata takes an AnnData" + (
            ", use setup_mudata." if cls._kind == "TOTALVI" else "."
        )
        raise TypeError(msg)
    args = _clean_keys(**keys)
    if args.get("labels_key", "") is None:
        del args["labels_key"]
    checked = {k: v for k, v in args.items() if k != "unlabeled_category"}
    DataSetup.from_adata(adata, **checked)  # keys, layer and categories checked now, as scvi-tools does
    cls._record(adata, args)


class SCVI(_Door, _ours.SCVI, register=False):
    """scvi-tools' ``scvi.model.SCVI`` over :class:`scanpy_scvi.SCVI`.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata` (its whole ``var``: no gene selection).
    n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood, latent_distribution
        As in scvi-tools (the same defaults).
    **model_kwargs
        The other architecture settings of :class:`scanpy_scvi.SCVI` under scvi-tools' names
        (``use_batch_norm``, ``use_layer_norm``, ``encode_covariates``,
        ``deeply_inject_covariates``, ``use_observed_lib_size``, ...). Those scvi-tools sets from
        the data (``n_batch``, ``library_log_means``, ...) raise a ``TypeError``.
    """

    _kind = "SCVI"
    _base = _ours.SCVI
    _linear = False

    def __init__(
        self,
        adata: AnnData | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        latent_distribution: str = "normal",
        **model_kwargs,
    ):
        args = self._setup_of(adata)
        super().__init__(
            adata, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
            dispersion=dispersion, gene_likelihood=gene_likelihood, latent_distribution=latent_distribution,
            random_state=settings.seed, **args, **self._architecture(model_kwargs),
        )  # fmt: skip

    @classmethod
    def _architecture(cls, model_kwargs) -> dict[str, Any]:
        kwargs = _model_kwargs(cls.__name__, model_kwargs)
        if cls._linear:
            kwargs["linear_decoder"] = True
        return kwargs

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        """Check and record where the counts and covariates are (``adata.uns['_scvi_setup']``).

        Every argument is :class:`scanpy_scvi.SCVI`'s of the same name. Nothing else of
        ``adata`` is changed (scvi-tools also adds ``_scvi_*`` obs columns; none here).
        """
        _scvi_setup(
            cls,
            adata,
            kwargs,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = 0.9,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_config: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        trainer_config: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """scvi-tools' ``train`` over :meth:`scanpy_scvi.SCVI.train`.

        ``max_epochs=None``: scvi-tools' heuristic ``min(400, round(20000 / n_cells * 400))``.
        ``accelerator`` / ``devices``: ``'cpu'``, ``'gpu'`` (``'cuda'``) or ``'auto'``, one device
        (several need ``strategy='ddp'`` under torchrun). ``plan_kwargs``: ``lr``,
        ``weight_decay``, ``eps``, the KL warm-up (``n_epochs_kl_warmup``, ``n_steps_kl_warmup``,
        ``min_kl_weight``, ``max_kl_weight``) and the plateau schedule (``reduce_lr_on_plateau``,
        ``lr_factor``, ``lr_patience``). Trainer options:
        ``early_stopping_patience``, ``early_stopping_min_delta``, ``enable_progress_bar``.
        ``load_sparse_tensor`` and display-only Lightning options have no effect. Seeded by
        ``settings.seed``. Unlike scvi-tools, early stopping ends with the weights of the best
        epoch, not the last.
        """
        kwargs = _train_kwargs(
            explicit={"batch_size": batch_size, "early_stopping": early_stopping},
            defaults={"batch_size": 128, "early_stopping": False},
            accelerator=accelerator, devices=devices, train_size=train_size, validation_size=validation_size,
            shuffle_set_split=shuffle_set_split, datasplitter_kwargs=datasplitter_kwargs, plan_kwargs=plan_kwargs,
            plan_config=plan_config, datamodule=datamodule, trainer_config=trainer_config, trainer_kwargs=trainer_kwargs,
        )  # fmt: skip
        super().train(max_epochs, **kwargs)

    @classmethod
    def _check_loaded(cls, loaded) -> None:
        if bool(loaded.architecture.linear_decoder) is not cls._linear:
            other = "SCVI" if cls._linear else "LinearSCVI"
            msg = f"The directory holds a {other} model (linear_decoder={not cls._linear}); load it with {other}."
            raise ValueError(msg)


class LinearSCVI(SCVI, register=False):
    """scvi-tools' ``scvi.model.LinearSCVI`` (LDVAE): :class:`scanpy_scvi.SCVI` with ``linear_decoder=True``.

    As :class:`SCVI` (same setup, train and methods, plus ``get_loadings``), with scvi-tools'
    LDVAE defaults: ``gene_likelihood='nb'`` and a learned library size.
    """

    _kind = "LinearSCVI"
    _linear = True
    _LATENT_QZM_KEY, _LATENT_QZV_KEY = "ldvae_latent_qzm", "ldvae_latent_qzv"

    def __init__(
        self,
        adata: AnnData | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "nb",
        latent_distribution: str = "normal",
        **model_kwargs,
    ):
        super().__init__(
            adata, n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood, latent_distribution,
            **model_kwargs,
        )  # fmt: skip


class SCANVI(_Door, _ours.SCANVI, register=False):
    """scvi-tools' ``scvi.model.SCANVI`` over :class:`scanpy_scvi.SCANVI`.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata` (``labels_key``, ``unlabeled_category``).
    n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood, linear_classifier
        As in scvi-tools (the same defaults).
    **model_kwargs
        Further architecture settings, as for :class:`SCVI`.
    """

    _kind = "SCANVI"
    _base = _ours.SCANVI
    _LATENT_QZM_KEY, _LATENT_QZV_KEY = "scanvi_latent_qzm", "scanvi_latent_qzv"

    def __init__(
        self,
        adata: AnnData | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        linear_classifier: bool = False,
        **model_kwargs,
    ):
        if isinstance(n_hidden, str):
            msg = (
                f"SCANVI(adata, {n_hidden!r}): since scvi-tools 0.15 the unlabelled category is an argument of "
                f"`SCANVI.setup_anndata(adata, labels_key=..., unlabeled_category={n_hidden!r})`."
            )
            raise TypeError(msg)
        args = self._setup_of(adata)
        super().__init__(
            adata, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
            dispersion=dispersion, gene_likelihood=gene_likelihood, linear_classifier=linear_classifier,
            random_state=settings.seed, **args, **_model_kwargs("SCANVI", model_kwargs),
        )  # fmt: skip

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        unlabeled_category: str,
        layer: str | None = None,
        batch_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        """Check and record the setup, as :meth:`SCVI.setup_anndata` plus the unlabelled category."""
        if labels_key is None:
            msg = "SCANVI.setup_anndata needs labels_key (an obs column of cell types)."
            raise ValueError(msg)
        _scvi_setup(
            cls,
            adata,
            kwargs,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            unlabeled_category=str(unlabeled_category),
        )

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: _ours.SCVI,
        unlabeled_category: str,
        labels_key: str | None = None,
        adata: AnnData | None = None,
        **scanvi_kwargs,
    ) -> SCANVI:
        """scANVI started from a trained scVI model (:meth:`scanpy_scvi.SCANVI.from_scvi_model`).

        ``labels_key`` defaults to the scVI model's. ``scanvi_kwargs``: only
        ``linear_classifier`` (the architecture is the scVI model's). Records the scANVI setup
        in the AnnData. scvi-tools also started from an untrained model (with a warning); here
        that is an error.
        """
        if _minify_type(scvi_model.adata if adata is None else adata) is not None:
            msg = (
                "scANVI is trained on the counts, and the scVI model's AnnData is minified: pass the AnnData with "
                "the counts (adata=...)."
            )
            raise ValueError(msg)
        labels_key = scvi_model.setup.labels_key if labels_key is None else labels_key
        if labels_key is None:
            msg = "The scVI model was set up without labels_key; pass labels_key= (an obs column of cell types)."
            raise ValueError(msg)
        linear_classifier = scanvi_kwargs.pop("linear_classifier", False)
        if scanvi_kwargs:
            msg = f"from_scvi_model(): {sorted(scanvi_kwargs)}: scANVI keeps the scVI model's architecture here."
            raise TypeError(msg)
        made = super().from_scvi_model(
            scvi_model, labels_key=labels_key, unlabeled_category=unlabeled_category, adata=adata,
            linear_classifier=linear_classifier, random_state=settings.seed,
        )  # fmt: skip
        cls._record(made.adata, _setup_args(made.setup, "SCANVI"))
        return made

    def train(
        self,
        max_epochs: int | None = None,
        n_samples_per_label: float | None = None,
        check_val_every_n_epoch: int | None = None,
        train_size: float | None = 0.9,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 128,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        **trainer_kwargs,
    ) -> None:
        """scvi-tools' ``train`` over :meth:`scanpy_scvi.SCANVI.train`, as :meth:`SCVI.train` plus
        ``plan_kwargs['classification_ratio']`` (default 50). ``max_epochs=None`` after
        :meth:`from_scvi_model`: ``min(10, max(2, round(heuristic / 3)))``, as scvi-tools.
        ``n_samples_per_label``: each epoch's labelled minibatches come from at most that many
        cells of each label, drawn anew every epoch."""
        kwargs = _train_kwargs(
            explicit={"batch_size": batch_size}, defaults={"batch_size": 128}, extra_plan=("classification_ratio",),
            accelerator=accelerator, devices=devices, train_size=train_size, validation_size=validation_size,
            shuffle_set_split=shuffle_set_split, datasplitter_kwargs=datasplitter_kwargs, plan_kwargs=plan_kwargs,
            datamodule=datamodule, trainer_kwargs=trainer_kwargs,
        )  # fmt: skip
        if n_samples_per_label is not None:
            kwargs["n_samples_per_label"] = int(n_samples_per_label)
        super().train(max_epochs, **kwargs)


class TOTALVI(_Door, _ours.TOTALVI, register=False):
    """scvi-tools' ``scvi.model.TOTALVI`` over :class:`scanpy_scvi.TOTALVI`.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata`, or a MuData set up with :meth:`setup_mudata`
        (then the model's ``adata`` is the AnnData :func:`scanpy_scvi.data.anndata_from_mudata`
        makes of it, and its outputs are for those cells).
    n_latent, gene_dispersion, protein_dispersion, gene_likelihood, latent_distribution, empirical_protein_background_prior, override_missing_proteins
        As in scvi-tools (the same defaults).
    **model_kwargs
        Further architecture settings of :class:`scanpy_scvi.TOTALVI` (``n_hidden``,
        ``n_layers_encoder``, ``dropout_rate_encoder``, ...).
    """

    _kind = "TOTALVI"
    _base = _ours.TOTALVI
    _LATENT_QZM_KEY = _LATENT_QZV_KEY = None  # see _NO_TOTALVI_MINIFY

    def __init__(
        self,
        adata=None,
        n_latent: int = 20,
        gene_dispersion: str = "gene",
        protein_dispersion: str = "protein",
        gene_likelihood: str = "nb",
        latent_distribution: str = "normal",
        empirical_protein_background_prior: bool | None = None,
        override_missing_proteins: bool = False,
        **model_kwargs,
    ):
        if adata is None:
            msg = "TOTALVI(adata=None) is not available: pass the AnnData or MuData."
            raise TypeError(msg)
        method, args = _recorded_setup(adata, "TOTALVI")
        if method == "setup_mudata":
            from ..data import anndata_from_mudata

            convert = {k: args.pop(k) for k in ("modalities", "rna_layer", "protein_layer")}
            adata = anndata_from_mudata(adata, **convert)
            args["protein_expression_obsm_key"] = "protein_expression"
        super().__init__(
            adata, n_latent=n_latent, gene_dispersion=gene_dispersion, protein_dispersion=protein_dispersion,
            gene_likelihood=gene_likelihood, latent_distribution=latent_distribution,
            empirical_protein_background_prior=empirical_protein_background_prior,
            override_missing_proteins=override_missing_proteins, random_state=settings.seed,
            **args, **_model_kwargs("TOTALVI", model_kwargs),
        )  # fmt: skip

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        protein_expression_obsm_key: str,
        protein_names_uns_key: str | None = None,
        batch_key: str | None = None,
        layer: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        """Check and record the setup: :class:`scanpy_scvi.TOTALVI`'s arguments of the same names."""
        _scvi_setup(
            cls,
            adata,
            kwargs,
            layer=layer,
            batch_key=batch_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            protein_expression_obsm_key=protein_expression_obsm_key,
            protein_names_uns_key=protein_names_uns_key,
        )

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        batch_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        modalities: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        """Check and record the setup of a MuData (RNA and protein modalities), read by
        :func:`scanpy_scvi.data.anndata_from_mudata` with ``modalities``, ``rna_layer`` and
        ``protein_layer``; the obs keys are looked up in the AnnData it makes."""
        from ..data import anndata_from_mudata

        if kwargs:
            msg = f"TOTALVI.setup_mudata() got unexpected keyword arguments {sorted(kwargs)}."
            raise TypeError(msg)
        convert = {
            "modalities": dict(modalities) if modalities else None,
            "rna_layer": rna_layer,
            "protein_layer": protein_layer,
        }
        args = _clean_keys(
            batch_key=batch_key, size_factor_key=size_factor_key, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )  # fmt: skip
        converted = anndata_from_mudata(mdata, **convert)
        DataSetup.from_adata(converted, protein_expression_obsm_key="protein_expression", **args)
        cls._record(mdata, {**convert, **args}, method="setup_mudata")

    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 4e-3,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = 0.9,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 256,
        early_stopping: bool = True,
        check_val_every_n_epoch: int | None = None,
        reduce_lr_on_plateau: bool = True,
        n_steps_kl_warmup: int | None = None,
        n_epochs_kl_warmup: int | None = None,
        adversarial_classifier: bool | None = None,
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        **kwargs,
    ) -> None:
        """scvi-tools' ``train`` over :meth:`scanpy_scvi.TOTALVI.train` (the same defaults), with
        the options of :meth:`SCVI.train`; ``plan_kwargs`` may also set ``adversarial_classifier``."""
        explicit = {
            "lr": lr, "batch_size": batch_size, "early_stopping": early_stopping,
            "reduce_lr_on_plateau": reduce_lr_on_plateau, "n_steps_kl_warmup": n_steps_kl_warmup,
            "n_epochs_kl_warmup": n_epochs_kl_warmup, "adversarial_classifier": adversarial_classifier,
        }  # fmt: skip
        defaults = {
            "lr": 4e-3, "batch_size": 256, "early_stopping": True, "reduce_lr_on_plateau": True,
            "n_steps_kl_warmup": None, "n_epochs_kl_warmup": None, "adversarial_classifier": None,
        }  # fmt: skip
        kwargs = _train_kwargs(
            explicit=explicit, defaults=defaults, extra_plan=("adversarial_classifier",), accelerator=accelerator,
            devices=devices, train_size=train_size, validation_size=validation_size,
            shuffle_set_split=shuffle_set_split, datasplitter_kwargs=datasplitter_kwargs, plan_kwargs=plan_kwargs,
            datamodule=datamodule, trainer_kwargs=kwargs,
        )  # fmt: skip
        super().train(max_epochs, **kwargs)

    def get_latent_library_size(
        self, adata: AnnData | None = None, indices=None, give_mean: bool = True, batch_size: int | None = None
    ) -> np.ndarray:
        """RNA library size per cell, shape (cells, 1): the total counts (observed library), or
        the posterior mean exp(mu + var / 2) of a learned one (``give_mean``; else one draw).
        scvi-tools raised for ``give_mean`` with the observed library; here it is the total."""
        bound, idx = self.select(adata, indices)
        out = np.empty((len(idx), 1), dtype=np.float32)
        with self.inference_mode():
            for rows, t in self.minibatches(bound, idx, batch_size):
                inf = self.module.inference(t)
                mean = give_mean and "ql_m" in inf
                out[rows] = to_numpy(torch.exp(inf["ql_m"] + 0.5 * inf["ql_v"]) if mean else torch.exp(inf["library"]))
        return out

    def get_protein_background_mean(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None):
        """Background mean (beta) per cell and protein from one posterior draw, (cells, proteins)."""
        return self.get_likelihood_parameters(adata, indices, batch_size=batch_size)["background_mean"]

    def differential_expression(
        self,
        adata: AnnData | None = None,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1=None,
        idx2=None,
        mode: Literal["vanilla", "change"] = "change",
        delta: float = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1: Sequence[str] | None = None,
        batchid2: Sequence[str] | None = None,
        fdr_target: float = 0.05,
        silent: bool = False,
        protein_prior_count: float = 0.1,
        scale_protein: bool = False,
        sample_protein_mixing: bool = False,
        include_protein_background: bool = False,
        **kwargs,
    ) -> pd.DataFrame:
        """As :meth:`SCVI.differential_expression` over genes then proteins (default ``mode='change'``),
        with ``protein_prior_count`` and ``include_protein_background``; ``scale_protein`` and
        ``sample_protein_mixing`` are not available."""
        if scale_protein or sample_protein_mixing:
            msg = "scale_protein and sample_protein_mixing are not available in differential expression here."
            raise ValueError(msg)
        protein = {"protein_prior_count": protein_prior_count, "include_protein_background": include_protein_background}
        return self._differential_expression(
            adata, groupby, group1, group2, idx1, idx2, mode, delta, batch_size, all_stats, batch_correction,
            batchid1, batchid2, fdr_target, silent, "uniform", False, None, kwargs, protein,
        )  # fmt: skip


model = SimpleNamespace(SCVI=SCVI, LinearSCVI=LinearSCVI, SCANVI=SCANVI, TOTALVI=TOTALVI)
"""``scvi.model``: the door classes under scvi-tools' names."""

__all__ = ["SCANVI", "SCVI", "TOTALVI", "LinearSCVI", "ScviToolsSettings", "model", "settings"]
