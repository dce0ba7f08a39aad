"""trVAE: the MMD against its closed form, the model, pp.trvae, reference mapping, bad input."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import assert_unchanged, grown_columns_only, make_adata, snapshot

import scanpy_scvi as ss
from scanpy_scvi.data import epoch_minibatches
from scanpy_scvi.model import query_model
from scanpy_scvi.nn import ConditionalVAE, mmd_between_conditions
from scanpy_scvi.nn._trvae import MMD_BANDWIDTHS

SMALL = {"hidden_layer_sizes": (32, 16), "n_latent": 4}


# -- the MMD ------------------------------------------------------------------------------------------
def _kernel_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean multi-scale RBF kernel between two sets, written the slow way (scArches' formula)."""
    total = torch.zeros((), dtype=torch.float64)
    for x in a:
        for y in b:
            d = ((x - y) ** 2).sum()
            total += sum(math.exp(-float(d) / (2 * s)) for s in MMD_BANDWIDTHS)
    return total / (len(a) * len(b))


def _mmd_by_partition(h, c, n_conditions, boundary=None):
    parts = [h[c == k] for k in range(n_conditions)]
    loss = torch.zeros((), dtype=torch.float64)

    def mmd(a, b):
        return _kernel_sum(a, a) + _kernel_sum(b, b) - 2 * _kernel_sum(a, b)

    if boundary is None:
        for i in range(n_conditions):
            for j in range(i):
                if len(parts[i]) and len(parts[j]):
                    loss += mmd(parts[i], parts[j])
    else:
        for i in range(boundary):
            for j in range(boundary, n_conditions):
                if len(parts[i]) >= 2 and len(parts[j]) >= 2:
                    loss += mmd(parts[i], parts[j])
    return loss


def test_mmd_of_two_points_is_the_closed_form():
    h = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)  # squared distance 25
    expected = 2 * len(MMD_BANDWIDTHS) - 2 * sum(math.exp(-25 / (2 * s)) for s in MMD_BANDWIDTHS)
    assert float(mmd_between_conditions(h, torch.tensor([0, 1]), 2)) == pytest.approx(expected, rel=1e-12)
    # one condition only, or identical sets: no discrepancy
    assert float(mmd_between_conditions(h, torch.tensor([1, 1]), 2)) == 0.0
    same = torch.cat([h, h])
    assert float(mmd_between_conditions(same, torch.tensor([0, 0, 1, 1]), 2)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("boundary", [None, 2])
def test_mmd_matches_the_per_condition_sum(boundary):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(23, 3, generator=gen, dtype=torch.float64)
    c = torch.tensor([0] * 6 + [1] * 1 + [2] * 9 + [3] * 7)  # condition 1 has one cell, 4 is absent
    got = mmd_between_conditions(h, c, 5, boundary)
    np.testing.assert_allclose(float(got), float(_mmd_by_partition(h, c, 5, boundary)), rtol=1e-10)


def test_module_structure_follows_scarches():
    """Conditions enter only the first encoder and decoder layers, through bias-free weights."""
    m = ConditionalVAE(50, n_batch=3, hidden_layer_sizes=(64, 16), n_latent=4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["encoder.condition.weight"] == (64, 3) and shapes["decoder.condition.weight"] == (16, 3)
    assert "encoder.first.bias" in shapes and "decoder.first.bias" not in shapes  # decoder layers: no bias
    assert shapes["log_theta"] == (50, 3)  # dispersion per gene and condition
    assert sum("condition" in k for k in shapes) == 2
    single = ConditionalVAE(50, n_batch=1, hidden_layer_sizes=(8,), n_latent=2)
    assert tuple(single.encoder.condition.weight.shape) == (8, 0)


# -- the model and pp.trvae ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    data = make_adata(n_obs=300, n_batches=3)
    model = ss.pp.trvae(data, condition_key="batch", use_highly_variable_genes=False, max_epochs=12,
                        return_model=True, progress_bar=False, **SMALL)  # fmt: skip
    return data, model


def test_pp_trvae_writes_its_outputs(fitted):
    data, model = fitted
    assert data.obsm["X_trvae"].shape == (data.n_obs, 4) and data.obsm["X_trvae"].dtype == np.float32
    rec = data.uns["trvae"]
    assert rec["params"]["batch_key"] == "batch" and rec["params"]["hidden_layer_sizes"] == [32, 16]
    assert rec["params"]["weight_decay"] == 0.04 and rec["params"]["balanced_sampling"] is True
    assert {"elbo_train", "elbo_validation", "mmd_train", "mmd_validation", "lr"} <= set(rec["history"])
    assert np.all(np.asarray(rec["history"]["mmd_train"]) > 0)
    np.testing.assert_array_equal(data.obsm["X_trvae"], model.get_latent_representation())


def test_random_state_reproduces_bit_for_bit():
    a, b = make_adata(n_obs=120, n_batches=2), make_adata(n_obs=120, n_batches=2)
    for x in (a, b):
        ss.pp.trvae(x, batch_key="batch", use_highly_variable_genes=False, max_epochs=3, progress_bar=False, **SMALL)
    np.testing.assert_array_equal(a.obsm["X_trvae"], b.obsm["X_trvae"])


def test_the_mmd_pulls_the_conditions_together():
    """Same data, same seed: the latent conditions are closer (MMD of the posterior means) with the
    penalty than without it."""
    data = make_adata(n_obs=300, n_batches=2)
    mmd = {}
    for use_mmd in (False, True):
        model = ss.TRVAE(data, batch_key="batch", use_mmd=use_mmd, beta=10.0, **SMALL)
        model.train(max_epochs=25, progress_bar=False, early_stopping=False)
        z = torch.as_tensor(model.get_latent_representation(), dtype=torch.float64)
        codes = torch.as_tensor(data.obs["batch"].cat.codes.to_numpy().copy(), dtype=torch.int64)
        mmd[use_mmd] = float(mmd_between_conditions(z, codes, 2))
    assert mmd[True] < 0.5 * mmd[False], mmd


def test_balanced_sampling_draws_every_condition_equally_often():
    cells = np.arange(1000)
    condition = (cells >= 900).astype(int)  # 900 vs 100 cells
    weights = 1.0 / np.bincount(condition)[condition]
    batches = epoch_minibatches(cells, np.random.default_rng(0), 100, weights=weights / weights.sum())
    drawn = np.concatenate(batches)
    assert len(drawn) == 1000
    assert 0.45 < np.mean(condition[drawn]) < 0.55  # a plain epoch would give 0.10
    on_disk = np.concatenate(
        epoch_minibatches(cells, np.random.default_rng(0), 100, weights=weights / weights.sum(), blocks=True)
    )
    assert np.array_equal(np.sort(on_disk), np.sort(drawn))  # the same draw, read by blocks


def test_get_y_is_the_first_decoder_layer(fitted):
    data, model = fitted
    y = model.get_y()
    assert y.shape == (data.n_obs, 16) and np.all(y >= 0)  # after the ReLU


def test_count_methods_and_de_work(fitted):
    data, model = fitted
    expr = model.get_normalized_expression(library_size=1e4, transform_batch="batch_0")
    np.testing.assert_allclose(expr.to_numpy().sum(1), 1e4, rtol=1e-4)
    assert model.posterior_predictive_sample().shape == (data.n_obs, data.n_vars)
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=5))
    de = ss.tl.differential_expression(data, groupby="labels", model=model, n_samples=200, inplace=False)
    assert len(de) == 3 * data.n_vars and np.all(np.isfinite(de["lfc_mean"]))


