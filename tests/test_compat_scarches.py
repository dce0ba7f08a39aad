"""The scArches door: scArches 0.6.1's methods and arguments, its tutorials' calls (trVAE, scPoli,
expiMap surgery pipelines), each against our own API's values."""

from __future__ import annotations

import inspect
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_unchanged, grown_columns_only, make_adata, snapshot

import scanpy_scvi as ss
from scanpy_scvi.compat import scarches as sca

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# The ``Methods`` lists of scArches' API page (shared/reference/api/scarches-0.6_models.txt)
METHODS = {
    "TRVAE": ["get_latent", "get_y", "load", "load_query_data", "save", "train"],
    "EXPIMAP": [
        "get_latent", "get_y", "latent_directions", "latent_enrich", "load", "load_query_data", "mask_genes",
        "nonzero_terms", "save", "term_genes", "train", "update_terms",
    ],
    "scPoli": [
        "add_new_cell_type", "classify", "get_conditional_embeddings", "get_latent", "get_prototypes_info", "load",
        "load_query_data", "save", "train", "get_recon_loss", "shot_surgery",
    ],
}  # fmt: skip

# Parameter names, in order, and defaults of the signatures on that page
SIGNATURES = {
    ("TRVAE", "__init__"): {
        "adata": None, "condition_key": None, "conditions": None, "hidden_layer_sizes": [256, 64], "latent_dim": 10,
        "dr_rate": 0.05, "use_mmd": True, "mmd_on": "z", "mmd_boundary": None, "recon_loss": "nb", "beta": 1,
        "use_bn": False, "use_ln": True,
    },
    ("TRVAE", "train"): {"n_epochs": 400, "lr": 0.001, "eps": 0.01},
    ("TRVAE", "get_latent"): {"x": None, "c": None, "mean": False, "mean_var": False},
    ("TRVAE", "get_y"): {"x": None, "c": None},
    ("TRVAE", "load"): {"dir_path": None, "adata": None, "map_location": None},
    ("TRVAE", "save"): {"dir_path": None, "overwrite": False, "save_anndata": False},
    ("TRVAE", "load_query_data"): {"adata": None, "reference_model": None, "freeze": True, "freeze_expression": True,
                                   "remove_dropout": True},
    ("EXPIMAP", "__init__"): {
        "adata": None, "condition_key": None, "conditions": None, "hidden_layer_sizes": [256, 256], "dr_rate": 0.05,
        "recon_loss": "nb", "use_l_encoder": False, "use_bn": False, "use_ln": True, "mask": None, "mask_key": "I",
        "decoder_last_layer": None, "soft_mask": False, "n_ext": 0, "n_ext_m": 0, "use_hsic": False,
        "hsic_one_vs_all": False, "ext_mask": None, "soft_ext_mask": False,
    },
    ("EXPIMAP", "train"): {"n_epochs": 400, "lr": 0.001, "eps": 0.01, "alpha": None, "omega": None},
    ("EXPIMAP", "get_latent"): {"x": None, "c": None, "only_active": False, "mean": False, "mean_var": False},
    ("EXPIMAP", "latent_directions"): {"method": "sum", "get_confidence": False, "adata": None,
                                       "key_added": "directions"},
    ("EXPIMAP", "latent_enrich"): {
        "groups": None, "comparison": "rest", "n_sample": 5000, "use_directions": False,
        "directions_key": "directions", "select_terms": None, "adata": None, "exact": True, "key_added": "bf_scores",
    },
    ("EXPIMAP", "load_query_data"): {
        "adata": None, "reference_model": None, "freeze": True, "freeze_expression": True, "unfreeze_ext": True,
        "remove_dropout": True, "new_n_ext": None, "new_n_ext_m": None, "new_ext_mask": None,
        "new_soft_ext_mask": False,
    },
    ("EXPIMAP", "mask_genes"): {"terms": "terms"},
    ("EXPIMAP", "term_genes"): {"term": None, "terms": "terms"},
    ("EXPIMAP", "update_terms"): {"terms": "terms", "adata": None},
    ("scPoli", "__init__"): {
        "adata": None, "share_metadata": True, "obs_metadata": None, "condition_keys": None, "conditions": None,
        "conditions_combined": None, "inject_condition": ["encoder", "decoder"], "cell_type_keys": None,
        "cell_types": None, "unknown_ct_names": None, "labeled_indices": None, "prototypes_labeled": None,
        "prototypes_unlabeled": None, "hidden_layer_sizes": None, "latent_dim": 10, "embedding_dims": 10,
        "embedding_max_norm": 1.0, "dr_rate": 0.05, "use_mmd": False, "mmd_on": "z", "mmd_boundary": None,
        "recon_loss": "nb", "beta": 1, "use_bn": False, "use_ln": True,
    },
    ("scPoli", "train"): {
        "n_epochs": 100, "pretraining_epochs": None, "eta": 1, "lr": 0.001, "eps": 0.01, "alpha_epoch_anneal": 100.0,
        "reload_best": None, "prototype_training": True, "unlabeled_prototype_training": True,
    },  # reload_best: scArches' False, which here means "the default" (see the docs page)
    ("scPoli", "add_new_cell_type"): {"cell_type_name": None, "obs_key": None, "prototypes": None, "x": None,
                                      "c": None},
    ("scPoli", "classify"): {"adata": None, "prototype": False, "p": 2, "get_prob": False, "log_distance": True,
                             "scale_uncertainties": False},
    ("scPoli", "get_latent"): {"adata": None, "mean": False},
    ("scPoli", "get_prototypes_info"): {"prototype_set": "labeled"},
    ("scPoli", "get_recon_loss"): {"adata": None, "batch_size": 128, "condition_encoders": None,
                                   "conditions_combined_encoder": None},
    ("scPoli", "load_query_data"): {
        "adata": None, "reference_model": None, "labeled_indices": None, "unknown_ct_names": None, "freeze": True,
        "freeze_expression": True, "remove_dropout": True, "return_new_conditions": False, "map_location": None,
    },
    ("scPoli", "shot_surgery"): {
        "adata": None, "reference_model": None, "labeled_indices": None, "unknown_ct_names": None,
        "train_epochs": 0, "batch_size": 128, "subsample": 1.0, "force_cuda": True,
    },
}  # fmt: skip

