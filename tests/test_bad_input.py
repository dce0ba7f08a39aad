"""Bad input raises the right error, before any training, and leaves the AnnData untouched."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from conftest import assert_unchanged, make_adata, snapshot

import scanpy_scvi as ss
import scanpy_scvi.model._base as base_mod
from scanpy_scvi import SCVI

FAST = {"n_hidden": 8, "n_latent": 2, "max_epochs": 1, "progress_bar": False, "use_highly_variable_genes": False}


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if training starts: every error below must come before it."""

    def forbidden(*args, **kwargs):
        msg = "training started on bad input"
        raise AssertionError(msg)

    monkeypatch.setattr(base_mod, "train", forbidden)


def _small(fmt: str, n_obs: int = 60, n_vars: int = 20):
    adata = make_adata(n_obs=n_obs, n_vars=n_vars, random_state=4)
    if fmt == "dense":
        adata.X = adata.X.toarray()
    return adata


def _set(adata, row, col, value):
    """Write one value into X (dense or CSR), creating the entry if needed."""
    if sp.issparse(adata.X):
        X = adata.X.tolil()
        X[row, col] = value
        adata.X = X.tocsr()
    else:
        adata.X[row, col] = value


def _expect(adata, exc, match=None, **kwargs):
    snap = snapshot(adata)
    with pytest.raises(exc, match=match):
        ss.pp.scvi(adata, **{**FAST, **kwargs})
    assert_unchanged(adata, snap)