def test_save_load_and_h5ad_round_trip(fitted, tmp_path):
    data, model = fitted
    model.save(tmp_path / "m")
    loaded = ss.TRVAE.load(tmp_path / "m", adata=data)
    assert loaded.architecture == model.architecture
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    data.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    again = ss.TRVAE.from_anndata(back)
    np.testing.assert_array_equal(again.get_latent_representation(), model.get_latent_representation())


def test_mse_reconstructs_log_normalised_values():
    import scanpy as sc

    data = make_adata(n_obs=150, n_batches=2)
    data.layers["log"] = data.X.copy()
    sc.pp.normalize_total(data, layer="log")
    sc.pp.log1p(data, layer="log")
    model = ss.TRVAE(data, batch_key="batch", layer="log", gene_likelihood="mse", **SMALL)
    model.train(max_epochs=5, progress_bar=False)
    assert model.history_["elbo_train"][-1] < model.history_["elbo_train"][0]
    assert model.get_normalized_expression().shape == (data.n_obs, data.n_vars)
    for call in (model.posterior_predictive_sample, lambda: model.get_normalized_expression(library_size=1e4)):
        with pytest.raises(ValueError, match="count likelihood"):
            call()


# -- bad input ---------------------------------------------------------------------------------------------
def test_bad_input_raises_and_leaves_adata_unchanged():
    data = make_adata(n_obs=60)
    snap = snapshot(data)
    with pytest.raises(ValueError, match="disagree"):
        ss.pp.trvae(data, condition_key="batch", batch_key="labels", use_highly_variable_genes=False)
    with pytest.raises(KeyError, match="nope"):
        ss.pp.trvae(data, condition_key="nope", use_highly_variable_genes=False)
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        ss.pp.trvae(data, condition_key="batch", use_highly_variable_genes=False, hidden_layer_sizes=(0,))
    with pytest.raises(ValueError, match="mmd_boundary"):
        ss.pp.trvae(data, condition_key="batch", use_highly_variable_genes=False, mmd_boundary=0)
    assert_unchanged(data, snap)
    bad = data.copy()
    bad.X = bad.X.toarray()
    bad.X[0, 0] = -1
    snap = snapshot(bad)
    with pytest.raises(ValueError, match="negative"):
        ss.pp.trvae(bad, condition_key="batch", use_highly_variable_genes=False)
    assert_unchanged(bad, snap)


# -- reference mapping ------------------------------------------------------------------------------------
def test_map_query_trains_only_the_new_condition():
    data = make_adata(n_obs=400, n_batches=4)
    is_query = (data.obs["batch"] == "batch_3").to_numpy()
    ref, query = data[~is_query].copy(), data[is_query].copy()
    ref.obs["batch"] = ref.obs["batch"].cat.remove_unused_categories()
    model = ss.TRVAE(ref, batch_key="batch", **SMALL)
    model.train(max_epochs=8, progress_bar=False)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    initial = query_model(model, query)[0].module.state_dict()  # the query model before training
    qm = ss.tl.map_query(query, model, max_epochs=10, progress_bar=False)
    assert isinstance(qm, ss.TRVAE) and qm.architecture.dropout_rate == 0.0  # scArches removes dropout
    assert query.obsm["X_trvae"].shape == (query.n_obs, 4)
    after = qm.module.state_dict()
    grown = grown_columns_only(before, after)
    assert grown == ["decoder.condition.weight", "encoder.condition.weight", "log_theta"]
    for k in grown:
        assert not torch.equal(after[k][:, -1], initial[k][:, -1]), f"{k}: the new column did not learn"
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k])  # the reference model itself is untouched
