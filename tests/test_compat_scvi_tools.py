"""The scvi-tools door: scvi-tools' tutorial calls, with only the import changed, equal our models."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import IFNB, make_adata

import scanpy_scvi as ss
from scanpy_scvi.compat import scvi_tools as scvi
from scanpy_scvi.compat.scvi_tools import _device

SMALL = {"n_hidden": 32, "n_latent": 5}
QUIET = {"accelerator": "cpu", "enable_progress_bar": False}

# the `Methods` lists of the API pages (scarches-0.6_models.txt: scVI, scANVI, TotalVI)
SCVI_METHODS = [
    "convert_legacy_save", "deregister_manager", "differential_expression", "get_anndata_manager", "get_elbo",
    "get_feature_correlation_matrix", "get_from_registry", "get_latent_library_size", "get_latent_representation",
    "get_likelihood_parameters", "get_marginal_ll", "get_normalized_expression", "get_reconstruction_error", "load",
    "load_query_data", "load_registry", "minify_adata", "posterior_predictive_sample", "prepare_query_anndata",
    "register_manager", "save", "setup_anndata", "to_device", "train", "view_anndata_setup", "view_setup_args",
]  # fmt: skip
SCANVI_METHODS = [
    "convert_legacy_save", "deregister_manager", "differential_expression", "from_scvi_model", "get_anndata_manager",
    "get_elbo", "get_feature_correlation_matrix", "get_from_registry", "get_latent_library_size",
    "get_latent_representation", "get_likelihood_parameters", "get_marginal_ll", "get_normalized_expression",
    "get_reconstruction_error", "load", "load_query_data", "load_registry", "minify_adata",
    "posterior_predictive_sample", "predict", "prepare_query_anndata", "register_manager", "save", "setup_anndata",
    "to_device", "train", "view_anndata_setup", "view_setup_args",
]  # fmt: skip
TOTALVI_METHODS = [
    "convert_legacy_save", "deregister_manager", "differential_expression", "get_anndata_manager", "get_elbo",
    "get_feature_correlation_matrix", "get_from_registry", "get_latent_library_size", "get_latent_representation",
    "get_likelihood_parameters", "get_marginal_ll", "get_normalized_expression", "get_protein_background_mean",
    "get_protein_foreground_probability", "get_reconstruction_error", "load", "load_query_data", "load_registry",
    "posterior_predictive_sample", "prepare_query_anndata", "register_manager", "save", "setup_anndata",
    "setup_mudata", "to_device", "train", "view_anndata_setup", "view_setup_args",
]  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "methods"),
    [(scvi.model.SCVI, SCVI_METHODS), (scvi.model.SCANVI, SCANVI_METHODS), (scvi.model.TOTALVI, TOTALVI_METHODS)],
    ids=["SCVI", "SCANVI", "TOTALVI"],
)
def test_every_method_of_the_api_page_exists(cls, methods):
    missing = [m for m in methods if not callable(getattr(cls, m, None))]
    assert not missing, missing
    assert scvi.model.LinearSCVI.get_loadings


def _data(n_obs: int = 300, seed: int = 0):
    adata = make_adata(n_obs=n_obs, random_state=seed)
    adata.layers["counts"] = adata.X.copy()
    adata.obs["cell_type"] = adata.obs["labels"].astype(str)
    return adata


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- quick start -----------------------------------------------------------------------------------------
def test_quick_start_equals_our_model_bit_for_bit():
    adata = _data()
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    vae = scvi.model.SCVI(adata, **SMALL)
    plan = {"lr": 2e-3, "n_epochs_kl_warmup": 3, "weight_decay": 0.0}
    vae.train(max_epochs=5, train_size=0.8, batch_size=64, plan_kwargs=plan, **QUIET)

    ours = ss.SCVI(adata, layer="counts", batch_key="batch", random_state=0, **SMALL)
    ours.train(5, train_size=0.8, batch_size=64, lr=2e-3, n_epochs_kl_warmup=3, weight_decay=0.0, device="cpu",
               random_state=0, progress_bar=False)  # fmt: skip
    assert _same_state(_state(vae), _state(ours))
    assert vae.history_ == ours.history_
    assert np.array_equal(vae.get_latent_representation(), ours.get_latent_representation())
    with vae.seeded(1):
        door_expr = vae.get_normalized_expression(library_size=1e4)
    with ours.seeded(1):
        our_expr = ours.get_normalized_expression(library_size=1e4)
    pd.testing.assert_frame_equal(door_expr, our_expr)
    assert np.allclose(door_expr.sum(1), 1e4, rtol=1e-4)  # frequencies scaled to the library size
    assert isinstance(vae, ss.SCVI) and vae.is_trained and len(vae.train_indices) == 240


def test_the_heuristic_and_defaults_are_scvi_tools():
    adata = _data()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    vae = scvi.model.SCVI(adata)
    assert vae.architecture.n_hidden == 128 and vae.architecture.n_latent == 10
    assert vae.architecture.gene_likelihood == "zinb" and vae.architecture.dropout_rate == 0.1
    assert vae.setup.genes == list(adata.var_names)  # the whole var, no gene selection
    assert vae.default_max_epochs(adata.n_obs) == 400
    assert vae.default_max_epochs(100_000) == 80  # round(20000 / 100000 * 400)
    linear = scvi.model.LinearSCVI
    linear.setup_anndata(adata, batch_key="batch")
    ldvae = linear(adata, **SMALL)
    assert ldvae.architecture.linear_decoder and ldvae.architecture.gene_likelihood == "nb"
    assert ldvae.get_loadings().shape == (adata.n_vars, SMALL["n_latent"])


def test_setup_is_recorded_as_json_and_survives_h5ad(tmp_path):
    adata = _data()
    adata.obs["depth"] = np.log(np.asarray(adata.X.sum(1)).ravel())
    scvi.model.SCVI.setup_anndata(
        adata, layer="counts", batch_key="batch", categorical_covariate_keys=["cell_type"],
        continuous_covariate_keys=["depth"],
    )  # fmt: skip
    before = scvi.model.SCVI(adata, **SMALL)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    after = scvi.model.SCVI(back, **SMALL)
    assert _same_state(_state(before), _state(after))
    assert after.setup == before.setup
    assert after.setup.categorical_covariate_keys == ["cell_type"]
    assert after.setup.continuous_covariate_keys == ["depth"]


def test_a_model_needs_its_own_setup():
    adata = _data()
    with pytest.raises(ValueError, match=r"scvi\.model\.SCVI\.setup_anndata"):
        scvi.model.SCVI(adata)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match=r"set up for SCVI.*SCANVI\.setup_anndata"):
        scvi.model.SCANVI(adata)
    with pytest.raises(KeyError, match="nope"):
        scvi.model.SCVI.setup_anndata(adata, batch_key="nope")
    with pytest.raises(TypeError, match="extend_categories"):
        scvi.model.SCVI.setup_anndata(adata, extend_categories=True)


def test_settings_seed_seeds_construction_and_training():
    adata = _data()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    first = _state(scvi.model.SCVI(adata, **SMALL))
    try:
        scvi.settings.seed = 1
        other = _state(scvi.model.SCVI(adata, **SMALL))
    finally:
        scvi.settings.seed = 0
    assert not _same_state(first, other)
    assert _same_state(first, _state(ss.SCVI(adata, batch_key="batch", random_state=0, **SMALL)))
    with pytest.raises(AttributeError):
        scvi.settings.not_a_setting = 1


# -- arguments without a meaning here ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    adata = _data()
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch", labels_key="cell_type")
    vae = scvi.model.SCVI(adata, **SMALL)
    vae.train(max_epochs=3, **QUIET)
    return adata, vae


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"accelerator": "mps"}, "mps"),
        ({"shuffle_set_split": False}, "shuffle_set_split"),
        ({"validation_size": 0.05}, "validation_size"),
        ({"plan_kwargs": {"optimizer": "AdamW"}}, "optimizer"),
        ({"plan_kwargs": {"lr_scheduler_metric": "reconstruction_loss_validation"}}, "lr_scheduler_metric"),
        ({"plan_kwargs": {"not_an_option": 1}}, "not_an_option"),
        ({"gradient_clip_val": 1.0}, "gradient_clip_val"),
        ({"early_stopping_monitor": "reconstruction_loss_validation"}, "early_stopping_monitor"),
        ({"devices": 2}, "devices"),
        ({"datamodule": object()}, "datamodule"),
        ({"datasplitter_kwargs": {"drop_last": True}}, "drop_last"),
    ],
)
def test_train_arguments_without_meaning_raise_naming_them(fitted, kwargs, name):
    _, vae = fitted
    before = _state(vae)
    with pytest.raises((TypeError, ValueError), match=name):
        vae.train(max_epochs=1, **{**QUIET, **kwargs})
    assert _same_state(before, _state(vae))  # nothing trained


def test_other_foreign_names_raise_naming_them(fitted):
    adata, vae = fitted
    with pytest.raises(TypeError, match="library_log_means"):
        scvi.model.SCVI(adata, library_log_means=np.zeros(2))
    with pytest.raises(ValueError, match="batch_representation"):
        scvi.model.SCVI(adata, batch_representation="embedding")
    with pytest.raises(ValueError, match="importance"):
        vae.differential_expression(groupby="cell_type", weights="importance")
    with pytest.raises(ValueError, match="test_mode"):
        vae.differential_expression(groupby="cell_type", test_mode="two")
    with pytest.raises(ValueError, match="unfrozen"):
        scvi.model.SCVI.load_query_data(adata, vae, unfrozen=True)
    with pytest.raises(ValueError, match="freeze_batchnorm_encoder"):
        scvi.model.SCVI.load_query_data(adata, vae, freeze_batchnorm_encoder=False)
    with pytest.raises(ValueError, match="prefix"):
        vae.save("unused", prefix="x_")
    for method, args in [
        (vae.get_anndata_manager, (adata,)), (vae.deregister_manager, ()), (scvi.model.SCVI.register_manager, (None,)),
        (scvi.model.SCVI.convert_legacy_save, ("a", "b")),
    ]:  # fmt: skip
        with pytest.raises(NotImplementedError):
            method(*args)


def test_plan_kwargs_and_a_train_argument_may_not_disagree():
    adata = _data()
    rng = np.random.default_rng(0)
    adata.obsm["protein_expression"] = pd.DataFrame(rng.poisson(20, (adata.n_obs, 4)), index=adata.obs_names)
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    vae = scvi.model.TOTALVI(adata, **SMALL)
    with pytest.raises(ValueError, match="lr is given twice"):
        vae.train(max_epochs=1, lr=1e-2, plan_kwargs={"lr": 1e-3}, **QUIET)
    vae.train(max_epochs=1, plan_kwargs={"lr": 1e-3}, **QUIET)  # plan_kwargs beats the default (not, as there, 4e-3)
    assert vae.train_config["lr"] == 1e-3


def test_accelerator_and_devices_map_to_one_device():
    assert _device("cpu", "auto") == ("cpu", False)
    assert _device("gpu", [1]) == ("cuda:1", False)
    assert _device("cuda", "0,") == ("cuda:0", False)
    assert _device("gpu", 1) == ("cuda", False)
    assert _device("gpu", -1) == ("cuda", True)
    assert _device("auto", "auto")[0] == ("cuda" if torch.cuda.is_available() else "cpu")


# -- the methods over our API ----------------------------------------------------------------------------------
def test_registry_views_read_the_setup(fitted, tmp_path, capsys):
    adata, vae = fitted
    codes = vae.get_from_registry(adata, "batch")
    assert codes.shape == (adata.n_obs, 1)
    assert np.array_equal(codes.ravel(), adata.obs["batch"].cat.codes.to_numpy())
    assert vae.get_from_registry(adata, "X") is adata.layers["counts"]
    vae.view_anndata_setup()
    shown = capsys.readouterr().out
    assert "'batch_0'" in shown and "n_cells: 300" in shown
    vae.save(tmp_path / "m", save_anndata=True)
    registry = scvi.model.SCVI.load_registry(tmp_path / "m")
    assert registry["model_name"] == "SCVI"
    assert registry["setup_args"]["layer"] == "counts" and registry["setup_args"]["labels_key"] == "cell_type"
    assert registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"] == ["batch_0", "batch_1"]
    loaded = scvi.model.SCVI.load(tmp_path / "m", accelerator="cpu")  # reads the saved adata.h5ad
    assert type(loaded) is scvi.model.SCVI and loaded.adata.n_obs == adata.n_obs
    assert _same_state(_state(loaded), _state(vae))
    assert type(ss.SCVI.load(tmp_path / "m")) is ss.SCVI  # a plain file of our class
    with pytest.raises(ValueError, match="holds a SCVI model"):
        scvi.model.LinearSCVI.load(tmp_path / "m")
    assert np.allclose(vae.get_latent_library_size().ravel(), np.asarray(adata.layers["counts"].sum(1)).ravel())


def test_differential_expression_has_scvi_tools_columns(fitted):
    adata, vae = fitted
    de = vae.differential_expression(groupby="cell_type", silent=True, n_samples_overall=500)
    assert list(de.columns[:14]) == [
        "proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2", "raw_mean1", "raw_mean2",
        "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1", "raw_normalized_mean2",
        "comparison", "group1", "group2",
    ]  # fmt: skip
    assert set(de["comparison"]) == {f"label_{i} vs Rest" for i in range(3)} and set(de["group2"]) == {"Rest"}
    assert len(de) == 3 * adata.n_vars and de.index.isin(adata.var_names).all()
    ours = ss.tl.differential_expression(
        adata, groupby="cell_type", mode="vanilla", n_samples=500, model=vae, inplace=False, progress_bar=False
    )
    assert np.array_equal(de["proba_m1"].to_numpy(), ours["proba_m1"].to_numpy())
    change = vae.differential_expression(
        idx1="cell_type == 'label_0'", mode="change", all_stats=False, silent=True, n_samples_overall=500
    )
    assert list(change.columns[:13]) == [
        "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta", "lfc_mean",
        "lfc_median", "lfc_std", "lfc_min", "lfc_max", "is_de_fdr_0.05",
    ]  # fmt: skip
    assert "raw_mean1" not in change and "comparison" not in change
    by_mask = vae.differential_expression(
        idx1=(adata.obs["cell_type"] == "label_0").to_numpy(), mode="change", all_stats=False, silent=True,
        n_samples_overall=500,
    )  # fmt: skip
    pd.testing.assert_frame_equal(change, by_mask)
    assert np.all(np.diff(change["proba_de"].to_numpy()) <= 0)  # sorted as scvi-tools


needs_ifnb = pytest.mark.skipif(not IFNB.is_file(), reason=f"real data not found at {IFNB}")


@needs_ifnb
def test_quick_start_de_puts_monocyte_markers_on_top():
    adata = ad.read_h5ad(IFNB)
    adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 1000, replace=False))].copy()
    # the most dispersed genes (a plain variance / mean rank) plus the classic CD14-monocyte markers
    mean = np.asarray(adata.X.mean(0)).ravel()
    var = np.asarray(adata.X.multiply(adata.X).mean(0)).ravel() - mean**2
    markers = ["CD14", "LYZ", "S100A8", "S100A9", "FCN1"]
    genes = np.argsort(-(var / np.maximum(mean, 1e-3)) * (mean > 0.05))[:500]
    adata = adata[:, np.union1d(genes, np.flatnonzero(adata.var_names.isin(markers)))].copy()
    adata.layers["counts"] = adata.X.copy()
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    vae = scvi.model.SCVI(adata, n_latent=10, n_hidden=64)
    vae.train(max_epochs=30, plan_kwargs={"lr": 3e-3}, **QUIET)
    adata.obsm["X_scVI"] = vae.get_latent_representation()
    de = vae.differential_expression(groupby="cell_type", group1="CD14 Mono", mode="change", silent=True)
    hits = de.loc[markers]
    assert (hits["lfc_median"] > 1).all() and (hits["proba_de"] > 0.85).all(), hits
    assert (hits["scale1"] > 2 * hits["scale2"]).all(), hits
    up = de[de["lfc_median"] > 0]  # scvi-tools' order (proba_de), up-regulated genes
    assert len(set(up.index[:30]) & set(markers)) >= 3, up.head(30)


# -- scANVI ----------------------------------------------------------------------------------------------------
def test_scanvi_from_scvi_model_equals_ours():
    adata = _data()
    adata.obs.loc[adata.obs_names[::4], "cell_type"] = "Unknown"
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    vae = scvi.model.SCVI(adata, **SMALL)
    vae.train(max_epochs=4, **QUIET)
    lvae = scvi.model.SCANVI.from_scvi_model(vae, "Unknown", adata=adata)
    lvae.train(max_epochs=3, plan_kwargs={"classification_ratio": 20}, **QUIET)

    base = ss.SCVI(adata, batch_key="batch", labels_key="cell_type", random_state=0, **SMALL)
    base.train(4, device="cpu", random_state=0, progress_bar=False)
    ours = ss.SCANVI.from_scvi_model(base, labels_key="cell_type", unlabeled_category="Unknown", random_state=0)
    ours.train(3, classification_ratio=20, device="cpu", random_state=0, progress_bar=False)
    assert _same_state(_state(lvae), _state(ours))
    assert np.array_equal(lvae.predict(), ours.predict())
    soft = lvae.predict(soft=True)
    pd.testing.assert_frame_equal(soft, ours.predict(soft=True))
    assert list(soft.columns) == ["label_0", "label_1", "label_2"] and np.allclose(soft.sum(1), 1, atol=1e-5)
    assert lvae.train_config["max_epochs"] == 3 and lvae.initialised_from == "SCVI"
    assert "SCANVI" in adata.uns["_scvi_setup"]  # recorded, as scvi-tools' from_scvi_model sets the data up
    # n_samples_per_label: each epoch's labelled minibatches from at most that many cells per label
    drawn = []
    original = ss.model._scanvi.SemiSupervisedObjective.epoch_start

    def spy(self, module, epoch):
        original(self, module, epoch)
        drawn.append(next(self._stream))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ss.model._scanvi.SemiSupervisedObjective, "epoch_start", spy)
        lvae.train(max_epochs=2, n_samples_per_label=5, batch_size=512, **QUIET)
    labels = lvae.bind().source.obs["labels"]
    for cells in drawn:  # one labelled minibatch holds the whole epoch's pool
        assert np.bincount(labels[cells], minlength=3).max() <= 5 and len(cells) == 15
    assert not np.array_equal(np.sort(drawn[0]), np.sort(drawn[1]))  # drawn anew every epoch
    assert lvae.train_config["n_samples_per_label"] == 5
    # use_posterior_mean=False classifies one draw of z: mostly the same calls, not all the same probabilities
    torch.manual_seed(0)
    drawn = lvae.predict(soft=True, use_posterior_mean=False)
    at_mean = lvae.predict(soft=True)
    assert not np.allclose(drawn.to_numpy(), at_mean.to_numpy())
    assert (drawn.to_numpy().argmax(1) == at_mean.to_numpy().argmax(1)).mean() >= 0.6
    with pytest.raises(TypeError, match="setup_anndata"):
        scvi.model.SCANVI(adata, "Unknown")


# -- totalVI -------------------------------------------------------------------------------------------------
def _cite(adata):
    rng = np.random.default_rng(0)
    proteins = pd.DataFrame(
        rng.poisson(20, (adata.n_obs, 4)), index=adata.obs_names, columns=["CD3", "CD4", "CD8", "CD19"]
    )
    adata.obsm["protein_expression"] = proteins
    return adata


def test_totalvi_setup_train_latent_equals_ours():
    adata = _cite(_data())
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    vae = scvi.model.TOTALVI(adata, **SMALL)
    vae.train(max_epochs=3, **QUIET)
    ours = ss.TOTALVI(adata, protein_expression_obsm_key="protein_expression", batch_key="batch", random_state=0,
                      **SMALL)  # fmt: skip
    ours.train(3, device="cpu", random_state=0, progress_bar=False)
    assert _same_state(_state(vae), _state(ours))
    assert vae.train_config["lr"] == 4e-3 and vae.train_config["batch_size"] == 256  # scvi-tools' totalVI plan
    latent = vae.get_latent_representation()
    assert latent.shape == (adata.n_obs, 5) and np.array_equal(latent, ours.get_latent_representation())
    totals = np.asarray(adata.X.sum(1)).ravel()
    assert np.allclose(vae.get_latent_library_size().ravel(), totals, rtol=1e-5)  # observed library
    with vae.seeded(3):
        background = vae.get_protein_background_mean()
    with ours.seeded(3):
        expected = ours.get_likelihood_parameters()["background_mean"]
    assert np.array_equal(background, expected) and background.shape == (adata.n_obs, 4)
    rna, protein = vae.get_normalized_expression(n_samples_overall=7)
    assert rna.shape == (7, adata.n_vars) and protein.shape == (7, 4)
    de = vae.differential_expression(groupby="cell_type", group1="label_0", silent=True, n_samples_overall=200)
    assert list(de.columns[:2]) == ["proba_de", "proba_not_de"]  # totalVI's default is the change mode
    assert set(de.index) == set(adata.var_names) | {"CD3", "CD4", "CD8", "CD19"}


def test_totalvi_setup_mudata_reads_the_modalities():
    mudata = pytest.importorskip("mudata")
    from scanpy_scvi import data

    if not hasattr(data, "anndata_from_mudata"):
        pytest.skip("scanpy_scvi.data.anndata_from_mudata is not available")
    adata = _cite(_data())
    prot = ad.AnnData(adata.obsm["protein_expression"].to_numpy().astype(np.float32), obs=adata.obs[[]])
    prot.var_names = list(adata.obsm["protein_expression"].columns)
    rna = ad.AnnData(adata.X.copy(), obs=adata.obs[[]], var=adata.var)
    mdata = mudata.MuData({"rna": rna, "prot": prot})
    mdata.obs["batch"] = adata.obs["batch"].to_numpy()
    scvi.model.TOTALVI.setup_mudata(mdata, batch_key="batch", modalities={"rna_layer": "rna", "protein_layer": "prot"})
    from_mudata = scvi.model.TOTALVI(mdata, **SMALL)
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    from_anndata = scvi.model.TOTALVI(adata, **SMALL)
    assert from_mudata.setup.protein_names == ["CD3", "CD4", "CD8", "CD19"]
    assert from_mudata.setup.batch_categories == ["batch_0", "batch_1"]
    assert _same_state(_state(from_mudata), _state(from_anndata))


# -- scArches --------------------------------------------------------------------------------------------------
REFERENCE = {"use_layer_norm": "both", "use_batch_norm": "none", "encode_covariates": True, "dropout_rate": 0.2}


def test_scarches_query_keeps_the_reference_frozen_and_equals_ours(tmp_path):
    adata = make_adata(n_obs=400, n_batches=4)
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    is_query = adata.obs["batch"].isin(["batch_3"]).to_numpy()
    ref, query = adata[~is_query].copy(), adata[is_query].copy()
    scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
    vae = scvi.model.SCVI(ref, **SMALL, **REFERENCE)
    vae.train(max_epochs=5, **QUIET)
    vae.save(tmp_path / "ref")
    before = _state(vae)

    # the query lacks one gene and has them in another order: prepare_query_anndata pads and sorts
    query = query[:, query.var_names[:-1][::-1]].copy()
    dropped = ref.var_names[-1]
    scvi.model.SCVI.prepare_query_anndata(query, tmp_path / "ref")
    assert list(query.var_names) == list(ref.var_names)
    assert query[:, dropped].X.nnz == 0
    assert np.array_equal(query[:, ref.var_names[:-1]].X.toarray(), adata[is_query, ref.var_names[:-1]].X.toarray())

    qvae = scvi.model.SCVI.load_query_data(query, tmp_path / "ref")
    assert type(qvae) is scvi.model.SCVI and not qvae.is_trained
    qvae.train(max_epochs=5, plan_kwargs={"weight_decay": 0.0}, **QUIET)
    after = _state(qvae)
    grown = sorted(k for k in before if after[k].shape != before[k].shape)
    assert "z_encoder.trunk.layers.0.0.weight" in grown and "decoder.layers.0.0.weight" in grown
    for k, old in before.items():  # frozen reference weights stay bit for bit; only new columns learn
        kept = after[k] if k not in grown else after[k].narrow(-1, 0, old.shape[-1])
        assert torch.equal(kept, old), k
    new = after["decoder.layers.0.0.weight"][:, -1]
    assert not torch.equal(new, before["decoder.layers.0.0.weight"][:, -3:].mean(1))  # the new batch learned
    assert _same_state(before, _state(vae))  # the reference model is untouched

    ours, _ = ss.model.query_model(ss.SCVI.load(tmp_path / "ref"), query, max_missing_genes=0.0, random_state=0)
    ours.train(5, weight_decay=0.0, device="cpu", random_state=0, progress_bar=False)
    assert _same_state(after, _state(ours))
    assert "SCVI" in query.uns["_scvi_setup"]
    dropout_free = scvi.model.SCVI.load_query_data(query, vae, freeze_dropout=True)
    assert dropout_free.architecture.dropout_rate == 0.0
    assert all(m.p == 0 for m in dropout_free.module.modules() if isinstance(m, torch.nn.Dropout))


# -- minify_adata ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minified():
    """A trained door model, its outputs on the full AnnData (seeded), then the model minified."""
    adata = _data()
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch", labels_key="cell_type")
    vae = scvi.model.SCVI(adata, **SMALL)
    vae.train(max_epochs=5, **QUIET)
    before = {"latent": vae.get_latent_representation(), "library": vae.get_latent_library_size()}
    with vae.seeded(1):
        before["expression"] = vae.get_normalized_expression(library_size=1e4)
    with vae.seeded(2):
        before["draws"] = vae.get_normalized_expression(n_samples=3, return_mean=False, batch_size=100)
    with vae.seeded(3):
        before["z"] = vae.get_latent_representation(give_mean=False)
    with vae.seeded(4):
        before["counts"] = vae.posterior_predictive_sample()
    with vae.seeded(5):
        before["params"] = vae.get_likelihood_parameters(n_samples=2)
    before["de"] = vae.differential_expression(groupby="cell_type", silent=True, n_samples_overall=500)
    before["change"] = vae.differential_expression(
        groupby="cell_type", mode="change", pseudocounts=1e-4, silent=True, n_samples_overall=500
    )
    vae.minify_adata()
    return adata, vae, before


def test_minify_adata_drops_the_counts_and_keeps_the_posterior(minified):
    adata, vae, before = minified
    mini = vae.adata
    assert mini is not adata and vae.minified_data_type == "latent_posterior_parameters"
    assert mini.X.nnz == 0 and mini.layers["counts"].nnz == 0 and mini.shape == adata.shape
    assert adata.layers["counts"].nnz > 0 and "_scvi_adata_minify_type" not in adata.uns  # the input is untouched
    assert mini.uns["_scvi_adata_minify_type"] == "latent_posterior_parameters"
    totals = np.asarray(adata.layers["counts"].sum(1)).ravel()
    assert np.array_equal(mini.obs["observed_lib_size"].to_numpy(), totals)
    qz_m, qz_v = vae.get_latent_representation(adata, return_dist=True)
    for key, value in [("X_latent_qzm", qz_m), ("X_latent_qzv", qz_v), ("scvi_latent_qzm", qz_m),
                       ("scvi_latent_qzv", qz_v)]:  # fmt: skip
        assert np.array_equal(mini.obsm[key], value), key
    assert np.array_equal(vae.get_latent_representation(), before["latent"])  # bit for bit
    assert np.array_equal(vae.get_latent_library_size(), before["library"])  # exp(log(total counts))
    assert np.allclose(before["library"].ravel(), totals, rtol=1e-6)
    assert "minified?: True" in vae.summary_string


def test_a_minified_model_draws_the_same_z_as_from_the_counts(minified):
    _, vae, before = minified
    with vae.seeded(1):  # the cached q(z | x) gives the draws the encoder gave: equal under one seed
        pd.testing.assert_frame_equal(vae.get_normalized_expression(library_size=1e4), before["expression"])
    with vae.seeded(2):
        draws = vae.get_normalized_expression(n_samples=3, return_mean=False, batch_size=100)
    assert np.array_equal(draws, before["draws"])
    with vae.seeded(3):
        assert np.array_equal(vae.get_latent_representation(give_mean=False), before["z"])
    with vae.seeded(4):
        assert (vae.posterior_predictive_sample() != before["counts"]).nnz == 0
    with vae.seeded(5):
        params = vae.get_likelihood_parameters(n_samples=2)  # the observed library from obs['observed_lib_size']
    assert params.keys() == before["params"].keys()
    assert all(np.array_equal(params[k], before["params"][k]) for k in params)


def test_de_on_a_minified_model_warns_for_the_raw_columns_and_ranks_the_same(minified):
    _, vae, before = minified
    with pytest.warns(UserWarning, match="Count statistics make no sense for minified model"):
        de = vae.differential_expression(groupby="cell_type", silent=True, n_samples_overall=500)
    for column in ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]:
        assert np.array_equal(de[column].to_numpy(), before["de"][column].to_numpy()), column
    for comparison, group in de.groupby("comparison"):
        expected = before["de"][before["de"]["comparison"] == comparison]
        assert list(group["bayes_factor"].nlargest(10).index) == list(expected["bayes_factor"].nlargest(10).index)
    raw = ["raw_mean1", "raw_mean2", "non_zeros_proportion1", "raw_normalized_mean1", "raw_normalized_mean2"]
    assert (de[raw].to_numpy() == 0).all()  # from the empty counts, as in scvi-tools
    assert (before["de"]["raw_mean1"] > 0).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without the raw columns
        change = vae.differential_expression(
            groupby="cell_type", mode="change", pseudocounts=1e-4, all_stats=False, silent=True, n_samples_overall=500
        )
    for column in ["proba_de", "lfc_mean", "lfc_median"]:
        assert np.array_equal(change[column].to_numpy(), before["change"][column].to_numpy()), column


def test_methods_that_need_the_counts_refuse_a_minified_anndata(minified):
    adata, vae, _ = minified
    for call in [vae.get_elbo, vae.get_reconstruction_error, lambda: vae.get_marginal_ll(n_mc_samples=5),
                 lambda: vae.train(max_epochs=1, **QUIET)]:  # fmt: skip
        with pytest.raises(ValueError, match="needs the counts, and the AnnData is minified"):
            call()
    assert np.isfinite(vae.get_elbo(adata))  # the AnnData with the counts still works
    assert vae.get_reconstruction_error(adata, indices=np.arange(20))["reconstruction_loss"] > 0
    with pytest.raises(ValueError, match="minified"):
        scvi.model.SCVI.load_query_data(vae.adata, vae)
    with pytest.raises(ValueError, match="minified"):
        scvi.model.SCANVI.from_scvi_model(vae, "Unknown")
    with pytest.raises(ValueError, match="already minified"):
        vae.minify_adata()


def test_a_minified_anndata_survives_h5ad_and_load(minified, tmp_path):
    _, vae, before = minified
    vae.adata.write_h5ad(tmp_path / "mini.h5ad")
    vae.save(tmp_path / "m", save_anndata=True)
    back = ad.read_h5ad(tmp_path / "mini.h5ad")
    for loaded in [scvi.model.SCVI.load(tmp_path / "m", back, accelerator="cpu"),
                   scvi.model.SCVI.load(tmp_path / "m", accelerator="cpu")]:  # fmt: skip
        assert loaded.minified_data_type == "latent_posterior_parameters" and loaded.adata.X.nnz == 0
        assert np.array_equal(loaded.get_latent_representation(), before["latent"])
        with loaded.seeded(1):
            pd.testing.assert_frame_equal(loaded.get_normalized_expression(library_size=1e4), before["expression"])
        with pytest.raises(ValueError, match="minified"):
            loaded.get_elbo()
    fresh = scvi.model.SCVI.load(tmp_path / "m", accelerator="cpu")
    assert np.array_equal(fresh.get_latent_representation(back), before["latent"])  # bound by passing it, too
    del back.obsm["scvi_latent_qzv"]
    with pytest.raises(ValueError, match=r"lacks obsm\['scvi_latent_qzv'\]"):
        scvi.model.SCVI.load(tmp_path / "m", back)


def test_minify_reads_the_given_posterior_and_refuses_what_it_cannot_serve():
    adata = _data(n_obs=120)
    adata.obs.loc[adata.obs_names[::4], "cell_type"] = "Unknown"
    scvi.model.SCANVI.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown", batch_key="batch")
    lvae = scvi.model.SCANVI(adata, **SMALL)
    lvae.train(max_epochs=2, **QUIET)
    predicted, soft = lvae.predict(), lvae.predict(soft=True)
    qz_m, qz_v = lvae.get_latent_representation(return_dist=True)
    adata.obsm["mine_m"], adata.obsm["mine_v"] = qz_m + 1, qz_v  # read as given, not recomputed
    lvae.minify_adata(use_latent_qzm_key="mine_m", use_latent_qzv_key="mine_v")
    assert np.array_equal(lvae.adata.obsm["scanvi_latent_qzm"], qz_m + 1)
    assert np.array_equal(lvae.get_latent_representation(), qz_m + 1)
    lvae.adata.obsm["scanvi_latent_qzm"] = qz_m  # back to the model's posterior: the classifier's calls return
    lvae.attach(lvae.adata)
    assert np.array_equal(lvae.predict(), predicted)
    pd.testing.assert_frame_equal(lvae.predict(soft=True), soft)

    scvi.model.LinearSCVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match="observed library size"):
        scvi.model.LinearSCVI(adata, **SMALL).minify_adata()  # a learned library needs the counts
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match=r"latent_posterior_parameters_with_counts.*update_only_decoder"):
        scvi.model.SCVI(adata, **SMALL).minify_adata("latent_posterior_parameters_with_counts")
    _cite(adata)
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    with pytest.raises(NotImplementedError, match="TOTALVI"):
        scvi.model.TOTALVI(adata, **SMALL).minify_adata()
