"""Batch-corrected counts: integer samples from the model, moved toward the target batch."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import make_adata

import scanpy_scvi as ss


@pytest.fixture(scope="module")
def fitted():
    """Strong batch effect, batch-aware NB model (the data are NB) on all genes, stored in uns."""
    adata = make_adata(n_obs=600, n_vars=60, random_state=7)
    ss.pp.scvi(adata, batch_key="batch", use_highly_variable_genes=False, n_epochs=60, n_hidden=32,
               n_latent=5, gene_likelihood="nb", progress_bar=False)  # fmt: skip
    return adata


def _means(X, mask):
    return np.asarray(X[mask].mean(0)).ravel()


def test_layer_is_sparse_integer_counts_with_params(fitted):
    adata = fitted.copy()
    ss.tl.batch_corrected_counts(adata, transform_batch="batch_0")
    layer = adata.layers["scvi_corrected_counts"]
    assert sp.issparse(layer) and layer.shape == adata.shape and layer.dtype == np.float32
    assert np.all(layer.data == np.round(layer.data)) and layer.data.min() >= 0
    assert adata.uns["scvi_corrected_counts"]["params"]["transform_batch"] == ["batch_0"]


def test_within_batch_means_match_observed(fitted):
    """Cells decoded in their own batch reproduce that batch's gene means."""
    b0 = (fitted.obs["batch"] == "batch_0").to_numpy()
    sim = ss.tl.batch_corrected_counts(fitted, transform_batch="batch_0", inplace=False)
    obs_means, sim_means = _means(fitted.X, b0), _means(sim, b0)
    assert np.corrcoef(np.log1p(obs_means), np.log1p(sim_means))[0, 1] > 0.95
    np.testing.assert_allclose(sim_means.sum(), obs_means.sum(), rtol=0.05)


def test_batch_means_move_toward_target_batch(fitted):
    b0 = (fitted.obs["batch"] == "batch_0").to_numpy()
    sim = ss.tl.batch_corrected_counts(fitted, transform_batch="batch_0", library_size=1e3, inplace=False)
    raw = fitted.X.multiply(1e3 / np.asarray(fitted.X.sum(1))).tocsr()  # same library for a fair comparison
    target = np.log1p(_means(raw, b0))
    before = np.abs(np.log1p(_means(raw, ~b0)) - target).mean()
    after = np.abs(np.log1p(_means(sim, ~b0)) - target).mean()
    assert after < 0.8 * before, (before, after)  # measured: 0.50 -> 0.29


def test_reproducible_with_random_state(fitted):
    a = ss.tl.batch_corrected_counts(fitted, transform_batch="batch_1", inplace=False, random_state=3)
    b = ss.tl.batch_corrected_counts(fitted, transform_batch="batch_1", inplace=False, random_state=3)
    c = ss.tl.batch_corrected_counts(fitted, transform_batch="batch_1", inplace=False, random_state=4)
    assert (a != b).nnz == 0
    assert (a != c).nnz > 0


def test_expected_counts_and_list_of_batches(fitted):
    exp = ss.tl.batch_corrected_counts(fitted, transform_batch=["batch_0", "batch_1"], expected=True, inplace=False)
    assert isinstance(exp, np.ndarray) and exp.dtype == np.float32 and exp.shape == fitted.shape
    # NB expectation: library x frequencies, so rows sum to the observed totals
    np.testing.assert_allclose(exp.sum(1), np.asarray(fitted.X.sum(1)).ravel(), rtol=1e-4)
    one = ss.tl.batch_corrected_counts(fitted, transform_batch="batch_0", expected=True, inplace=False)
    assert not np.allclose(one, exp)


def test_zinb_expected_counts_below_library():
    adata = make_adata(n_obs=150, n_vars=30, random_state=9)
    ss.pp.scvi(adata, batch_key="batch", use_highly_variable_genes=False, n_epochs=2, progress_bar=False)
    ss.tl.batch_corrected_counts(adata, transform_batch="batch_1", expected=True)
    exp = adata.layers["scvi_expected_counts"]
    totals = np.asarray(adata.X.sum(1)).ravel()
    assert np.all(exp.sum(1) < totals)  # (1 - pi) mu with pi > 0
    assert np.all(exp.sum(1) > 0.2 * totals)


def test_errors(fitted):
    with pytest.raises(ValueError, match="Unknown batch"):
        ss.tl.batch_corrected_counts(fitted, transform_batch="nope")
    hvg = make_adata(n_obs=200, n_vars=40, random_state=8)
    ss.pp.scvi(hvg, subset_genes=list(hvg.var_names[:20]), n_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="covers 20 of adata's 40 genes"):
        ss.tl.batch_corrected_counts(hvg, transform_batch="batch_0")
    assert "scvi_corrected_counts" not in hvg.layers
