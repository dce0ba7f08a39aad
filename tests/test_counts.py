"""Batch-corrected counts: integer samples from the model, moved toward the target batch."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import assert_unchanged, make_adata, snapshot

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


@pytest.fixture(scope="module")
def hvg_fitted():
    """A model trained on 20 of the 40 genes (as on HVGs), stored in uns; the 20 are not in adata order."""
    adata = make_adata(n_obs=200, n_vars=40, random_state=8)
    genes = list(adata.var_names[::2][::-1])
    ss.pp.scvi(adata, batch_key="batch", subset_genes=genes, n_epochs=3, n_hidden=16, n_latent=4,
               gene_likelihood="nb", progress_bar=False)  # fmt: skip
    return adata, genes


def test_gene_subset_model_writes_obsm_with_gene_names(hvg_fitted):
    base, genes = hvg_fitted
    adata = base.copy()
    ss.tl.batch_corrected_counts(adata, transform_batch="batch_0")
    key = "scvi_corrected_counts"
    assert key not in adata.layers
    counts = adata.obsm[key]
    assert sp.issparse(counts) and counts.format == "csr" and counts.dtype == np.float32
    assert counts.shape == (adata.n_obs, len(genes))
    assert np.all(counts.data == np.round(counts.data)) and counts.data.min() >= 0 and counts.nnz > 0
    assert list(adata.uns[key]["genes"]) == genes  # the model's order, as uns['scvi']['genes']
    assert list(adata.uns[key]["genes"]) == list(adata.uns["scvi"]["genes"])
    assert adata.uns[key]["params"]["transform_batch"] == ["batch_0"]
    # the same seed gives the same counts; inplace=False returns what is written
    again = ss.tl.batch_corrected_counts(base, transform_batch="batch_0", inplace=False)
    assert (again != counts).nnz == 0
    other = ss.tl.batch_corrected_counts(base, transform_batch="batch_0", inplace=False, random_state=1)
    assert (other != counts).nnz > 0


def test_gene_subset_equals_layer_on_the_model_genes(hvg_fitted):
    """On adata restricted to the model's genes (in another order) the same model writes a layer:
    the same counts, column for column, for the same seed."""
    base, genes = hvg_fitted
    sub = base[:, sorted(genes)].copy()  # all of its genes are the model's: the layer path
    ss.tl.batch_corrected_counts(sub, transform_batch="batch_1", random_state=5)
    layer = sub.layers["scvi_corrected_counts"]
    assert "genes" not in sub.uns["scvi_corrected_counts"] and "scvi_corrected_counts" not in sub.obsm
    obsm = ss.tl.batch_corrected_counts(base, transform_batch="batch_1", random_state=5, inplace=False)
    cols = [genes.index(g) for g in sub.var_names]
    np.testing.assert_array_equal(layer.toarray(), obsm[:, cols].toarray())


def test_gene_subset_expected_is_dense(hvg_fitted):
    base, genes = hvg_fitted
    adata = base.copy()
    ss.tl.batch_corrected_counts(adata, transform_batch=["batch_0", "batch_1"], expected=True)
    exp = adata.obsm["scvi_expected_counts"]
    assert isinstance(exp, np.ndarray) and exp.dtype == np.float32 and exp.shape == (adata.n_obs, len(genes))
    # NB expectation with the observed library: rows sum to the totals over the model's genes
    totals = np.asarray(adata[:, genes].X.sum(1)).ravel()
    np.testing.assert_allclose(exp.sum(1), totals, rtol=1e-4)
    assert list(adata.uns["scvi_expected_counts"]["genes"]) == genes


def test_key_added_and_layer_added(fitted, hvg_fitted):
    adata = fitted.copy()
    ss.tl.batch_corrected_counts(adata, transform_batch="batch_0", key_added="corr")
    ss.tl.batch_corrected_counts(adata, transform_batch="batch_0", layer_added="corr_old")
    ss.tl.batch_corrected_counts(adata, transform_batch="batch_0", key_added="same", layer_added="same")
    assert {"corr", "corr_old", "same"} <= set(adata.layers) and {"corr", "corr_old", "same"} <= set(adata.uns)
    assert (adata.layers["corr"] != adata.layers["corr_old"]).nnz == 0
    hvg = hvg_fitted[0].copy()
    ss.tl.batch_corrected_counts(hvg, transform_batch="batch_0", layer_added="corr_old")  # historical name
    assert "corr_old" in hvg.obsm and "genes" in hvg.uns["corr_old"]


def test_errors_leave_adata_unchanged(fitted, hvg_fitted):
    for adata in (fitted.copy(), hvg_fitted[0].copy()):
        snap = snapshot(adata)
        with pytest.raises(ValueError, match="disagree"):
            ss.tl.batch_corrected_counts(adata, transform_batch="batch_0", key_added="a", layer_added="b")
        with pytest.raises(TypeError, match="key_added must be a non-empty string"):
            ss.tl.batch_corrected_counts(adata, transform_batch="batch_0", key_added="")
        with pytest.raises(ValueError, match="Unknown batch"):
            ss.tl.batch_corrected_counts(adata, transform_batch="nope")
        with pytest.raises(ValueError, match="library_size"):
            ss.tl.batch_corrected_counts(adata, transform_batch="batch_0", library_size=-1)
        assert_unchanged(adata, snap)
    # a model gene missing from adata
    base, genes = hvg_fitted
    short = base[:, [g for g in base.var_names if g != genes[0]]].copy()
    snap = snapshot(short)
    with pytest.raises(ValueError, match=r"missing from adata\.var_names"):
        ss.tl.batch_corrected_counts(short, transform_batch="batch_0", model=ss.SCVI.from_anndata(base))
    assert_unchanged(short, snap)
