"""TRVAE: the trVAE model object (conditional VAE + MMD; scArches' integration model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._settings import keyword_settings, split_settings
from ..data import BoundData, DataSetup, SetupArguments
from ..nn import ConditionalVAE, TRVAEArchitecture, to_numpy
from ..train import Objective, Terms
from ._scvi import SCVI

if TYPE_CHECKING:
    from anndata import AnnData
    from torch import nn


def resolve_condition_key(condition_key: str | None, batch_key: str | None) -> str | None:
    """scArches' ``condition_key`` is our ``batch_key``: either may be given, not two different ones."""
    if condition_key is not None and batch_key is not None and condition_key != batch_key:
        msg = (
            f"condition_key={condition_key!r} and batch_key={batch_key!r} disagree; pass only one (they are the same)."
        )
        raise ValueError(msg)
    return batch_key if batch_key is not None else condition_key


@keyword_settings(SetupArguments, TRVAEArchitecture)
class TRVAE(SCVI):
    """trVAE (Lotfollahi et al. 2020), as in scArches: a conditional VAE whose conditions enter the
    first encoder and decoder layers, trained with an MMD penalty between conditions.

    Every method of :class:`SCVI` that needs a count decoder works the same way (latent space,
    normalised expression, DE, batch-corrected counts, save/load, :func:`~scanpy_scvi.tl.map_query`),
    except with ``gene_likelihood='mse'``, which models log-normalised values.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` or ``layer`` (log-normalised values for ``'mse'``).
    condition_key
        scArches' name of ``batch_key`` (the ``obs`` column of conditions); pass either.
    genes
        Genes (``var_names``) to model, in order. Default: all genes of ``adata``.
    {SetupArguments}
    {TRVAEArchitecture}
    random_state
        Seed of the weight initialisation.
    """

    name = "trVAE"
    uns_key = "trvae"
    module_class = ConditionalVAE
    balanced_sampling = True  # set by train()

    def __init__(
        self,
        adata: AnnData,
        *,
        condition_key: str | None = None,
        genes: Sequence[str] | None = None,
        random_state: int | None = 0,
        **settings,
    ):
        setup_args, architecture = split_settings(settings, SetupArguments)
        setup_args["batch_key"] = resolve_condition_key(condition_key, setup_args.get("batch_key"))
        architecture = TRVAEArchitecture(**architecture)
        if architecture.gene_likelihood == "mse":
            setup_args["check_counts"] = False  # log-normalised values are not integers
        setup = DataSetup.from_adata(adata, genes=genes, **setup_args)
        self._assemble(setup, architecture, adata=adata, random_state=random_state)

    def __repr__(self) -> str:
        a = self.architecture
        return (
            f"TRVAE: {len(self.setup.genes)} genes, {self.setup.n_batch} conditions ({self.setup.batch_key!r}), "
            f"hidden {list(a.hidden_layer_sizes)}, n_latent={a.n_latent}, {a.gene_likelihood} reconstruction, "
            f"MMD {'on ' + a.mmd_on + f' (beta={a.beta})' if a.use_mmd else 'off'}; trained: {self.is_trained}"
        )

    # -- training ------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.04,
        eps: float = 0.01,
        train_size: float = 0.9,
        batch_size: int = 128,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        reduce_lr_on_plateau: bool = True,
        lr_factor: float = 0.1,
        lr_patience: int = 7,
        n_epochs_kl_warmup: int | None = None,
        balanced_sampling: bool = True,
        **kwargs,
    ) -> None:
        """Train with scArches' trVAE defaults: loss = reconstruction + kl_weight x KL + beta x MMD.

        Parameters
        ----------
        max_epochs
            ``None``: ``min(400, round(20000 / n_cells * 400))`` (scArches: 400).
        lr, weight_decay, eps, train_size, batch_size
            scArches' defaults (1e-3, 0.04, 0.01, 0.9, 128).
        early_stopping, early_stopping_patience, reduce_lr_on_plateau, lr_factor, lr_patience
            scArches' early stopping (on, 20 epochs, best weights restored) and learning-rate
            schedule (x0.1 after 7 epochs without improvement), watching the validation ELBO
            (scArches watches the validation loss with the MMD). With ``train_size=1.0``
            they watch the training ELBO.
        n_epochs_kl_warmup
            Epochs of linear KL warm-up (scArches' ``alpha_epoch_anneal``); default none.
        balanced_sampling
            Draw each epoch's cells with replacement, every condition equally often (scArches'
            stratified sampling, its default), so that minibatches hold the conditions the MMD
            compares; ``False``: every training cell once per epoch. On counts backed on disk
            the draws are read by blocks, so a minibatch holds the conditions of a few blocks:
            shuffle the file's rows once for well-mixed minibatches (:doc:`/large-data`).
        **kwargs
            Every other argument of :meth:`SCVI.train` (``max_kl_weight`` is scArches' ``alpha_kl``).
        """
        self.balanced_sampling = bool(balanced_sampling)
        super().train(
            max_epochs, lr=lr, weight_decay=weight_decay, eps=eps, train_size=train_size, batch_size=batch_size,
            early_stopping=early_stopping, early_stopping_patience=early_stopping_patience,
            reduce_lr_on_plateau=reduce_lr_on_plateau, lr_factor=lr_factor, lr_patience=lr_patience,
            n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs,
        )  # fmt: skip
        self.train_config["balanced_sampling"] = self.balanced_sampling

    def objective(self, bound: BoundData, train_idx: np.ndarray) -> Objective:
        return MMDObjective(with_mmd=several_conditions(bound, train_idx))

    def sample_weights(self, bound: BoundData, train_idx: np.ndarray) -> np.ndarray | None:
        """Per training cell: 1 / (training cells of its condition), normalised (balanced sampling)."""
        if not self.balanced_sampling:
            return None
        condition = bound.source.obs["batch"][train_idx]
        weights = 1.0 / np.bincount(condition)[condition]
        return weights / weights.sum()

    def query_changes(
        self, query: AnnData, *, remove_dropout: bool = True, **options
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A query model has no dropout by default (scArches' ``remove_dropout=True``);
        ``remove_dropout=False`` keeps the reference's."""
        return super().query_changes(query, remove_dropout=remove_dropout, **options)

    # -- outputs -----------------------------------------------------------------------------------
    def get_y(
        self, adata: AnnData | None = None, indices=None, give_mean: bool = True, batch_size: int | None = None
    ) -> np.ndarray:
        """The first decoder layer's output per cell (scArches' ``get_y``, the space ``mmd_on='y'``
        aligns; for expiMap the gene logits of its linear decoder), from the posterior mean of z
        (``give_mean``) or one draw (scArches)."""
        bound, idx = self.select(adata, indices)
        out = np.empty((0, self.architecture.hidden_layer_sizes[-1]), dtype=np.float32)
        with self.inference_mode():
            for rows, t in self.minibatches(bound, idx, batch_size, encoder_only=True):
                inf = self.module.inference(t)
                z = inf["qz_m"] if give_mean else inf["z"]
                y = to_numpy(self.module.generative(z, inf["library"], t)["y"])
                if rows.start == 0:  # the width is the module's (expiMap's y: the gene logits)
                    out = np.empty((len(idx), y.shape[1]), dtype=np.float32)
                out[rows] = y
        return out

    def _require_counts(self, what: str) -> None:
        if self.architecture.gene_likelihood == "mse":
            msg = f"{what} needs a count likelihood; this trVAE reconstructs log-normalised values ('mse')."
            raise ValueError(msg)

    def _decode(self, bound, idx, codes, mask, library_size=1, *args, **kwargs) -> np.ndarray:
        if library_size != 1:
            self._require_counts(f"library_size={library_size!r}")
        return super()._decode(bound, idx, codes, mask, library_size, *args, **kwargs)

    def decode_features(self, z: torch.Tensor, tensors: dict[str, torch.Tensor], transform_batch=None) -> torch.Tensor:
        self._require_counts("Differential expression")
        return super().decode_features(z, tensors, transform_batch)

    def get_likelihood_parameters(self, *args, **kwargs):
        self._require_counts("get_likelihood_parameters")
        return super().get_likelihood_parameters(*args, **kwargs)

    def posterior_predictive_sample(self, *args, **kwargs):
        self._require_counts("posterior_predictive_sample")
        return super().posterior_predictive_sample(*args, **kwargs)

    def get_marginal_ll(self, *args, **kwargs):
        self._require_counts("get_marginal_ll")
        return super().get_marginal_ll(*args, **kwargs)

    def get_feature_correlation_matrix(self, *args, **kwargs):
        self._require_counts("get_feature_correlation_matrix")
        return super().get_feature_correlation_matrix(*args, **kwargs)


def several_conditions(bound: BoundData, idx: np.ndarray) -> bool:
    """Whether the cells ``idx`` come from more than one condition (else the MMD is zero)."""
    return len(np.unique(bound.source.obs["batch"][idx])) > 1


class MMDObjective(Objective):
    """trVAE's loss (the module's, MMD included); the history gains ``mmd_*`` (beta x MMD per minibatch)."""

    def __init__(self, with_mmd: bool = True):
        self.with_mmd = with_mmd  # False when the cells come from one condition (e.g. one query batch)

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms:
        return self.terms(module.loss(batch, kl_weight=kl_weight, with_mmd=self.with_mmd))

    @staticmethod
    def terms(out: dict[str, torch.Tensor]) -> Terms:
        """The :class:`Terms` of the module's loss output."""
        n = out["reconstruction_loss"].shape[0]
        return Terms(
            out["loss"], out["reconstruction_loss"], out["kl_z"], extra={"mmd": (out["mmd"].detach().double() * n, n)}
        )
