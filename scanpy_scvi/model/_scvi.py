"""SCVI: scVI and LDVAE as a model object (latent space, expression, likelihood, fit scores)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._settings import check_positive_int, keyword_settings, split_settings
from ..data import BoundData, DataSetup, SetupArguments
from ..nn import VAE, VAEArchitecture, sample_counts, to_numpy
from ._base import BaseModel
from ._correlation import sample_correlation

if TYPE_CHECKING:
    from anndata import AnnData

DECODE_ELEMENTS = 2**22  # decoded entries per pass when several samples are drawn (16 MB of float32)


@keyword_settings(SetupArguments, VAEArchitecture)
class SCVI(BaseModel):
    """scVI (Lopez et al. 2018) or, with ``linear_decoder=True``, LDVAE (Svensson et al. 2020).

    The model keeps its own gene list and categorical mappings; the AnnData is never modified.
    Method names and semantics follow scvi-tools' ``SCVI``.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` or in ``layer``. Checked now: non-count, NaN or
        negative values, empty cells and missing keys raise before any training.
    genes
        Genes (``var_names``) to model, in order. Default: all genes of ``adata``.
    labels_key
        ``obs`` column of cell labels (used by ``dispersion='gene-label'``).
    {SetupArguments}
    {VAEArchitecture}
    random_state
        Seed of the weight initialisation.
    """

    name = "scVI"
    module_class = VAE

    def __init__(
        self,
        adata: AnnData,
        *,
        genes: Sequence[str] | None = None,
        labels_key: str | None = None,
        random_state: int | None = 0,
        **settings,
    ):
        setup_args, architecture = split_settings(settings, SetupArguments)
        architecture = VAEArchitecture(**architecture)
        setup = DataSetup.from_adata(adata, genes=genes, labels_key=labels_key, **setup_args)
        self._assemble(setup, architecture, adata=adata, random_state=random_state)

    def __repr__(self) -> str:
        a = self.architecture
        return (
            f"SCVI ({'LDVAE' if a.linear_decoder else 'scVI'}): {len(self.setup.genes)} genes, "
            f"{self.setup.n_batch} batches, n_latent={a.n_latent}, n_hidden={a.n_hidden}, n_layers={a.n_layers}, "
            f"{a.gene_likelihood} likelihood, dispersion={a.dispersion!r}; trained: {self.is_trained}"
        )

    # -- internal API of differential expression ------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        """The features :meth:`decode_features` returns: the model genes."""
        return self.setup.genes

    def decode_features(self, z: torch.Tensor, tensors: dict[str, torch.Tensor], transform_batch=None) -> torch.Tensor:
        """Normalised expression of one draw ``z`` per cell, decoded in batch ``transform_batch``
        (a code; ``None``: the cell's own): the quantity DE compares."""
        return self.module.expression(z, None, tensors, transform_batch=transform_batch)

    # -- latent library ------------------------------------------------------------------------
    def get_latent_library_size(
        self, adata: AnnData | None = None, indices=None, give_mean: bool = True, batch_size: int | None = None
    ) -> np.ndarray:
        """Library size per cell, shape (cells, 1).

        Observed library: the total counts. Learned library: the posterior mean
        exp(mu + var / 2) with ``give_mean``, else one sample of exp(l).
        """
        bound, idx = self.select(adata, indices)
        n = len(idx)
        out = np.empty((n, 1), dtype=np.float32)
        with self.inference_mode():
            for rows, t in self.minibatches(bound, idx, batch_size, encoder_only=True):
                inf = self.module.inference(t)
                if give_mean and not self.module.use_observed_lib_size:
                    out[rows] = to_numpy(torch.exp(inf["ql_m"] + 0.5 * inf["ql_v"]))
                else:
                    out[rows] = to_numpy(torch.exp(inf["library"]))
        return out

    # -- expression ------------------------------------------------------------------------------
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices=None,
        transform_batch=None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        out=None,
    ) -> pd.DataFrame | np.ndarray:
        """Decoded (denoised) expression per cell.

        Parameters
        ----------
        adata, indices
            Cells to decode (default: the training AnnData, all cells).
        transform_batch
            ``None``: decode each cell in its own batch (not batch-corrected). A category (or
            integer code): decode every cell as if from that batch. A list: average the
            frequencies over those batches, each decoding the same draw of z.
        gene_list
            Model genes to return (in model order); default all.
        library_size
            A number scales the normalised frequencies (rows sum to it with the default
            softmax decoder; ``1e4`` gives counts per 10k). ``'latent'``: the likelihood mean
            with the cell's observed or learned library.
        n_samples
            Posterior z draws per cell.
        n_samples_overall
            Return this many draws in total from cells picked uniformly at random (with
            replacement), shape (n_samples_overall, genes); only those draws are decoded.
        return_mean
            With ``n_samples > 1``, average the draws; ``False`` returns (samples, cells, genes).
        return_numpy
            Return an ndarray. Default: a DataFrame (cells x genes) unless the output is 3-D
            or comes from ``n_samples_overall``.
        out
            A (cells, genes) float32 array to write into, minibatch by minibatch, and return:
            an ``h5py`` dataset, a ``zarr`` array or a ``numpy.memmap``, so that expression
            larger than memory goes straight to disk (not with ``return_mean=False``).
        """
        check_positive_int(n_samples=n_samples)
        bound, idx = self.select(adata, indices)
        codes = self.batch_codes(transform_batch)
        mask = self.gene_mask(gene_list)
        if library_size != "latent" and not (isinstance(library_size, (int, float)) and library_size > 0):
            msg = f"library_size must be a positive number or 'latent', got {library_size!r}."
            raise ValueError(msg)
        if n_samples_overall is not None:
            check_positive_int(n_samples_overall=n_samples_overall)
            if n_samples != 1:
                msg = "Pass either n_samples or n_samples_overall, not both."
                raise ValueError(msg)
            if len(idx) == 0:
                msg = "n_samples_overall needs at least one cell."
                raise ValueError(msg)
            idx = idx[torch.randint(len(idx), (n_samples_overall,)).numpy()]
        three_d = n_samples > 1 and not return_mean
        if return_numpy is False and (three_d or n_samples_overall is not None):
            msg = "A 3-D result (n_samples > 1, return_mean=False) or n_samples_overall draws cannot be a DataFrame."
            raise ValueError(msg)

        if out is not None and (three_d or tuple(out.shape) != (len(idx), int(mask.sum()))):
            msg = f"out must have shape (cells, genes) = ({len(idx)}, {int(mask.sum())}), got {tuple(out.shape)}."
            raise ValueError(msg)
        result = self._decode(bound, idx, codes, mask, library_size, n_samples, return_mean, batch_size, out)
        if out is not None:
            return out
        if return_numpy or three_d or n_samples_overall is not None:
            return result
        names = (adata if adata is not None else self.adata).obs_names[idx]
        return pd.DataFrame(result, index=names, columns=np.asarray(self.setup.genes)[mask])

    def _decode(
        self,
        bound: BoundData,
        idx: np.ndarray,
        codes: list[int | None],
        mask: np.ndarray,
        library_size: float | str = 1,
        n_samples: int = 1,
        return_mean: bool = True,
        batch_size: int | None = None,
        out=None,
    ) -> np.ndarray:
        """Expression of cells ``idx``: one z draw per sample, decoded in each batch of ``codes``
        (``None``: the cell's own) and averaged over them; (cells, genes) or (samples, cells, genes),
        written into ``out`` when given."""
        three_d = n_samples > 1 and not return_mean
        G = int(mask.sum())
        gene_mask = None if mask.all() else torch.as_tensor(mask, device=self.device)
        latent_lib = library_size == "latent"
        if out is None:
            out = np.empty((n_samples, len(idx), G) if three_d else (len(idx), G), dtype=np.float32)
        with self.inference_mode():
            for rows, t in self.minibatches(bound, idx, batch_size, encoder_only=True):
                n_cells = rows.stop - rows.start
                inf = self.module.inference(t, n_samples=n_samples)  # one z draw, decoded in each batch
                z, lib = inf["z"], inf["library"]
                if n_samples == 1:
                    z, lib = z[None], lib[None]
                # decode a few samples at a time: (samples, cells, genes) temporaries stay cache-sized
                per_pass = max(1, DECODE_ELEMENTS // (n_cells * len(mask)))
                total = None
                for s0 in range(0, n_samples, per_pass):
                    zs, ls = z[s0 : s0 + per_pass], lib[s0 : s0 + per_pass]
                    acc = None
                    for code in codes:
                        value = self.module.expression(zs, ls, t, transform_batch=code, scaled_by_library=latent_lib)
                        if gene_mask is not None:
                            value = value[..., gene_mask]
                        acc = value if acc is None else acc.add_(value)
                    if three_d:
                        out[s0 : s0 + len(zs), rows] = to_numpy(acc / len(codes))
                    else:
                        part = acc[0] if len(acc) == 1 else acc.sum(0)
                        total = part if total is None else total.add_(part)
                if not three_d:
                    scale = (1.0 if latent_lib else float(library_size)) / (len(codes) * n_samples)
                    out[rows] = to_numpy(total if scale == 1 else total.mul_(scale))
            if three_d and not latent_lib and library_size != 1:
                out *= np.float32(library_size)
        return out

    def denoised_and_rate(self, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Frequencies and likelihood means of the training cells from one shared z draw each.

        The same draw as ``get_normalized_expression(library_size=1)`` and
        ``(..., library_size='latent')`` would make separately, computed in one pass.
        """
        bound, idx = self.select(None, None)
        n = len(idx)
        G = len(self.setup.genes)
        scale, rate = np.empty((n, G), dtype=np.float32), np.empty((n, G), dtype=np.float32)
        with self.inference_mode():
            for rows, t in self.minibatches(bound, idx, batch_size, encoder_only=True):
                inf = self.module.inference(t)
                px_scale = self.module.expression(inf["z"], inf["library"], t)  # no dropout/dispersion heads
                scale[rows] = to_numpy(px_scale)
                rate[rows] = to_numpy(torch.exp(self.module.log_library(inf["library"], t)) * px_scale)
        return scale, rate

    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Parameters of p(x | z, l) per cell and gene.

        ``mean``: the NB/Poisson mean (library x frequencies, without zero inflation);
        ``dispersions``: theta (not for Poisson); ``dropout``: zero-inflation probability
        (ZINB only). With ``n_samples > 1``: averaged when ``give_mean``, else stacked as
        (samples, cells, genes).
        """
        check_positive_int(n_samples=n_samples)
        bound, idx = self.select(adata, indices)
        n = len(idx)
        G = len(self.setup.genes)
        keys = ["mean"]
        if self.module.gene_likelihood != "poisson":
            keys.append("dispersions")
        if self.module.gene_likelihood == "zinb":
            keys.append("dropout")
        stacked = n_samples > 1 and not give_mean
        shape = (n_samples, n, G) if stacked else (n, G)
        out = {k: np.empty(shape, dtype=np.float32) for k in keys}
        with self.inference_mode():
            for rows, t in self.minibatches(bound, idx, batch_size, encoder_only=True):
                _inf, gen = self.module(t, n_samples=n_samples)
                values = {
                    "mean": gen["px_rate"],
                    "dispersions": gen["theta"],
                    "dropout": torch.sigmoid(gen["zi_logits"]),
                }
                for k in keys:
                    v = values[k].expand_as(gen["px_rate"])
                    if n_samples > 1 and give_mean:
                        v = v.mean(0)
                    if stacked:
                        out[k][:, rows] = to_numpy(v)
                    else:
                        out[k][rows] = to_numpy(v)
        return out

    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> sp.csr_matrix | np.ndarray:
        """Counts drawn from the posterior predictive p(x' | x).

        Returns a sparse CSR matrix (cells x genes) for one sample, or a dense array
        (cells, genes, samples) for several (as scvi-tools' shape). Uses torch's global RNG.
        """
        check_positive_int(n_samples=n_samples)
        bound, idx = self.select(adata, indices)
        mask = torch.as_tensor(self.gene_mask(gene_list), device=self.device)
        blocks = []
        with self.inference_mode():
            for _, t in self.minibatches(bound, idx, batch_size, encoder_only=True):
                _, gen = self.module(t, n_samples=n_samples)
                counts = to_numpy(
                    sample_counts(gen["px_rate"], gen["theta"], gen["zi_logits"], self.module.gene_likelihood)[
                        ..., mask
                    ]
                )
                # one sample: keep only the sparse block, so memory follows the nonzeros
                blocks.append(sp.csr_matrix(counts) if n_samples == 1 else np.moveaxis(counts, 0, -1))
        if n_samples == 1:
            return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, int(mask.sum())), dtype=np.float32)
        return np.concatenate(blocks, axis=0)

    # -- model fit -------------------------------------------------------------------------------
    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Importance-sampled log p(x) (higher is better): the mean over cells, or per cell."""
        check_positive_int(n_mc_samples=n_mc_samples)
        bound, idx = self.select(adata, indices)
        n = len(idx)
        out = np.empty(n, dtype=np.float64)
        with self.inference_mode():
            for rows, t in self.minibatches(bound, idx, batch_size or 128):
                out[rows] = to_numpy(self.module.marginal_ll(t, n_mc_samples))
        return float(out.mean()) if return_mean else out

    def get_loadings(self) -> pd.DataFrame:
        """LDVAE loadings (genes x latent), decoder batch norm folded into the weights."""
        if not self.module.linear_decoder:
            msg = "get_loadings() needs a linear decoder (LDVAE): build the model with linear_decoder=True."
            raise ValueError(msg)
        w = to_numpy(self.module.loadings())
        return pd.DataFrame(w, index=pd.Index(self.setup.genes), columns=[f"Z_{i}" for i in range(w.shape[1])])

    def get_feature_correlation_matrix(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 10,
        batch_size: int | None = None,
        rna_size_factor: int = 1000,
        transform_batch=None,
        correlation_type: Literal["spearman", "pearson"] = "spearman",
    ) -> pd.DataFrame:
        """Gene-gene correlation of denoised expression samples (genes x genes DataFrame).

        For each cell, ``n_samples`` posterior draws of z are decoded and a denoised expression
        is drawn from Gamma(theta, theta / (rna_size_factor * frequencies)); correlations are
        taken over all cells x samples and, for a list ``transform_batch``, averaged over the
        batches. Pearson is accumulated in minibatches; Spearman ranks need all
        (cells x n_samples, genes) samples in memory, so pass ``indices`` on large data.
        """
        check_positive_int(n_samples=n_samples)
        if correlation_type not in ("spearman", "pearson"):
            msg = f"correlation_type must be 'spearman' or 'pearson', got {correlation_type!r}."
            raise ValueError(msg)
        bound, idx = self.select(adata, indices)
        G = len(self.setup.genes)

        def draws_in(code):
            for draws in self._denoised_draws(bound, idx, n_samples, batch_size, rna_size_factor, code):
                yield draws.reshape(-1, G).astype(np.float64)

        mats = [sample_correlation(draws_in(code), G, correlation_type) for code in self.batch_codes(transform_batch)]
        return pd.DataFrame(np.mean(mats, axis=0), index=self.setup.genes, columns=self.setup.genes)

    def get_denoised_samples(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 25,
        batch_size: int | None = None,
        rna_size_factor: int = 1000,
        transform_batch=None,
    ) -> np.ndarray:
        """Denoised expression draws, (cells, genes, n_samples): for each posterior draw of z,
        one draw of Gamma(theta, theta / (rna_size_factor x frequencies)), decoded in batch
        ``transform_batch`` (one category or code; ``None``: each cell's own). These are the
        samples behind :meth:`get_feature_correlation_matrix`."""
        check_positive_int(n_samples=n_samples)
        bound, idx = self.select(adata, indices)
        codes = self.batch_codes(transform_batch)
        if len(codes) != 1:
            msg = "get_denoised_samples decodes in one batch: pass a single transform_batch (or None)."
            raise ValueError(msg)
        blocks = [
            np.moveaxis(draws.reshape(n_samples, -1, len(self.setup.genes)), 0, -1)
            for draws in self._denoised_draws(bound, idx, n_samples, batch_size, rna_size_factor, codes[0])
        ]
        return np.concatenate(blocks) if blocks else np.empty((0, len(self.setup.genes), n_samples), np.float32)

    def _denoised_draws(self, bound, idx, n_samples, batch_size, rna_size_factor, code):
        """Per minibatch, the Gamma draws of :meth:`get_denoised_samples`, (samples, cells, genes)
        (without the samples axis for one sample)."""
        with self.inference_mode():
            for _, t in self.minibatches(bound, idx, batch_size, encoder_only=True):
                inf = self.module.inference(t, n_samples=n_samples)
                gen = self.module.generative(inf["z"], inf["library"], t, transform_batch=code)
                mean = rna_size_factor * gen["px_scale"]
                theta = gen["theta"].expand_as(mean)
                yield to_numpy(torch.distributions.Gamma(theta, theta / mean).sample())
