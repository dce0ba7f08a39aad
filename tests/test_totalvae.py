"""The totalVI module (nn/_totalvae.py): its likelihood against closed forms, its loss terms, masks,
priors and shapes. Tiny networks: the whole file runs in a few seconds on a CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import special, stats

from scanpy_scvi.nn import TOTALVAE, TOTALVIArchitecture, log_nb_mixture, sample_nb_mixture
from scanpy_scvi.nn._likelihoods import log_nb, log_zinb

N_CELLS, N_GENES, N_PROTEINS, N_BATCH = 16, 30, 7, 2
SMALL = {"n_hidden": 16, "n_latent": 4}


def _grid(*arrays):
    return [m.ravel() for m in np.meshgrid(*arrays, indexing="ij")]


def _t(a):
    return torch.as_tensor(a, dtype=torch.float64)


def _minibatch(seed: int = 0, n_cells: int = N_CELLS, cat_covs: bool = False, cont_covs: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n_cells, N_GENES, generator=g) * 6, generator=g)
    x[:, 0] += 1  # no empty cell
    t = {
        "X": x,
        "Y": torch.poisson(torch.rand(n_cells, N_PROTEINS, generator=g) * 60, generator=g),
        "batch": torch.arange(n_cells) % N_BATCH,
        "labels": torch.arange(n_cells) % 3,
    }
    if cat_covs:
        t["cat_covs"] = torch.stack([torch.arange(n_cells) % 3, torch.arange(n_cells) % 2], dim=-1)
    if cont_covs:
        t["cont_covs"] = torch.randn(n_cells, 2, generator=g)
    return t


def _module(seed: int = 0, **kwargs) -> TOTALVAE:
    torch.manual_seed(seed)
    return TOTALVAE(N_GENES, n_proteins=N_PROTEINS, n_batch=N_BATCH, n_labels=3, **{**SMALL, **kwargs})


# -- architecture ------------------------------------------------------------------------------


def test_architecture_defaults_are_the_reference_ones():
    """scvi-tools TOTALVAE / TOTALVI defaults (module/_totalvae.py, model/_totalvi.py, nn FCLayers)."""
    assert TOTALVIArchitecture().to_dict() == {
        "n_hidden": 256,
        "n_latent": 20,
        "n_layers_encoder": 2,
        "n_layers_decoder": 1,
        "dropout_rate_encoder": 0.2,
        "dropout_rate_decoder": 0.2,
        "gene_dispersion": "gene",
        "protein_dispersion": "protein",
        "gene_likelihood": "nb",
        "latent_distribution": "normal",
        "encode_covariates": True,
        "deeply_inject_covariates": True,
        "use_observed_lib_size": True,
        "use_batch_norm": "both",
        "use_layer_norm": "none",
    }
    for f in dataclasses.fields(TOTALVIArchitecture):
        assert f.metadata["doc"].endswith("."), f.name
    with pytest.raises(ValueError):
        TOTALVIArchitecture(gene_dispersion="gene-cell")
    with pytest.raises(ValueError):
        TOTALVIArchitecture(gene_likelihood="poisson")


def test_module_takes_the_architecture_or_its_fields():
    a = TOTALVIArchitecture(n_hidden=16, n_latent=3, gene_likelihood="zinb")
    assert TOTALVAE(5, n_proteins=2, architecture=a).architecture == a
    assert TOTALVAE(5, n_proteins=2, n_hidden=16, n_latent=3, gene_likelihood="zinb").architecture == a
    with pytest.raises(TypeError):
        TOTALVAE(5, n_proteins=2, architecture=a, n_latent=3)
    with pytest.raises(ValueError):
        TOTALVAE(5, n_proteins=0)


# -- the NB mixture ----------------------------------------------------------------------------

Y_VALUES = np.array([0.0, 1.0, 3.0, 12.0, 80.0, 600.0, 4000.0])
MU1_VALUES = np.array([0.3, 8.0, 150.0])
ALPHA_VALUES = np.array([1.0, 2.5, 40.0])  # mu2 = mu1 * alpha, as totalVI's foreground
THETA_VALUES = np.array([0.2, 3.0, 50.0])
MIX_LOGITS = np.array([-80.0, -30.0, -4.0, 0.0, 1.5, 30.0, 80.0])


def _scipy_nb_logpmf(y, mu, theta):
    return stats.nbinom.logpmf(y, theta, theta / (theta + mu))


def test_log_nb_mixture_matches_scipy_closed_form():
    y, mu1, alpha, theta, logits = _grid(Y_VALUES, MU1_VALUES, ALPHA_VALUES, THETA_VALUES, MIX_LOGITS)
    mu2 = mu1 * alpha
    ours = log_nb_mixture(_t(y), _t(mu1), _t(mu2), _t(theta), _t(logits)).numpy()
    # sigmoid(logits) is the weight of the first (background) component
    expected = np.logaddexp(
        special.log_expit(logits) + _scipy_nb_logpmf(y, mu1, theta),
        special.log_expit(-logits) + _scipy_nb_logpmf(y, mu2, theta),
    )
    assert ours.dtype == np.float64 and np.all(np.isfinite(expected))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-5)


def test_log_nb_mixture_extreme_logits_in_float32():
    """Logits far beyond float32's exp range stay finite and exact (a component weighted e^-200
    still wins where the other's NB is e^-3000: no clamping of the weights)."""
    y, mu1, alpha, theta, logits = _grid(Y_VALUES, MU1_VALUES, [3.0], [4.0], [-1e4, -200.0, 200.0, 1e4])
    mu2 = mu1 * alpha
    ours = log_nb_mixture(*(torch.as_tensor(v, dtype=torch.float32) for v in (y, mu1, mu2, theta, logits)))
    expected = np.logaddexp(
        special.log_expit(logits) + _scipy_nb_logpmf(y, mu1, theta),
        special.log_expit(-logits) + _scipy_nb_logpmf(y, mu2, theta),
    )
    assert torch.isfinite(ours).all()
    # rtol: float32 lgamma(y + theta) - lgamma(y + 1) near y = 4000 cancels ~3e4-sized terms
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-4, atol=1e-3)
    # where both components are plausible, the mixture is the favoured component's NB
    one = log_nb_mixture(
        *(torch.tensor([5.0, 5.0]), torch.tensor([4.0, 4.0]), torch.tensor([12.0, 12.0])),
        torch.tensor([2.0, 2.0]),
        torch.tensor([200.0, -200.0]),
    )
    torch.testing.assert_close(one, log_nb(torch.tensor([5.0, 5.0]), torch.tensor([4.0, 12.0]), torch.tensor(2.0)))


