"""scvi 0.x's ``Posterior`` over our model API (what ``pp.scvi(return_posterior=True)`` returns).

The module is long (some 790 lines) because the 0.x ``Posterior`` has 35 public methods; each
is a few lines over the model's methods plus its docstring.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ._arguments import loader_batch_size

if TYPE_CHECKING:
    from anndata import AnnData

    from ...model import SCVI

# -- the Posterior ----------------------------------------------------------------------------------------
LN2 = math.log(2.0)


class Posterior:
    """scvi 0.x's ``Posterior``: a trained model over a set of cells, with 0.x's methods.

    ``pp.scvi(..., return_posterior=True)`` returns one over all cells, as
    ``scanpy.external.pp.scvi`` did. Every method runs the model's own methods (or ``tl``
    functions) on the cells of :attr:`indices`; results are in cell order.

    Parameters
    ----------
    model
        A trained :class:`~scanpy_scvi.SCVI` (or :class:`~scanpy_scvi.SCANVI`).
    gene_dataset
        The AnnData (0.x: a ``GeneExpressionDataset``). Default: the model's.
    shuffle
        Accepted for 0.x code; results are always in cell order.
    indices
        Positions of the cells (default: all).
    use_cuda
        Run on CUDA when available (moves the model).
    data_loader_kwargs
        ``batch_size`` is the minibatch size of every method; other keys have no meaning here.
    """

    def __init__(
        self,
        model: SCVI,
        gene_dataset: AnnData | None = None,
        shuffle: bool = False,
        indices=None,
        use_cuda: bool = True,
        data_loader_kwargs: Mapping[str, Any] | None = None,
    ):
        self.model = model
        self.gene_dataset = gene_dataset if gene_dataset is not None else model.adata
        if self.gene_dataset is None:
            msg = "The model holds no AnnData; pass gene_dataset=."
            raise ValueError(msg)
        self._bound = model.bind(self.gene_dataset)  # checked once
        n = self._bound.n_obs
        self._indices = np.arange(n) if indices is None else _positions(indices, n)
        self.batch_size = loader_batch_size(data_loader_kwargs or {}, "data_loader_kwargs") or 128
        self._corrupted: AnnData | None = None  # the corrupted counts while corrupted()
        self._originals: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if use_cuda and torch.cuda.is_available() and model.device.type != "cuda":
            model.to_device("cuda")

    # -- attributes --------------------------------------------------------------------------------
    @property
    def indices(self) -> np.ndarray:
        """The cells of this Posterior (positions in ``gene_dataset``)."""
        return self._indices

    @property
    def nb_cells(self) -> int:
        """Number of cells."""
        return len(self._indices)

    @property
    def posterior_type(self) -> str:
        """The class name."""
        return type(self).__name__

    @property
    def data_loader(self) -> tuple[np.ndarray, int]:
        """What the cells are iterated over as (indices, batch size); assign it back to restore
        the state before :meth:`update_sampler_indices`, as 0.x code does."""
        return self._indices.copy(), self.batch_size

    @data_loader.setter
    def data_loader(self, state: tuple[np.ndarray, int]) -> None:
        self._indices, self.batch_size = np.asarray(state[0]), int(state[1])

    def __iter__(self):
        """Minibatches as 0.x yielded them: ``(counts, local_l_mean, local_l_var, batch_index, labels)``
        tensors, counts dense (cells, genes), the others (cells, 1)."""
        counts, obs, library_prior = self._counts(self._adata), self._bound.source.obs, self._library_prior()
        for start in range(0, self.nb_cells, self.batch_size):
            rows = self._indices[start : start + self.batch_size]
            codes = (torch.as_tensor(obs[k][rows].reshape(-1, 1)) for k in ("batch", "labels"))
            yield torch.as_tensor(_dense(counts[rows])), *library_prior(rows), *codes

    def _library_prior(self):
        """Per-cell mean and variance of the log library in the cell's batch (0.x's
        ``local_l_mean``/``local_l_var``)."""
        means, variances = self._bound.log_library_moments(self.model.setup.n_batch)
        batch = self._bound.source.obs["batch"]

        def at(rows):
            return (torch.as_tensor(means[batch[rows]].reshape(-1, 1), dtype=torch.float32),
                    torch.as_tensor(variances[batch[rows]].reshape(-1, 1), dtype=torch.float32))  # fmt: skip

        return at

    # -- copies ------------------------------------------------------------------------------------
    def _copy(self) -> Posterior:
        new = copy.copy(self)
        new._indices = self._indices.copy()
        return new

    def sequential(self, batch_size: int | None = 128) -> Posterior:
        """A copy iterating in cell order with ``batch_size`` (every method here runs in cell order)."""
        new = self._copy()
        new.batch_size = int(batch_size or 128)
        return new

    def update(self, data_loader_kwargs: Mapping[str, Any]) -> Posterior:
        """A copy with new data-loader settings: ``batch_size`` (``shuffle``, ``pin_memory`` and
        ``num_workers`` are accepted and change nothing: results come in cell order, in-process)."""
        new = self._copy()
        new.batch_size = loader_batch_size(data_loader_kwargs, "data_loader_kwargs") or self.batch_size
        return new

    def update_sampler_indices(self, idx) -> None:
        """Restrict this Posterior to cells ``idx`` (positions in ``gene_dataset``), in place."""
        self._indices = _positions(idx, self._bound.n_obs)

    def to_cuda(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors on the CUDA device."""
        if not torch.cuda.is_available():
            msg = "to_cuda: no CUDA device is available."
            raise RuntimeError(msg)
        return [t.cuda() for t in tensors]

    # -- the data ----------------------------------------------------------------------------------
    @property
    def _adata(self) -> AnnData:
        """The AnnData the methods read: the corrupted copy while :meth:`corrupted`."""
        return self._corrupted if self._corrupted is not None else self.gene_dataset

    def _codes(self, key: str) -> np.ndarray:
        return self._bound.source.obs[key][self._indices].astype(np.int64)

    def _gene_names(self, genes) -> list[str] | None:
        """0.x gene lists (names or positions among the model genes) as names."""
        if genes is None:
            return None
        values = np.atleast_1d(np.asarray(genes))
        if np.issubdtype(values.dtype, np.integer):
            return [self.model.setup.genes[int(g)] for g in values]
        return [str(g) for g in values]

    def _batch(self, transform_batch):
        """0.x batch ids (integer codes) as our batch categories."""
        if transform_batch is None:
            return None
        cats = self.model.setup.batch_categories
        values = [transform_batch] if np.isscalar(transform_batch) else list(transform_batch)
        names = [cats[int(v)] if isinstance(v, (int, np.integer)) else v for v in values]
        return names[0] if np.isscalar(transform_batch) else names

    def _counts(self, adata: AnnData):
        """The counts of the model genes in ``adata`` (all cells, as stored)."""
        setup = self.model.setup
        X = adata.layers[setup.layer] if setup.layer is not None else adata.X
        return X[:, adata.var_names.get_indexer(setup.genes)]

    def raw_data(self) -> tuple[np.ndarray | sp.spmatrix, np.ndarray]:
        """The counts of the model genes (cells x genes, as stored) and the label codes."""
        return self._counts(self._adata)[self._indices], self._codes("labels")

    # -- latent space and fit ----------------------------------------------------------------------
    def get_latent(self, give_mean: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(latent, batch_indices, labels)``: the posterior mean of z (or one draw), and the
        batch and label codes of each cell (zeros without batch / labels)."""
        latent = self.model.get_latent_representation(self._adata, self._indices, give_mean=give_mean,
                                                      batch_size=self.batch_size)  # fmt: skip
        return latent, self._codes("batch"), self._codes("labels")

    def elbo(self) -> float:
        """The ELBO per cell (higher is better).

        0.x returned the negative ELBO (the training loss, a positive number) under this name;
        this returns the bound itself, as ``SCVI.get_elbo``.
        """
        return self.model.get_elbo(self._adata, self._indices, batch_size=self.batch_size)

    def reconstruction_error(self) -> float:
        """Mean negative log-likelihood of the counts per cell (lower is better)."""
        return self.model.get_reconstruction_error(self._adata, self._indices)["reconstruction_loss"]

    def marginal_ll(self, n_mc_samples: int = 1000) -> float:
        """Importance-sampled log p(x) per cell, averaged (higher is better; 0.x returned its
        negative under this name)."""
        return self.model.get_marginal_ll(self._adata, self._indices, n_mc_samples=n_mc_samples)

    def get_stats(self) -> np.ndarray:
        """The log library size of each cell (observed, or the learned posterior mean)."""
        lib = self.model.get_latent_library_size(self._adata, self._indices, batch_size=self.batch_size)
        return np.log(lib).ravel()

    def entropy_batch_mixing(self, **kwargs) -> float:
        """Batch mixing of the latent space (:meth:`~scanpy_scvi.SCVI.entropy_batch_mixing`)."""
        return self.model.entropy_batch_mixing(self._adata, self._indices, **kwargs)

    def knn_purity(self, **kwargs) -> float:
        """kNN purity of the labels in the latent space (:meth:`~scanpy_scvi.SCVI.knn_purity`)."""
        return self.model.knn_purity(self._adata, self._indices, **kwargs)

    def clustering_scores(self, prediction_algorithm: str = "knn") -> tuple[float, float, float]:
        """``(silhouette, nmi, ari)`` of the labels in the latent space, as 0.x returned them.

        0.x clustered with k-means or a GMM (``prediction_algorithm``); here always k-means.
        """
        if prediction_algorithm not in ("knn", "kmeans", "gmm"):
            msg = f"prediction_algorithm must be 'knn', 'kmeans' or 'gmm', got {prediction_algorithm!r}."
            raise ValueError(msg)
        if prediction_algorithm == "gmm":
            msg = "prediction_algorithm='gmm' is not implemented; the clustering here is k-means."
            raise NotImplementedError(msg)
        s = self.model.clustering_scores(self._adata, self._indices)
        return s["silhouette"], s["nmi"], s["ari"]

    def accuracy(self) -> float:
        """Fraction of labelled cells whose predicted label is their label (scANVI models)."""
        if not hasattr(self.model, "predict"):
            msg = f"accuracy() needs a classifier (a scANVI model); this Posterior's model is {self.model.name}."
            raise ValueError(msg)
        predicted = np.asarray(self.model.predict(self._adata, indices=self._indices)).astype(str)
        truth = self._adata.obs[self.model.setup.labels_key].astype(str).to_numpy()[self._indices]
        labelled = truth != str(self.model.setup.unlabeled_category)
        return float(np.mean(predicted[labelled] == truth[labelled]))

    def nn_overlap_score(self, *, protein_obsm_key: str = "protein_expression", k: int = 100) -> tuple[float, float]:
        """``(spearman_correlation, fold_enrichment)`` of the cells' ``k``-nearest-neighbour graphs
        in the latent space and in the CLR-normalised protein space (``obsm[protein_obsm_key]``),
        as 0.x: the Spearman correlation of the two adjacency matrices' entries, and the number
        of shared edges over its expectation for independent graphs. (For 0/1 entries, Spearman's
        correlation is the phi coefficient, computed here from edge counts without the dense
        cells x cells matrices.)"""
        from sklearn.neighbors import NearestNeighbors

        if protein_obsm_key not in self._adata.obsm:
            msg = f"nn_overlap_score needs protein counts in obsm[{protein_obsm_key!r}] (a CITE-seq AnnData)."
            raise ValueError(msg)
        log_p = np.log1p(np.asarray(self._adata.obsm[protein_obsm_key], dtype=np.float64)[self._indices])
        clr = log_p - log_p.mean(axis=1, keepdims=True)
        latent = self.get_latent()[0]
        n = len(latent)
        k = min(k, n - 1)
        graphs = []
        for x in (latent, clr):
            g = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors_graph(x).tolil()
            g.setdiag(0)
            graphs.append(g.tocsr())
        graphs[0].eliminate_zeros(), graphs[1].eliminate_zeros()
        both, e1, e2, total = float(graphs[0].multiply(graphs[1]).sum()), graphs[0].nnz, graphs[1].nnz, float(n * n)
        phi = (total * both - e1 * e2) / math.sqrt(e1 * (total - e1) * e2 * (total - e2))
        return float(phi), both * total / (e1 * e2)

    # -- expression ----------------------------------------------------------------------------------
    def get_sample_scale(
        self,
        transform_batch=None,
        gene_list=None,
        library_size: float = 1,
        return_df: bool | None = None,
        n_samples: int = 1,
        return_mean: bool = True,
    ) -> np.ndarray | pd.DataFrame:
        """Normalised expression (the scVI paper's rho) scaled to ``library_size``
        (:meth:`~scanpy_scvi.SCVI.get_normalized_expression`). ``transform_batch``: a batch code
        or category (None: each cell's own); ``gene_list``: gene names or positions."""
        genes = self._gene_names(gene_list)
        if return_df is None:
            return_df = genes is not None and len(genes) > 1
        return self.model.get_normalized_expression(
            self._adata, self._indices, transform_batch=self._batch(transform_batch), gene_list=genes,
            library_size=library_size, n_samples=n_samples, return_mean=return_mean, batch_size=self.batch_size,
            return_numpy=not return_df,
        )  # fmt: skip

    def imputation(self, n_samples: int = 1, transform_batch=None) -> np.ndarray:
        """The likelihood mean px_rate (library x frequencies) per cell and gene: (cells, genes),
        or (n_samples, cells, genes); a list ``transform_batch`` averages over those batches."""
        return self.model.get_normalized_expression(
            self._adata, self._indices, transform_batch=self._batch(transform_batch), library_size="latent",
            n_samples=n_samples, return_mean=False, return_numpy=True, batch_size=self.batch_size,
        )  # fmt: skip

    def generate(self, n_samples: int = 100, genes=None, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_new, x_old)``: ``n_samples`` posterior predictive draws (cells, genes, n_samples)
        and the observed counts (cells, genes), as tensors."""
        names = self._gene_names(genes)
        new = self.model.posterior_predictive_sample(self._adata, self._indices, n_samples=n_samples,
                                                     gene_list=names, batch_size=batch_size)  # fmt: skip
        new = np.asarray(new.todense())[..., None] if sp.issparse(new) else new
        old = _dense(self.raw_data()[0])
        if names is not None:
            old = old[:, self.model.gene_mask(names)]
        return torch.as_tensor(new), torch.as_tensor(old)

    def generate_parameters(self, n_samples: int = 1, give_mean: bool = False) -> tuple[np.ndarray, ...]:
        """``(dropout, mean, dispersion)`` of p(x | z): the zero-inflation probability (zeros for
        NB), the mean and theta, (cells, genes) or (n_samples, cells, genes)."""
        p = self.model.get_likelihood_parameters(self._adata, self._indices, n_samples=n_samples, give_mean=give_mean,
                                                 batch_size=self.batch_size)  # fmt: skip
        zeros = np.zeros_like(p["mean"])
        return p.get("dropout", zeros), p["mean"], p.get("dispersions", zeros)

    def generate_denoised_samples(
        self, n_samples: int = 25, batch_size: int = 64, rna_size_factor: int = 1000, transform_batch=None
    ) -> np.ndarray:
        """Denoised expression draws (cells, genes, n_samples): per posterior draw of z,
        Gamma(theta, theta / (rna_size_factor x frequencies)), the draws behind
        :meth:`generate_feature_correlation_matrix`."""
        return self.model.get_denoised_samples(self._adata, self._indices, n_samples=n_samples, batch_size=batch_size,
                                               rna_size_factor=rna_size_factor,
                                               transform_batch=self._batch(transform_batch))  # fmt: skip

    def generate_feature_correlation_matrix(
        self,
        n_samples: int = 10,
        batch_size: int = 64,
        rna_size_factor: int = 1000,
        transform_batch=None,
        correlation_type: str = "spearman",
    ) -> np.ndarray:
        """Gene-gene correlation (genes x genes) of denoised samples
        (:meth:`~scanpy_scvi.SCVI.get_feature_correlation_matrix`)."""
        return self.model.get_feature_correlation_matrix(
            self._adata, self._indices, n_samples=n_samples, batch_size=batch_size, rna_size_factor=rna_size_factor,
            transform_batch=self._batch(transform_batch), correlation_type=correlation_type,
        ).to_numpy()  # fmt: skip

    def scale_sampler(
        self,
        selection,
        n_samples: int | None = 5000,
        n_samples_per_cell: int | None = None,
        batchid=None,
        use_observed_batches: bool = False,
        give_mean: bool = False,
        **kwargs,
    ) -> dict[str, np.ndarray]:
        """Normalised-expression draws of the cells ``selection`` (mask or positions in this
        Posterior's cells): ``{'scale': (draws, genes), 'batch': (draws,)}``, per batch of
        ``batchid`` (default all; with ``use_observed_batches`` each cell's own batch), each
        cell drawn ``n_samples_per_cell`` times or ``n_samples`` draws in total per batch.
        ``give_mean``: one mean over the draws per batch."""
        _no_extras(kwargs, "scale_sampler")
        cells = self._indices[_positions(selection, self.nb_cells)]
        if n_samples is None and n_samples_per_cell is None:
            msg = "Pass n_samples or n_samples_per_cell."
            raise ValueError(msg)
        batches = [None] if use_observed_batches else (
            list(range(self.model.setup.n_batch)) if batchid is None else list(batchid))  # fmt: skip
        per_cell = n_samples_per_cell or max(1, math.ceil(n_samples / (len(batches) * len(cells))))
        scales, ids = [], []
        for b in batches:
            s = self.model.get_normalized_expression(
                self._adata,
                cells,
                transform_batch=self._batch(b),
                n_samples=per_cell,
                return_mean=False,
                return_numpy=True,
                batch_size=self.batch_size,
            ).reshape(-1, len(self.model.setup.genes))  # rows sample-major: draw k of every cell, then k + 1
            batch = np.tile(self._bound.source.obs["batch"][cells], per_cell) if b is None else np.full(len(s), b)
            if n_samples_per_cell is None:
                s, batch = s[: max(1, n_samples // len(batches))], batch[: max(1, n_samples // len(batches))]
            scales.append(s.mean(0, keepdims=True) if give_mean else s)
            ids.append(np.full(1, -1 if b is None else b) if give_mean else batch)
        return {"scale": np.concatenate(scales), "batch": np.concatenate(ids)}

    # -- differential expression -----------------------------------------------------------------------
    def differential_expression_score(
        self,
        idx1,
        idx2,
        mode: str = "vanilla",
        batchid1=None,
        batchid2=None,
        use_observed_batches: bool = False,
        n_samples: int = 5000,
        use_permutation: bool = False,
        M_permutation: int = 10000,
        all_stats: bool = True,
        change_fn=None,
        m1_domain_fn=None,
        delta: float = 0.5,
        cred_interval_lvls=None,
        **kwargs,
    ) -> pd.DataFrame:
        """Bayesian DE between cells ``idx1`` and ``idx2`` (masks or positions in this Posterior's
        cells; ``idx2=None``: all others), over :func:`scanpy_scvi.tl.differential_expression`.

        Columns as in 0.x: vanilla mode ``proba_m1``, ``proba_m2``, ``bayes_factor``, ``scale1``,
        ``scale2``; change mode ``proba_de``, ``proba_not_de``, ``bayes_factor``, ``scale1``,
        ``scale2``, ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max``; with
        ``all_stats`` also ``raw_mean``, ``non_zeros_proportion`` and ``raw_normalized_mean`` of
        both groups. Sorted by ``bayes_factor`` (vanilla) or ``proba_de`` (change).

        Differences from 0.x: the change mode's fold change is 0.x's natural-log one (``delta``
        on that scale), but of frequencies plus scvi-tools' small pseudocount; draws are paired
        rather than permuted (``use_permutation`` is refused), and ``change_fn``,
        ``m1_domain_fn`` and ``cred_interval_lvls`` are not implemented. ``use_observed_batches=False``
        (default) decodes both groups in the batches ``batchid1`` / ``batchid2`` (codes or
        categories; default all), as 0.x did.
        """
        _no_extras(kwargs, "differential_expression_score")
        if use_permutation:
            msg = "use_permutation=True is not implemented: draws of the two groups are paired, not permuted."
            raise NotImplementedError(msg)
        if change_fn not in (None, "log-fold") or m1_domain_fn is not None or cred_interval_lvls is not None:
            msg = "change_fn, m1_domain_fn and cred_interval_lvls are not implemented: the effect size is the log fold change."
            raise NotImplementedError(msg)
        from ...tl import differential_expression

        cells1 = self._indices[_positions(idx1, self.nb_cells)]
        cells2 = None if idx2 is None else self._indices[_positions(idx2, self.nb_cells)]
        if cells2 is None:
            cells2 = np.setdiff1d(self._indices, cells1)
        df = differential_expression(
            self._adata, idx1=cells1, idx2=cells2, mode=mode, delta=delta / LN2, batch_correction=not use_observed_batches,
            batchid1=self._batch(batchid1), batchid2=self._batch(batchid2), n_samples=n_samples, model=self.model,
            inplace=False, progress_bar=False,
        )  # fmt: skip
        for col in ("lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max"):
            df[col] = df[col] * LN2  # log2 -> 0.x's natural log
        first = ["proba_de", "proba_not_de"] if mode == "change" else ["proba_m1", "proba_m2"]
        cols = [*first, "bayes_factor", "scale1", "scale2"]
        if mode == "change":
            cols += ["lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max"]
        if all_stats:
            cols += [f"{k}{g}" for k in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean") for g in (1, 2)]
        out = df[cols].copy()
        out.index.name = None
        return out

    def get_bayes_factors(self, idx1, idx2, mode: str = "vanilla", **kwargs) -> dict[str, np.ndarray]:
        """The DE statistics of :meth:`differential_expression_score` without the raw-count
        columns, as ``{column: array}`` in model gene order."""
        df = self.differential_expression_score(idx1, idx2, mode=mode, all_stats=False, **kwargs)
        df = df.loc[self.model.setup.genes]
        return {c: df[c].to_numpy() for c in df.columns}

    def differential_expression_stats(self, M_sampling: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """``(px_scales, all_labels)``: ``M_sampling`` normalised-expression draws of every cell,
        (cells x M_sampling, genes), and the label code of each draw."""
        s = self.model.get_normalized_expression(self._adata, self._indices, n_samples=M_sampling, return_mean=False,
                                                 return_numpy=True, batch_size=self.batch_size)  # fmt: skip
        if M_sampling == 1:
            s = s[None]
        return np.swapaxes(s, 0, 1).reshape(-1, s.shape[-1]), np.repeat(self._codes("labels"), M_sampling)

    def one_vs_all_degenes(
        self,
        subset=None,
        cell_labels=None,
        use_observed_batches: bool = False,
        min_cells: int = 10,
        n_samples: int = 5000,
        use_permutation: bool = False,
        M_permutation: int = 10000,
        output_file: bool = False,
        mode: str = "vanilla",
        change_fn=None,
        m1_domain_fn=None,
        delta: float = 0.5,
        cred_interval_lvls=None,
        save_dir: str = "./",
        filename: str = "one2all",
        **kwargs,
    ) -> tuple[list[pd.DataFrame], np.ndarray]:
        """Each cluster against all other cells (of ``subset``): ``(de_res, de_cluster)``, one
        :meth:`differential_expression_score` DataFrame (plus a ``clusters`` column) per cluster
        of at least ``min_cells`` cells, and those clusters' names. ``cell_labels``: a label per
        cell of this Posterior (default the model's labels). ``output_file`` writes one CSV per
        cluster, ``<save_dir>/<filename>.<cluster>.csv`` (0.x wrote one Excel workbook)."""
        labels, keep = self._clusters(cell_labels, subset)
        pairs = {}
        for name in pd.unique(labels[keep]):
            in_cluster = keep & (labels == name)
            if in_cluster.sum() >= min_cells:
                pairs[name] = (in_cluster, keep & ~in_cluster)
        de_args = dict(mode=mode, use_observed_batches=use_observed_batches, n_samples=n_samples,
                       use_permutation=use_permutation, M_permutation=M_permutation, change_fn=change_fn,
                       m1_domain_fn=m1_domain_fn, delta=delta, cred_interval_lvls=cred_interval_lvls, **kwargs)  # fmt: skip
        return self._per_cluster(pairs, de_args, output_file, save_dir, filename)

    def within_cluster_degenes(
        self,
        states,
        cell_labels=None,
        min_cells: int = 10,
        batch1=None,
        batch2=None,
        use_observed_batches: bool = False,
        subset=None,
        n_samples: int = 5000,
        use_permutation: bool = False,
        M_permutation: int = 10000,
        mode: str = "vanilla",
        change_fn=None,
        m1_domain_fn=None,
        delta: float = 0.5,
        cred_interval_lvls=None,
        output_file: bool = False,
        save_dir: str = "./",
        filename: str = "within_cluster",
        **kwargs,
    ) -> tuple[list[pd.DataFrame], np.ndarray]:
        """Within each cluster, the cells of state ``True`` against those of state ``False``
        (``states``: one boolean per cell of this Posterior): ``(de_res, de_cluster)`` for the
        clusters with at least ``min_cells`` cells in each state. ``batch1`` / ``batch2``: the
        batches to decode each state in (codes or categories)."""
        states = np.asarray(states).astype(bool)
        if states.shape != (self.nb_cells,):
            msg = f"states must hold one boolean per cell ({self.nb_cells}), got shape {states.shape}."
            raise ValueError(msg)
        labels, keep = self._clusters(cell_labels, subset)
        pairs = {}
        for name in pd.unique(labels[keep]):
            in_cluster = keep & (labels == name)
            one, two = in_cluster & states, in_cluster & ~states
            if one.sum() >= min_cells and two.sum() >= min_cells:
                pairs[name] = (one, two)
        de_args = dict(mode=mode, batchid1=batch1, batchid2=batch2, use_observed_batches=use_observed_batches,
                       n_samples=n_samples, use_permutation=use_permutation, M_permutation=M_permutation,
                       change_fn=change_fn, m1_domain_fn=m1_domain_fn, delta=delta,
                       cred_interval_lvls=cred_interval_lvls, **kwargs)  # fmt: skip
        return self._per_cluster(pairs, de_args, output_file, save_dir, filename)

    def _per_cluster(self, pairs: dict, de_args: dict, output_file: bool, save_dir: str, filename: str):
        """One :meth:`differential_expression_score` per cluster's pair of masks, with a
        ``clusters`` column; CSV files with ``output_file``."""
        de_res = []
        for name, (one, two) in pairs.items():
            res = self.differential_expression_score(one, two, **de_args)
            res["clusters"] = name
            de_res.append(res)
        if output_file:
            os.makedirs(save_dir, exist_ok=True)
            for name, res in zip(pairs, de_res, strict=True):
                res.to_csv(os.path.join(save_dir, f"{filename}.{name}.csv"))
        return de_res, np.asarray(list(pairs))

    def _clusters(self, cell_labels, subset) -> tuple[np.ndarray, np.ndarray]:
        if cell_labels is None:
            key = self.model.setup.labels_key
            if key is None:
                msg = "Pass cell_labels= (one label per cell): the model was built without labels_key."
                raise ValueError(msg)
            cell_labels = self.gene_dataset.obs[key].to_numpy()[self._indices]
        labels = np.asarray(cell_labels)
        if labels.shape != (self.nb_cells,):
            msg = f"cell_labels must hold one label per cell ({self.nb_cells}), got shape {labels.shape}."
            raise ValueError(msg)
        keep = np.ones(self.nb_cells, dtype=bool)
        if subset is not None:
            keep = np.zeros(self.nb_cells, dtype=bool)
            keep[_positions(subset, self.nb_cells)] = True
        return labels, keep

    # -- imputation benchmark ----------------------------------------------------------------------------
    def corrupted(self, corruption: str = "uniform", rate: float = 0.1, random_state: int | None = 0) -> Posterior:
        """A copy reading corrupted counts, made as 0.x's ``GeneExpressionDataset.corrupt()``:
        ``'uniform'`` multiplies a fraction ``rate`` of the nonzero counts (of this Posterior's
        cells) by a Bernoulli(0.9) draw; ``'binomial'`` replaces a fraction ``rate`` of all
        entries by a Binomial(count, 0.2) draw. The original counts stay in ``gene_dataset``;
        :meth:`imputation_list` compares them at the entries that changed."""
        import anndata as ad

        if corruption not in ("uniform", "binomial"):
            msg = f"corruption must be 'uniform' or 'binomial', got {corruption!r}."
            raise ValueError(msg)
        rng = np.random.default_rng(random_state)
        counts = sp.csr_matrix(self._counts(self.gene_dataset), dtype=np.float32)
        dense = counts[self._indices].toarray()
        if corruption == "uniform":
            i, j = dense.nonzero()
        else:
            i, j = (k.ravel() for k in np.indices(dense.shape))
        pick = rng.choice(len(i), int(np.floor(rate * len(i))), replace=False)
        i, j = i[pick], j[pick]
        originals = dense[i, j].copy()
        if corruption == "uniform":
            dense[i, j] = originals * rng.binomial(1, 0.9, size=len(pick))
        else:
            dense[i, j] = rng.binomial(originals.astype(np.int64), 0.2)
        changed = dense[i, j] != originals
        counts = counts.tolil()
        counts[self._indices] = dense
        counts = counts.tocsr()
        new = self._copy()
        setup = self.model.setup
        new._corrupted = ad.AnnData(
            counts, obs=self.gene_dataset.obs.copy(), var=pd.DataFrame(index=pd.Index(setup.genes)),
            layers=None if setup.layer is None else {setup.layer: counts}, obsm=dict(self.gene_dataset.obsm),
        )  # fmt: skip
        new._originals = (self._indices[i[changed]], j[changed], originals[changed])
        return new

    def uncorrupted(self) -> Posterior:
        """A copy reading the original counts."""
        new = self._copy()
        new._corrupted, new._originals = None, None
        return new

    def imputation_list(self, n_samples: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(original_list, imputed_list)``: per cell, the original counts of its corrupted
        entries and the model's px_rate there, computed from the corrupted counts (corrupts
        first with :meth:`corrupted` unless already corrupted)."""
        post = self if self._originals is not None else self.corrupted()
        rate = post.imputation(n_samples=n_samples)
        if n_samples > 1:
            rate = rate.mean(0)
        rows, cols, originals = post._originals
        where = {c: i for i, c in enumerate(post._indices)}
        original_list, imputed_list = [], []
        for cell in post._indices:
            at = rows == cell
            original_list.append(originals[at])
            imputed_list.append(rate[where[cell], cols[at]])
        return original_list, imputed_list

    def imputation_score(self, original_list=None, imputed_list=None, n_samples: int = 1) -> float:
        """Median absolute imputation error over all corrupted entries."""
        if original_list is None or imputed_list is None:
            original_list, imputed_list = self.imputation_list(n_samples=n_samples)
        return float(np.median(np.abs(np.concatenate(original_list) - np.concatenate(imputed_list))))

    def imputation_benchmark(
        self, n_samples: int = 8, show_plot: bool = True, title_plot: str = "imputation", save_path: str = ""
    ) -> tuple[float, float]:
        """``(median_score, mean_score)``: the median over cells of each cell's median absolute
        imputation error, and the mean of those; ``show_plot`` draws imputed against original
        counts (saved to ``save_path + title_plot + '.png'`` when ``save_path`` is given)."""
        original_list, imputed_list = self.imputation_list(n_samples=n_samples)
        per_cell = np.array(
            [np.median(np.abs(o - i)) for o, i in zip(original_list, imputed_list, strict=True) if len(o)]
        )
        if show_plot:
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots()
            ax.scatter(np.concatenate(original_list), np.concatenate(imputed_list), s=2, alpha=0.3)
            ax.set(xlabel="original count", ylabel="imputed (px_rate)", title=title_plot)
            if save_path:
                fig.savefig(os.path.join(save_path, f"{title_plot}.png"))
        return float(np.median(per_cell)), float(np.mean(per_cell))

    # -- t-SNE ---------------------------------------------------------------------------------------
    @staticmethod
    def apply_t_sne(
        latent: np.ndarray, n_samples: int = 1000, random_state: int | None = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(latent_tsne, idx_t_sne)``: a 2-D t-SNE of ``n_samples`` cells of ``latent`` drawn at
        random (all when there are fewer) and their positions."""
        from sklearn.manifold import TSNE

        rng = np.random.default_rng(random_state)
        idx = np.sort(rng.permutation(len(latent))[:n_samples])
        perplexity = min(30.0, max(1.0, (len(idx) - 1) / 3))
        return TSNE(perplexity=perplexity, random_state=random_state).fit_transform(latent[idx]), idx

    def show_t_sne(
        self,
        n_samples: int = 1000,
        color_by: str = "",
        save_name: str = "",
        latent=None,
        batch_indices=None,
        labels=None,
        n_batch=None,
    ) -> None:
        """Plot a t-SNE of the latent space coloured by ``'batches'``, ``'labels'`` or
        ``'batches and labels'`` (two panels); saved to ``save_name`` when given.
        (For a scanpy workflow: ``sc.tl.tsne(adata, use_rep='X_scvi')``.)"""
        import matplotlib.pyplot as plt

        if latent is None:
            latent, batch_indices, labels = self.get_latent()
        coords, idx = self.apply_t_sne(latent, n_samples)
        panels = {"": [None], "batches": ["batch"], "labels": ["labels"], "batches and labels": ["batch", "labels"]}
        if color_by not in panels:
            msg = f"color_by must be one of {list(panels)}, got {color_by!r}."
            raise ValueError(msg)
        values = {"batch": batch_indices, "labels": labels, None: None}
        fig, axes = plt.subplots(1, len(panels[color_by]), figsize=(5 * len(panels[color_by]), 5), squeeze=False)
        for ax, key in zip(axes[0], panels[color_by], strict=True):
            c = None if values[key] is None else np.asarray(values[key]).ravel()[idx]
            ax.scatter(coords[:, 0], coords[:, 1], c=c, s=4, cmap="tab20")
            ax.set_title(key or "latent space")
        if save_name:
            fig.savefig(save_name)

    # -- files ---------------------------------------------------------------------------------------
    def save_posterior(self, dir_path: str | os.PathLike) -> None:
        """Save to ``dir_path``, which must not exist: the model (our safe format), the AnnData
        (h5ad), the cells and the batch size (no pickle). :func:`load_posterior` reads it."""
        path = Path(dir_path)
        if path.exists():
            msg = f"{path} exists; save_posterior needs a new directory (as in 0.x)."
            raise ValueError(msg)
        path.mkdir(parents=True)
        self.model.save(path / "model")
        self.gene_dataset.write_h5ad(path / "anndata.h5ad")
        np.save(path / "indices.npy", self._indices)
        (path / "attributes.json").write_text(json.dumps({"batch_size": self.batch_size, "class": self.posterior_type}))


def load_posterior(dir_path: str | os.PathLike, use_cuda: bool = True) -> Posterior:
    """The :class:`Posterior` that :meth:`Posterior.save_posterior` wrote to ``dir_path``."""
    import anndata as ad

    from ...model import SCVI

    path = Path(dir_path)
    for part in ("model", "anndata.h5ad", "indices.npy", "attributes.json"):
        if not (path / part).exists():
            msg = f"{path} is not a saved Posterior: {part} is missing."
            raise ValueError(msg)
    adata = ad.read_h5ad(path / "anndata.h5ad")
    model = SCVI.load(path / "model", adata=adata)  # also reads scANVI
    attributes = json.loads((path / "attributes.json").read_text())
    post = Posterior(model, adata, indices=np.load(path / "indices.npy", allow_pickle=False), use_cuda=use_cuda)
    post.batch_size = int(attributes["batch_size"])
    return post


def _positions(idx, n: int) -> np.ndarray:
    """A boolean mask of length ``n`` or integer positions, as positions (``None``: all)."""
    from ...model import cell_positions

    return cell_positions(idx, n).ravel()


def _dense(X) -> np.ndarray:
    return np.asarray(X.todense() if sp.issparse(X) else X, dtype=np.float32)


def _no_extras(kwargs: Mapping[str, Any], method: str) -> None:
    if kwargs:
        msg = f"{method} got unknown arguments {sorted(kwargs)}."
        raise TypeError(msg)
