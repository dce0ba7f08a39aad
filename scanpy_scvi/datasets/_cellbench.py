"""Small datasets for examples, documentation and tests.

Nothing here imports torch.
"""

from __future__ import annotations

from importlib import resources

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

_CELLBENCH_FILE = "cellbench_lung_5batch.h5ad"


def cellbench_lung() -> ad.AnnData:
    """Load the CellBench lung cell-line mixture (5 batches, 5 cell lines).

    A real, small single-cell RNA-seq dataset with a strong technical batch
    effect and known cell identities, shipped with the package (about 3.4 MB).
    Single cells from up to five lung adenocarcinoma cell lines (A549, H1975,
    H2228, H838, HCC827) were profiled with CEL-seq2 (four batches) and
    Drop-seq (one batch) by Tian et al. (2019). Cell identities are the
    demuxlet genotype calls, so they are independent of the expression data.

    All 1408 cells of the source are kept. ERCC spike-ins are removed, and the
    3000 genes are those with the largest variance of ``log1p`` counts-per-10k
    among Ensembl genes detected in at least 5 cells; see ``adata.uns['dataset_info']['subset_rule']`` and
    ``benchmarks/make_demo_dataset.py`` for the exact rule.

    Returns
    -------
    anndata.AnnData
        A new in-memory object (1408 cells x 3000 genes) on every call, with

        ``X``
            Raw UMI counts, :class:`scipy.sparse.csr_matrix`, ``float32``,
            integer-valued.
        ``layers['counts']``
            An independent copy of the same counts, so ``X`` can be
            log-normalised while the counts stay available for scVI.
        ``obs['batch']``
            Categorical, 5 batches: ``'CELseq2_3cl'``, ``'CELseq2_5cl_p1'``,
            ``'CELseq2_5cl_p2'``, ``'CELseq2_5cl_p3'``, ``'Dropseq_3cl'``.
        ``obs['cell_type']``
            Categorical, 5 cell lines. The ``*_3cl`` batches contain only
            H1975, H2228 and HCC827.
        ``obs['demuxlet_cls']``
            Categorical, ``'SNG'`` (singlet) or ``'DBL'`` (doublet call by
            demuxlet; 387 cells). Doublets are kept; filter them with
            ``adata[adata.obs['demuxlet_cls'] == 'SNG']`` if needed.
        ``var_names``
            Ensembl gene ids (no gene symbols are available in the source).
        ``uns['dataset_info']``
            Provenance: source repository, license (MIT), publication, GEO
            accession and the gene-subsetting rule.

    Notes
    -----
    Source: https://github.com/LuyiTian/sc_mixology (MIT license). Publication:
    Tian L. et al. (2019) *Benchmarking single cell RNA-sequencing analysis
    pipelines using mixture control experiments*. Nat Methods 16:479-487,
    doi:10.1038/s41592-019-0425-8. Raw data: GEO GSE118767.

    Examples
    --------
    >>> import scanpy as sc
    >>> from scanpy_scvi.datasets import cellbench_lung
    >>> adata = cellbench_lung()
    >>> sc.pp.normalize_total(adata)
    >>> sc.pp.log1p(adata)  # layers['counts'] still holds the raw counts
    """
    ref = resources.files(__package__).joinpath(_CELLBENCH_FILE)
    with resources.as_file(ref) as path:
        adata = ad.read_h5ad(path)

    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X.sort_indices()
    adata.X = X
    adata.layers["counts"] = X.copy()
    for key in ("batch", "cell_type", "demuxlet_cls"):
        if key in adata.obs and not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
            adata.obs[key] = adata.obs[key].astype("category")
    return adata


