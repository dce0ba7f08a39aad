"""TOTALVI's generative-model outputs on real CITE-seq (10x PBMC 10k + 5k, 9 proteins): likelihood
parameters, posterior predictive counts, the marginal likelihood, gene-protein correlations and
the reconstruction error by modality."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_totalvi import _cite

import scanpy_scvi as ss
from scanpy_scvi.model import BaseModel

MARKERS = ["MS4A1", "CD79A", "CD3D", "CD14"]  # B-cell genes, a T-cell gene, a monocyte gene
CD19 = "CD19_TotalSeqB"


def _cite_small(n_per_batch: int = 150, n_genes: int = 150, seed: int = 0):
    """Cells of both batches (B, T, monocytes, NK); the most dispersed genes plus the markers."""
    return _cite(n_per_batch, n_genes, seed, extra_genes=MARKERS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one torch thread is faster, also on a shared machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(one_thread):
    """totalVI on 300 cells x ~150 genes x 9 proteins, 2 batches, 40 epochs (read-only)."""
    adata = _cite_small()
    model = ss.TOTALVI(adata, batch_key="batch", n_hidden=32, n_latent=8)
    model.train(40, batch_size=64, n_epochs_kl_warmup=10, progress_bar=False, device="cpu")
    return adata, model


def _counts(adata) -> np.ndarray:
    return np.asarray(adata.X.sum(1)).ravel()


def test_likelihood_parameters(fitted):
    adata, model = fitted
    G, P = adata.n_vars, 9
    params = model.get_likelihood_parameters()
    rna_keys, protein_keys = {"mean", "dispersions"}, {"background_mean", "foreground_mean", "protein_dispersions"}
    assert set(params) == rna_keys | protein_keys | {"mixing"}
    for k in rna_keys:
        assert params[k].shape == (adata.n_obs, G) and params[k].dtype == np.float32
    for k in [*protein_keys, "mixing"]:
        assert params[k].shape == (adata.n_obs, P)
    # observed library: the NB means of a cell sum to its total count
    np.testing.assert_allclose(params["mean"].sum(1), _counts(adata), rtol=1e-4)
    assert (params["dispersions"] > 0).all() and (params["protein_dispersions"] > 0).all()
    assert (params["foreground_mean"] > params["background_mean"]).all()
    assert (params["mixing"] >= 0).all() and (params["mixing"] <= 1).all()
    # mixing is P(background): 1 - the foreground probability of the same draw
    with model.seeded(0):
        mixing = model.get_likelihood_parameters(indices=np.arange(20))["mixing"]
    with model.seeded(0):
        foreground = model.get_protein_foreground_probability(indices=np.arange(20), return_numpy=True)
    np.testing.assert_allclose(mixing, 1 - foreground, atol=1e-6)
    stacked = model.get_likelihood_parameters(indices=np.arange(20), n_samples=3)
    assert stacked["mean"].shape == (3, 20, G) and stacked["mixing"].shape == (3, 20, P)
    averaged = model.get_likelihood_parameters(indices=np.arange(20), n_samples=3, give_mean=True)
    assert averaged["foreground_mean"].shape == (20, P)


def test_zinb_adds_dropout_and_samples_counts():
    adata = _cite_small(n_per_batch=30, n_genes=40, seed=1)
    model = ss.TOTALVI(adata, batch_key="batch", n_hidden=16, n_latent=4, gene_likelihood="zinb")  # untrained
    params = model.get_likelihood_parameters()
    assert set(params) >= {"mean", "dispersions", "dropout"} and params["dropout"].shape == (adata.n_obs, adata.n_vars)
    assert (params["dropout"] > 0).all() and (params["dropout"] < 1).all()
    x = model.posterior_predictive_sample(n_samples=2)
    assert x.shape == (adata.n_obs, adata.n_vars + 9, 2)
    assert np.array_equal(x, np.round(x)) and x.min() >= 0


def test_posterior_predictive_sample(fitted):
    adata, model = fitted
    G = adata.n_vars
    torch.manual_seed(0)
    one = model.posterior_predictive_sample()
    assert sp.issparse(one) and one.format == "csr" and one.shape == (adata.n_obs, G + 9)
    dense = one.toarray()
    assert np.array_equal(dense, np.round(dense)) and dense.min() >= 0
    picked = model.posterior_predictive_sample(
        indices=np.arange(20), n_samples=3, gene_list=["CD79A", "MS4A1"], protein_list=[CD19]
    )
    assert isinstance(picked, np.ndarray) and picked.shape == (20, 3, 3)  # model-order genes, then proteins

    # the mean of many draws is the likelihood mean: with the same seed (one minibatch) both
    # calls make the same posterior draws, so the sample mean differs from the mean of the
    # likelihood means only by the count noise, whose variance the parameters give
    cells, S = np.arange(0, adata.n_obs, 30), 1000
    with model.seeded(1):
        draws = model.posterior_predictive_sample(indices=cells, n_samples=S)
    with model.seeded(1):
        params = model.get_likelihood_parameters(indices=cells, n_samples=S)
    assert draws.shape == (len(cells), G + 9, S)
    np.testing.assert_allclose(draws[:, :G].sum(1).mean(-1), _counts(adata)[cells], rtol=0.03)  # RNA totals
    mu, theta = params["mean"].astype(np.float64), params["dispersions"]
    _assert_mean_within(draws[:, :G], mu, mu + mu**2 / theta)
    pi, phi = params["mixing"], params["protein_dispersions"]
    back, fore = params["background_mean"].astype(np.float64), params["foreground_mean"].astype(np.float64)
    mean = pi * back + (1 - pi) * fore
    second = pi * (back + back**2 * (1 + 1 / phi)) + (1 - pi) * (fore + fore**2 * (1 + 1 / phi))
    _assert_mean_within(draws[:, G:], mean, second - mean**2)


def _assert_mean_within(draws: np.ndarray, mean: np.ndarray, variance: np.ndarray, z: float = 5.0) -> None:
    """The mean over the last axis of ``draws`` (cells, features, S) is within ``z`` standard
    errors of the mean of the S per-draw ``mean`` (S, cells, features), given their ``variance``;
    checked where the S draws expect at least 20 counts (a near-normal sample mean)."""
    S = draws.shape[-1]
    expected = mean.mean(0)
    error = np.sqrt(variance.sum(0)) / S
    checked = S * expected >= 20
    assert checked.mean() > 0.5
    deviation = np.abs(draws.mean(-1) - expected)[checked]
    assert (deviation < z * error[checked]).all(), (deviation / error[checked]).max()


def test_marginal_ll_is_above_the_elbo_and_close(fitted):
    _, model = fitted
    idx = np.arange(0, 300, 3)
    torch.manual_seed(0)
    elbo = np.mean([model.get_elbo(indices=idx) for _ in range(20)])
    # one importance sample: log w averages to the ELBO
    torch.manual_seed(1)
    single = np.mean([model.get_marginal_ll(indices=idx, n_mc_samples=1) for _ in range(20)])
    assert single == pytest.approx(elbo, rel=0.01)
    torch.manual_seed(2)
    mll = model.get_marginal_ll(indices=idx, n_mc_samples=200, return_mean=False)
    assert mll.shape == (len(idx),) and np.isfinite(mll).all() and (mll < 0).all()
    # Jensen: log p(x, y) >= the importance-sampled bound >= the ELBO, here by a few percent
    assert elbo < mll.mean() < elbo + 0.15 * abs(elbo)
    torch.manual_seed(2)
    assert model.get_marginal_ll(indices=idx, n_mc_samples=200) == pytest.approx(mll.mean(), abs=1e-6)


def test_marginal_ll_leaves_unmeasured_proteins_out(fitted):
    _, model = fitted
    bound, idx = model.select(None, np.arange(40))
    (_, t), *_ = model.minibatches(bound, idx)
    module = copy.deepcopy(model.module).eval()
    batch0 = int(t["batch"][0])
    module.set_protein_mask(np.array([[j != 4 or b != batch0 for j in range(9)] for b in range(2)]))

    def mll(protein: int) -> torch.Tensor:
        changed = copy.deepcopy(module)
        with torch.no_grad():
            changed.background_pro_alpha[protein, batch0] += 3.0
        torch.manual_seed(0)
        return changed.marginal_ll(t, 20)

    torch.manual_seed(0)
    base = module.marginal_ll(t, 20)
    # the background prior of an unmeasured protein does not enter; that of a measured one does
    torch.testing.assert_close(mll(4), base)
    assert not torch.allclose(mll(3)[t["batch"] == batch0], base[t["batch"] == batch0])


def test_feature_correlation_matrix(fitted):
    adata, model = fitted
    proteins = list(adata.obsm["protein_expression"].columns)
    torch.manual_seed(0)
    corr = model.get_feature_correlation_matrix(n_samples=5)
    names = [*adata.var_names, *proteins]
    assert list(corr.index) == names and list(corr.columns) == names
    values = corr.to_numpy()
    np.testing.assert_allclose(values, values.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(values), 1.0)
    # the CD19 protein goes with B-cell genes, not with T-cell or monocyte ones
    b_genes = corr.loc[CD19, ["MS4A1", "CD79A"]]
    assert (b_genes > 0.1).all() and b_genes.min() > corr.loc[CD19, ["CD3D", "CD14"]].max(), corr.loc[CD19, MARKERS]
    pearson = model.get_feature_correlation_matrix(
        indices=np.arange(100), n_samples=3, correlation_type="pearson", log_transform=True,
        transform_batch=list(adata.obs["batch"].cat.categories),
    )  # fmt: skip
    p = pearson.to_numpy()
    np.testing.assert_allclose(p, p.T, atol=1e-10)
    np.testing.assert_allclose(np.diag(p), 1.0, atol=1e-10)
    assert np.abs(p).max() <= 1 + 1e-10


def test_reconstruction_error_by_modality(fitted):
    _, model = fitted
    idx = np.arange(100)
    torch.manual_seed(0)
    errors = model.get_reconstruction_error(indices=idx)
    assert set(errors) == {"reconstruction_loss", "reconst_loss_gene", "reconst_loss_protein"}
    assert errors["reconst_loss_gene"] > 0 and errors["reconst_loss_protein"] > 0
    assert errors["reconstruction_loss"] == pytest.approx(errors["reconst_loss_gene"] + errors["reconst_loss_protein"])
    # the same draws give the base's total, and -ELBO = reconstruction + KL > reconstruction
    torch.manual_seed(0)
    total = BaseModel.get_reconstruction_error(model, indices=idx)["reconstruction_loss"]
    assert errors["reconstruction_loss"] == pytest.approx(total, rel=1e-6)
    torch.manual_seed(0)
    assert -model.get_elbo(indices=idx) > errors["reconstruction_loss"]


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("get_likelihood_parameters", {"n_samples": 0}, "n_samples"),
        ("get_likelihood_parameters", {"batch_size": -1}, "batch_size"),
        ("get_likelihood_parameters", {"indices": [10_000]}, "indices"),
        ("posterior_predictive_sample", {"gene_list": ["NOT_A_GENE"]}, "gene_list"),
        ("posterior_predictive_sample", {"protein_list": ["CD999"]}, "protein_list"),
        ("posterior_predictive_sample", {"n_samples": 1.5}, "n_samples"),
        ("get_marginal_ll", {"n_mc_samples": 0}, "n_mc_samples"),
        ("get_feature_correlation_matrix", {"correlation_type": "kendall"}, "correlation_type"),
        ("get_feature_correlation_matrix", {"rna_size_factor": 0}, "rna_size_factor"),
        ("get_feature_correlation_matrix", {"transform_batch": "no such batch"}, "no such batch"),
        ("get_feature_correlation_matrix", {"indices": []}, "at least one cell"),
        ("get_reconstruction_error", {"indices": []}, "at least one cell"),
    ],
)  # fmt: skip
def test_bad_arguments_raise(fitted, method, kwargs, match):
    _, model = fitted
    with pytest.raises(ValueError, match=match):
        getattr(model, method)(**kwargs)
