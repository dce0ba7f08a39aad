"""TOTALVI: totalVI (Gayoso et al. 2021) for CITE-seq, RNA and surface proteins in one latent space."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._settings import check_positive_int, keyword_settings, split_settings
from ..data import BoundData, DataSetup, SetupArguments, background_prior, measured_proteins
from ..nn import TOTALVAE, TOTALVIArchitecture, to_numpy
from ..train import Objective
from . import _totalvi_outputs as outputs
from ._adversarial import AdversarialObjective
from ._base import BaseModel
from ._selection import names_mask

if TYPE_CHECKING:
    from anndata import AnnData


@keyword_settings(SetupArguments, TOTALVIArchitecture)
class TOTALVI(BaseModel):
    """totalVI (Gayoso et al. 2021): a joint model of RNA and surface-protein counts (CITE-seq).

    RNA is modelled as in scVI; each protein count is a negative binomial mixture of a
    background (ambient antibodies, non-specific binding) and a foreground (the protein on the
    cell). Both share one latent space. Proteins that a batch did not measure (different
    antibody panels) are left out of that batch's likelihood and imputed in the outputs.
    Method names and semantics follow scvi-tools' ``TOTALVI``.

    Parameters
    ----------
    adata
        AnnData with raw RNA counts in ``X`` or ``layer`` and raw protein counts in
        ``adata.obsm[protein_expression_obsm_key]``.
    protein_expression_obsm_key
        ``obsm`` key of the protein counts: a DataFrame (columns = protein names) or an array.
    protein_names_uns_key
        For an array: the ``uns`` key of its protein names (default ``protein_0``, ...).
    genes
        Genes (``var_names``) to model, in order. Default: all genes of ``adata``.
    labels_key
        ``obs`` column of cell labels (used by the ``'gene-label'`` / ``'protein-label'`` dispersions).
    empirical_protein_background_prior
        Start the background prior from the data: per batch, a two-component Gaussian mixture on
        the log counts of each of 100 cells, the lower component taken as background. Default:
        on when there are more than 10 proteins (scvi-tools' rule).
    override_missing_proteins
        Treat every protein as measured in every batch, even where a batch has no count of it.
    {SetupArguments}
    {TOTALVIArchitecture}
    random_state
        Seed of the weight initialisation and of the empirical prior's cell sample.
    """

    name = "totalVI"
    adversarial_classifier = False  # set by train()
    uns_key = "totalvi"
    module_class = TOTALVAE

    def __init__(
        self,
        adata: AnnData,
        *,
        protein_expression_obsm_key: str = "protein_expression",
        protein_names_uns_key: str | None = None,
        genes: Sequence[str] | None = None,
        labels_key: str | None = None,
        empirical_protein_background_prior: bool | None = None,
        override_missing_proteins: bool = False,
        random_state: int | None = 0,
        **settings,
    ):
        setup_args, architecture = split_settings(settings, SetupArguments)
        architecture = TOTALVIArchitecture(**architecture)
        setup = DataSetup.from_adata(
            adata, genes=genes, labels_key=labels_key, protein_expression_obsm_key=protein_expression_obsm_key,
            protein_names_uns_key=protein_names_uns_key, **setup_args,
        )  # fmt: skip
        self._assemble(setup, architecture, adata=adata, random_state=random_state)
        Y, batch = self._bound.source.obs["Y"], self._bound.source.obs["batch"]
        measured = self.module.protein_mask.bool().numpy()
        if override_missing_proteins:
            measured = np.ones_like(measured)
            self.module.set_protein_mask(measured)
        for b, c in enumerate(setup.batch_categories):
            if not measured[b].all():
                missing = [str(p) for p in np.asarray(setup.protein_names)[~measured[b]]]
                warnings.warn(
                    f"Batch {c!r} has no count of {len(missing)} proteins ({missing[:5]}): treated as not "
                    "measured there (left out of its likelihood, imputed in outputs). Pass "
                    "override_missing_proteins=True if they were measured and are truly zero.",
                    UserWarning,
                    stacklevel=2,
                )
        if empirical_protein_background_prior is None:
            empirical_protein_background_prior = len(setup.protein_names) > 10
        if empirical_protein_background_prior:
            mean, scale = background_prior(Y, batch, measured, np.random.default_rng(random_state))
            self.module.set_background_prior(mean, scale)

    def _assemble(self, setup, architecture, *, adata=None, state=None, **kwargs) -> None:
        super()._assemble(setup, architecture, adata=adata, state=state, **kwargs)
        if state is None and adata is not None:  # fresh weights on data (a new model, or a query's)
            source = self._bound.source
            self.module.set_protein_mask(measured_proteins(source.obs["Y"], source.obs["batch"], setup.n_batch))

    def __repr__(self) -> str:
        a = self.architecture
        return (
            f"TOTALVI: {len(self.setup.genes)} genes, {len(self.setup.protein_names)} proteins, "
            f"{self.setup.n_batch} batches, n_latent={a.n_latent}, {a.gene_likelihood} RNA likelihood; "
            f"trained: {self.is_trained}"
        )

    # -- training ------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        lr: float = 4e-3,
        batch_size: int = 256,
        train_size: float = 0.9,
        early_stopping: bool = True,
        reduce_lr_on_plateau: bool = True,
        n_steps_kl_warmup: int | None = None,
        n_epochs_kl_warmup: int | None = None,
        adversarial_classifier: bool | None = None,
        **kwargs,
    ) -> None:
        """Train with scvi-tools' totalVI defaults.

        Parameters
        ----------
        max_epochs
            ``None``: ``min(400, round(20000 / n_cells * 400))``.
        lr, batch_size, train_size, early_stopping, reduce_lr_on_plateau
            scvi-tools' totalVI defaults (4e-3, 256, 0.9, on, on). With ``train_size=1.0``
            there is no validation set: early stopping and the learning-rate schedule then
            watch the training ELBO.
        n_steps_kl_warmup, n_epochs_kl_warmup
            KL warm-up; default over ``0.75 * n_cells`` optimiser steps (scvi-tools).
        adversarial_classifier
            Train a batch classifier on z and reward the model for fooling it, weighted by
            ``1 - kl_weight`` (history: ``adversarial_loss_train``). Default: on when some batch
            did not measure some protein (scvi-tools' rule), with at least 2 batches.
        **kwargs
            Every other argument of :meth:`BaseModel.train`.
        """
        if n_steps_kl_warmup is None and n_epochs_kl_warmup is None:
            n_steps_kl_warmup = int(0.75 * self.bind().n_obs)
        if adversarial_classifier is None:
            adversarial_classifier = not bool(self.module.protein_mask.bool().all())
        self.adversarial_classifier = bool(adversarial_classifier) and self.setup.n_batch > 1
        super().train(
            max_epochs, lr=lr, batch_size=batch_size, train_size=train_size, early_stopping=early_stopping,
            reduce_lr_on_plateau=reduce_lr_on_plateau, n_steps_kl_warmup=n_steps_kl_warmup,
            n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs,
        )  # fmt: skip
        self.train_config["adversarial_classifier"] = self.adversarial_classifier

    def objective(self, bound: BoundData, train_idx: np.ndarray) -> Objective:
        if not self.adversarial_classifier:
            return super().objective(bound, train_idx)
        return AdversarialObjective(self.module.n_latent, self.setup.n_batch)

    # -- expression ------------------------------------------------------------------------------
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices=None,
        transform_batch=None,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        sample_protein_mixing: bool = False,
        scale_protein: bool = False,
        include_protein_background: bool = False,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        n_samples_overall: int | None = None,
    ) -> tuple[pd.DataFrame, pd.DataFrame] | tuple[np.ndarray, np.ndarray]:
        """Denoised RNA and protein expression per cell: ``(rna, protein)``.

        Parameters
        ----------
        adata, indices
            Cells to decode (default: the training AnnData, all cells).
        transform_batch
            ``None``: each cell in its own batch. A category (or code), or a list: decode every
            cell in that batch (averaged over a list).
        gene_list, protein_list
            Genes / proteins to return (model order); default all.
        library_size
            RNA: a number scales the normalised frequencies (rows sum to it); ``'latent'``
            gives the likelihood mean with the cell's library.
        n_samples
            Posterior draws per cell; averaged unless ``return_mean=False`` (then 3-D arrays).
        sample_protein_mixing
            Draw the background/foreground indicator instead of weighting by its probability.
        scale_protein
            Rescale each cell's protein values to sum to 1.
        include_protein_background
            Add the background part: the expected protein count rather than its foreground.
        n_samples_overall
            Instead of every cell: this many cells drawn uniformly with replacement (torch's
            RNG), returned as arrays unless ``return_numpy=False``.

        Notes
        -----
        Proteins a cell's batch did not measure are imputed: decoded in the batches that measured
        them (averaged). The protein values are ``(1 - pi) * foreground (+ pi * background)``,
        where ``pi`` is the probability that a count is background.
        """
        check_positive_int(n_samples=n_samples)
        bound, idx = self.select(adata, indices)
        if n_samples_overall is not None:
            check_positive_int(n_samples_overall=n_samples_overall)
            idx = idx[torch.randint(len(idx), (n_samples_overall,)).numpy()]
            return_numpy = True if return_numpy is None else return_numpy
        codes = self.batch_codes(transform_batch)
        genes = self.gene_mask(gene_list)
        proteins = self._protein_mask(protein_list)
        if library_size != "latent" and not (isinstance(library_size, (int, float)) and library_size > 0):
            msg = f"library_size must be a positive number or 'latent', got {library_size!r}."
            raise ValueError(msg)
        three_d = n_samples > 1 and not return_mean
        rna_parts, protein_parts = [], []
        with self.inference_mode():
            for _, t in self.minibatches(bound, idx, batch_size):
                rna, protein = self._expression(
                    t, codes, n_samples, library_size, sample_protein_mixing, include_protein_background
                )
                if scale_protein:
                    protein = protein / protein.sum(-1, keepdim=True)
                if not three_d and n_samples > 1:
                    rna, protein = rna.mean(0), protein.mean(0)
                rna_parts.append(to_numpy(rna[..., torch.as_tensor(genes)]))
                protein_parts.append(to_numpy(protein[..., torch.as_tensor(proteins)]))
        axis = 1 if three_d else 0
        rna = np.concatenate(rna_parts, axis=axis) if rna_parts else np.zeros((0, int(genes.sum())), np.float32)
        protein = np.concatenate(protein_parts, axis=axis) if protein_parts else np.zeros((0, int(proteins.sum())))
        if return_numpy or three_d:
            return rna, protein
        names = (adata if adata is not None else self.adata).obs_names[idx]
        return (
            pd.DataFrame(rna, index=names, columns=np.asarray(self.setup.genes)[genes]),
            pd.DataFrame(protein, index=names, columns=np.asarray(self.setup.protein_names)[proteins]),
        )

    def get_protein_foreground_probability(
        self,
        adata: AnnData | None = None,
        indices=None,
        transform_batch=None,
        protein_list: Sequence[str] | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Posterior probability that each protein count is foreground (``1 - pi``), per cell.

        Imputed, as :meth:`get_normalized_expression`, for proteins a cell's batch did not measure.
        """
        check_positive_int(n_samples=n_samples)
        bound, idx = self.select(adata, indices)
        codes = self.batch_codes(transform_batch)
        proteins = self._protein_mask(protein_list)
        three_d = n_samples > 1 and not return_mean
        parts = []
        with self.inference_mode():
            for _, t in self.minibatches(bound, idx, batch_size):
                decoded = self._decoder(t, n_samples)
                value = self._per_protein(t, codes, lambda code, d=decoded: 1 - torch.sigmoid(d(code)["mixing"]))
                if not three_d and n_samples > 1:
                    value = value.mean(0)
                parts.append(to_numpy(value[..., torch.as_tensor(proteins)]))
        out = np.concatenate(parts, axis=1 if three_d else 0) if parts else np.zeros((0, int(proteins.sum())))
        if return_numpy or three_d:
            return out
        names = (adata if adata is not None else self.adata).obs_names[idx]
        return pd.DataFrame(out, index=names, columns=np.asarray(self.setup.protein_names)[proteins])

    # -- the generative model: parameters, samples, correlations ------------------------------
    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Parameters of p(x, y | z, l, beta) per cell, decoded in the cell's own batch.

        Parameters
        ----------
        adata, indices, batch_size
            Cells (default: the training AnnData, all cells), run in minibatches of ``batch_size``.
        n_samples
            Posterior draws of (z, l, log beta) per cell.
        give_mean
            With ``n_samples > 1``, average the draws; otherwise they are stacked.

        Returns
        -------
        Arrays (cells, genes) for RNA, as :meth:`SCVI.get_likelihood_parameters`: ``mean`` (the
        NB mean, library x frequencies), ``dispersions`` (theta) and, for ZINB, ``dropout``
        (zero-inflation probability); (cells, proteins) for proteins: ``background_mean``
        (beta), ``foreground_mean`` (beta alpha), ``protein_dispersions`` (phi) and ``mixing``
        (the probability that a count is background, sigmoid of the logits). (samples, cells,
        features) with ``n_samples > 1`` and not ``give_mean``. scvi-tools' TOTALVI has no
        such method. Proteins a cell's batch did not measure get the decoder's values in that
        batch, which no count constrained.
        """
        self._check_sizes(n_samples=n_samples, batch_size=batch_size)
        bound, idx = self.select(adata, indices)
        return outputs.likelihood_parameters(self, bound, idx, n_samples, give_mean, batch_size)

    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> sp.csr_matrix | np.ndarray:
        """Counts drawn from the posterior predictive p(x', y' | x, y), genes then proteins.

        Each sample draws (z, l, log beta) from the posterior, then RNA counts from the NB (or
        ZINB) and protein counts from the background/foreground NB mixture, with torch's global
        RNG (seed it, or use ``model.seeded(...)``, to reproduce).

        Parameters
        ----------
        adata, indices, batch_size
            Cells (default: the training AnnData, all cells), run in minibatches of ``batch_size``.
        n_samples
            Draws per cell.
        gene_list, protein_list
            Genes / proteins to return (model order); default all of each.

        Returns
        -------
        The columns of scvi-tools' ``TOTALVI.posterior_predictive_sample``: the genes, then the
        proteins. One sample: a sparse CSR matrix (cells, genes + proteins), as
        :meth:`SCVI.posterior_predictive_sample`, so ``x[:, :n_genes]`` fits ``adata.layers``;
        several: a dense array (cells, genes + proteins, samples). Integer-valued float32.
        Proteins a cell's batch did not measure are drawn from the decoder in that batch.
        """
        self._check_sizes(n_samples=n_samples, batch_size=batch_size)
        bound, idx = self.select(adata, indices)
        genes, proteins = self.gene_mask(gene_list), self._protein_mask(protein_list)
        return outputs.posterior_predictive_sample(self, bound, idx, n_samples, genes, proteins, batch_size)

    def get_feature_correlation_matrix(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 10,
        batch_size: int = 64,
        rna_size_factor: int = 1000,
        transform_batch=None,
        correlation_type: Literal["spearman", "pearson"] = "spearman",
        log_transform: bool = False,
    ) -> pd.DataFrame:
        """Correlations between all genes and proteins of denoised samples (scvi-tools' semantics).

        For each cell, ``n_samples`` posterior draws are decoded; RNA is drawn from
        Gamma(theta, theta / (``rna_size_factor`` x frequencies)), a protein from Gamma(phi,
        phi / foreground rate), set to 0 where a Bernoulli draw of the background probability
        says background. Correlations are over all cells x samples; for a list
        ``transform_batch``, averaged over the batches.

        Parameters
        ----------
        adata, indices, batch_size
            Cells (default: the training AnnData, all cells), run in minibatches of ``batch_size``.
        n_samples
            Posterior draws per cell.
        rna_size_factor
            Library the RNA frequencies are scaled to before the Gamma draw.
        transform_batch
            ``None``: each cell in its own batch; a category (or code): every cell in that batch;
            a list: one matrix per batch, averaged.
        correlation_type
            ``'spearman'`` (needs all cells x ``n_samples`` draws in memory; pass ``indices`` on
            large data) or ``'pearson'`` (accumulated in minibatches).
        log_transform
            Correlate log(RNA + 1e-8) and log1p(protein) instead.

        Returns
        -------
        DataFrame (genes + proteins) x (genes + proteins), model genes then proteins. Proteins
        the decoding batch did not measure come from the decoder's extrapolation there.
        """
        self._check_sizes(n_samples=n_samples, batch_size=batch_size)
        if correlation_type not in ("spearman", "pearson"):
            msg = f"correlation_type must be 'spearman' or 'pearson', got {correlation_type!r}."
            raise ValueError(msg)
        if isinstance(rna_size_factor, bool) or not (isinstance(rna_size_factor, (int, float)) and rna_size_factor > 0):
            msg = f"rna_size_factor must be a positive number, got {rna_size_factor!r}."
            raise ValueError(msg)
        bound, idx = self.select(adata, indices)
        if len(idx) == 0:
            msg = "get_feature_correlation_matrix needs at least one cell."
            raise ValueError(msg)
        codes = self.batch_codes(transform_batch)
        corr = outputs.feature_correlation(
            self, bound, idx, codes, n_samples, batch_size, rna_size_factor, correlation_type, log_transform
        )
        names = [*self.setup.genes, *self.setup.protein_names]
        return pd.DataFrame(corr, index=names, columns=names)

    # -- model fit -------------------------------------------------------------------------------
    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Importance-sampled log p(x, y) (higher is better): the mean over cells, or per cell.

        The proposal is the posterior q(z, l, log beta | x, y); the priors are N(0, I) for z,
        the per-batch library prior (learned library only) and N(c_ts, d_ts^2) for the log
        background of protein t in batch s, over the proteins the cell's batch measured. At
        least the ELBO in expectation (:meth:`get_elbo`), approaching log p(x, y) as
        ``n_mc_samples`` grows. Uses torch's global RNG.
        """
        self._check_sizes(n_mc_samples=n_mc_samples, batch_size=batch_size)
        bound, idx = self.select(adata, indices)
        out = np.empty(len(idx), dtype=np.float64)
        with self.inference_mode():
            for rows, t in self.minibatches(bound, idx, batch_size or 128):
                out[rows] = to_numpy(self.module.marginal_ll(t, n_mc_samples))
        return float(out.mean()) if return_mean else out

    def get_reconstruction_error(
        self, adata: AnnData | None = None, indices=None, batch_size: int | None = None
    ) -> dict[str, float]:
        """Mean negative log-likelihood per cell (lower is better), from one posterior draw.

        ``reconstruction_loss``: RNA and proteins together (the key of every model);
        ``reconst_loss_gene`` and ``reconst_loss_protein``: the two parts (scvi-tools' keys).
        Proteins a cell's batch did not measure are not counted.
        """
        self._check_sizes(batch_size=batch_size)
        bound, idx = self.select(adata, indices)
        if len(idx) == 0:
            msg = "get_reconstruction_error needs at least one cell."
            raise ValueError(msg)
        return outputs.reconstruction_error(self, bound, idx, batch_size)

    @staticmethod
    def _check_sizes(**values) -> None:
        check_positive_int(**{k: v for k, v in values.items() if v is not None})

    def _expression(self, t, codes, n_samples, library_size, sample_mixing, include_background):
        decoded = self._decoder(t, n_samples)
        latent_lib = library_size == "latent"

        def rna_in(code):
            return decoded(code)["px_rate"] if latent_lib else decoded(code)["px_scale"] * float(library_size)

        def protein_in(code):
            gen = decoded(code)
            background = torch.sigmoid(gen["mixing"])
            if sample_mixing:
                background = torch.bernoulli(background)
            value = gen["rate_fore"] * (1 - background)
            return value + gen["rate_back"] * background if include_background else value

        rna = sum(rna_in(code) for code in codes) / len(codes)
        return rna, self._per_protein(t, codes, protein_in)

    def _decoder(self, t, n_samples: int):
        """``decoded(code)``: the generative outputs of one posterior draw per cell (and sample),
        decoded in batch ``code`` (``None``: the cell's own), each batch decoded once."""
        inf = self.module.inference(t, n_samples=n_samples)
        cache = {}

        def decoded(code):
            if code not in cache:  # the cell's own batch decodes the background drawn with z
                background = inf["log_background"] if code is None else None
                cache[code] = self.module.generative(
                    inf["z"], inf["library"], t, transform_batch=code, log_background=background
                )
            return cache[code]

        return decoded

    # -- internal API of differential expression ------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        """The features :meth:`decode_features` returns: the genes, then the proteins."""
        return [*self.setup.genes, *self.setup.protein_names]

    def decode_features(
        self,
        z: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        transform_batch=None,
        *,
        protein_prior_count: float = 0.1,
        include_protein_background: bool = False,
    ) -> torch.Tensor:
        """RNA frequencies and protein expression (foreground, plus background if asked, plus
        ``protein_prior_count``; imputed where the batch did not measure a protein) of one draw
        ``z`` per cell, decoded in batch ``transform_batch``: the quantities DE compares."""
        library = torch.zeros((*z.shape[:-1], 1), dtype=z.dtype, device=z.device)  # frequencies need none
        cache = {}

        def decoded(code):
            if code not in cache:
                cache[code] = self.module.generative(z, library, tensors, transform_batch=code)
            return cache[code]

        def protein_in(code):
            gen = decoded(code)
            background = torch.sigmoid(gen["mixing"])
            value = gen["rate_fore"] * (1 - background)
            return value + gen["rate_back"] * background if include_protein_background else value

        protein = self._per_protein(tensors, [transform_batch], protein_in)
        return torch.cat([decoded(transform_batch)["px_scale"], protein + protein_prior_count], dim=-1)

    def _per_protein(self, t, codes, value_in) -> torch.Tensor:
        """Mean of ``value_in(code)`` over ``codes``, each protein over the batches that measured
        it; where none of them did, over every batch that did (imputation)."""
        measured = self.module.protein_mask.bool()
        total = weight = None
        for code in codes:
            w = measured[t["batch"]] if code is None else measured[code].expand(len(t["batch"]), -1)
            v = value_in(code)
            total = v * w if total is None else total + v * w
            weight = w.float() if weight is None else weight + w
        if bool((weight == 0).any()):
            fill_total = fill_weight = 0
            for b in range(self.setup.n_batch):
                if measured[b].any():
                    fill_total = fill_total + value_in(b) * measured[b]
                    fill_weight = fill_weight + measured[b].float()
            imputed = fill_total / fill_weight.clamp(min=1)
            return torch.where(weight > 0, total / weight.clamp(min=1), imputed)
        return total / weight

    def _protein_mask(self, protein_list) -> np.ndarray:
        return names_mask(self.setup.protein_names, protein_list, "protein_list", "proteins")