def test_log_nb_mixture_is_normalised_and_broadcasts_theta():
    y = _t(np.arange(0, 4000))
    for mu1, mu2, theta, logit in [(2.0, 30.0, 1.5, 0.7), (40.0, 400.0, 8.0, -2.0)]:
        total = torch.exp(log_nb_mixture(y, _t(mu1), _t(mu2), _t(theta), _t(logit))).sum().item()
        assert total == pytest.approx(1.0, abs=1e-6)
    mu = torch.rand(4, 5) + 0.5
    theta = torch.rand(5) + 0.5
    ll = log_nb_mixture(torch.ones(4, 5), mu, 3 * mu, theta, torch.zeros(4, 5))
    torch.testing.assert_close(ll, log_nb_mixture(torch.ones(4, 5), mu, 3 * mu, theta.expand(4, 5), torch.zeros(4, 5)))


def test_sample_nb_mixture_moments():
    torch.manual_seed(0)
    n = 200_000
    mu1, mu2, theta, logit = torch.full((n,), 3.0), torch.full((n,), 60.0), torch.full((n,), 5.0), 0.8
    counts = sample_nb_mixture(mu1, mu2, theta, torch.full((n,), logit))
    pi = special.expit(logit)
    assert counts.mean().item() == pytest.approx(pi * 3.0 + (1 - pi) * 60.0, rel=0.01)
    # the fraction of counts below 20 is essentially the background weight
    assert (counts < 20).float().mean().item() == pytest.approx(
        pi + (1 - pi) * stats.nbinom.cdf(19, 5, 5 / 65), abs=0.005
    )


