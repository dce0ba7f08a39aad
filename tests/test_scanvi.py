"""scANVI: the module's loss, the model object, from_scvi_model, predict and pp.scanvi."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MODEL, assert_unchanged, make_adata, snapshot

import scanpy_scvi as ss
from scanpy_scvi import SCANVI, SCVI
from scanpy_scvi.model._scanvi import SemiSupervisedObjective
from scanpy_scvi.nn._scanvae import SCANVAE

UNL = "Unknown"


def semi_labelled(adata, frac_unlabelled: float = 0.7, seed: int = 0):
    """Copy labels to obs['cell_type'] and hide a fraction of them; truth in obs['truth']."""
    adata.obs["truth"] = adata.obs["labels"].astype(str)
    hide = np.random.default_rng(seed).random(adata.n_obs) < frac_unlabelled
    adata.obs["cell_type"] = np.where(hide, UNL, adata.obs["truth"])
    return hide


@pytest.fixture(scope="module")
def scanvi_fit():
    adata = make_adata(n_obs=400)
    hide = semi_labelled(adata)
    model = SCANVI(adata, labels_key="cell_type", unlabeled_category=UNL, batch_key="batch", **SMALL_MODEL)
    model.train(max_epochs=25, progress_bar=False)
    return adata, hide, model


def test_unlabelled_category_is_not_a_class(scanvi_fit):
    _adata, hide, model = scanvi_fit
    assert model.setup.label_categories == ["label_0", "label_1", "label_2"]
    assert model.module.n_labels == 3
    codes = model._bound.source.obs["labels"]
    assert np.all(codes[hide] == 3) and np.all(codes[~hide] < 3)


def test_transfers_labels_to_unlabelled_cells(scanvi_fit):
    adata, hide, model = scanvi_fit
    pred = model.predict()
    assert (pred[hide] == adata.obs["truth"].to_numpy()[hide]).mean() > 0.9
    assert model.history["accuracy_train"].iloc[-1, 0] > 0.9
    assert "classification_loss_validation" in model.history_


def test_predict_soft_is_a_distribution_over_known_labels(scanvi_fit):
    adata, _, model = scanvi_fit
    soft = model.predict(soft=True)
    assert list(soft.columns) == ["label_0", "label_1", "label_2"]
    assert soft.index.equals(adata.obs_names)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(soft.to_numpy().argmax(1), pd.Index(soft.columns).get_indexer(model.predict()))
    sub = model.predict(indices=[3, 1], soft=True)
    assert list(sub.index) == [adata.obs_names[3], adata.obs_names[1]]


def test_labelled_and_unlabelled_are_split_separately(scanvi_fit):
    _, hide, model = scanvi_fit
    val = model.validation_indices
    n_lab, n_unl = int((~hide).sum()), int(hide.sum())
    assert int((~hide[val]).sum()) == n_lab - int(np.ceil(0.9 * n_lab))
    assert int(hide[val].sum()) == n_unl - int(np.ceil(0.9 * n_unl))


def test_classification_loss_is_cross_entropy_of_known_labels_only():
    torch.manual_seed(0)
    module = SCANVAE(20, n_labels=3, n_hidden=16, n_latent=4).eval()
    x = torch.poisson(torch.full((6, 20), 3.0)) + 1
    labels = torch.tensor([0, 1, 2, 3, 3, 1])  # code 3 = unlabelled
    t = {"X": x, "batch": torch.zeros(6, dtype=torch.long), "labels": labels}
    out = module.classification(t)
    known = labels < 3
    expected = F.cross_entropy(module.classify({k: v[known] for k, v in t.items()}), labels[known])
    assert out["n_labelled"] == 4
    torch.testing.assert_close(out["classification_loss"], expected)
    torch.manual_seed(1)
    base = module.loss(t)
    torch.manual_seed(1)
    with_ce = SemiSupervisedObjective(np.arange(0), classification_ratio=10.0).evaluate(module, t, kl_weight=1.0)
    torch.testing.assert_close(with_ce.loss, base["loss"] + 10.0 * expected)
    assert with_ce.extra["classification_loss"] == pytest.approx((expected.item() * 4, 4))


def test_label_kl_vanishes_for_a_uniform_classifier():
    """KL(q(y|z) || uniform) is the only label term: zero when the classifier is uniform."""
    torch.manual_seed(0)
    module = SCANVAE(20, n_labels=4, n_hidden=16, n_latent=4, linear_classifier=True).eval()
    with torch.no_grad():
        module.classifier.logits.weight.zero_()
        module.classifier.logits.bias.zero_()
    x = torch.poisson(torch.full((5, 20), 3.0)) + 1
    t = {"X": x, "batch": torch.zeros(5, dtype=torch.long), "labels": torch.zeros(5, dtype=torch.long)}
    torch.manual_seed(3)
    out = module.loss(t)
    # recompute E_y[KL(q(u | z, y) || N(0, I))] with the same draws
    torch.manual_seed(3)
    inf = module.inference(t)
    z = inf["z"].repeat(4, 1)
    y = torch.eye(4).repeat_interleave(5, dim=0)
    m, v = module.u_encoder(z, y)
    kl_u = (0.5 * (v + m**2 - 1 - torch.log(v))).sum(-1).view(4, 5).mean(0)
    torch.testing.assert_close(out["kl_z"], kl_u)


def test_from_scvi_model_copies_weights_and_trains_briefly(base_adata):
    adata = base_adata.copy()
    semi_labelled(adata)
    vae = SCVI(adata, batch_key="batch", **SMALL_MODEL)
    vae.train(max_epochs=5, progress_bar=False)
    model = SCANVI.from_scvi_model(vae, labels_key="cell_type", unlabeled_category=UNL)
    for name, tensor in vae.module.state_dict().items():
        assert torch.equal(model.module.state_dict()[name], tensor), name
    assert model.setup.genes == vae.setup.genes and model.setup.batch_categories == vae.setup.batch_categories
    # heuristic 400 epochs for 300 cells -> min(10, max(2, round(400 / 3))) = 10
    assert model.default_max_epochs(adata.n_obs) == 10
    model.train(progress_bar=False)
    assert len(model.history_["elbo_train"]) == 10
    with pytest.raises(ValueError, match="not trained"):
        SCANVI.from_scvi_model(SCVI(adata), labels_key="cell_type", unlabeled_category=UNL)


def test_reproducible_with_random_state(base_adata):
    adata = base_adata.copy()
    semi_labelled(adata)
    latents = []
    for _ in range(2):
        m = SCANVI(adata, labels_key="cell_type", unlabeled_category=UNL, **SMALL_MODEL)
        m.train(max_epochs=3, progress_bar=False)
        latents.append(m.get_latent_representation())
    np.testing.assert_array_equal(*latents)


def test_save_load_keeps_class_and_predictions(scanvi_fit, tmp_path):
    adata, _, model = scanvi_fit
    model.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", adata=adata, device="cpu")
    assert type(loaded) is SCANVI
    np.testing.assert_array_equal(loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy())


def test_scanvi_load_refuses_an_scvi_model(tmp_path):
    vae = SCVI(make_adata(n_obs=50), **SMALL_MODEL)
    vae.save(tmp_path / "v")
    with pytest.raises(ValueError, match="'SCVI' model, not SCANVI"):
        SCANVI.load(tmp_path / "v")


def test_predict_on_new_data_without_labels_column(scanvi_fit):
    adata, _, model = scanvi_fit
    other = adata.copy()
    del other.obs["cell_type"]
    np.testing.assert_array_equal(model.predict(other), model.predict())


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("one known label", ValueError, "at least 2"),
        ("NaN label", ValueError, "missing values"),
        ("no column", KeyError, "not found"),
    ],
)
def test_bad_labels_raise_and_leave_adata_unchanged(base_adata, case, error, match):
    adata = base_adata.copy()
    semi_labelled(adata)
    labels = adata.obs["cell_type"].to_numpy().astype(object)
    if case == "one known label":
        adata.obs["cell_type"] = np.where(labels == UNL, UNL, "only")
    elif case == "NaN label":
        labels[0] = np.nan
        adata.obs["cell_type"] = labels
    snap = snapshot(adata)
    key = "no_such_column" if case == "no column" else "cell_type"
    with pytest.raises(error, match=match):
        ss.pp.scanvi(adata, labels_key=key, unlabeled_category=UNL, use_highly_variable_genes=False, progress_bar=False)
    assert_unchanged(adata, snap)


def test_gene_label_dispersion_is_refused(base_adata):
    adata = base_adata.copy()
    semi_labelled(adata)
    with pytest.raises(ValueError, match="gene-label"):
        SCANVI(adata, labels_key="cell_type", unlabeled_category=UNL, dispersion="gene-label")


def test_pp_scanvi_writes_outputs_and_survives_h5ad(base_adata, tmp_path):
    adata = base_adata.copy()
    hide = semi_labelled(adata)
    model = ss.pp.scanvi(
        adata, labels_key="cell_type", unlabeled_category=UNL, batch_key="batch", use_highly_variable_genes=False,
        max_epochs=20, n_hidden=32, n_latent=5, return_model=True, progress_bar=False,
    )  # fmt: skip
    assert adata.obsm["X_scanvi"].shape == (adata.n_obs, 5)
    pred = adata.obs["cell_type_scanvi_pred"]
    assert isinstance(pred.dtype, pd.CategoricalDtype) and list(pred.cat.categories) == [
        "label_0",
        "label_1",
        "label_2",
    ]
    assert (pred.astype(str).to_numpy()[hide] == adata.obs["truth"].to_numpy()[hide]).mean() > 0.9
    proba = adata.obs["cell_type_scanvi_proba"].to_numpy()
    np.testing.assert_allclose(proba, model.predict(soft=True).max(1).to_numpy(), rtol=1e-6)
    params = adata.uns["scanvi"]["params"]
    assert params["labels_key"] == "cell_type" and params["unlabeled_category"] == UNL
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    back = SCVI.from_anndata(ad.read_h5ad(path), key="scanvi", device="cpu")
    assert type(back) is SCANVI
    np.testing.assert_array_equal(back.predict(), model.predict())


def test_pp_scanvi_from_stored_scvi_model(base_adata):
    adata = base_adata.copy()
    semi_labelled(adata)
    ss.pp.scvi(
        adata,
        batch_key="batch",
        use_highly_variable_genes=False,
        n_epochs=5,
        n_hidden=32,
        n_latent=5,
        progress_bar=False,
    )
    out = ss.pp.scanvi(
        adata, labels_key="cell_type", unlabeled_category=UNL, scvi_model="scvi", copy=True, progress_bar=False
    )
    assert out.uns["scanvi"]["params"]["from_scvi_model"] is True
    assert out.uns["scanvi"]["params"]["max_epochs"] == 10
    assert "X_scanvi" in out.obsm and "X_scanvi" not in adata.obsm
