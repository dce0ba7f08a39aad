"""Count likelihoods, samplers and KL terms against closed forms (scipy / torch.distributions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import special, stats

from scanpy_scvi.nn._likelihoods import log_nb, log_poisson, log_zinb, sample_counts
from scanpy_scvi.nn._vae import VAE, _kl_normal, _kl_normal_std, _log_normal

# Counts including 0, small and large values; means and inverse dispersions over several decades.
X_VALUES = np.array([0.0, 1.0, 2.0, 3.0, 7.0, 25.0, 130.0, 1000.0, 5000.0])
MU_VALUES = np.array([0.05, 0.7, 3.0, 40.0, 900.0])
THETA_VALUES = np.array([0.1, 1.0, 4.5, 60.0])
LOGITS = np.array([-6.0, -1.0, 0.0, 2.5])


def _grid(*arrays):
    mesh = np.meshgrid(*arrays, indexing="ij")
    return [m.ravel() for m in mesh]


def _t(a):
    return torch.as_tensor(a, dtype=torch.float64)


def _scipy_nb_logpmf(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def test_log_nb_matches_scipy():
    x, mu, theta = _grid(X_VALUES, MU_VALUES, THETA_VALUES)
    ours = log_nb(_t(x), _t(mu), _t(theta)).numpy()
    expected = _scipy_nb_logpmf(x, mu, theta)
    assert ours.dtype == np.float64
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-5)


def test_log_nb_is_normalised():
    """exp(log NB) sums to 1 over the support (catches a missing lgamma(x + 1))."""
    x = np.arange(0, 3000, dtype=np.float64)
    for mu, theta in [(3.0, 0.5), (40.0, 4.0), (200.0, 30.0)]:
        total = torch.exp(log_nb(_t(x), _t(mu), _t(theta))).sum().item()
        assert total == pytest.approx(1.0, abs=1e-6)


def test_log_zinb_matches_mixture_closed_form():
    x, mu, theta, logits = _grid(X_VALUES, MU_VALUES, THETA_VALUES, LOGITS)
    ours = log_zinb(_t(x), _t(mu), _t(theta), _t(logits)).numpy()
    pi = special.expit(logits)
    nb_logpmf = _scipy_nb_logpmf(x, mu, theta)
    # log(pi * 1[x == 0] + (1 - pi) * NB(x)), evaluated stably in log space
    expected = np.where(
        x == 0,
        np.logaddexp(np.log(pi), np.log1p(-pi) + nb_logpmf),
        np.log1p(-pi) + nb_logpmf,
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-5)

    # and literally as written, where the pmf does not underflow
    with np.errstate(divide="ignore"):
        direct = np.log(pi * (x == 0) + (1 - pi) * stats.nbinom.pmf(x, theta, theta / (theta + mu)))
    ok = np.isfinite(direct) & (direct > -600)
    assert ok.sum() > 0.5 * ok.size
    np.testing.assert_allclose(ours[ok], direct[ok], rtol=1e-6, atol=1e-5)


def test_log_zinb_equals_reference_piecewise_formula():
    """The reference (scvi-tools) piecewise softplus form, written out independently."""
    x, mu, theta, logits = _grid(X_VALUES, MU_VALUES, THETA_VALUES, LOGITS)
    eps = 1e-8

    def softplus(v):
        return np.logaddexp(0.0, v)

    log_theta_mu = np.log(theta + mu + eps)
    a = -logits + theta * (np.log(theta + eps) - log_theta_mu)
    case_zero = softplus(a) - softplus(-logits)
    case_nonzero = (
        -softplus(-logits)
        + a
        + x * (np.log(mu + eps) - log_theta_mu)
        + special.gammaln(x + theta)
        - special.gammaln(theta)
        - special.gammaln(x + 1)
    )
    reference = np.where(x < eps, case_zero, case_nonzero)
    ours = log_zinb(_t(x), _t(mu), _t(theta), _t(logits)).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-9)


def test_log_zinb_reduces_to_nb_without_inflation():
    x, mu, theta = _grid(X_VALUES, MU_VALUES, THETA_VALUES)
    very_negative = np.full_like(x, -800.0)  # pi = exp(-800): below every NB(0) on the grid
    zinb = log_zinb(_t(x), _t(mu), _t(theta), _t(very_negative)).numpy()
    nb = log_nb(_t(x), _t(mu), _t(theta)).numpy()
    np.testing.assert_allclose(zinb, nb, rtol=1e-9, atol=1e-9)


def test_log_poisson_matches_scipy():
    x, mu = _grid(X_VALUES, MU_VALUES)
    ours = log_poisson(_t(x), _t(mu)).numpy()
    np.testing.assert_allclose(ours, stats.poisson.logpmf(x, mu), rtol=1e-10, atol=1e-9)


def test_log_likelihoods_broadcast_gene_theta():
    """A per-gene theta (G,) broadcasts over a (cells, G) mean, as the module uses it."""
    rng = np.random.default_rng(0)
    mu = rng.uniform(0.1, 20, size=(6, 4))
    theta = rng.uniform(0.5, 10, size=4)
    x = rng.poisson(mu).astype(np.float64)
    ours = log_nb(_t(x), _t(mu), _t(theta)).numpy()
    np.testing.assert_allclose(ours, _scipy_nb_logpmf(x, mu, theta[None, :]), rtol=1e-6, atol=1e-5)


# -- samplers ------------------------------------------------------------------------------------
PARAMS = [(5.0, 2.0), (50.0, 10.0), (0.5, 0.5)]  # (mu, theta) per gene


def _draw(likelihood, n=200_000, logits=None, seed=0):
    mu = torch.tensor([p[0] for p in PARAMS], dtype=torch.float32).expand(n, len(PARAMS)).contiguous()
    theta = torch.tensor([p[1] for p in PARAMS], dtype=torch.float32)
    zi = None if logits is None else torch.full_like(mu, logits)
    torch.manual_seed(seed)
    return sample_counts(mu, theta, zi, likelihood).double().numpy()


def test_nb_sample_moments():
    draws = _draw("nb")
    assert np.array_equal(draws, np.round(draws)) and draws.min() >= 0
    for g, (mu, theta) in enumerate(PARAMS):
        var = mu + mu**2 / theta
        se_mean = np.sqrt(var / len(draws))
        assert abs(draws[:, g].mean() - mu) < 6 * se_mean + 1e-3 * mu
        # NB variance (a Poisson sampler would give var = mu, far outside this band)
        assert draws[:, g].var() == pytest.approx(var, rel=0.04)


def test_poisson_sample_moments():
    draws = _draw("poisson")
    for g, (mu, _) in enumerate(PARAMS):
        assert draws[:, g].mean() == pytest.approx(mu, rel=0.02)
        assert draws[:, g].var() == pytest.approx(mu, rel=0.03)


def test_zinb_zero_fraction_and_mean():
    logit = 0.4
    pi = special.expit(logit)
    draws = _draw("zinb", logits=logit)
    for g, (mu, theta) in enumerate(PARAMS):
        nb_zero = (theta / (theta + mu)) ** theta
        expected_zero = pi + (1 - pi) * nb_zero
        assert (draws[:, g] == 0).mean() == pytest.approx(expected_zero, abs=0.006)
        assert draws[:, g].mean() == pytest.approx((1 - pi) * mu, rel=0.03)


def test_samplers_use_global_rng():
    a = _draw("zinb", n=1000, logits=0.0, seed=3)
    b = _draw("zinb", n=1000, logits=0.0, seed=3)
    c = _draw("zinb", n=1000, logits=0.0, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# -- KL and Gaussian densities --------------------------------------------------------------------
def test_kl_standard_normal_matches_torch():
    torch.manual_seed(0)
    m = torch.randn(50, 7, dtype=torch.float64) * 2
    v = torch.rand(50, 7, dtype=torch.float64) * 3 + 1e-3
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, v.sqrt()), torch.distributions.Normal(torch.zeros_like(m), torch.ones_like(m))
    )
    torch.testing.assert_close(_kl_normal_std(m, v), expected, rtol=1e-10, atol=1e-10)


def test_kl_general_normal_matches_torch():
    torch.manual_seed(1)
    m, pm = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    v, pv = torch.rand(40, 3, dtype=torch.float64) + 0.05, torch.rand(40, 3, dtype=torch.float64) + 0.05
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, v.sqrt()), torch.distributions.Normal(pm, pv.sqrt())
    )
    torch.testing.assert_close(_kl_normal(m, v, pm, pv), expected, rtol=1e-10, atol=1e-10)
    assert torch.all(_kl_normal(m, v, m, v).abs() < 1e-12)


def test_log_normal_matches_torch():
    torch.manual_seed(2)
    x, m = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, 4, dtype=torch.float64)
    v = torch.rand(30, 4, dtype=torch.float64) + 0.1
    torch.testing.assert_close(
        _log_normal(x, m, v), torch.distributions.Normal(m, v.sqrt()).log_prob(x), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("gene_likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("use_observed_lib_size", [True, False])
def test_module_loss_terms(gene_likelihood, use_observed_lib_size):
    """VAE.loss: recon = -sum_g log p(x | z, l), KL terms analytic, loss = mean(recon + w kl_z + kl_l)."""
    torch.manual_seed(0)
    n, g = 12, 9
    module = VAE(
        g, n_batch=2, n_hidden=8, n_latent=3, gene_likelihood=gene_likelihood,
        use_observed_lib_size=use_observed_lib_size,
    )  # fmt: skip
    module.library_log_means.fill_(3.0)
    module.library_log_vars.fill_(0.5)
    module.eval()
    x = torch.poisson(torch.full((n, g), 4.0))
    x[:, 0] += 1  # no empty cell
    tensors = {"X": x, "batch": torch.arange(n) % 2, "labels": torch.zeros(n, dtype=torch.int64)}

    torch.manual_seed(5)
    out = module.loss(tensors, kl_weight=0.3)
    torch.manual_seed(5)
    with torch.no_grad():
        inf, gen = module(tensors)

    mu, theta = gen["px_rate"].double().numpy(), gen["theta"].double().numpy()
    xn = x.double().numpy()
    if gene_likelihood == "poisson":
        lp = stats.poisson.logpmf(xn, mu)
    else:
        lp = _scipy_nb_logpmf(xn, mu, np.broadcast_to(theta, mu.shape))
        if gene_likelihood == "zinb":
            pi = special.expit(gen["zi_logits"].double().numpy())
            lp = np.where(xn == 0, np.logaddexp(np.log(pi), np.log1p(-pi) + lp), np.log1p(-pi) + lp)
    out = {k: v.detach() for k, v in out.items()}
    np.testing.assert_allclose(out["reconstruction_loss"].numpy(), -lp.sum(-1), rtol=1e-4, atol=1e-3)

    std = torch.distributions.Normal(0.0, 1.0)
    kl_z = torch.distributions.kl_divergence(torch.distributions.Normal(inf["qz_m"], inf["qz_v"].sqrt()), std).sum(-1)
    torch.testing.assert_close(out["kl_z"], kl_z, rtol=1e-5, atol=1e-5)
    if use_observed_lib_size:
        assert torch.all(out["kl_l"] == 0)
        torch.testing.assert_close(gen["px_rate"].sum(-1), x.sum(-1), rtol=1e-5, atol=1e-3)
    else:
        prior = torch.distributions.Normal(torch.full((n, 1), 3.0), torch.full((n, 1), 0.5).sqrt())
        kl_l = torch.distributions.kl_divergence(
            torch.distributions.Normal(inf["ql_m"], inf["ql_v"].sqrt()), prior
        ).sum(-1)
        torch.testing.assert_close(out["kl_l"], kl_l, rtol=1e-5, atol=1e-5)
        assert torch.all(out["kl_l"] > 0)
    expected_loss = (out["reconstruction_loss"] + 0.3 * out["kl_z"] + out["kl_l"]).mean()
    torch.testing.assert_close(out["loss"], expected_loss)


# -- the sparse-aware summed likelihood used in training ------------------------------------------
@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("theta_shape", ["gene", "cell-gene", "group-gene"])
def test_summed_log_likelihood_equals_reference_values_and_gradients(likelihood, theta_shape):
    """The nonzero-only evaluation equals the summed reference formulas, gradients included;
    a dispersion table of rows (``theta_rows``) as the per-cell theta it stands for."""
    from scanpy_scvi.nn._likelihoods import summed_log_likelihood

    g = torch.Generator().manual_seed(0)
    n, genes = 37, 53
    x = torch.poisson(torch.rand(n, genes, generator=g, dtype=torch.float64) * 3) * (
        torch.rand(n, genes, generator=g, dtype=torch.float64) < 0.3
    )
    x[0] = 0.0  # a cell without counts in these genes
    x[1, :5] = torch.tensor([1.0, 17.0, 250.0, 3000.0, 2.0], dtype=torch.float64)
    mu0 = torch.rand(n, genes, generator=g, dtype=torch.float64) * 20 + 1e-3
    shape = {"gene": (genes,), "cell-gene": (n, genes), "group-gene": (4, genes)}[theta_shape]
    theta0 = torch.rand(shape, generator=g, dtype=torch.float64) * 5 + 0.05
    rows = torch.arange(n) % 3 if theta_shape == "group-gene" else None  # table row 3 unused: zero gradient
    logits0 = torch.randn(n, genes, generator=g, dtype=torch.float64) * 2

    def grads(fn):
        mu, theta, logits = (t.clone().requires_grad_(True) for t in (mu0, theta0, logits0))
        value = fn(mu, theta, logits)
        (value * torch.linspace(0.5, 1.5, n, dtype=torch.float64)).sum().backward()
        used = [mu] + ([theta] if likelihood != "poisson" else []) + ([logits] if likelihood == "zinb" else [])
        return value.detach(), [t.grad for t in used]

    def reference(mu, theta, logits):
        theta = theta if rows is None else theta[rows]
        if likelihood == "zinb":
            return log_zinb(x, mu, theta, logits).sum(-1)
        if likelihood == "nb":
            return log_nb(x, mu, theta).sum(-1)
        return log_poisson(x, mu).sum(-1)

    nz_index = x.reshape(-1).nonzero().squeeze(1)

    def fast(mu, theta, logits):
        if rows is None:
            return summed_log_likelihood(mu, theta, logits, likelihood, nz_index, x.reshape(-1)[nz_index])
        return summed_log_likelihood(mu, theta[rows], logits, likelihood, nz_index, x.reshape(-1)[nz_index],
                                     theta_table=theta, theta_rows=rows)  # fmt: skip

    ref_value, ref_grads = grads(reference)
    fast_value, fast_grads = grads(fast)
    torch.testing.assert_close(fast_value, ref_value, rtol=1e-12, atol=1e-9)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if rows is not None and likelihood != "poisson":
        assert torch.all(fast_grads[1][3] == 0) and torch.all(fast_grads[1][:3] != 0)


def test_module_loss_matches_elementwise_reference():
    """VAE.log_likelihood (training path) equals the elementwise reference in float32 too."""
    torch.manual_seed(0)
    module = VAE(40, n_batch=2, n_hidden=16, n_latent=4, gene_likelihood="zinb", dispersion="gene-batch").eval()
    x = torch.poisson(torch.rand(30, 40) * 2)
    x[:, 0] += 1  # no empty cells
    tensors = {"X": x, "batch": torch.randint(0, 2, (30,)), "labels": torch.zeros(30, dtype=torch.long)}
    with torch.no_grad():
        _inf, gen = module(tensors)
        fast = module.log_likelihood(x, gen)
        ref = module.elementwise_log_likelihood(x, gen).sum(-1)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("gene_likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-cell"])
def test_training_gradients_equal_the_elementwise_reference(gene_likelihood, dispersion):
    """Every parameter gradient of the training loss (fused likelihood node, nonzeros taken from
    a CSR minibatch) equals autograd through the elementwise reference formulas."""
    import scipy.sparse as sp

    from scanpy_scvi.data._batches import MinibatchSource

    torch.manual_seed(0)
    n, genes = 30, 40
    module = VAE(genes, n_batch=2, n_hidden=16, n_latent=4, gene_likelihood=gene_likelihood, dispersion=dispersion)
    module = module.double().eval()  # eval: no dropout, so both passes see the same network
    counts = np.random.default_rng(0).poisson(1.0, (n, genes + 5)).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    genes_used = np.arange(3, genes + 3)  # a column subset of the CSR, as with HVGs
    obs = {"batch": np.arange(n) % 2, "labels": np.zeros(n, dtype=np.int64)}
    source = MinibatchSource(sp.csr_matrix(counts), genes_used, obs)
    tensors = source.get(np.arange(n)[::-1].copy(), nonzero=True)
    assert torch.equal(tensors["nz_index"].sort().values, tensors["X"].reshape(-1).nonzero().squeeze(1))
    tensors["X"] = tensors["X"].double()

    def gradients(reference: bool) -> dict[str, torch.Tensor]:
        module.zero_grad()
        torch.manual_seed(1)  # the same z draw in both passes
        if reference:
            module.log_likelihood = lambda x, gen, nz=None: module.elementwise_log_likelihood(x, gen).sum(-1)
        try:
            module.loss(tensors)["loss"].backward()
        finally:
            module.__dict__.pop("log_likelihood", None)
        return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}

    fast, ref = gradients(False), gradients(True)
    assert fast.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-9, atol=1e-11, msg=k)


def test_flat_nonzero_survives_explicit_zeros_and_duplicates():
    import scipy.sparse as sp

    from scanpy_scvi.data._batches import flat_nonzero

    block = sp.csr_matrix((np.array([1.0, 0.0, 2.0, 3.0]), np.array([0, 1, 2, 2]), np.array([0, 2, 4])), shape=(2, 3))
    dense = block.toarray()  # duplicates (row 1, col 2) summed to 5; the explicit zero is no count
    np.testing.assert_array_equal(flat_nonzero(block, dense), np.flatnonzero(dense))
    clean = sp.csr_matrix(dense)
    np.testing.assert_array_equal(flat_nonzero(clean, dense), [0, 5])


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"encode_covariates": True, "n_cats_per_cov": (3,), "use_observed_lib_size": False, "n_layers": 2},
        {"encode_covariates": True, "n_continuous_cov": 2},  # continuous covariates: densified
        {"linear_decoder": True, "latent_distribution": "ln"},
    ],
)
def test_sparse_counts_give_the_dense_inference(kwargs):
    """A CSR count input (the CPU inference path) gives the dense path's posterior and library."""
    import scipy.sparse as sp

    from scanpy_scvi.data._batches import _torch_csr

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.poisson(0.3, size=(64, 40)).astype(np.float32)
    x[:, 0] += 1  # no empty cell
    module = VAE(40, n_batch=2, **kwargs).eval()
    tensors = {"batch": torch.as_tensor(rng.integers(0, 2, 64))}
    if kwargs.get("n_cats_per_cov"):
        tensors["cat_covs"] = torch.as_tensor(rng.integers(0, 3, (64, 1)))
    if kwargs.get("n_continuous_cov"):
        tensors["cont_covs"] = torch.as_tensor(rng.normal(size=(64, 2)), dtype=torch.float32)
    with torch.inference_mode():
        dense = module.inference({**tensors, "X": torch.from_numpy(x)})
        sparse = module.inference({**tensors, "X": _torch_csr(sp.csr_matrix(x))})
    for key in ("qz_m", "qz_v", "ql_m") if "ql_m" in dense else ("qz_m", "qz_v", "library"):
        torch.testing.assert_close(sparse[key], dense[key], rtol=1e-5, atol=1e-5)