# -- the module --------------------------------------------------------------------------------


def test_loss_keys_shapes_and_weights():
    m, t = _module(), _minibatch()
    torch.manual_seed(1)
    out = m.loss(t, kl_weight=0.3, pro_recons_weight=0.5)
    assert set(out) == {
        "loss",
        "reconstruction_loss",
        "kl_z",
        "kl_l",
        "reconstruction_loss_gene",
        "reconstruction_loss_protein",
        "z",
    }
    assert out["loss"].shape == ()
    assert out["z"].shape == (N_CELLS, m.n_latent)
    for key in set(out) - {"loss", "z"}:
        assert out[key].shape == (N_CELLS,) and torch.isfinite(out[key]).all(), key
    torch.testing.assert_close(
        out["reconstruction_loss"], out["reconstruction_loss_gene"] + out["reconstruction_loss_protein"]
    )
    # the warm-up weight multiplies the protein reconstruction, the z and background KL (here
    # kl_l is the background KL only) and the mixing penalty, as scvi-tools 1.4
    _, gen = _seeded_forward(m, t, 1)
    penalty = -1e-3 * torch.nn.functional.logsigmoid(gen["mixing"]).sum(-1)
    expected = (
        out["reconstruction_loss_gene"]
        + 0.3 * (0.5 * out["reconstruction_loss_protein"] + out["kl_z"] + out["kl_l"] + penalty)
    ).mean()
    torch.testing.assert_close(out["loss"], expected)
    assert (out["kl_z"] >= 0).all() and (out["kl_l"] >= 0).all()


def _seeded_forward(m, t, seed):
    torch.manual_seed(seed)
    inf = m.inference(t)
    gen = m.generative(inf["z"], inf["library"], t, log_background=inf["log_background"])
    return inf, gen


def test_loss_terms_equal_their_formulas():
    """Same seed: ``loss`` draws exactly inference then generative; recompute every term."""
    m, t = _module(gene_likelihood="zinb", use_observed_lib_size=False), _minibatch()
    m.library_log_means.fill_(4.0)
    m.library_log_vars.fill_(0.5)
    m.eval()
    torch.manual_seed(3)
    out = m.loss(t)
    inf, gen = _seeded_forward(m, t, 3)
    recon_gene = -log_zinb(t["X"], gen["px_rate"], gen["theta"], gen["zi_logits"]).sum(-1)
    torch.testing.assert_close(out["reconstruction_loss_gene"], recon_gene, rtol=1e-5, atol=1e-3)
    recon_pro = -log_nb_mixture(t["Y"], gen["rate_back"], gen["rate_fore"], gen["py_theta"], gen["mixing"]).sum(-1)
    torch.testing.assert_close(out["reconstruction_loss_protein"], recon_pro)

    qz_m, qz_v = inf["qz_m"].detach().double().numpy(), inf["qz_v"].detach().double().numpy()
    kl_z = 0.5 * (qz_v + qz_m**2 - 1 - np.log(qz_v)).sum(-1)
    np.testing.assert_allclose(out["kl_z"].detach().numpy(), kl_z, rtol=1e-5, atol=1e-5)
    ql_m, ql_v = inf["ql_m"].detach().double().numpy(), inf["ql_v"].detach().double().numpy()
    kl_lib = 0.5 * (np.log(0.5 / ql_v) + (ql_v + (ql_m - 4.0) ** 2) / 0.5 - 1).sum(-1)
    np.testing.assert_allclose(
        out["kl_l"].detach().numpy(), kl_lib + _numpy_background_kl(m, inf, t["batch"]), rtol=1e-5, atol=1e-4
    )


def _numpy_background_kl(m, inf, batch, mask=None):
    """Closed-form KL(N(m, v) || N(c, d^2)) in float64, summed over the measured proteins."""
    mean, var = inf["back_m"].detach().double().numpy(), inf["back_v"].detach().double().numpy()
    b = batch.numpy()
    c = m.background_pro_alpha.detach().double().numpy()[:, b].T
    d = np.exp(m.background_pro_log_beta.detach().double().numpy())[:, b].T
    kl = np.log(d) - 0.5 * np.log(var) + (var + (mean - c) ** 2) / (2 * d**2) - 0.5
    if mask is not None:
        kl = kl * mask[b]
    return kl.sum(-1)


