"""The SCVI model: training, inference APIs, model variants, early stopping, minibatching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import N_LATENT, N_OBS, N_VARS, SMALL_MODEL, make_adata

from scanpy_scvi import SCVI
from scanpy_scvi.train._loop import minibatches

# Real data lives in shared/ next to the repository (see shared/data/PROVENANCE.md).
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kang2018_lupus_pbmc_8k_2511genes.h5ad"


def _totals(adata, genes=None):
    X = adata.X if genes is None else adata[:, genes].X
    return np.asarray(X.sum(axis=1)).ravel()


def _nge(model, seed, **kwargs):
    torch.manual_seed(seed)
    return model.get_normalized_expression(return_numpy=True, **kwargs)


# -- training on real data ---------------------------------------------------------------------------
@pytest.mark.skipif(not REAL_DATA.is_file(), reason=f"real data not found at {REAL_DATA}")
def test_loss_decreases_on_real_data():
    import anndata as ad
    import scanpy as sc

    full = ad.read_h5ad(REAL_DATA)
    rng = np.random.default_rng(0)
    adata = full[np.sort(rng.choice(full.n_obs, 2000, replace=False))].copy()
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=500)
    hvg = adata.var_names[adata.var["highly_variable"]]
    adata = adata[_totals(adata, hvg) > 0].copy()

    model = SCVI(adata, genes=hvg, batch_key="batch", n_hidden=32, n_latent=10)
    model.train(max_epochs=8, train_size=0.9, progress_bar=False)
    h = model.history_
    assert len(h["elbo_train"]) == len(h["elbo_validation"]) == 8
    assert np.all(np.isfinite(h["elbo_train"])) and np.all(np.isfinite(h["elbo_validation"]))
    # clearly lower: at least 5 % of the initial per-cell loss
    assert h["elbo_train"][-1] < 0.95 * h["elbo_train"][0]
    assert h["elbo_validation"][-1] < 0.95 * h["elbo_validation"][0]
    assert h["elbo_train"][-1] < min(h["elbo_train"][:3])
    # the warm-up weight is recorded and rises linearly
    np.testing.assert_allclose(h["kl_weight"], np.arange(8) / 400)
    # the model ELBO on held-out cells agrees with the recorded scale
    elbo_val = model.get_elbo(indices=model.validation_indices)
    assert elbo_val < 0
    assert -elbo_val == pytest.approx(h["elbo_validation"][-1], rel=0.05)


def test_history_and_split(trained_model):
    m = trained_model
    assert m.is_trained
    n_val = N_OBS - int(np.ceil(0.8 * N_OBS))
    assert len(m.validation_indices) == n_val and len(m.train_indices) == N_OBS - n_val
    assert np.intersect1d(m.train_indices, m.validation_indices).size == 0
    assert np.array_equal(np.sort(np.concatenate([m.train_indices, m.validation_indices])), np.arange(N_OBS))
    expected = {
        f"{metric}_{split}"
        for metric in ("elbo", "reconstruction_loss", "kl_local")
        for split in ("train", "validation")
    } | {"train_loss", "validation_loss", "kl_weight"}
    assert set(m.history_) == expected
    assert all(len(v) == 15 for v in m.history_.values())
    h = m.history_
    np.testing.assert_allclose(h["elbo_train"], np.add(h["reconstruction_loss_train"], h["kl_local_train"]))
    hist = m.history
    assert isinstance(hist["elbo_train"], pd.DataFrame)
    assert hist["elbo_train"].shape == (15, 1) and hist["elbo_train"].index.name == "epoch"


def test_train_leaves_global_rng_untouched(base_adata):
    model = SCVI(base_adata, **SMALL_MODEL)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model.train(max_epochs=1, progress_bar=False)
    assert torch.equal(torch.get_rng_state(), state)


# -- latent space ------------------------------------------------------------------------------------
def test_latent_representation(trained_model, base_adata):
    m = trained_model
    z = m.get_latent_representation()
    assert z.shape == (N_OBS, N_LATENT) and z.dtype == np.float32 and np.all(np.isfinite(z))
    # the posterior mean is deterministic
    assert np.array_equal(z, m.get_latent_representation())
    mean, var = m.get_latent_representation(return_dist=True)
    assert np.array_equal(mean, z) and np.all(var > 0)
    torch.manual_seed(0)
    sample = m.get_latent_representation(give_mean=False)
    assert sample.shape == z.shape and not np.allclose(sample, z)
    # a sample lies within a few posterior standard deviations of the mean
    assert np.mean(np.abs(sample - z) / np.sqrt(var) < 4) > 0.99
    # indices select rows; an explicit adata gives the same result
    idx = np.array([5, 0, 17])
    np.testing.assert_allclose(m.get_latent_representation(indices=idx), z[idx], rtol=1e-5, atol=1e-6)
    assert np.array_equal(m.get_latent_representation(adata=base_adata.copy()), z)


def test_latent_library_size_observed(trained_model, base_adata):
    lib = trained_model.get_latent_library_size()
    assert lib.shape == (N_OBS, 1)
    np.testing.assert_allclose(lib[:, 0], _totals(base_adata), rtol=1e-5)


# -- get_normalized_expression ---------------------------------------------------------------------------
def test_transform_batch(trained_model, base_adata):
    m = trained_model
    b0 = _nge(m, 7, transform_batch="batch_0")
    b1 = _nge(m, 7, transform_batch="batch_1")
    assert b0.shape == b1.shape == (N_OBS, N_VARS)
    assert np.abs(b0 - b1).max() > 1e-3
    # a list averages the decoded frequencies over the batches, for the same z
    both = _nge(m, 7, transform_batch=["batch_0", "batch_1"])
    np.testing.assert_allclose(both, (b0 + b1) / 2, rtol=1e-5, atol=1e-8)
    # integer codes are accepted
    np.testing.assert_array_equal(_nge(m, 7, transform_batch=1), b1)
    # None decodes each cell in its own batch: equals the matching transform for those cells
    own = _nge(m, 7)
    in_b0 = (base_adata.obs["batch"] == "batch_0").to_numpy()
    np.testing.assert_allclose(own[in_b0], b0[in_b0], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(own[~in_b0], b1[~in_b0], rtol=1e-5, atol=1e-8)
    for bad in ("batch_7", 2, -1, []):
        with pytest.raises(ValueError):
            m.get_normalized_expression(transform_batch=bad)


def test_library_size_scaling(trained_model, base_adata):
    m = trained_model
    one = _nge(m, 3)
    np.testing.assert_allclose(one.sum(1), 1.0, rtol=1e-5)
    assert np.all(one >= 0)
    cp10k = _nge(m, 3, library_size=1e4)
    np.testing.assert_allclose(cp10k, 1e4 * one, rtol=1e-5)
    latent = _nge(m, 3, library_size="latent")
    totals = _totals(base_adata)
    np.testing.assert_allclose(latent.sum(1), totals, rtol=1e-4)
    np.testing.assert_allclose(latent, one * totals[:, None], rtol=1e-4, atol=1e-6)
    # a different draw of z gives a different output
    assert not np.array_equal(_nge(m, 4), one)
    for bad in (0, -1.0, "observed", None):
        with pytest.raises(ValueError):
            m.get_normalized_expression(library_size=bad)


def test_normalized_expression_shapes(trained_model, base_adata):
    m = trained_model
    df = m.get_normalized_expression()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == list(base_adata.var_names)
    assert df.index.equals(base_adata.obs_names)
    assert df.to_numpy().dtype == np.float32

    genes = ["gene_40", "gene_3", "gene_7"]
    sub = m.get_normalized_expression(gene_list=genes, indices=[4, 2])
    assert list(sub.columns) == ["gene_3", "gene_7", "gene_40"]  # model order
    assert list(sub.index) == ["cell_4", "cell_2"]
    torch.manual_seed(0)
    full = m.get_normalized_expression(indices=[4, 2], return_numpy=True)
    torch.manual_seed(0)
    sub = m.get_normalized_expression(gene_list=genes, indices=[4, 2], return_numpy=True)
    np.testing.assert_array_equal(sub, full[:, [3, 7, 40]])

    torch.manual_seed(1)
    draws = m.get_normalized_expression(n_samples=4, return_mean=False)
    assert isinstance(draws, np.ndarray) and draws.shape == (4, N_OBS, N_VARS)
    assert not np.allclose(draws[0], draws[1])
    torch.manual_seed(1)
    mean = m.get_normalized_expression(n_samples=4, return_numpy=True)
    assert mean.shape == (N_OBS, N_VARS)
    np.testing.assert_allclose(mean, draws.mean(0), rtol=1e-5, atol=1e-8)

    overall = m.get_normalized_expression(n_samples_overall=37)
    assert isinstance(overall, np.ndarray) and overall.shape == (37, N_VARS)
    np.testing.assert_allclose(overall.sum(1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError):
        m.get_normalized_expression(n_samples=2, return_mean=False, return_numpy=False)
    with pytest.raises(ValueError, match="not trained on"):
        m.get_normalized_expression(gene_list=["not_a_gene"])


# -- other inference APIs ----------------------------------------------------------------------------------
def test_likelihood_parameters_zinb_gene_batch(trained_model, base_adata):
    m = trained_model
    p = m.get_likelihood_parameters()
    assert set(p) == {"mean", "dispersions", "dropout"}
    for v in p.values():
        assert v.shape == (N_OBS, N_VARS) and v.dtype == np.float32 and np.all(np.isfinite(v))
    assert np.all((p["dropout"] >= 0) & (p["dropout"] <= 1))
    assert np.all(p["dispersions"] > 0) and np.all(p["mean"] >= 0)
    np.testing.assert_allclose(p["mean"].sum(1), _totals(base_adata), rtol=1e-4)
    # gene-batch dispersion: theta depends only on the cell's batch
    theta = torch.exp(m.module.log_theta).detach().numpy()  # (genes, batches)
    codes = base_adata.obs["batch"].cat.codes.to_numpy()
    np.testing.assert_allclose(p["dispersions"], theta[:, codes].T, rtol=1e-6)
    assert not np.allclose(theta[:, 0], theta[:, 1])

    stacked = m.get_likelihood_parameters(n_samples=3, indices=np.arange(10))
    assert all(v.shape == (3, 10, N_VARS) for v in stacked.values())
    averaged = m.get_likelihood_parameters(n_samples=3, give_mean=True, indices=np.arange(10))
    assert all(v.shape == (10, N_VARS) for v in averaged.values())


def test_posterior_predictive_sample(trained_model, base_adata):
    m = trained_model
    torch.manual_seed(0)
    x = m.posterior_predictive_sample()
    assert sp.issparse(x) and x.format == "csr" and x.shape == (N_OBS, N_VARS)
    assert np.all(x.data > 0) and np.array_equal(x.data, np.round(x.data))
    # the totals follow the observed library (zero inflation lowers them)
    ratio = np.asarray(x.sum(1)).ravel().sum() / _totals(base_adata).sum()
    assert 0.5 < ratio < 1.3
    many = m.posterior_predictive_sample(n_samples=3, indices=np.arange(20), gene_list=["gene_1", "gene_2"])
    assert isinstance(many, np.ndarray) and many.shape == (20, 2, 3)
    assert np.array_equal(many, np.round(many)) and many.min() >= 0


def test_elbo_marginal_ll_reconstruction(trained_model):
    m = trained_model
    idx = np.arange(60)
    torch.manual_seed(0)
    elbo = m.get_elbo(indices=idx)
    torch.manual_seed(0)
    recon = m.get_reconstruction_error(indices=idx)
    assert set(recon) == {"reconstruction_loss"}
    assert recon["reconstruction_loss"] > 0
    assert elbo < 0
    # same draws: -ELBO = recon + KL with KL > 0
    assert -elbo > recon["reconstruction_loss"]
    torch.manual_seed(0)
    mll = m.get_marginal_ll(indices=idx, n_mc_samples=200)
    assert np.isfinite(mll) and mll < 0
    # importance-sampled log p(x) >= ELBO up to Monte Carlo noise
    assert mll >= elbo - 0.5
    torch.manual_seed(0)
    per_cell = m.get_marginal_ll(indices=idx, n_mc_samples=200, return_mean=False)
    assert per_cell.shape == (60,)
    assert per_cell.mean() == pytest.approx(mll, abs=1e-6)
    # the whole-data ELBO is in line with the recorded training ELBO
    assert -m.get_elbo() == pytest.approx(m.history_["elbo_train"][-1], rel=0.1)


# -- model variants ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def variant_adata():
    adata = make_adata(n_obs=150, n_vars=40, random_state=1)
    rng = np.random.default_rng(0)
    adata.obs["donor"] = pd.Categorical(rng.choice(["d0", "d1", "d2"], adata.n_obs))
    adata.obs["pct_mito"] = rng.uniform(0, 0.2, adata.n_obs)
    adata.obs["sf"] = _totals(adata) / _totals(adata).mean()
    return adata


def _variant(adata, **kwargs):
    kwargs = {"n_hidden": 16, "n_latent": 4, **kwargs}
    model = SCVI(adata, **kwargs)
    model.train(max_epochs=3, progress_bar=False, batch_size=64)
    assert all(np.all(np.isfinite(v)) for v in model.history_.values())
    return model


@pytest.mark.parametrize("gene_likelihood", ["nb", "poisson", "zinb"])
def test_likelihood_variants(variant_adata, gene_likelihood):
    m = _variant(variant_adata, gene_likelihood=gene_likelihood)
    p = m.get_likelihood_parameters()
    expected = {"zinb": {"mean", "dispersions", "dropout"}, "nb": {"mean", "dispersions"}, "poisson": {"mean"}}
    assert set(p) == expected[gene_likelihood]
    assert all(v.shape == (variant_adata.n_obs, 40) for v in p.values())
    x = m.posterior_predictive_sample()
    assert x.shape == (variant_adata.n_obs, 40) and np.array_equal(x.data, np.round(x.data))
    assert m.get_elbo() < 0


def test_gene_label_dispersion(variant_adata):
    m = _variant(variant_adata, labels_key="labels", dispersion="gene-label")
    assert tuple(m.module.log_theta.shape) == (40, 3)
    disp = m.get_likelihood_parameters()["dispersions"]
    codes = variant_adata.obs["labels"].cat.codes.to_numpy()
    theta = torch.exp(m.module.log_theta).detach().numpy()
    np.testing.assert_allclose(disp, theta[:, codes].T, rtol=1e-6)
    for c in range(3):
        rows = disp[codes == c]
        assert np.array_equal(rows, np.broadcast_to(rows[0], rows.shape))


def test_gene_cell_dispersion(variant_adata):
    m = _variant(variant_adata, dispersion="gene-cell")
    assert not hasattr(m.module, "log_theta")
    disp = m.get_likelihood_parameters()["dispersions"]
    assert np.all(disp > 0)
    assert np.unique(disp[:, 0]).size > variant_adata.n_obs // 2  # theta differs between cells


def test_logistic_normal_latent(variant_adata):
    m = _variant(variant_adata, latent_distribution="ln")
    torch.manual_seed(0)
    z = m.get_latent_representation(mc_samples=200)
    assert z.shape == (variant_adata.n_obs, 4)
    assert np.all(z >= 0)
    np.testing.assert_allclose(z.sum(1), 1.0, rtol=1e-5)
    mean, _ = m.get_latent_representation(return_dist=True)
    assert not np.allclose(mean.sum(1), 1.0)  # return_dist stays untransformed
    torch.manual_seed(0)
    sample = m.get_latent_representation(give_mean=False)
    np.testing.assert_allclose(sample.sum(1), 1.0, rtol=1e-5)
    assert np.isfinite(m.get_marginal_ll(n_mc_samples=20))


def test_learned_library(variant_adata):
    m = _variant(variant_adata, batch_key="batch", use_observed_lib_size=False)
    assert m.architecture.use_observed_lib_size is False
    # prior: per-batch mean and variance of log totals
    log_lib = np.log(_totals(variant_adata))
    codes = variant_adata.obs["batch"].cat.codes.to_numpy()
    for b in range(2):
        assert m.module.library_log_means[0, b].item() == pytest.approx(log_lib[codes == b].mean(), rel=1e-5)
        assert m.module.library_log_vars[0, b].item() == pytest.approx(log_lib[codes == b].var(), rel=1e-4)
    assert np.all(np.asarray(m.history_["kl_local_train"]) > 0)
    lib = m.get_latent_library_size()
    assert lib.shape == (variant_adata.n_obs, 1) and np.all(lib > 0)
    # posterior mean exp(m + v / 2) from the library encoder
    torch.manual_seed(0)
    one = m.get_latent_library_size(give_mean=False)
    assert one.shape == lib.shape and not np.allclose(one, lib)
    # library_size='latent' uses the learned library, not the observed totals
    torch.manual_seed(0)
    latent = m.get_normalized_expression(library_size="latent", return_numpy=True)
    assert not np.allclose(latent.sum(1), _totals(variant_adata), rtol=1e-3)


def test_covariates(variant_adata):
    m = _variant(
        variant_adata, batch_key="batch", categorical_covariate_keys=["donor"], continuous_covariate_keys=["pct_mito"]
    )
    assert m.module.n_cats_per_cov == (3,)
    assert m.module.n_continuous_cov == 1
    # decoder input: n_latent + 1 continuous; covariates: 2 batches + 3 donors
    assert m.module.decoder.layers[0][0].in_features == 4 + 1 + 2 + 3
    z = m.get_latent_representation()
    assert z.shape == (variant_adata.n_obs, 4)
    # the decoder depends on the covariates
    other = variant_adata.copy()
    other.obs["pct_mito"] = other.obs["pct_mito"] + 5.0
    other.obs["donor"] = pd.Categorical(np.where(other.obs["donor"] == "d0", "d1", "d0"), categories=["d0", "d1", "d2"])
    a, b = _nge(m, 0), _nge(m, 0, adata=other)
    assert np.abs(a - b).max() > 1e-4
    np.testing.assert_allclose(b.sum(1), 1.0, rtol=1e-5)
    # encoder is covariate-free by default: same latent
    np.testing.assert_array_equal(m.get_latent_representation(adata=other), z)


def test_encode_covariates(variant_adata):
    m = _variant(variant_adata, batch_key="batch", encode_covariates=True)
    assert m.module.z_encoder.trunk.layers[0][0].in_features == 40 + 2
    other = variant_adata.copy()
    other.obs["batch"] = pd.Categorical(
        np.where(other.obs["batch"] == "batch_0", "batch_1", "batch_0"), categories=["batch_0", "batch_1"]
    )
    assert not np.allclose(m.get_latent_representation(adata=other), m.get_latent_representation())


def test_size_factor_key(variant_adata):
    m = _variant(variant_adata, size_factor_key="sf")
    one = _nge(m, 0)
    assert np.all(one >= 0)
    assert not np.allclose(one.sum(1), 1.0)  # softplus, not softmax
    latent = _nge(m, 0, library_size="latent")
    sf = variant_adata.obs["sf"].to_numpy()
    np.testing.assert_allclose(latent, one * sf[:, None], rtol=1e-4, atol=1e-7)
    mean = m.get_likelihood_parameters()["mean"]
    assert mean.shape == (variant_adata.n_obs, 40)


def test_model_genes_subset(variant_adata):
    genes = list(variant_adata.var_names[::-3])
    m = _variant(variant_adata, genes=genes)
    assert m.setup.genes == genes
    df = m.get_normalized_expression()
    assert list(df.columns) == genes
    np.testing.assert_allclose(m.get_latent_library_size()[:, 0], _totals(variant_adata, genes), rtol=1e-5)


def test_repr_and_layer(variant_adata):
    adata = variant_adata.copy()
    adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)  # X is not counts; the layer is
    m = SCVI(adata, layer="counts", n_hidden=16, n_latent=4)
    assert "trained: False" in repr(m) and "40 genes" in repr(m)
    np.testing.assert_allclose(m.get_latent_library_size()[:, 0], _totals(variant_adata), rtol=1e-5)


# -- early stopping --------------------------------------------------------------------------------------------
def test_early_stopping_restores_best_weights(base_adata):
    """The restored weights are those after the best epoch: bit-identical to a run stopped there."""
    data = base_adata[:200].copy()
    kw = {"lr": 0.05, "train_size": 0.7, "batch_size": 64, "progress_bar": False, "random_state": 3}
    model_kw = {"batch_key": "batch", "n_hidden": 16, "n_latent": 4}

    es = SCVI(data, **model_kw)
    es.train(max_epochs=40, early_stopping=True, early_stopping_patience=3, **kw)
    val = np.asarray(es.history_["elbo_validation"])
    n_run = len(val)
    best = es.train_config["best_epoch"]
    assert n_run < 40, "early stopping did not trigger"
    assert best == int(np.argmin(val))
    assert n_run == best + 3 + 1  # stopped after `patience` epochs without improvement
    assert best < n_run - 1

    # same seed, no early stopping, just best + 1 epochs: the same trajectory up to the best epoch
    ref = SCVI(data, **model_kw)
    ref.train(max_epochs=best + 1, **kw)
    np.testing.assert_array_equal(ref.history_["elbo_validation"], val[: best + 1])
    last = SCVI(data, **model_kw)
    last.train(max_epochs=n_run, **kw)
    np.testing.assert_array_equal(last.history_["elbo_validation"], val)

    es_state, ref_state, last_state = (m.module.state_dict() for m in (es, ref, last))
    assert all(torch.equal(es_state[k], ref_state[k]) for k in es_state)
    assert not all(torch.equal(es_state[k], last_state[k]) for k in es_state)
    assert "best_epoch" not in ref.train_config
    assert not es.module.training


# -- minibatches ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 127, 128, 129, 130, 131, 256, 257, 1000])
def test_minibatches_keep_every_index_once(n):
    idx = np.random.default_rng(n).permutation(n) + 1000
    batches = minibatches(idx, 128)
    assert np.array_equal(np.concatenate(batches), idx)  # every index once, order kept
    if n > 128:
        assert all(len(b) >= 3 for b in batches)
    assert all(len(b) <= 128 + 2 for b in batches)
    assert len(batches) == max(1, -(-n // 128) - (1 if n > 128 and n % 128 in (1, 2) else 0))


def test_last_minibatch_of_one_cell_trains():
    adata = make_adata(n_obs=129, n_vars=30, random_state=2)
    assert adata.n_obs == 129
    model = SCVI(adata, n_hidden=16, n_latent=3)
    model.train(max_epochs=2, train_size=1.0, batch_size=128, progress_bar=False)
    assert len(model.history_["elbo_train"]) == 2
    assert "elbo_validation" not in model.history_
    assert np.all(np.isfinite(model.history_["elbo_train"]))
    assert model.get_latent_representation().shape == (129, 3)


def test_train_argument_checks(base_adata):
    model = SCVI(base_adata, **SMALL_MODEL)
    bad = ({"max_epochs": 0}, {"batch_size": 0}, {"train_size": 0.0}, {"train_size": 1.5}, {"train_size": 0.005})
    for kwargs in bad:
        with pytest.raises(ValueError):
            model.train(progress_bar=False, **{"max_epochs": 1, **kwargs})
    assert not model.is_trained
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            model.to_device("cuda")
    with pytest.raises(ValueError, match="Unknown device"):
        model.to_device("tpu:banana")
    assert model.device.type == "cpu"


def test_matrix_formats_give_identical_results(tmp_path):
    """Dense, CSR, CSC and backed (on-disk) counts feed the model the same numbers."""
    import anndata as ad

    csr = make_adata(n_obs=120, n_vars=30, random_state=6)
    dense, csc = csr.copy(), csr.copy()
    dense.X = csr.X.toarray()
    csc.X = sp.csc_matrix(csr.X)
    csr.write_h5ad(tmp_path / "csr.h5ad")
    backed = ad.read_h5ad(tmp_path / "csr.h5ad", backed="r")

    latents, weights = [], []
    for data in (csr, dense, csc):
        model = SCVI(data, batch_key="batch", n_hidden=16, n_latent=3)
        model.train(max_epochs=2, batch_size=50, progress_bar=False)
        weights.append({k: v.clone() for k, v in model.module.state_dict().items()})
        latents.append(model.get_latent_representation())
    for w in weights[1:]:  # training sees bit-identical minibatches
        assert all(torch.equal(w[k], weights[0][k]) for k in w)
    for z in latents[1:]:  # inference on CSR multiplies only the nonzeros: summation order differs
        np.testing.assert_allclose(z, latents[0], rtol=1e-5, atol=1e-6)
    # the same model on the backed file: the same numbers (training on disk reads in blocks,
    # a different order: tests/test_blocks.py)
    np.testing.assert_allclose(model.get_latent_representation(adata=backed), latents[-1], rtol=1e-5, atol=1e-6)
    # inference on another format, with unsorted indices on the backed file
    idx = np.array([7, 2, 99, 0])
    np.testing.assert_allclose(
        model.get_latent_representation(adata=backed, indices=idx), latents[0][idx], rtol=1e-5, atol=1e-6
    )
    backed.file.close()
