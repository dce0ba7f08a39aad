"""EXPIMAP: the expiMap model object (gene programs as the latent space)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .._settings import keyword_settings, split_settings
from ..data import BoundData, DataSetup, Programs, SetupArguments, gene_sets, program_rows
from ..nn import EXPIMAPArchitecture, ProgramVAE, hsic, to_numpy
from ..train import Terms, TrainContext
from ._trvae import TRVAE, MMDObjective, resolve_condition_key

if TYPE_CHECKING:
    from anndata import AnnData
    from torch import nn

    from ._base import BaseModel


@keyword_settings(SetupArguments, EXPIMAPArchitecture)
class EXPIMAP(TRVAE):
    """expiMap (Lotfollahi et al. 2023), as in scArches: a conditional VAE whose latent units are
    gene programs. The decoder is linear and masked: program ``k`` reaches only its genes (the
    mask, from :func:`scanpy_scvi.tl.add_gene_programs`), so the latent space reads as program
    activity; a group-lasso step switches off programs the data do not support.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` or ``layer`` and the program mask in ``varm[mask_key]``.
    condition_key
        scArches' name of ``batch_key``: the ``obs`` column of conditions (studies, samples).
    mask_key, terms_key
        The (genes, programs) binary mask in ``adata.varm[mask_key]`` and the program names in
        ``adata.uns[terms_key]`` (as :func:`~scanpy_scvi.tl.add_gene_programs` writes them).
    genes
        Genes to model (default all); their rows of the mask are used.
    {SetupArguments}
    {EXPIMAPArchitecture}
    random_state
        Seed of the weight initialisation.
    """

    name = "expiMap"
    uns_key = "expimap"
    module_class = ProgramVAE
    alpha: float | None = 0.7  # set by train()
    alpha_l1: float | None = None
    gamma_ext: float | None = None
    hsic_weight = 1.0

    def __init__(
        self,
        adata: AnnData,
        *,
        condition_key: str | None = None,
        mask_key: str = "I",
        terms_key: str = "terms",
        genes: Sequence[str] | None = None,
        random_state: int | None = 0,
        **settings,
    ):
        setup_args, architecture = split_settings(settings, SetupArguments)
        setup_args["batch_key"] = resolve_condition_key(condition_key, setup_args.get("batch_key"))
        mask, names = read_mask(adata, mask_key, terms_key, genes)
        architecture = EXPIMAPArchitecture(**architecture).replace(n_latent=mask.shape[1])
        if architecture.n_ext_masked:
            msg = (
                "n_ext_masked counts constrained programs a query adds (`tl.map_query(..., new_programs=)`); "
                "a reference takes all its programs from the mask."
            )
            raise ValueError(msg)
        if architecture.gene_likelihood == "mse":
            setup_args["check_counts"] = False
        setup = DataSetup.from_adata(adata, genes=genes, **setup_args)
        setup = dataclasses.replace(setup, program_names=names)
        self._assemble(setup, architecture, adata=adata, random_state=random_state)
        self.module.set_mask(torch.as_tensor(mask, dtype=torch.float32))

    def __repr__(self) -> str:
        return (
            f"EXPIMAP: {len(self.setup.genes)} genes, {self.module.n_latent} programs "
            f"({int(self.module.active_programs().sum())} active), {self.setup.n_batch} conditions; "
            f"trained: {self.is_trained}"
        )

    # -- training ------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        alpha: float | None = 0.7,
        alpha_l1: float | None = None,
        gamma_ext: float | None = None,
        hsic_weight: float = 1.0,
        max_kl_weight: float = 0.35,
        n_epochs_kl_warmup: int | None = None,
        **kwargs,
    ) -> None:
        """Train with scArches' expiMap defaults: the trVAE loss without MMD, a KL weight rising
        to 0.35 over ``min(130, max_epochs)`` epochs, and after every optimiser step the proximal
        steps (group lasso ``alpha x lr`` on each program's decoder column; with a soft mask,
        L1 ``alpha_l1 x lr`` on the out-of-mask weights).

        Parameters
        ----------
        max_epochs
            ``None``: ``min(400, round(20000 / n_cells * 400))`` (scArches: 400).
        alpha
            Group-lasso coefficient (the scArches tutorial's 0.7; scArches' own default is none).
            ``None`` or 0 keeps every program.
        alpha_l1
            L1 coefficient of the out-of-mask weights (``soft_mask=True``, or new programs mapped
            with ``new_programs_soft_mask=True``).
        gamma_ext
            L1 coefficient of the extension programs' weights (``n_ext > 0``; scArches' ``gamma_ext``).
        hsic_weight
            Weight of the HSIC between extension and annotated programs (``use_hsic=True``;
            scArches' ``beta``).
        max_kl_weight, n_epochs_kl_warmup
            scArches' ``alpha_kl`` (0.35) and ``alpha_epoch_anneal`` (default ``min(130, max_epochs)``).
        **kwargs
            Every other argument of :meth:`TRVAE.train`.
        """
        for name, value in (
            ("alpha", alpha),
            ("alpha_l1", alpha_l1),
            ("gamma_ext", gamma_ext),
            ("hsic_weight", hsic_weight),
        ):
            if value is not None and not value >= 0:
                msg = f"{name} must be None or >= 0, got {value}."
                raise ValueError(msg)
        if alpha_l1 and not (self.architecture.soft_mask or self.architecture.soft_ext_mask):
            msg = (
                "alpha_l1 acts on out-of-mask weights, which only a soft mask has: build the model with soft_mask=True "
                "(or map a query with new_programs_soft_mask=True)."
            )
            raise ValueError(msg)
        epochs = max_epochs if max_epochs is not None else self.default_max_epochs(self.bind().n_obs)
        self.alpha, self.alpha_l1, self.gamma_ext, self.hsic_weight = alpha, alpha_l1, gamma_ext, hsic_weight
        if n_epochs_kl_warmup is None:
            n_epochs_kl_warmup = min(130, epochs)
        super().train(epochs, max_kl_weight=max_kl_weight, n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs)
        self.train_config.update(alpha=alpha, alpha_l1=alpha_l1, gamma_ext=gamma_ext, hsic_weight=hsic_weight)

    def objective(self, bound: BoundData, train_idx: np.ndarray) -> ProximalObjective:
        hsic_weight = self.hsic_weight if self.architecture.use_hsic and self.architecture.n_ext else 0.0
        return ProximalObjective(self.alpha or 0.0, self.alpha_l1 or 0.0, self.gamma_ext or 0.0, hsic_weight)

    def query_changes(
        self,
        query: AnnData,
        *,
        n_ext: int = 0,
        new_programs: Programs | None = None,
        new_programs_soft_mask: bool = False,
        use_hsic: bool | None = None,
        **options,
    ) -> tuple[dict, dict]:
        """trVAE's (no dropout), with ``n_ext`` unconstrained extension programs (scArches'
        ``new_n_ext``) and the constrained ones of ``new_programs`` (scArches' ``new_n_ext_m``
        with ``new_ext_mask``) when asked; ``use_hsic`` (default: the reference's) penalises the
        dependence of the extension programs on the annotated ones."""
        setup, architecture = super().query_changes(query, **options)
        if use_hsic is not None:
            architecture["use_hsic"] = bool(use_hsic)
        if (n_ext or new_programs is not None) and (self.architecture.n_ext or self.architecture.n_ext_masked):
            msg = (
                "This expiMap model already has extension programs; n_ext and new_programs add them to a "
                "reference without any."
            )
            raise ValueError(msg)
        if n_ext:
            architecture["n_ext"] = int(n_ext)
        if new_programs is not None:
            _, names = self.new_program_mask(new_programs)
            clash = sorted(set(names) & set(self.setup.program_names))
            if clash:
                msg = f"new_programs {clash[:5]} are already programs of the model; give new programs new names."
                raise ValueError(msg)
            setup["program_names"] = [*self.setup.program_names, *names]
            architecture.update(n_ext_masked=len(names), soft_ext_mask=bool(new_programs_soft_mask))
        return setup, architecture

    def adopt_query(self, query: AnnData, reference: BaseModel, *, new_programs=None, **options) -> None:
        """Install the constrained extension programs' mask."""
        super().adopt_query(query, reference, **options)
        if new_programs is not None:
            mask, _ = self.new_program_mask(new_programs)
            self.module.set_ext_mask(torch.as_tensor(mask))

    def new_program_mask(self, programs: Programs) -> tuple[np.ndarray, list[str]]:
        """The (model genes, programs) 0/1 mask and the names of new programs, every one checked
        to have genes of the model."""
        rows = program_rows(self.setup.genes, gene_sets(programs))
        empty = [name for name, r in rows.items() if not len(r)]
        if empty:
            msg = f"new_programs {empty[:5]} have no gene among the model's {len(self.setup.genes)} genes."
            raise ValueError(msg)
        mask = np.zeros((len(self.setup.genes), len(rows)), dtype=np.float32)
        for k, r in enumerate(rows.values()):
            mask[r, k] = 1.0
        return mask, list(rows)

    # -- programs ----------------------------------------------------------------------------------
    def programs(self) -> pd.DataFrame:
        """One row per program: ``active`` (a nonzero decoder column), ``direction`` (+1 when its
        gene weights sum to a positive number, so that a higher latent value means higher
        expression; scArches' ``latent_directions``), ``direction_confidence`` (``|sum of the
        weights| / sum of |weights|``: 1 when every weight has the direction's sign, near 0 when
        up and down weights cancel and the direction is a coin flip), ``n_genes`` (in the mask)."""
        w = to_numpy(self.module.decoder.all_weights())
        n_ext = self.architecture.n_ext
        in_mask = to_numpy(self.module.decoder.masks().sum(0)).astype(int)
        size = np.abs(w).sum(0)
        confidence = np.divide(np.abs(w.sum(0)), size, out=np.zeros_like(size), where=size > 0)
        return pd.DataFrame(
            {
                "active": to_numpy(self.module.active_programs()).astype(bool),
                "direction": np.sign(w.sum(0)).astype(np.float32),
                "direction_confidence": confidence.astype(np.float32),
                "n_genes": np.concatenate([in_mask, np.full(n_ext, len(self.setup.genes))]),
            },
            index=pd.Index(self.program_names(), name="program"),
        )

    def program_mask(self) -> pd.DataFrame:
        """The gene-program mask: model genes x annotated programs (the reference's, then a query's
        ``new_programs``), ``True`` where the gene belongs to the program."""
        return pd.DataFrame(
            to_numpy(self.module.decoder.masks()) > 0,
            index=pd.Index(self.setup.genes, name="gene"),
            columns=pd.Index(self.setup.program_names, name="program"),
        )

    def program_names(self) -> list[str]:
        """The latent units' names: the programs (the reference's, then a query's ``new_programs``),
        then ``extension_0``, ... (``n_ext``)."""
        return [*self.setup.program_names, *(f"extension_{i}" for i in range(self.architecture.n_ext))]

    def term_genes(self, program: str | int) -> pd.DataFrame:
        """The genes of one program by decreasing absolute decoder weight: ``genes``, ``weights``,
        ``in_mask`` (scArches' ``term_genes``; nonzero weights only)."""
        k = program if isinstance(program, (int, np.integer)) else self._program_index(program)
        w = to_numpy(self.module.decoder.all_weights()[:, k])
        order = np.argsort(-np.abs(w), kind="stable")
        order = order[np.abs(w[order]) > 0]
        mask = (
            np.zeros(len(w), dtype=bool)
            if k >= self.module.n_annotated
            else to_numpy(self.module.decoder.masks()[:, k]) > 0
        )
        return pd.DataFrame({"genes": np.asarray(self.setup.genes)[order], "weights": w[order], "in_mask": mask[order]})

    def _program_index(self, name: str) -> int:
        try:
            return self.program_names().index(name)
        except ValueError:
            msg = f"{name!r} is not a program of the model (e.g. {self.setup.program_names[:3]})."
            raise KeyError(msg) from None

    def get_latent_representation(
        self, adata: AnnData | None = None, indices=None, give_mean: bool = True, only_active: bool = False, **kwargs
    ) -> np.ndarray:
        """Program activities per cell (posterior mean of z by default); ``only_active`` keeps the
        active programs' columns (in :meth:`programs` order). Other arguments as :class:`SCVI`'s."""
        latent = super().get_latent_representation(adata, indices, give_mean=give_mean, **kwargs)
        if only_active and not isinstance(latent, tuple):
            latent = latent[:, self.programs()["active"].to_numpy()]
        return latent


def read_mask(adata: AnnData, mask_key: str, terms_key: str, genes: Sequence[str] | None) -> tuple[np.ndarray, list]:
    """The (model genes, programs) 0/1 mask and the program names, checked."""
    if mask_key not in adata.varm:
        msg = (
            f"adata.varm[{mask_key!r}] (the gene-program mask) not found. Build it with "
            "`scanpy_scvi.tl.add_gene_programs(adata, 'programs.gmt')`."
        )
        raise KeyError(msg)
    mask = np.asarray(adata.varm[mask_key])
    if mask.ndim != 2 or not np.isin(mask, (0, 1)).all():
        msg = f"adata.varm[{mask_key!r}] must be a (genes, programs) matrix of 0 and 1."
        raise ValueError(msg)
    names = adata.uns.get(terms_key)
    names = [str(n) for n in (names if names is not None else [])]
    if len(names) != mask.shape[1]:
        msg = (
            f"adata.uns[{terms_key!r}] must name the {mask.shape[1]} programs of varm[{mask_key!r}]; got {len(names)}."
        )
        raise ValueError(msg)
    if genes is not None:
        mask = mask[adata.var_names.get_indexer(list(genes))]
    empty = int((mask.sum(0) == 0).sum())
    if empty:
        msg = f"{empty} programs have no gene among the model genes; rebuild the mask on these genes."
        raise ValueError(msg)
    return mask.astype(np.float32), names


class ProximalObjective(MMDObjective):
    """expiMap's loss (trVAE's, without MMD) with the proximal steps after every optimiser step,
    thresholds scaled by the current learning rate (scArches)."""

    capturable = False  # the proximal steps are hooks after every optimiser step

    def __init__(self, alpha: float, alpha_l1: float, gamma_ext: float = 0.0, hsic_weight: float = 0.0):
        super().__init__(with_mmd=False)
        self.alpha, self.alpha_l1, self.gamma_ext, self.hsic_weight = alpha, alpha_l1, gamma_ext, hsic_weight
        self.optimizer = None

    def begin(self, context: TrainContext) -> None:
        self.optimizer = context.optimizer

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms:
        out = module.loss(batch, kl_weight=kl_weight, with_mmd=False)
        terms = self.terms(out)
        if self.hsic_weight:  # extension programs independent of the annotated ones (scArches' HSIC)
            k = module.n_annotated
            penalty = hsic(out["z"][:, :k], out["z"][:, k:])
            terms.loss = terms.loss + self.hsic_weight * penalty
            n = terms.reconstruction.shape[0]
            terms.extra["hsic"] = (float(penalty.detach()) * n, n)
        return terms

    def after_step(self, module: nn.Module) -> None:
        lr = float(self.optimizer.param_groups[0]["lr"])
        module.proximal_step(self.alpha * lr, self.alpha_l1 * lr, self.gamma_ext * lr)
