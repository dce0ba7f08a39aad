from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scanpy_scvi.datasets import cellbench_lung, synthetic_counts


@pytest.fixture(scope="module")
def lung():
    return cellbench_lung()


def test_cellbench_shape_and_obs(lung):
    assert lung.shape == (1408, 3000)
    assert lung.var_names.str.startswith("ENSG").all()
    assert lung.obs_names.is_unique and lung.var_names.is_unique
    for key in ("batch", "cell_type"):
        assert isinstance(lung.obs[key].dtype, pd.CategoricalDtype)
    assert lung.obs["batch"].nunique() == 5
    assert len(lung.obs["batch"].cat.categories) == 5
    assert lung.obs["cell_type"].nunique() == 5
    assert set(lung.obs["cell_type"].cat.categories) == {"A549", "H1975", "H2228", "H838", "HCC827"}
    assert (lung.obs["batch"].value_counts() > 200).all()


def test_cellbench_counts(lung):
    X = lung.X
    assert isinstance(X, sp.csr_matrix)
    assert X.dtype == np.float32
    assert X.nnz > 0
    assert np.all(X.data > 0)
    assert np.array_equal(X.data, np.round(X.data))
    # every cell and every gene has counts
    assert np.asarray(X.sum(axis=1)).min() > 0
    assert np.asarray((X > 0).sum(axis=0)).min() >= 5


def test_cellbench_counts_layer(lung):
    counts = lung.layers["counts"]
    assert isinstance(counts, sp.csr_matrix)
    assert counts.shape == lung.shape
    assert (counts != lung.X).nnz == 0
    # independent buffers: log-normalising X must not touch the counts
    assert not np.shares_memory(counts.data, lung.X.data)


def test_cellbench_provenance(lung):
    info = lung.uns["dataset_info"]
    assert info["license"] == "MIT"
    assert info["geo"] == "GSE118767"
    assert "sc_mixology" in info["source"]
    assert "3000" in info["subset_rule"]


def test_cellbench_fresh_object(lung):
    other = cellbench_lung()
    assert other is not lung
    assert other.X is not lung.X
    other.X.data[:] = 0
    other.obs["batch"] = "x"
    assert lung.X.data.max() > 0
    assert lung.obs["batch"].nunique() == 5
    third = cellbench_lung()
    assert (third.X != lung.X).nnz == 0


def test_cellbench_scanpy_preprocessing(lung):
    sc = pytest.importorskip("scanpy")
    adata = lung.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=1000, batch_key="batch")
    assert adata.var["highly_variable"].sum() == 1000
    # counts layer survives log-normalisation of X
    assert np.array_equal(adata.layers["counts"].data, np.round(adata.layers["counts"].data))
    assert (adata.layers["counts"] != lung.X).nnz == 0


def test_synthetic_shape_dtype_categories():
    adata = synthetic_counts(n_obs=120, n_vars=40, n_batches=3, n_labels=4, random_state=1)
    assert adata.shape == (120, 40)
    assert isinstance(adata.X, sp.csr_matrix)
    assert adata.X.dtype == np.float32
    assert np.array_equal(adata.X.data, np.round(adata.X.data))
    assert np.all(adata.X.data > 0)
    assert (adata.layers["counts"] != adata.X).nnz == 0
    for key, prefix, n in (("batch", "batch_", 3), ("labels", "label_", 4)):
        col = adata.obs[key]
        assert isinstance(col.dtype, pd.CategoricalDtype)
        assert list(col.cat.categories) == [f"{prefix}{i}" for i in range(n)]
        assert col.value_counts().min() == 120 // n  # balanced


def test_synthetic_defaults():
    adata = synthetic_counts()
    assert adata.shape == (500, 200)
    assert adata.obs["batch"].nunique() == 2
    assert adata.obs["labels"].nunique() == 3
    assert np.asarray(adata.X.sum(axis=1)).min() > 0


def test_synthetic_deterministic():
    a = synthetic_counts(random_state=7)
    b = synthetic_counts(random_state=7)
    c = synthetic_counts(random_state=8)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0


def _log2_batch_ratio(X: np.ndarray, mask: np.ndarray) -> np.ndarray:
    norm = X / X.sum(axis=1, keepdims=True) * 1e4
    m0 = norm[mask].mean(axis=0) + 0.5
    m1 = norm[~mask].mean(axis=0) + 0.5
    return np.log2(m0 / m1)


def test_synthetic_batch_effect_is_real():
    adata = synthetic_counts(n_obs=2000, n_vars=200, n_batches=2, n_labels=3, random_state=0)
    X = adata.X.toarray()
    is_b0 = (adata.obs["batch"] == "batch_0").to_numpy()
    ratio = _log2_batch_ratio(X, is_b0)
    # a clear, gene-specific shift between batches: many genes differ > 2-fold
    assert (np.abs(ratio) > 1.0).sum() >= 10
    # control: a random split within batch_0 shows no such shift
    rng = np.random.default_rng(0)
    sub = X[is_b0]
    split = rng.permutation(sub.shape[0]) % 2 == 0
    null = _log2_batch_ratio(sub, split)
    assert (np.abs(null) > 1.0).sum() == 0
    assert np.abs(ratio).max() > 3 * np.abs(null).max()


def test_synthetic_label_effect_is_real():
    adata = synthetic_counts(n_obs=1500, n_vars=200, n_batches=1, n_labels=3, random_state=0)
    X = adata.X.toarray()
    is_l0 = (adata.obs["labels"] == "label_0").to_numpy()
    ratio = _log2_batch_ratio(X, is_l0)
    assert (ratio > 1.0).sum() >= 10  # label_0's gene program


@pytest.mark.parametrize("kwargs", [{"n_obs": 0}, {"n_vars": -1}, {"n_batches": 1.5}, {"n_labels": True}])
def test_synthetic_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        synthetic_counts(**kwargs)