def test_background_kl_matches_closed_form_normal_kl():
    m, t = _module(), _minibatch()
    m.set_background_prior(np.linspace(-1, 2, N_PROTEINS * N_BATCH).reshape(N_PROTEINS, N_BATCH), 0.4)
    m.eval()
    torch.manual_seed(5)
    out = m.loss(t)  # observed library: kl_l is the background KL alone
    inf, _ = _seeded_forward(m, t, 5)
    np.testing.assert_allclose(out["kl_l"].detach().numpy(), _numpy_background_kl(m, inf, t["batch"]), rtol=1e-5)
    kl_torch = torch.distributions.kl_divergence(
        torch.distributions.Normal(inf["back_m"], inf["back_v"].sqrt()),
        torch.distributions.Normal(
            m.background_pro_alpha[:, t["batch"]].T, torch.exp(m.background_pro_log_beta[:, t["batch"]].T)
        ),
    ).sum(-1)
    torch.testing.assert_close(out["kl_l"], kl_torch, rtol=1e-5, atol=1e-4)


def test_protein_mask_removes_unmeasured_proteins():
    m, t = _module(), _minibatch()
    mask = np.ones((N_BATCH, N_PROTEINS))
    mask[1, [2, 5]] = 0  # proteins 2 and 5 not measured in batch 1
    m.set_protein_mask(mask.astype(bool))
    assert m.protein_mask.dtype == torch.float32 and m.protein_mask.sum() == mask.sum()
    m.eval()
    _, gen = _seeded_forward(m, t, 0)
    batch = t["batch"]
    base = m.protein_log_likelihood(t["Y"], gen, batch)
    y = t["Y"].clone()
    y[batch == 1, 2] += 1000.0  # a masked entry: no change
    y[batch == 1, 5] = 0.0
    torch.testing.assert_close(m.protein_log_likelihood(y, gen, batch), base)
    y[batch == 1, 1] += 50.0  # a measured entry: changes
    assert not torch.allclose(m.protein_log_likelihood(y, gen, batch)[batch == 1], base[batch == 1])

    # in the loss: recon and background KL are the unmasked sums minus the masked entries
    torch.manual_seed(8)
    out = m.loss(t)
    inf, gen = _seeded_forward(m, t, 8)
    ll = log_nb_mixture(t["Y"], gen["rate_back"], gen["rate_fore"], gen["py_theta"], gen["mixing"])
    expected = -(ll * torch.as_tensor(mask, dtype=torch.float32)[batch]).sum(-1)
    torch.testing.assert_close(out["reconstruction_loss_protein"], expected)
    np.testing.assert_allclose(
        out["kl_l"].detach().numpy(), _numpy_background_kl(m, inf, batch, mask), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError):
        m.set_protein_mask(np.ones((N_PROTEINS, N_BATCH)))


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {
            "gene_likelihood": "zinb",
            "use_observed_lib_size": False,
            "gene_dispersion": "gene-batch",
            "protein_dispersion": "protein-label",
            "latent_distribution": "ln",
            "n_layers_decoder": 2,
            "use_layer_norm": "both",
        },
    ],
)
def test_gradients_reach_every_parameter(settings):
    covs = bool(settings)
    m = TOTALVAE(
        N_GENES,
        n_proteins=N_PROTEINS,
        n_batch=N_BATCH,
        n_labels=3,
        n_cats_per_cov=(3, 2) if covs else (),
        n_continuous_cov=2 if covs else 0,
        **SMALL,
        **settings,
    )
    m.train()
    m.loss(_minibatch(cat_covs=covs, cont_covs=covs))["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_set_background_prior_copies_values():
    m = _module()
    mean = np.arange(N_PROTEINS * N_BATCH, dtype=np.float64).reshape(N_PROTEINS, N_BATCH) / 10
    scale = np.full((N_PROTEINS, N_BATCH), 0.3)
    m.set_background_prior(mean, scale)
    np.testing.assert_allclose(m.background_pro_alpha.detach().numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(torch.exp(m.background_pro_log_beta).detach().numpy(), scale, rtol=1e-6)
    assert m.background_pro_alpha.requires_grad  # still learned
    # one column (or a vector) for every batch; tensors too
    m.set_background_prior(torch.arange(N_PROTEINS, dtype=torch.float32), torch.full((N_PROTEINS, 1), 2.0))
    assert torch.equal(m.background_pro_alpha[:, 1], torch.arange(N_PROTEINS, dtype=torch.float32))
    torch.testing.assert_close(m.background_pro_log_beta, torch.full((N_PROTEINS, N_BATCH), float(np.log(2.0))))
    with pytest.raises(ValueError):
        m.set_background_prior(mean.T, scale.T)
    with pytest.raises(ValueError):
        m.set_background_prior(mean, -scale)
    # a saved state dict carries the prior and the mask
    state = m.state_dict()
    assert {"background_pro_alpha", "background_pro_log_beta", "protein_mask"} <= set(state)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
def test_sparse_counts_give_the_dense_inference():
    m, t = _module(use_observed_lib_size=False), _minibatch()
    m.eval()
    with torch.inference_mode():
        torch.manual_seed(2)
        dense = m.inference(t)
        torch.manual_seed(2)
        sparse = m.inference({**t, "X": t["X"].to_sparse_csr()})
    assert set(dense) == set(sparse)
    for key in dense:
        torch.testing.assert_close(sparse[key], dense[key], msg=key)


def test_shapes_with_several_samples_and_outputs():
    m, t = _module(gene_likelihood="zinb"), _minibatch(cat_covs=False, cont_covs=False)
    m.eval()
    s = 3
    with torch.inference_mode():
        inf, gen = m(t, n_samples=s)
        assert inf["qz_m"].shape == (N_CELLS, 4)
        assert inf["z"].shape == (s, N_CELLS, 4)
        assert inf["library"].shape == (s, N_CELLS, 1)
        for key in ("back_m", "back_v", "log_background"):
            assert inf[key].shape == (s, N_CELLS, N_PROTEINS), key
        for key in ("px_scale", "px_rate", "zi_logits"):
            assert gen[key].shape == (s, N_CELLS, N_GENES), key
        for key in ("rate_back", "rate_fore", "mixing", "protein_scale"):
            assert gen[key].shape == (s, N_CELLS, N_PROTEINS), key
        torch.testing.assert_close(gen["px_scale"].sum(-1), torch.ones(s, N_CELLS))
        torch.testing.assert_close(gen["px_rate"], gen["px_scale"] * t["X"].sum(-1, keepdim=True))
        assert (gen["rate_fore"] >= gen["rate_back"]).all()  # alpha = 1 + ReLU + 1e-8
        torch.testing.assert_close(gen["rate_back"], torch.exp(inf["log_background"]))
        fg = m.protein_foreground_probability(gen["mixing"])
        torch.testing.assert_close(fg, 1 - torch.sigmoid(gen["mixing"]))
        torch.testing.assert_close(gen["protein_scale"], gen["rate_fore"] * fg)
        assert m.rna_log_likelihood(t["X"], gen).shape == (s, N_CELLS)

        # one draw: the sparse summed RNA likelihood equals the elementwise one
        inf1, gen1 = m(t)
        one = m.rna_log_likelihood(t["X"], gen1)
        stacked = m.rna_log_likelihood(t["X"], {k: v.unsqueeze(0) if v.dim() > 1 else v for k, v in gen1.items()})
        torch.testing.assert_close(one, stacked[0], rtol=1e-5, atol=1e-3)

        # transform_batch: the decoder and the background posterior see the new batch
        gen_b = m.generative(inf1["z"], inf1["library"], t, transform_batch=1)
        assert {"back_m", "back_v"} <= set(gen_b)
        _, back_v = m._background_posterior(*m._decoder_input(inf1["z"], t, torch.ones_like(t["batch"])))
        torch.testing.assert_close(gen_b["back_v"], back_v)
        torch.testing.assert_close(m.expression(inf1["z"], None, t, transform_batch=1), gen_b["px_scale"])