# the tutorials' early stopping (trVAE and expiMap; scPoli watches its prototype loss)
EARLY = {"early_stopping_metric": "val_unweighted_loss", "threshold": 0, "patience": 20, "reduce_lr": True,
         "lr_patience": 13, "lr_factor": 0.1}  # fmt: skip
EARLY_PROTOTYPES = {**EARLY, "early_stopping_metric": "val_prototype_loss", "mode": "min"}


def _door(name: str):
    return getattr(sca.models, name)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_of_the_api_page_is_the_doors_own(name):
    door = _door(name)
    for method in METHODS[name]:
        func = getattr(door, method)
        assert callable(func), method
        assert func.__module__.startswith("scanpy_scvi.compat.scarches"), f"{method} is not the door's"


@pytest.mark.parametrize(("name", "method"), list(SIGNATURES))
def test_signatures_have_scarches_names_order_and_defaults(name, method):
    params = [p for p in inspect.signature(getattr(_door(name), method)).parameters.values()
              if p.name not in ("self", "cls") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]  # fmt: skip
    expected = SIGNATURES[(name, method)]
    assert [p.name for p in params[: len(expected)]] == list(expected)
    for p in params[: len(expected)]:
        default = p.default if not isinstance(p.default, tuple) else list(p.default)
        assert default == expected[p.name] or (p.default is p.empty and expected[p.name] is None), p.name


def test_scpoli_is_our_class_under_scarches_spelling():
    assert sca.models.scPoli is sca.models.SCPOLI and issubclass(sca.models.scPoli, ss.SCPOLI)
    assert issubclass(sca.models.TRVAE, ss.TRVAE) and issubclass(sca.models.EXPIMAP, ss.EXPIMAP)
    assert sca.models.TRVAE not in ss.model.BaseModel._classes.values()  # model files name our classes


# -- trVAE: the surgery pipeline tutorial ---------------------------------------------------------
def _pancreas_like():
    """Three studies; the last is the query (the tutorial's two target studies)."""
    adata = make_adata(n_obs=300, n_batches=3)
    target_conditions = ["batch_2"]
    source = adata[~adata.obs["batch"].isin(target_conditions)]  # views, as in the tutorial
    target = adata[adata.obs["batch"].isin(target_conditions)]
    return adata, source, target


@pytest.fixture(scope="module")
def trvae_run(tmp_path_factory):
    adata, source, target = _pancreas_like()
    source_conditions = source.obs["batch"].unique().tolist()
    trvae = sca.models.TRVAE(adata=source, condition_key="batch", conditions=source_conditions,
                             hidden_layer_sizes=[32, 32])  # fmt: skip
    trvae.train(n_epochs=8, alpha_epoch_anneal=4, early_stopping_kwargs=EARLY, monitor=False)
    reference_state = {k: v.clone() for k, v in trvae.module.state_dict().items()}
    ref_path = tmp_path_factory.mktemp("trvae") / "reference_model"
    trvae.save(str(ref_path), overwrite=True, save_anndata=True)
    new_trvae = sca.models.TRVAE.load_query_data(adata=target, reference_model=str(ref_path))
    new_trvae.train(n_epochs=5, alpha_epoch_anneal=4, early_stopping_kwargs=EARLY, weight_decay=0, monitor=False)
    return {"adata": adata, "source": source, "target": target, "conditions": source_conditions, "trvae": trvae,
            "reference_state": reference_state, "ref_path": ref_path, "query": new_trvae}  # fmt: skip


