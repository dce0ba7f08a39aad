"""The base of every model object: one way to assemble it, training, the internal API, files.

A model is a :class:`~scanpy_scvi.data.DataSetup` (what it knows of its AnnData), an
architecture (a frozen settings dataclass of its torch module) and the module's weights.
Every way to make a model (fresh from an AnnData, loaded from a directory, rebuilt from
``adata.uns``, initialised from another model, a query model for reference mapping) ends in
:meth:`BaseModel._assemble`, which sets every attribute.

Internal API
------------
``tl``, ``pp`` and the CLI run a model over cells only through public methods of the model
object: ``bind``, ``select``, ``minibatches``, ``inference_mode``, ``seeded``,
``batch_codes``, ``gene_mask``, ``latent``, ``default_max_epochs``, ``uns_record`` (here),
``feature_names`` and ``decode_features`` (the models with a count decoder), and ``module``.
docs/architecture.rst describes each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch

from .._compat import logg
from .._settings import check_positive_int
from ..data import BoundData, DataSetup
from ..nn import to_numpy
from ..train import Distributed, Objective, TrainConfig, evaluate, train
from ._device import resolve_device, seeded_on
from ._io import FORMAT, FORMAT_VERSION, read_model_dir, write_model_dir
from ._selection import cell_positions, names_mask, split_groups

if TYPE_CHECKING:
    import os

    from anndata import AnnData
    from torch import nn

    from .._settings import Settings

DEFAULT_INFERENCE_BATCH = 1024  # eval-mode minibatches; output memory dominates, not this


class BaseModel:
    """What every model object shares; see the module docstring for the internal API."""

    name: ClassVar[str] = "model"  # the model's name in messages
    uns_key: ClassVar[str] = "scvi"  # where its pp function stores it (from_anndata's default)
    module_class: ClassVar[type[nn.Module]]
    _classes: ClassVar[dict[str, type[BaseModel]]] = {}

    def __init_subclass__(cls, *, register: bool = True, **kwargs):
        super().__init_subclass__(**kwargs)
        if register:  # model files name their class; the doors of scanpy_scvi.compat pass register=False
            BaseModel._classes[cls.__name__] = cls

    # -- assembly ----------------------------------------------------------------------------------
    def _assemble(
        self,
        setup: DataSetup,
        architecture: Settings,
        *,
        adata: AnnData | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
        random_state: int | None = 0,
        record: Mapping[str, Any] | None = None,
        initialised_from: str | None = None,
        source: str = "the model",
    ) -> None:
        """Build the module from ``setup`` and ``architecture`` and set every attribute.

        ``state``: weights to load (checked against the module: a mismatch is a corrupt file);
        without it the module starts from ``random_state``'s initialisation. ``adata``: the
        AnnData to bind as the model's default data. ``record``: the saved training record
        (``history``, ``train_config``, ``is_trained``). ``initialised_from``: the kind of
        model the weights came from (e.g. ``'SCVI'`` for scANVI started from scVI).
        """
        self.setup = setup
        self.architecture = architecture
        with seeded_on(random_state, torch.device("cpu")):
            self.module = self.module_class(len(setup.genes), **setup.module_sizes(), architecture=architecture)
        if state is not None:
            _load_checked(self.module, state, source)
        self.module.eval()
        self.device = torch.device("cpu")
        record = record or {}
        self.history_: dict[str, list[float]] = {k: list(v) for k, v in record.get("history", {}).items()}
        self.train_config: dict[str, Any] = dict(record.get("train_config", {}))
        self.is_trained = bool(record.get("is_trained", False))
        self.initialised_from = initialised_from
        self.train_indices = self.validation_indices = np.arange(0)
        self.trainable_masks: dict[str, torch.Tensor] | None = None  # partly frozen tensors (reference mapping)
        self.adata: AnnData | None = None
        self._bound: BoundData | None = None
        if adata is not None:
            self.attach(adata)
            if state is None and self._bound.n_obs < 3:
                msg = f"{self.name} needs at least 3 cells to train; adata has {self._bound.n_obs}."
                raise ValueError(msg)
            if state is None and not getattr(self.module, "use_observed_lib_size", True):
                self._init_library_prior(self._bound)  # fresh weights on data: the learned-library prior

    def _init_library_prior(self, bound: BoundData) -> None:
        """Per-batch mean and (population) variance of log total counts of the bound cells: the
        learned-library prior (a batch without cells keeps N(0, 1))."""
        means, variances = bound.log_library_moments(self.setup.n_batch)
        self.module.library_log_means.copy_(torch.as_tensor(means[None], dtype=torch.float32))
        self.module.library_log_vars.copy_(torch.as_tensor(variances[None], dtype=torch.float32))

    @classmethod
    def _assembled(cls, setup: DataSetup, architecture: Settings, **kwargs) -> BaseModel:
        """A model of class ``cls`` made by :meth:`_assemble` (the path of every constructor but
        ``__init__``, which calls ``_assemble`` itself)."""
        model = cls.__new__(cls)
        model._assemble(setup, architecture, **kwargs)
        return model

    def attach(self, adata: AnnData, *, bound: BoundData | None = None) -> None:
        """Make ``adata`` (checked) the model's default data; ``bound``: its already checked data
        when ``adata`` is a copy of the AnnData it was bound from (no second pass over the counts)."""
        self._bound = self.setup.bind(adata) if bound is None else bound
        self.adata = adata

    # -- training ------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        train_size: float = 0.9,
        batch_size: int = 128,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        early_stopping_min_delta: float = 0.0,
        n_epochs_kl_warmup: int | None = 400,
        n_steps_kl_warmup: int | None = None,
        min_kl_weight: float = 0.0,
        max_kl_weight: float = 1.0,
        reduce_lr_on_plateau: bool = False,
        lr_factor: float = 0.6,
        lr_patience: int = 30,
        device: str | torch.device = "auto",
        counts_on_device: bool | None = None,
        strategy: str | None = None,
        random_state: int | None = 0,
        progress_bar: bool = True,
    ) -> None:
        """Train with Adam and a linear KL warm-up (the scvi-tools training plan).

        Parameters
        ----------
        max_epochs
            Epochs. ``None`` uses scvi-tools' heuristic ``min(400, round(20000 / n_cells * 400))``.
        lr, weight_decay, eps
            Adam settings (reference defaults 1e-3, 1e-6, 0.01).
        train_size
            Fraction of cells used for training; the rest is a validation set whose ELBO is
            recorded every epoch. ``1.0`` trains on all cells.
        batch_size
            Cells per minibatch. A final minibatch of fewer than 3 cells is merged into the
            previous one, so batch norm never sees a single cell.
        early_stopping
            Stop when the validation ELBO (training ELBO when ``train_size=1``: there is no
            validation set) has not improved by ``early_stopping_min_delta`` for
            ``early_stopping_patience`` epochs, and restore the weights of the best epoch
            (scvi-tools keeps the last weights).
        n_epochs_kl_warmup, n_steps_kl_warmup, min_kl_weight, max_kl_weight
            The z-KL weight rises linearly from min to max over this many epochs (or, when
            ``n_steps_kl_warmup`` is given, optimiser steps).
        reduce_lr_on_plateau, lr_factor, lr_patience
            Multiply the learning rate by ``lr_factor`` when the ELBO monitored as for early
            stopping has not improved for ``lr_patience`` epochs (history gains ``lr``).
        device
            ``'auto'`` (CUDA if available, else CPU), ``'cpu'``, ``'cuda'`` or a torch device.
        counts_on_device
            Hold the model genes' counts on ``device`` (as CSR) and gather minibatches there,
            instead of building each one on the host. ``None``: on a GPU when they take at most
            half of its free memory. ``True`` also works on the CPU (a CSR copy of the counts).
        strategy
            ``'ddp'``: train across the processes of a ``torchrun`` launch, ``batch_size`` cells
            per process and step; every process ends with the same weights (docs: "Large data").
        random_state
            Seed of the split, the shuffling and every random draw; ``0`` reproduces bit for bit
            on CPU. The global torch RNG state is left as it was.
        progress_bar
            Show a per-epoch tqdm bar with the ELBO.
        """
        bound = self.bind()
        if max_epochs is None:
            max_epochs = self.default_max_epochs(bound.n_obs)
        check_positive_int(max_epochs=max_epochs, batch_size=batch_size)
        if not 0 < train_size <= 1:
            msg = f"train_size must be in (0, 1], got {train_size}."
            raise ValueError(msg)
        train_idx, val_idx = self.split(bound, train_size, random_state)
        if len(train_idx) < 3:
            msg = f"train_size={train_size} leaves {len(train_idx)} training cells; at least 3 are needed."
            raise ValueError(msg)
        config = TrainConfig(
            max_epochs=max_epochs, lr=lr, weight_decay=weight_decay, eps=eps, batch_size=batch_size,
            n_epochs_kl_warmup=n_epochs_kl_warmup, n_steps_kl_warmup=n_steps_kl_warmup, min_kl_weight=min_kl_weight,
            max_kl_weight=max_kl_weight, early_stopping=early_stopping, early_stopping_patience=early_stopping_patience,
            early_stopping_min_delta=early_stopping_min_delta, reduce_lr_on_plateau=reduce_lr_on_plateau,
            lr_factor=lr_factor, lr_patience=lr_patience, counts_on_device=counts_on_device,
        )  # fmt: skip
        distributed = Distributed.for_strategy(strategy, resolve_device(device))
        self.to_device(device if distributed is None else distributed.device)
        logg.info(
            f"training {self.name} on {len(train_idx)} cells ({len(val_idx)} held out) for {max_epochs} epochs "
            f"on {self.device}"
        )
        torch_seed = random_state if distributed is None else distributed.torch_seed(random_state)
        with seeded_on(torch_seed, self.device):
            history, best_epoch = train(
                self.module,
                bound.source,
                train_idx,
                val_idx,
                config,
                self.objective(bound, train_idx),
                device=self.device,
                seed=random_state,
                progress_bar=progress_bar,
                grad_masks=self.trainable_masks,
                sample_weights=self.sample_weights(bound, train_idx),
                desc=f"Training {self.name}",
                distributed=distributed,
            )
        self.history_ = history
        self.train_config = {**vars(config), "train_size": train_size, "random_state": random_state}
        if distributed is not None:
            self.train_config.update(strategy=strategy, world_size=distributed.world_size)
        if best_epoch is not None:
            self.train_config["best_epoch"] = best_epoch
        self.train_indices, self.validation_indices = train_idx, val_idx
        self.is_trained = True

    def objective(self, bound: BoundData, train_idx: np.ndarray) -> Objective:
        """What training optimises (default: the module's ELBO)."""
        return Objective()

    def sample_weights(self, bound: BoundData, train_idx: np.ndarray) -> np.ndarray | None:
        """Probabilities (summing to 1) of drawing each training cell, for epochs drawn with
        replacement; ``None`` (default): every training cell once per epoch."""
        return None

    def query_changes(
        self, query: AnnData, *, remove_dropout: bool = False, **options
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(data setup, architecture) changes of a query model that surgery maps onto this one,
        from the model-specific ``options`` of ``tl.map_query``; ``remove_dropout``: the query
        model has no dropout. Query cells are unlabelled: the label codes are dropped unless a
        dispersion per label needs them."""
        if options:
            msg = f"{', '.join(options)}: not an option of {self.name} references."
            raise ValueError(msg)
        settings = self.architecture.to_dict()
        per_label = any(str(v).endswith("-label") for v in settings.values())
        unlabelled = self.setup.unlabeled_category is not None or not per_label
        no_dropout = {k: 0.0 for k in settings if k.startswith("dropout_rate")} if remove_dropout else {}
        return ({"labels_key": None} if unlabelled else {}), no_dropout

    def adopt_query(self, query: AnnData, reference: BaseModel, **options) -> None:
        """Called on a query model built by surgery, once the reference's weights are in, with the
        options :meth:`query_changes` took (nothing to do here)."""

    def default_max_epochs(self, n_obs: int) -> int:
        """scvi-tools' heuristic: 400 epochs up to 20k cells, fewer above."""
        return max(1, min(400, round(20000 / n_obs * 400)))

    def split(self, bound: BoundData, train_size: float, random_state: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Sorted (train, validation) positions: a seeded permutation, ceil(train_size * n) to train."""
        return split_groups([np.arange(bound.n_obs)], train_size, random_state)

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics as scvi-tools shows them: one single-column DataFrame per metric."""
        return {k: pd.DataFrame({k: v}, index=pd.RangeIndex(len(v), name="epoch")) for k, v in self.history_.items()}

    def to_device(self, device: str | torch.device = "auto") -> None:
        """Move the model to ``device`` (``'auto'``: CUDA if available, else CPU)."""
        self.device = resolve_device(device)
        self.module.to(self.device)

    # -- internal API: running the model over cells -------------------------------------------
    def bind(self, adata: AnnData | None = None) -> BoundData:
        """``adata`` checked against the model's setup (default: the model's own AnnData)."""
        if adata is not None and adata is not self.adata:
            return self.setup.bind(adata)
        if self._bound is None:
            msg = "This model holds no AnnData (it was loaded without one); pass `adata=`."
            raise ValueError(msg)
        return self._bound

    def select(self, adata: AnnData | None = None, indices=None) -> tuple[BoundData, np.ndarray]:
        """Bind (and check) ``adata`` once and resolve ``indices`` to positions."""
        bound = self.bind(adata)
        return bound, cell_positions(indices, bound.n_obs)

    def minibatches(
        self, bound: BoundData, idx: np.ndarray, batch_size: int | None = None, *, encoder_only: bool = False
    ) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
        """Yield (output rows, tensors) over the cells ``idx``, in order.

        ``encoder_only``: the counts only feed the encoder and the observed library, so on the
        CPU they come as a sparse CSR tensor and the encoder's first layer multiplies only the
        nonzero counts.
        """
        batch_size = batch_size or DEFAULT_INFERENCE_BATCH
        sparse = encoder_only and self.device.type == "cpu"
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            yield slice(start, start + len(chunk)), bound.source.get(chunk, self.device, sparse=sparse)

    @contextmanager
    def inference_mode(self):
        """Eval mode and ``torch.inference_mode`` inside the block; the module's mode restored after."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.module.train(was_training)

    def seeded(self, random_state: int | None):
        """Context: torch seeded with ``random_state`` on the model's device, its RNG state restored after."""
        return seeded_on(random_state, self.device)

    def batch_codes(self, transform_batch) -> list[int | None]:
        """``transform_batch`` (None, a category or code, or a list of them) as batch codes."""
        if transform_batch is None:
            return [None]
        values = [transform_batch] if isinstance(transform_batch, (str, int, np.integer)) else list(transform_batch)
        if not values:
            msg = "transform_batch is an empty list."
            raise ValueError(msg)
        return [self.setup.batch_code(v) for v in values]

    def gene_mask(self, gene_list) -> np.ndarray:
        """Boolean mask over the model genes of ``gene_list`` (None: all)."""
        return names_mask(self.setup.genes, gene_list, "gene_list", "genes")

    # -- latent space and fit -------------------------------------------------------------------
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices=None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Posterior of z per cell: its mean (default), one sample, or (mean, variance).

        For ``latent_distribution='ln'`` the mean is a Monte Carlo average of
        softmax(z) over ``mc_samples`` draws, as in scvi-tools.
        """
        bound, idx = self.select(adata, indices)
        return self.latent(bound, idx, give_mean=give_mean, mc_samples=mc_samples, batch_size=batch_size,
                           return_dist=return_dist)  # fmt: skip

    def latent(
        self,
        bound: BoundData,
        idx: np.ndarray,
        *,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """:meth:`get_latent_representation` of bound cells (internal API)."""
        n = len(idx)
        k = self.module.n_latent
        out = np.empty((n, k), dtype=np.float32)
        var = np.empty((n, k), dtype=np.float32) if return_dist else None
        ln = getattr(self.module, "latent_distribution", "normal") == "ln"
        with self.inference_mode():
            for rows, t in self.minibatches(bound, idx, batch_size, encoder_only=True):
                inf = self.module.inference(t)
                if return_dist:
                    out[rows], var[rows] = to_numpy(inf["qz_m"]), to_numpy(inf["qz_v"])
                elif give_mean and ln:
                    out[rows] = to_numpy(_mc_softmax_mean(inf["qz_m"], inf["qz_v"], mc_samples))
                else:
                    out[rows] = to_numpy(inf["qz_m"] if give_mean else inf["z"])
        return (out, var) if return_dist else out

    def _loss_sums(self, adata, indices, batch_size):
        bound, idx = self.select(adata, indices)
        # evaluate() runs in eval mode under inference_mode and restores the mode
        return evaluate(
            self.module, bound.source, idx, batch_size or DEFAULT_INFERENCE_BATCH, self.device,
            objective=self.objective(bound, idx),
        )  # fmt: skip

    def get_elbo(self, adata: AnnData | None = None, indices=None, batch_size: int | None = None) -> float:
        """ELBO averaged over cells (higher is better), from one posterior sample per cell.

        Equals minus (reconstruction NLL + unweighted KL), as scvi-tools' ``get_elbo``.
        """
        return -self._loss_sums(adata, indices, batch_size).elbo

    def get_reconstruction_error(
        self, adata: AnnData | None = None, indices=None, batch_size: int | None = None
    ) -> dict[str, float]:
        """Mean negative log-likelihood of the counts per cell (lower is better)."""
        s = self._loss_sums(adata, indices, batch_size)
        return {"reconstruction_loss": s.recon / s.n}

    # -- quality scores of the latent space (the original scVI Posterior API) --------------------
    def entropy_batch_mixing(
        self,
        adata: AnnData | None = None,
        indices=None,
        *,
        n_neighbors: int = 50,
        n_pools: int = 50,
        n_samples_per_pool: int = 100,
        random_state: int | None = 0,
    ) -> float:
        """Batch mixing of the latent space: mean entropy of the batches among each cell's
        ``n_neighbors`` nearest neighbours (0: unmixed; log(n_batches): balanced batches fully
        mixed), averaged over random pools of cells as in scVI 0.6."""
        from ._metrics import entropy_batch_mixing

        if self.setup.batch_key is None:
            msg = "The model has no batch_key, so there are no batches to mix."
            raise ValueError(msg)
        bound, idx = self.select(adata, indices)
        return entropy_batch_mixing(
            self.latent(bound, idx), bound.source.obs["batch"][idx], n_neighbors=n_neighbors, n_pools=n_pools,
            n_samples_per_pool=n_samples_per_pool, random_state=random_state,
        )  # fmt: skip

    def knn_purity(
        self, adata: AnnData | None = None, indices=None, *, labels_key: str | None = None, n_neighbors: int = 30
    ) -> float:
        """Fraction of each cell's latent-space neighbours with the same label (``labels_key``,
        default the model's), averaged within each label and then over labels; 1 is pure."""
        from ._metrics import cell_labels, knn_purity

        bound, idx = self.select(adata, indices)
        labels = cell_labels(adata if adata is not None else self.adata, idx, labels_key or self.setup.labels_key)
        return knn_purity(self.latent(bound, idx), labels, n_neighbors=n_neighbors)

    def clustering_scores(
        self, adata: AnnData | None = None, indices=None, *, labels_key: str | None = None, random_state: int | None = 0
    ) -> dict[str, float]:
        """k-means on the latent (as many clusters as labels): ``ari`` and ``nmi`` against the
        labels, and the ``silhouette`` of the labels in the latent space."""
        from ._metrics import cell_labels, clustering_scores

        bound, idx = self.select(adata, indices)
        labels = cell_labels(adata if adata is not None else self.adata, idx, labels_key or self.setup.labels_key)
        return clustering_scores(self.latent(bound, idx), labels, random_state=random_state)

    # -- persistence -------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "model_class": type(self).__name__,
            "scanpy_scvi_version": __version__,
            "torch_version": torch.__version__,
            "setup": self.setup.to_dict(),
            "architecture": self.architecture.to_dict(),
            "train_config": self.train_config,
            "history": self.history_,
            "is_trained": self.is_trained,
        }

    def save(self, dir_path: str | os.PathLike, overwrite: bool = False) -> None:
        """Save to a directory: ``model.safetensors`` (weights) and ``config.json``.

        The write is atomic: a crash mid-save leaves any previous save intact.
        No pickle is involved, so loading a model file can never execute code.
        """
        write_model_dir(dir_path, self._config(), self.module.state_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData | None = None, device: str | torch.device = "auto"):
        """Load a saved model; with ``adata``, check its genes and categories against the model."""
        config, state = read_model_dir(dir_path)
        return cls._from_payload(config, state, adata=adata, device=device, source=f"{dir_path}/config.json")

    def to_uns(self) -> dict[str, Any]:
        """The model as an h5ad-writable dict: JSON configuration plus weights as numpy arrays.

        ``pp`` functions store this in ``adata.uns[key]['model']`` so that ``tl`` functions
        find the model again, also after ``write_h5ad`` / ``read_h5ad``.
        """
        return {
            "config": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **self._config()}),
            "weights": {k: v.detach().cpu().numpy() for k, v in self.module.state_dict().items()},
        }

    @classmethod
    def from_anndata(cls, adata: AnnData, *, key: str | None = None, device: str | torch.device = "auto"):
        """Rebuild the model a ``pp`` function stored in ``adata.uns[key]['model']`` (default
        key: the model's ``pp`` function's, e.g. ``'totalvi'`` for :class:`TOTALVI`)."""
        key = cls.uns_key if key is None else key
        entry = adata.uns.get(key, {})
        stored = entry.get("model") if isinstance(entry, Mapping) else None
        if not isinstance(stored, Mapping) or "config" not in stored or "weights" not in stored:
            msg = (
                f"No model stored in adata.uns[{key!r}]['model']. Run `scanpy_scvi.pp.scvi(adata)` "
                "(with store_model=True, the default), or pass the model explicitly (`model=`)."
            )
            raise KeyError(msg)
        try:
            config = json.loads(str(stored["config"]))
        except json.JSONDecodeError as e:
            msg = f"adata.uns[{key!r}]['model']['config'] is not valid JSON ({e})."
            raise ValueError(msg) from e
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in stored["weights"].items()}
        return cls._from_payload(config, state, adata=adata, device=device, source=f"adata.uns[{key!r}]['model']")

    @classmethod
    def _from_payload(cls, config: dict[str, Any], state: dict[str, torch.Tensor], *, adata, device, source: str):
        model_cls = BaseModel._classes.get(config.get("model_class"))
        if model_cls is not None and issubclass(cls, model_cls) and cls not in BaseModel._classes.values():
            model_cls = cls  # a door of scanpy_scvi.compat (unregistered) loads the files of its base class
        if model_cls is None or not issubclass(model_cls, cls):  # SCVI.load also reads SCANVI
            msg = f"{source} holds a {config.get('model_class')!r} model, not {cls.__name__}."
            raise ValueError(msg)
        try:
            setup = DataSetup.from_dict(config["setup"])
            settings = config["architecture"] if "architecture" in config else config["module_kwargs"]  # 0.1 files
            architecture = model_cls.module_class.architecture_class.from_dict(settings, source=source)
        except (KeyError, TypeError) as e:
            msg = f"{source}: the configuration is incomplete or inconsistent ({e!r}). Re-save the model."
            raise ValueError(msg) from e
        model = model_cls._assembled(setup, architecture, state=state, random_state=None, record=config, source=source)
        if adata is not None:
            model.attach(adata)
        model.to_device(device)
        return model

    def uns_record(self, params: dict[str, Any], *, store_model: bool) -> dict[str, Any]:
        """The h5ad-writable ``uns`` entry of a fit: ``params`` (None values left out; the
        architecture as built added), ``genes``, per-epoch ``history``, ``versions``,
        ``device`` and, with ``store_model``, the ``model``."""
        from importlib.metadata import version

        from .. import __version__

        params = {**self.architecture.to_dict(), **params}
        if "best_epoch" in self.train_config:
            params["best_epoch"] = self.train_config["best_epoch"]
        clean = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in params.items() if v is not None}
        record = {
            "params": clean,
            "genes": np.asarray(self.setup.genes, dtype=object),
            "history": {k: np.asarray(v, dtype=np.float64) for k, v in self.history_.items()},
            "versions": {
                "scanpy_scvi": __version__,
                "torch": version("torch"),
                "scanpy": version("scanpy"),
                "anndata": version("anndata"),
            },
            "device": str(self.device),
        }
        if store_model:
            record["model"] = self.to_uns()
        return record


# -- helpers -------------------------------------------------------------------------------------------
def _load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    problems = sorted(set(expected) ^ set(state)) + [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        msg = f"{source}: weights do not match the configuration ({problems[:5]}). The file is corrupt."
        raise ValueError(msg)
    module.load_state_dict(state)


def _mc_softmax_mean(mean: torch.Tensor, var: torch.Tensor, n_draws: int, max_elements: int = 2**22) -> torch.Tensor:
    """Monte Carlo E[softmax(z)] for z ~ N(mean, var), in passes of bounded size."""
    per_pass = max(1, max_elements // mean.numel())
    total = torch.zeros_like(mean)
    for start in range(0, n_draws, per_pass):
        s = min(per_pass, n_draws - start)
        draws = mean + var.sqrt() * torch.randn((s, *mean.shape), dtype=mean.dtype, device=mean.device)
        total += torch.softmax(draws, dim=-1).sum(0)
    return total / n_draws