def synthetic_counts(
    n_obs: int = 500,
    n_vars: int = 200,
    n_batches: int = 2,
    n_labels: int = 3,
    random_state: int | None = 0,
) -> ad.AnnData:
    """Simulate negative-binomial counts with a batch effect and cell types.

    A fast, dependency-free toy dataset for tests and documentation. Counts
    are drawn as a gamma-Poisson (negative binomial) mixture with mean

    ``mu[c, g] = size[c] * base[g] * label_effect[label[c], g] * batch_effect[batch[c], g]``

    where

    - ``base[g]`` is a log-normal baseline expression level per gene,
    - ``label_effect`` gives each label its own gene program: about 10 % of the
      genes (at least one) are up-regulated 3-8 fold in that label,
    - ``batch_effect`` multiplies every gene by a per-batch log-normal factor
      (log-scale standard deviation 0.5), i.e. a real, gene-specific technical
      shift between batches,
    - ``size[c]`` is a log-normal per-cell size factor,

    and the gene-wise inverse dispersion ``theta[g]`` is drawn between 2 and 20.
    Cells are assigned to batches and labels in balanced proportions
    (independently shuffled), so every category occurs when ``n_obs`` allows.

    Parameters
    ----------
    n_obs
        Number of cells.
    n_vars
        Number of genes.
    n_batches
        Number of batches; categories ``'batch_0'``, ``'batch_1'``, ...
    n_labels
        Number of cell types; categories ``'label_0'``, ``'label_1'``, ...
    random_state
        Seed for :func:`numpy.random.default_rng`. The same seed and arguments
        give identical data.

    Returns
    -------
    anndata.AnnData
        ``n_obs`` x ``n_vars`` object with integer-valued counts in ``X``
        (:class:`scipy.sparse.csr_matrix`, ``float32``), an independent copy
        in ``layers['counts']``, and categorical ``obs['batch']`` and
        ``obs['labels']``.

    Examples
    --------
    >>> from scanpy_scvi.datasets import synthetic_counts
    >>> adata = synthetic_counts(n_obs=100, n_vars=50, n_batches=3)
    >>> adata.obs["batch"].cat.categories.tolist()
    ['batch_0', 'batch_1', 'batch_2']
    """
    for name, value in (
        ("n_obs", n_obs),
        ("n_vars", n_vars),
        ("n_batches", n_batches),
        ("n_labels", n_labels),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            msg = f"{name} must be a positive integer, got {value!r}."
            raise ValueError(msg)
    n_obs, n_vars, n_batches, n_labels = int(n_obs), int(n_vars), int(n_batches), int(n_labels)

    rng = np.random.default_rng(random_state)

    # Gene-level parameters.
    base = rng.lognormal(mean=0.0, sigma=1.0, size=n_vars)
    theta = rng.uniform(2.0, 20.0, size=n_vars)

    # Per-label gene programs: ~10% of genes up-regulated 3-8 fold per label.
    n_program = max(1, round(0.1 * n_vars))
    label_effect = np.ones((n_labels, n_vars))
    for lab in range(n_labels):
        genes = rng.choice(n_vars, size=n_program, replace=False)
        label_effect[lab, genes] = rng.uniform(3.0, 8.0, size=n_program)

    # Per-batch gene multipliers (technical batch effect).
    batch_effect = rng.lognormal(mean=0.0, sigma=0.5, size=(n_batches, n_vars))

    # Balanced, shuffled assignments.
    batch_idx = rng.permutation(np.arange(n_obs) % n_batches)
    label_idx = rng.permutation(np.arange(n_obs) % n_labels)
    size = rng.lognormal(mean=0.0, sigma=0.3, size=n_obs)

    mu = size[:, None] * base[None, :] * label_effect[label_idx] * batch_effect[batch_idx]
    rate = rng.gamma(shape=theta[None, :], scale=mu / theta[None, :])
    counts = rng.poisson(rate).astype(np.float32)

    X = sp.csr_matrix(counts)
    X.sort_indices()

    batch_names = [f"batch_{i}" for i in range(n_batches)]
    label_names = [f"label_{i}" for i in range(n_labels)]
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batch_idx, categories=batch_names),
            "labels": pd.Categorical.from_codes(label_idx, categories=label_names),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_obs)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene_{i}" for i in range(n_vars)]))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    return adata