def test_trvae_is_ours_trained_with_the_mapped_arguments(trvae_run):
    """scArches' names and defaults (seed 2020, weight decay 0.04, early stopping after 20
    epochs, learning rate x0.1 after 13, stratified sampling) are our arguments: same weights
    bit for bit; the conditions keep the order given."""
    source, conditions = trvae_run["source"], trvae_run["conditions"]
    assert conditions != sorted(conditions)  # order of appearance: not our default order
    data = source.copy()
    data.obs["batch"] = pd.Categorical(data.obs["batch"].astype(str), categories=conditions)
    ours = ss.TRVAE(data, batch_key="batch", hidden_layer_sizes=(32, 32))
    ours.train(8, n_epochs_kl_warmup=4, lr_patience=13, random_state=2020, progress_bar=False)
    door = trvae_run["trvae"]
    assert door.conditions_ == conditions == ours.setup.batch_categories
    assert door.history_ == ours.history_
    for k, v in ours.module.state_dict().items():
        assert torch.equal(trvae_run["reference_state"][k], v), k


def test_trvae_get_latent_draws_and_its_mean_is_ours(trvae_run):
    trvae = trvae_run["trvae"]
    mean = trvae.get_latent(mean=True)
    np.testing.assert_array_equal(mean, trvae.get_latent_representation())
    m, v = trvae.get_latent(mean_var=True)
    ours_m, ours_v = trvae.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(m, ours_m)
    np.testing.assert_array_equal(v, ours_v)
    draw = trvae.get_latent()  # scArches' default: one draw of z per cell
    assert not np.allclose(draw, mean)
    standardised = (draw - m) / np.sqrt(v)  # N(0, 1) entries: 2000 of them
    assert abs(standardised.mean()) < 0.1 and 0.9 < standardised.std() < 1.1


def test_trvae_x_and_c_are_cells_of_any_anndata(trvae_run):
    adata, query = trvae_run["adata"], trvae_run["query"]
    full = query.get_latent(adata.X, adata.obs["batch"], mean=True)  # the tutorial's last call
    np.testing.assert_array_equal(full, query.get_latent_representation(adata))
    dense = query.get_latent(adata.X.toarray(), adata.obs["batch"].to_numpy(), mean=True)
    np.testing.assert_allclose(dense, full, atol=1e-5)  # dense counts: another matrix product
    with torch.random.fork_rng():
        torch.manual_seed(0)
        y = query.get_y(adata.X, adata.obs["batch"])
        torch.manual_seed(0)
        ours = ss.TRVAE.get_y(query, adata, give_mean=False)
    np.testing.assert_array_equal(y, ours)
    assert y.shape == (adata.n_obs, 32)
    with pytest.raises(ValueError, match="without c"):
        query.get_latent(adata.X)


def test_trvae_query_learns_only_its_new_condition(trvae_run):
    query, before = trvae_run["query"], trvae_run["reference_state"]
    assert isinstance(query, sca.models.TRVAE)
    assert query.conditions_ == [*trvae_run["conditions"], "batch_2"]
    assert query.architecture.dropout_rate == 0.0  # remove_dropout=True
    grown = grown_columns_only(before, query.module.state_dict())
    assert grown == ["decoder.condition.weight", "encoder.condition.weight", "log_theta"]
    # the path and the model give the same query model
    from_model = sca.models.TRVAE.load_query_data(trvae_run["target"], trvae_run["trvae"])
    from_path = sca.models.TRVAE.load_query_data(trvae_run["target"], str(trvae_run["ref_path"]))
    for k, v in from_model.module.state_dict().items():
        assert torch.equal(v, from_path.module.state_dict()[k]), k


def test_trvae_unfrozen_query_and_kept_dropout(trvae_run):
    target, trvae = trvae_run["target"], trvae_run["trvae"]
    loose = sca.models.TRVAE.load_query_data(target, trvae, freeze=False, remove_dropout=False)
    assert loose.architecture.dropout_rate == 0.05 and loose.trainable_masks is None
    assert all(p.requires_grad for p in loose.module.parameters())
    loose.train(n_epochs=1, monitor=False)
    assert not torch.equal(
        loose.module.state_dict()["encoder.first.weight"], trvae.module.state_dict()["encoder.first.weight"]
    )


def test_trvae_conditions_fix_the_codes_and_may_name_future_ones():
    _, source, target = _pancreas_like()
    source = source.copy()
    source.obs["batch"] = source.obs["batch"].cat.set_categories(["batch_0", "batch_1", "batch_2"])  # one unused
    plain = sca.models.TRVAE(source, "batch", hidden_layer_sizes=[8])
    assert plain.conditions_ == ["batch_0", "batch_1"]  # the values present: batch_2 stays new to a query
    listed = sca.models.TRVAE(source, "batch", ["batch_2", "batch_1", "batch_0"], hidden_layer_sizes=[8])
    assert listed.conditions_ == ["batch_2", "batch_1", "batch_0"] and listed.module.n_batch == 3
    listed.train(n_epochs=1, monitor=False)
    with pytest.warns(UserWarning, match="Every query condition is known"):
        query = sca.models.TRVAE.load_query_data(target, listed)
    assert query.conditions_ == listed.conditions_
    with pytest.raises(ValueError, match="lack values"):
        sca.models.TRVAE(source, "batch", ["batch_0"])