FORMATS = ["dense", "csr"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_negative_values(fmt, no_training):
    adata = _small(fmt)
    _set(adata, 3, 4, -2.0)
    _expect(adata, ValueError, "negative")
    _expect(adata, ValueError, "negative", check_counts=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_integer_values(fmt, no_training):
    adata = _small(fmt)
    _set(adata, 5, 1, 2.5)
    _expect(adata, ValueError, "non-integer")


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_counts_false_accepts_non_integers(fmt):
    adata = _small(fmt)
    adata.X = adata.X * 0.7  # non-negative, non-integer (e.g. ambient-corrected)
    model = ss.pp.scvi(adata, **FAST, check_counts=False)
    assert model.is_trained and adata.obsm["X_scvi"].shape == (adata.n_obs, 2)
    assert adata.uns["scvi"]["params"]["check_counts"] is False


@pytest.mark.parametrize("fmt", FORMATS)
def test_log_transformed_data(fmt, no_training):
    adata = _small(fmt)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    del adata.uns["log1p"]
    _expect(adata, ValueError, "log-transformed")
    # the counts layer is fine and used when asked for
    model = SCVI(adata, layer="counts", n_hidden=8, n_latent=2)
    assert model.setup.layer == "counts"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf(fmt, value, no_training):
    adata = _small(fmt)
    _set(adata, 0, 0, value)
    _expect(adata, ValueError, "NaN or infinite")
    _expect(adata, ValueError, "NaN or infinite", check_counts=False)


def test_bad_values_outside_model_genes_are_ignored():
    adata = _small("dense")
    adata.X[2, 0] = -1.0
    adata.X[3, 0] = np.nan
    model = SCVI(adata, genes=list(adata.var_names[1:]), n_hidden=8, n_latent=2)
    assert len(model.setup.genes) == adata.n_vars - 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_count_cells(fmt, no_training):
    adata = _small(fmt)
    for row in (4, 9, 30):
        for col in range(adata.n_vars):
            _set(adata, row, col, 0.0)
    if sp.issparse(adata.X):
        adata.X.eliminate_zeros()
    _expect(adata, ValueError, r"3 of 60 cells have zero total counts")


def test_zero_count_cells_over_model_genes(no_training):
    adata = _small("dense")
    top = np.argsort(-adata.X.sum(axis=0))[:8]
    assert adata.X[:, top].sum(axis=1).min() > 0
    adata.X[7, top] = 0
    adata.X[7, 0] += 1  # gene 0 is not a model gene
    assert adata.X[7].sum() > 0
    _expect(adata, ValueError, r"1 of 60 cells", subset_genes=list(adata.var_names[top]))


def test_missing_keys(no_training):
    adata = _small("csr")
    _expect(adata, KeyError, "'donor' not found", batch_key="donor")
    _expect(adata, KeyError, "not found", labels_key="nope")
    _expect(adata, KeyError, "not found", categorical_covariate_keys=["nope"])
    _expect(adata, KeyError, "not found", continuous_covariate_keys=["nope"])
    _expect(adata, KeyError, "not found", size_factor_key="nope")
    _expect(adata, KeyError, "layer='raw' not found", layer="raw")


def test_nan_in_batch_column(no_training):
    adata = _small("csr")
    batch = adata.obs["batch"].astype(object)
    batch.iloc[[1, 5]] = np.nan
    adata.obs["batch"] = pd.Categorical(batch)
    _expect(adata, ValueError, r"2 missing values", batch_key="batch")
    _expect(adata, ValueError, r"missing values", labels_key="batch")


def test_too_few_cells(no_training):
    adata = _small("csr")[:2].copy()
    _expect(adata, ValueError, "at least 3 cells")


def test_bad_options(no_training):
    adata = _small("csr")
    _expect(adata, TypeError, "model_kwargs", model_kwargs={"n_hiden": 3})
    _expect(adata, ValueError, "given twice", model_kwargs={"n_hidden": 3})  # also passed as n_hidden=8
    _expect(adata, TypeError, "trainer_kwargs", trainer_kwargs={"learning_rate": 1e-3})
    _expect(adata, ValueError, "dispersion", dispersion="gene_batch")
    _expect(adata, ValueError, "gene_likelihood", gene_likelihood="negative-binomial")
    _expect(adata, ValueError, "latent_distribution", latent_distribution="lognormal")
    _expect(adata, ValueError, "use_batch_norm", model_kwargs={"use_batch_norm": "yes"})
    _expect(adata, ValueError, "dropout_rate", dropout_rate=1.0)
    _expect(adata, ValueError, "n_latent", n_latent=0)
    _expect(adata, TypeError, "key_added", key_added="")
    with pytest.raises(ValueError):
        SCVI(adata, dispersion="genes")
    with pytest.raises(ValueError):
        SCVI(adata, gene_likelihood="zip")


def test_bad_size_factors_and_covariates(no_training):
    adata = _small("csr")
    adata.obs["sf"] = 1.0
    adata.obs.iloc[3, adata.obs.columns.get_loc("sf")] = 0.0
    _expect(adata, ValueError, "positive", size_factor_key="sf")
    adata.obs["cont"] = np.nan
    _expect(adata, ValueError, "NaN or infinite", continuous_covariate_keys=["cont"])
    adata.obs["word"] = "a"
    _expect(adata, TypeError, "numeric", continuous_covariate_keys=["word"])


def test_duplicate_var_names(no_training):
    adata = _small("csr")
    adata.var_names = ["g"] * 2 + list(adata.var_names[2:])
    with pytest.warns(UserWarning, match="not unique"):
        adata = ad.AnnData(adata.X, obs=adata.obs, var=adata.var)
    _expect(adata, ValueError, "var_names_make_unique")


def test_unknown_transform_batch(trained_model):
    for bad in ("batch_9", 5, ["batch_0", "oops"]):
        with pytest.raises(ValueError, match="Unknown batch"):
            trained_model.get_normalized_expression(transform_batch=bad)


def test_genes_missing_at_inference(trained_model, base_adata):
    query = base_adata[:, 10:].copy()
    with pytest.raises(ValueError, match="10 of the model's 80 genes are missing"):
        trained_model.get_latent_representation(adata=query)


def test_bad_indices(trained_model):
    with pytest.raises(ValueError):
        trained_model.get_latent_representation(indices=[0, 10_000])
    with pytest.raises(ValueError):
        trained_model.get_latent_representation(indices=np.ones(5, dtype=bool))


def test_sparse_counts_are_never_densified(monkeypatch):
    """The counts check walks the CSR data; it never calls toarray/todense on the matrix."""
    adata = make_adata(n_obs=200, n_vars=50, random_state=5)

    def forbidden(self, *args, **kwargs):
        msg = "densified a sparse matrix during the input check"
        raise AssertionError(msg)

    for cls in (sp.csr_matrix, sp.csr_array, sp.csc_matrix, sp.csc_array):
        monkeypatch.setattr(cls, "toarray", forbidden)
        monkeypatch.setattr(cls, "todense", forbidden)
    model = SCVI(adata, batch_key="batch", n_hidden=8, n_latent=2)
    np.testing.assert_allclose(model._bound.library, np.asarray(adata.X.sum(axis=1)).ravel())
    bad = adata.copy()
    bad.X.data[0] = 0.5
    with pytest.raises(ValueError, match="non-integer"):
        SCVI(bad, n_hidden=8, n_latent=2)