def test_trvae_files_are_ours(trvae_run):
    ref_path, trvae = trvae_run["ref_path"], trvae_run["trvae"]
    loaded = sca.models.TRVAE.load(str(ref_path), map_location="cpu")  # the AnnData saved with it
    assert isinstance(loaded, sca.models.TRVAE) and loaded.adata.n_obs == trvae_run["source"].n_obs
    np.testing.assert_array_equal(loaded.get_latent(mean=True), trvae.get_latent(mean=True))
    ours = ss.TRVAE.load(ref_path, adata=trvae_run["source"])
    assert type(ours) is ss.TRVAE
    np.testing.assert_array_equal(ours.get_latent_representation(), trvae.get_latent(mean=True))
    # our tools take the door: it is our model class
    query = trvae_run["target"].copy()
    mapped = ss.tl.map_query(query, trvae, max_epochs=1, progress_bar=False)
    assert isinstance(mapped, sca.models.TRVAE) and query.obsm["X_trvae"].shape == (query.n_obs, 10)


# -- scPoli: the surgery pipeline tutorial --------------------------------------------------------
@pytest.fixture(scope="module")
def scpoli_run():
    adata = make_adata(n_obs=300, n_batches=3)
    source_adata = adata[adata.obs["batch"].isin(["batch_0", "batch_1"])].copy()
    source_adata = source_adata[~source_adata.obs["labels"].str.contains("label_2")].copy()  # a type only the query has
    target_adata = adata[adata.obs["batch"].isin(["batch_2"])].copy()
    snap = snapshot(source_adata)
    scpoli_model = sca.models.scPoli(
        adata=source_adata, condition_keys="batch", cell_type_keys="labels", embedding_dims=3, recon_loss="nb",
        hidden_layer_sizes=[32], latent_dim=4,
    )  # fmt: skip
    assert_unchanged(source_adata, snap)  # scArches writes obs['conditions_combined']
    with pytest.warns(UserWarning, match="val_prototype_loss.*validation ELBO"):
        scpoli_model.train(n_epochs=10, pretraining_epochs=8, early_stopping_kwargs=EARLY_PROTOTYPES, eta=5,
                           monitor=False)  # fmt: skip
    reference_state = {k: v.clone() for k, v in scpoli_model.module.state_dict().items()}
    scpoli_query = sca.models.scPoli.load_query_data(adata=target_adata, reference_model=scpoli_model,
                                                     labeled_indices=[])  # fmt: skip
    scpoli_query.train(n_epochs=5, pretraining_epochs=4, eta=10, monitor=False)
    return {"source": source_adata, "target": target_adata, "model": scpoli_model, "state": reference_state,
            "query": scpoli_query}  # fmt: skip


def test_scpoli_is_ours_trained_with_the_mapped_arguments(scpoli_run):
    ours = ss.SCPOLI(scpoli_run["source"], condition_keys="batch", cell_type_keys="labels", embedding_dims=3,
                     hidden_layer_sizes=(32,), n_latent=4)  # fmt: skip
    ours.train(10, pretraining_epochs=8, eta=5, lr_patience=13, random_state=2020, progress_bar=False)
    assert scpoli_run["model"].history_ == ours.history_
    for k, v in ours.module.state_dict().items():
        assert torch.equal(scpoli_run["state"][k], v), k


def test_scpoli_classify_is_the_nearest_prototype(scpoli_run):
    model, source = scpoli_run["model"], scpoli_run["source"]
    assert isinstance(model.classify(), pd.DataFrame)  # without adata: ours, as tl.map_query calls it
    ours = ss.SCPOLI.classify(model, source)
    calls = model.classify(source)["labels"]
    np.testing.assert_array_equal(calls["preds"], ours["pred"].astype(str).to_numpy())
    np.testing.assert_allclose(calls["uncert"], ours["uncertainty"], rtol=1e-6)
    np.testing.assert_allclose(calls["weighted_distances"].min(1), calls["uncert"], rtol=1e-6)
    prob = model.classify(source, get_prob=True)["labels"]
    np.testing.assert_allclose(prob["weighted_distances"].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(prob["uncert"], ours["probability"], rtol=1e-5)
    scaled = model.classify(source, scale_uncertainties=True)["labels"]["uncert"]
    assert scaled.min() == 0.0 and scaled.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(np.argsort(scaled, kind="stable"), np.argsort(calls["uncert"], kind="stable"))


def test_scpoli_query_learns_only_its_new_embedding(scpoli_run):
    query, before = scpoli_run["query"], scpoli_run["state"]
    assert isinstance(query, sca.models.scPoli) and query.conditions_ == {"batch": ["batch_0", "batch_1", "batch_2"]}
    after = query.module.state_dict()
    for k, old in before.items():
        if after[k].shape == old.shape:
            assert torch.equal(after[k], old), k
        else:  # a row per condition (embeddings) or a column (dispersions): the reference's stay
            kept = after[k][: old.shape[0]] if after[k].shape[1] == old.shape[1] else after[k][:, : old.shape[1]]
            assert torch.equal(kept, old), k
    np.testing.assert_array_equal(query.get_latent(scpoli_run["target"], mean=True),
                                  query.get_latent_representation())  # fmt: skip
    results = query.classify(scpoli_run["target"], scale_uncertainties=True)["labels"]
    assert set(results["preds"]) <= {"label_0", "label_1"} and results["uncert"].max() == pytest.approx(1.0)


def test_scpoli_prototypes_info(scpoli_run):
    query = scpoli_run["query"]
    labeled = query.get_prototypes_info()
    assert list(labeled.obs["labels"]) == ["label_0", "label_1"]  # scArches 0.6.1 writes "0", "1"
    assert list(labeled.obs["labels_pred"]) == list(labeled.obs["labels"])  # each prototype is its own nearest
    np.testing.assert_allclose(labeled.obs["labels_uncert"], 0.0, atol=1e-5)
    assert set(labeled.obs["batch"]) == {"prototype-Set Labeled"}
    unlabeled = query.get_prototypes_info(prototype_set="unlabeled")
    np.testing.assert_array_equal(unlabeled.X, query.module.unlabeled_prototypes.cpu().numpy())
    assert list(unlabeled.obs["labels"]) == [str(i) for i in range(unlabeled.n_obs)]
    with pytest.raises(ValueError, match="prototype_set"):
        query.get_prototypes_info(prototype_set="l")


def test_scpoli_new_cell_type_and_embeddings(scpoli_run):
    query = sca.models.scPoli.load_query_data(scpoli_run["target"], scpoli_run["model"], labeled_indices=[])
    query.train(n_epochs=2, pretraining_epochs=1, monitor=False)  # the unlabelled prototypes: the query's clusters
    unlabeled = query.module.unlabeled_prototypes.clone()
    query.add_new_cell_type("label_2", "labels", [0, 1])  # the tutorial's call
    assert query.setup.label_categories == ["label_0", "label_1", "label_2"]
    assert torch.allclose(query.module.prototypes[2], unlabeled[[0, 1]].mean(0))
    assert "label_2" in set(
        query.classify(query.module.prototypes[2:].cpu().numpy(), prototype=True)["labels"]["preds"]
    )
    with pytest.raises(ValueError, match="obs_key"):
        query.add_new_cell_type("other", "batch", [0])
    emb = query.get_conditional_embeddings()
    assert list(emb.obs_names) == query.conditions_["batch"]
    np.testing.assert_array_equal(emb.X, ss.SCPOLI.get_conditional_embeddings(query).X)
    query.share_metadata = False
    assert query.get_conditional_embeddings().obs.shape[1] == 0


def test_scpoli_labelled_query_cells_bring_new_prototypes(scpoli_run):
    target, model = scpoli_run["target"], scpoli_run["model"]
    labelled = np.arange(target.n_obs)
    query, new = sca.models.scPoli.load_query_data(target, model, labeled_indices=labelled, return_new_conditions=True)
    assert new == {"batch": ["batch_2"]}
    assert query.setup.label_categories == ["label_0", "label_1", "label_2"]
    query = sca.models.scPoli.load_query_data(target, model, labeled_indices=labelled, unknown_ct_names=["label_2"])
    assert query.setup.label_categories == ["label_0", "label_1"]


def test_scpoli_recon_loss_and_shot_surgery(scpoli_run):
    target, model = scpoli_run["target"], scpoli_run["model"]
    query = sca.models.scPoli.load_query_data(target, model, labeled_indices=[])
    with query.seeded(0):
        loss = query.get_recon_loss(target)
    with query.seeded(0):
        ours = query.get_reconstruction_error(target, batch_size=128)["reconstruction_loss"]
    assert loss == pytest.approx(ours)
    losses = {}
    for old in ("batch_0", "batch_1"):  # the query's cells decoded as each reference condition
        as_old = target.copy()
        as_old.obs["batch"] = old
        with query.seeded(0):
            losses[old] = query.get_recon_loss(as_old)
    shot, mapping = sca.models.scPoli.shot_surgery(target, model, labeled_indices=[], force_cuda=False)
    assert mapping == {"batch_2": min(losses, key=losses.get)}
    table = shot.module.embeddings[0].weight
    code = shot.conditions_["batch"].index(mapping["batch_2"])
    assert torch.equal(table[2], table[code]) and torch.equal(
        shot.module.log_theta[:, 2], shot.module.log_theta[:, code]
    )


def test_scpoli_files_are_ours(scpoli_run, tmp_path):
    model = scpoli_run["model"]
    model.save(tmp_path / "m")
    assert type(ss.SCPOLI.load(tmp_path / "m")) is ss.SCPOLI
    loaded = sca.models.scPoli.load(tmp_path / "m", adata=scpoli_run["source"])
    assert isinstance(loaded, sca.models.scPoli)
    np.testing.assert_array_equal(loaded.get_latent(scpoli_run["source"], mean=True), model.get_latent_representation())


# -- expiMap ----------------------------------------------------------------------------------------
def _programs_file(adata, path, n=4, size=15, seed=0):
    rng = np.random.default_rng(seed)
    sets = {f"HALLMARK_P{k}": list(rng.choice(adata.var_names, size, replace=False)) for k in range(n)}
    path.write_text("".join(f"{name}\thttp://x\t" + "\t".join(genes) + "\n" for name, genes in sets.items()))
    return sets


@pytest.fixture(scope="module")
def expimap_run(tmp_path_factory):
    adata = make_adata(n_obs=300, n_batches=3)
    gmt = tmp_path_factory.mktemp("gmt") / "hallmark.gmt"
    sets = _programs_file(adata, gmt)
    sca.utils.add_annotations(adata, str(gmt), min_genes=12, clean=True)
    reference = adata[adata.obs["batch"] != "batch_2"].copy()
    query = adata[adata.obs["batch"] == "batch_2"].copy()
    intr_cvae = sca.models.EXPIMAP(adata=reference, condition_key="batch", hidden_layer_sizes=[32, 32],
                                   recon_loss="nb", soft_mask=True)  # fmt: skip
    intr_cvae.train(n_epochs=6, alpha_epoch_anneal=4, alpha=0.7, alpha_kl=0.5, alpha_l1=0.1, weight_decay=0.0,
                    early_stopping_kwargs=EARLY, use_early_stopping=True, monitor_only_val=False, seed=2020,
                    monitor=False)  # fmt: skip
    return {"adata": adata, "gmt": gmt, "sets": sets, "reference": reference, "query": query, "model": intr_cvae}


def test_add_annotations_is_add_gene_programs_with_scarches_defaults(expimap_run):
    adata, gmt = expimap_run["adata"], expimap_run["gmt"]
    ours = ss.tl.add_gene_programs(adata, gmt, min_genes=12, clean=True, copy=True)
    np.testing.assert_array_equal(adata.varm["I"], ours.varm["I"])
    assert adata.uns["terms"] == ["P0", "P1", "P2", "P3"]  # a list, as scArches writes it
    everything = adata.copy()
    sca.utils.add_annotations(everything, [str(gmt)], min_genes=14)  # more than 14 of 15: none
    with pytest.raises(ValueError, match="min_genes"):
        sca.utils.add_annotations(everything, str(gmt), min_genes=15)
    sca.utils.add_annotations(everything, str(gmt))  # scArches' defaults: min_genes=0, clean=True
    assert everything.uns["terms"] == ["P0", "P1", "P2", "P3"]


def test_expimap_is_ours_trained_with_the_mapped_arguments(expimap_run):
    ours = ss.EXPIMAP(expimap_run["reference"], batch_key="batch", hidden_layer_sizes=(32, 32), soft_mask=True)
    ours.train(6, alpha=0.7, alpha_l1=0.1, max_kl_weight=0.5, n_epochs_kl_warmup=4, weight_decay=0.0, lr_patience=13,
               random_state=2020, progress_bar=False)  # fmt: skip
    door = expimap_run["model"]
    assert door.history_ == ours.history_
    for k, v in ours.module.state_dict().items():
        assert torch.equal(door.module.state_dict()[k], v), k


def test_expimap_train_defaults_are_scarches(expimap_run):
    model = sca.models.EXPIMAP(expimap_run["reference"], condition_key="batch", hidden_layer_sizes=[8])
    model.train(n_epochs=2, monitor=False)
    c = model.train_config
    assert (c["max_kl_weight"], c["n_epochs_kl_warmup"], c["alpha"], c["weight_decay"]) == (0.35, 2, None, 0.04)
    assert (c["random_state"], c["early_stopping_patience"], c["lr_patience"], c["balanced_sampling"]) == (
        2020,
        20,
        13,
        True,
    )
    model.train(n_epochs=2, alpha_epoch_anneal=None, monitor=False)
    assert model.train_config["n_epochs_kl_warmup"] == 0  # scArches: None means no annealing


def test_expimap_directions_terms_and_masks(expimap_run):
    model, sets = expimap_run["model"], expimap_run["sets"]
    table = model.programs()
    data = expimap_run["reference"].copy()
    model.latent_directions(adata=data)
    np.testing.assert_array_equal(data.uns["directions"], table["direction"])
    model.latent_directions(method="counts", get_confidence=True, adata=data, key_added="counts")
    for k, name in enumerate(data.uns["terms"]):
        w = model.term_genes(name)["weights"].to_numpy()
        share = (w > 0).mean()
        assert data.uns["counts"][k] == (1.0 if share > 0.5 else -1.0 if share < 0.5 else 0.0)
        assert data.uns["counts_confindence"][k] == pytest.approx(abs(share - 0.5) / 0.5)
    np.testing.assert_array_equal(model.nonzero_terms(), table["active"])
    latent = model.get_latent(only_active=True, mean=True)
    np.testing.assert_array_equal(latent, model.get_latent_representation()[:, table["active"].to_numpy()])
    masks = model.mask_genes()
    assert {k: set(v) for k, v in masks.items()} == {k.removeprefix("HALLMARK_"): set(v) for k, v in sets.items()}
    pd.testing.assert_frame_equal(model.term_genes("P1"), ss.EXPIMAP.term_genes(model, "P1"))
    pd.testing.assert_frame_equal(model.term_genes(1), model.term_genes("P1"))
    assert model.get_y().shape == (data.n_obs, data.n_vars)  # the decoder's gene logits


def test_latent_enrich_writes_our_bayes_factors_as_scarches(expimap_run):
    model = expimap_run["model"]
    data = expimap_run["reference"].copy()
    model.latent_directions(adata=data)
    model.latent_enrich(groups="labels", comparison="label_0", use_directions=True, adata=data)
    scores = data.uns["bf_scores"]
    assert list(scores) == [g for g in pd.unique(data.obs["labels"].astype(str)) if g != "label_0"]
    ours = ss.tl.gene_program_enrichment(data, "labels", comparison="label_0", model=model, only_active=False,
                                         key_added="ours")  # fmt: skip
    for group, values in scores.items():
        expected = ours[ours["group"] == group].set_index("program").loc[model.program_names()]
        np.testing.assert_allclose(values["bf"], expected["bf"], rtol=1e-6)
        np.testing.assert_allclose(values["p_h0"] + values["p_h1"], 1.0)
    cells = {"a": list(data.obs_names[:40]), "b": list(data.obs_names[40:90])}
    model.latent_enrich(groups=cells, comparison="b", adata=data, select_terms=[0, 2], key_added="by_dict")
    assert list(data.uns["by_dict"]) == ["a"] and data.uns["by_dict"]["a"]["bf"].shape == (2,)


def test_expimap_query_with_extension_programs(expimap_run):
    query, model = expimap_run["query"], expimap_run["model"]
    new_mask = np.zeros((1, query.n_vars))
    new_mask[0, :20] = 1
    q = sca.models.EXPIMAP.load_query_data(query, model, new_n_ext=2, new_n_ext_m=1, new_ext_mask=new_mask,
                                           new_soft_ext_mask=True)  # fmt: skip
    q.train(
        n_epochs=3, alpha_epoch_anneal=3, weight_decay=0.0, alpha_kl=0.1, gamma_ext=0.1, alpha_l1=0.1, monitor=False
    )
    terms = ["P0", "P1", "P2", "P3", "constrained_0", "unconstrained_0", "unconstrained_1"]
    assert q.update_terms(list(query.uns["terms"])) == terms
    q.update_terms()
    assert q.adata.uns["terms"] == terms
    assert set(q.mask_genes()["constrained_0"]) == set(query.var_names[:20])
    genes = q.term_genes("constrained_0")
    assert set(genes["genes"][genes["in_mask"]]) <= set(query.var_names[:20])
    assert q.nonzero_terms()[4:].all()  # extension programs count as active (scArches)
    assert q.get_latent(query.X, query.obs["batch"], mean=True).shape == (query.n_obs, 7)


@pytest.mark.skipif(not (SHARED / "kang2018_ifnb_pbmc_2k.h5ad").is_file(), reason="real data not in ../shared")
def test_interferon_programs_top_the_stimulated_kang_cells():
    """The basic expiMap tutorial's calls on the Kang IFN-beta data, hallmark programs: in STIM vs
    CTRL enrichment (directions on) the interferon programs rank first."""
    import scanpy as sc

    kang = ad.read_h5ad(SHARED / "kang2018_ifnb_pbmc_2k.h5ad")
    sca.utils.add_annotations(kang, str(SHARED / "msigdb_h.all.v7.0.symbols.gmt"), min_genes=12, clean=True)
    kang._inplace_subset_var(kang.varm["I"].sum(1) > 0)
    sc.pp.highly_variable_genes(kang, flavor="seurat_v3", n_top_genes=800, subset=True)
    select_terms = kang.varm["I"].sum(0) > 12
    kang.uns["terms"] = np.array(kang.uns["terms"])[select_terms].tolist()
    kang.varm["I"] = kang.varm["I"][:, select_terms]
    kang._inplace_subset_var(kang.varm["I"].sum(1) > 0)
    kang.obs["study"] = "Kang"
    kang.obs["condition"] = kang.obs["batch"].astype(str)
    intr_cvae = sca.models.EXPIMAP(adata=kang, condition_key="study", hidden_layer_sizes=[64, 64], recon_loss="nb")
    intr_cvae.train(n_epochs=15, alpha_epoch_anneal=10, alpha=0.7, alpha_kl=0.5, weight_decay=0.0, monitor=False)
    intr_cvae.latent_directions(adata=kang)
    intr_cvae.latent_enrich(groups="condition", comparison="CTRL", use_directions=True, adata=kang)
    bf = kang.uns["bf_scores"]["STIM"]["bf"]
    ranked = [kang.uns["terms"][i] for i in np.argsort(-bf)]
    assert ranked[0] == "INTERFERON_ALPHA_RESPONSE", ranked[:5]
    assert set(ranked[:2]) == {"INTERFERON_ALPHA_RESPONSE", "INTERFERON_GAMMA_RESPONSE"}, ranked[:5]
    assert bf.max() > 2.0


# -- arguments without a meaning here ---------------------------------------------------------------
def _scpoli_data():
    return make_adata(n_obs=60, n_batches=2)


FOREIGN = [
    ("EXPIMAP", {"use_l_encoder": True}, "use_l_encoder"),
    ("EXPIMAP", {"hsic_one_vs_all": True}, "hsic_one_vs_all"),
    ("EXPIMAP", {"n_ext_m": 2}, "load_query_data"),
    ("EXPIMAP", {"decoder_last_layer": "exp"}, "decoder_last_layer"),
    ("EXPIMAP", {"recon_loss": "zinb"}, "recon_loss"),
    ("TRVAE", {"recon_loss": "bernoulli"}, "recon_loss"),
    ("scPoli", {"obs_metadata": pd.DataFrame()}, "obs_metadata"),
    ("scPoli", {"prototypes_labeled": {"mean": None}}, "prototypes_labeled"),
    ("scPoli", {"embedding_dims": [3, 4]}, "embedding_dims"),
    ("scPoli", {"inject_condition": []}, "inject_condition"),
]


@pytest.mark.parametrize(("name", "kwargs", "match"), FOREIGN, ids=[f[2] for f in FOREIGN])
def test_constructor_arguments_without_meaning_raise_and_leave_adata_unchanged(name, kwargs, match):
    data = _scpoli_data()
    ss.tl.add_gene_programs(data, {"A": list(data.var_names[:15]), "B": list(data.var_names[15:30])}, min_genes=12)
    snap = snapshot(data)
    keys = {"condition_keys": "batch"} if name == "scPoli" else {"condition_key": "batch"}
    with pytest.raises(ValueError, match=match):
        _door(name)(data, **keys, **kwargs)
    assert_unchanged(data, snap)


TRAIN_FOREIGN = [
    ({"clip_value": 1.0}, ValueError, "clip_value"),
    ({"n_samples": 50}, ValueError, "n_samples"),
    ({"early_stopping_kwargs": {"mode": "max"}}, ValueError, "mode"),
    ({"early_stopping_kwargs": {"min_delta": 1}}, TypeError, "min_delta"),
    ({"early_stopping_kwargs": {"early_stopping_metric": "val_accuracy"}}, ValueError, "val_accuracy"),
    ({"reload_best": False}, ValueError, "reload_best"),
    ({"seed": 1, "random_state": 1}, TypeError, "seed"),
    ({"n_epochs_per_batch": 2}, TypeError, "n_epochs_per_batch"),
    ({"omega": torch.ones(2)}, ValueError, "omega"),
    ({"gamma_epoch_anneal": 10}, ValueError, "gamma_epoch_anneal"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), TRAIN_FOREIGN, ids=[t[2] for t in TRAIN_FOREIGN])
def test_train_arguments_without_meaning_raise_before_training(kwargs, error, match):
    data = _scpoli_data()
    ss.tl.add_gene_programs(data, {"A": list(data.var_names[:15]), "B": list(data.var_names[15:30])}, min_genes=12)
    model = sca.models.EXPIMAP(data, condition_key="batch", hidden_layer_sizes=[8])
    with pytest.raises(error, match=match):
        model.train(n_epochs=1, monitor=False, **kwargs)
    assert not model.is_trained


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"clustering": "leiden"}, "Leiden"), ({"unlabeled_weight": 1.0}, "unlabeled_weight"),
     ({"p_prototype_loss": 1}, "p_prototype_loss"), ({"clustering_res": 1.0}, "clustering_res")],
)  # fmt: skip
def test_scpoli_train_arguments_without_meaning_raise(kwargs, match):
    model = sca.models.scPoli(_scpoli_data(), condition_keys="batch", cell_type_keys="labels", hidden_layer_sizes=[8])
    with pytest.raises(ValueError, match=match):
        model.train(n_epochs=1, **kwargs)


def test_methods_without_meaning_raise(scpoli_run, expimap_run):
    query = scpoli_run["query"]
    with pytest.raises(ValueError, match="p=1"):
        query.classify(scpoli_run["target"], p=1)
    with pytest.raises(ValueError, match="condition_encoders"):
        query.get_recon_loss(scpoli_run["target"], condition_encoders={})
    with pytest.raises(ValueError, match="exact"):
        expimap_run["model"].latent_enrich("labels", exact=False)
    with pytest.raises(TypeError, match="latent_dim"):
        sca.models.TRVAE.load_query_data(scpoli_run["target"], expimap_run["model"], latent_dim=3)
    with pytest.raises(TypeError, match="reference_model must be a TRVAE"):
        sca.models.TRVAE.load_query_data(scpoli_run["target"], expimap_run["model"])


def test_scvi_tools_models_are_re_exported_as_in_scarches():
    from scanpy_scvi.compat import scvi_tools

    for name in ("SCVI", "SCANVI", "TOTALVI"):
        assert getattr(sca.models, name) is getattr(scvi_tools.model, name)


def test_remove_sparsity_at_scarches_path():
    from scanpy_scvi.compat.scarches.dataset.trvae.data_handling import remove_sparsity

    adata = make_adata(n_obs=20, n_vars=10)
    dense = remove_sparsity(adata)
    assert isinstance(dense.X, np.ndarray)
    np.testing.assert_array_equal(dense.X, adata.X.toarray())
    assert dense.obs.equals(adata.obs) and dense.var.equals(adata.var)
    assert remove_sparsity(dense) is dense
    assert sca.dataset.remove_sparsity is remove_sparsity
