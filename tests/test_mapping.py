"""Reference mapping (``tl.map_query``): frozen weights, padded genes, query batches, labels."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import assert_unchanged, make_adata, snapshot

import scanpy_scvi as ss
from scanpy_scvi import SCANVI, SCVI

ARCH = dict(n_hidden=32, n_latent=5, **{k: v for k, v in ss.pp.REFERENCE_MAPPING.items() if k != "n_layers"})


def split(n_obs: int = 600, n_batches: int = 4, n_query_batches: int = 1, seed: int = 0):
    """Reference = the first batches, query = the last ``n_query_batches`` (synthetic counts)."""
    adata = make_adata(n_obs=n_obs, n_batches=n_batches, random_state=seed)
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    query_batches = [f"batch_{i}" for i in range(n_batches - n_query_batches, n_batches)]
    is_query = adata.obs["batch"].isin(query_batches).to_numpy()
    return adata[~is_query].copy(), adata[is_query].copy()


@pytest.fixture(scope="module")
def reference():
    ref, _ = split()
    model = SCVI(ref, batch_key="batch", **ARCH)
    model.train(max_epochs=30, progress_bar=False)
    return ref, model


@pytest.fixture(scope="module")
def mapped(reference):
    ref, model = reference
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    _, query = split()
    # a non-zero weight decay must still not move a frozen entry
    qm = ss.tl.map_query(query, model, max_epochs=20, weight_decay=1e-3, progress_bar=False)
    return ref, model, before, query, qm


def test_reference_model_is_untouched(mapped):
    _, model, before, _, _ = mapped
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_tensors_are_bit_identical_and_new_columns_learn(mapped):
    _, _model, before, _, qm = mapped
    after = qm.module.state_dict()
    grown = []
    for k, ref_t in before.items():
        new_t = after[k]
        if new_t.shape == ref_t.shape:
            assert torch.equal(new_t, ref_t), f"{k} moved"
        else:
            grown.append(k)
            # reference columns unchanged; the query batch's column (the last one here) trained
            assert torch.equal(new_t[:, : ref_t.shape[1]], ref_t), f"{k}: reference columns moved"
    assert "z_encoder.trunk.layers.0.0.weight" in grown and "decoder.layers.0.0.weight" in grown
    mask = qm.trainable_masks["z_encoder.trunk.layers.0.0.weight"]
    assert mask.sum() == mask.shape[0]  # exactly one new one-hot column
    assert torch.all(mask[:, -1])
    assert qm.history_["elbo_train"][-1] < qm.history_["elbo_train"][0]


def test_a_new_batch_starts_as_the_mean_reference_batch(reference):
    """Before training, each grown weight's new column is the mean of its reference batch columns."""
    _, model = reference
    _, query = split()
    qm = ss.tl.map_query(query, model, max_epochs=0, progress_bar=False)
    n_ref = len(model.setup.batch_categories)
    grown = 0
    for k, ref_t in model.module.state_dict().items():
        new_t = qm.module.state_dict()[k]
        if new_t.shape != ref_t.shape and k.endswith(".weight"):  # a layer reading the one-hot batch
            expected = ref_t[:, -n_ref:].mean(dim=1)
            torch.testing.assert_close(new_t[:, -1], expected, rtol=0, atol=1e-7)
            assert not torch.equal(new_t[:, -1], ref_t[:, -1])
            grown += 1
    assert grown >= 2  # the encoder's and the decoder's first layers at least


def test_reference_latent_is_unchanged_under_the_query_model(mapped):
    ref, model, _, _, qm = mapped
    np.testing.assert_allclose(qm.get_latent_representation(ref), model.get_latent_representation(ref), atol=1e-5)


def test_query_training_moves_the_query_latent(reference):
    """scvi-tools #2331: with a covariate-aware encoder, the query's latent must adapt."""
    _, model = reference
    _, q0 = split()
    _, q1 = split()
    ss.tl.map_query(q0, model, max_epochs=0, progress_bar=False)
    ss.tl.map_query(q1, model, max_epochs=20, progress_bar=False)
    # 80 Adam steps at lr 1e-3 on one new column per layer: small but clearly non-zero
    assert np.abs(q0.obsm["X_scvi"] - q1.obsm["X_scvi"]).mean() > 0.005


def test_outputs_and_record(mapped):
    _, model, _, query, qm = mapped
    assert query.obsm["X_scvi"].shape == (query.n_obs, 5)
    np.testing.assert_array_equal(query.obsm["X_scvi"], qm.get_latent_representation())
    rec = query.uns["scvi"]
    assert list(rec["new_categories"]) == ["batch=batch_3"]
    assert rec["params"]["weight_decay"] == 1e-3 and rec["params"]["reference_class"] == "SCVI"
    assert qm.setup.batch_categories == [*model.setup.batch_categories, "batch_3"]


def test_several_query_batches_at_once():
    ref, query = split(n_obs=700, n_batches=5, n_query_batches=2)
    model = SCVI(ref, batch_key="batch", **ARCH)
    model.train(max_epochs=5, progress_bar=False)
    qm = ss.tl.map_query(query, model, max_epochs=3, progress_bar=False)
    assert qm.setup.batch_categories[-2:] == ["batch_3", "batch_4"]
    assert qm.trainable_masks["decoder.layers.0.0.weight"].sum() == 2 * 32  # two new columns x 32 hidden units


def test_new_batch_with_categorical_covariate_keeps_block_offsets():
    """New batch columns go inside the batch block, before the covariate block (the ⚠ of §7.2)."""
    ref, query = split(n_obs=600, n_batches=4)
    rng = np.random.default_rng(0)
    for a in (ref, query):
        a.obs["donor_sex"] = rng.choice(["f", "m"], size=a.n_obs)
    model = SCVI(ref, batch_key="batch", categorical_covariate_keys=["donor_sex"], **ARCH)
    model.train(max_epochs=10, progress_bar=False)
    qm = ss.tl.map_query(query, model, max_epochs=5, progress_bar=False)
    w_ref = model.module.decoder.layers[0][0].weight
    w_q = qm.module.decoder.layers[0][0].weight
    n_feat = 5  # n_latent
    torch.testing.assert_close(w_q[:, n_feat : n_feat + 3], w_ref[:, n_feat : n_feat + 3], rtol=0, atol=0)
    torch.testing.assert_close(w_q[:, -2:], w_ref[:, -2:], rtol=0, atol=0)  # covariate block, shifted by one
    np.testing.assert_allclose(qm.get_latent_representation(ref), model.get_latent_representation(ref), atol=1e-5)


def test_missing_genes_are_zero_padded_with_a_warning(reference):
    _, model = reference
    _, query = split()
    drop = query.var_names[:4]
    padded = query[:, ~query.var_names.isin(drop)].copy()
    with pytest.warns(UserWarning, match="4 of the reference's 80 genes are missing"):
        qm = ss.tl.map_query(padded, model, max_epochs=2, progress_bar=False)
    x = qm._bound.source.get(np.arange(5))["X"].numpy()
    assert np.all(x[:, :4] == 0)
    np.testing.assert_array_equal(x[:, 4:], query[:5, 4:].X.toarray())
    assert list(padded.uns["scvi"]["missing_genes"]) == list(drop)


def test_too_many_missing_genes_is_an_error_and_nothing_is_written(reference):
    _, model = reference
    _, query = split()
    cut = query[:, 30:].copy()  # 30 of 80 genes missing (37.5 %)
    snap = snapshot(cut)
    with pytest.raises(ValueError, match="30 of the model's 80 genes are missing"):
        ss.tl.map_query(cut, model, progress_bar=False)
    assert_unchanged(cut, snap)
    with pytest.warns(UserWarning, match="30 of the reference's 80 genes"):
        qm = ss.tl.map_query(cut, model, max_missing_genes=0.5, max_epochs=1, progress_bar=False)
    assert qm.setup.max_missing_genes == 0.5


def test_unseen_gene_set_is_a_clear_error(reference):
    _, model = reference
    _, query = split()
    query.var_names = [f"ENSG{i:011d}" for i in range(query.n_vars)]
    with pytest.raises(ValueError, match="shares none of the model's 80 genes"):
        ss.tl.map_query(query, model, progress_bar=False)


def test_bad_query_counts_leave_query_unchanged(reference):
    _, model = reference
    _, query = split()
    query.X = query.X.astype(np.float32)
    query.X.data[0] = -1.0
    snap = snapshot(query)
    with pytest.raises(ValueError, match="negative"):
        ss.tl.map_query(query, model, progress_bar=False)
    assert_unchanged(query, snap)


def test_known_batches_only_embed_without_training(reference):
    ref, model = reference
    query = ref[:50].copy()
    qm = ss.tl.map_query(query, model, progress_bar=False)
    assert qm.history_ == {}
    np.testing.assert_allclose(query.obsm["X_scvi"], model.get_latent_representation(ref)[:50], atol=1e-6)


def test_reference_without_batch_key_is_refused():
    ref, query = split()
    model = SCVI(ref, n_hidden=16, n_latent=3)
    model.train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="without batch_key"):
        ss.tl.map_query(query, model, progress_bar=False)


def test_reference_without_encoded_covariates_warns():
    ref, query = split()
    model = SCVI(ref, batch_key="batch", n_hidden=16, n_latent=3)
    model.train(max_epochs=1, progress_bar=False)
    with pytest.warns(UserWarning, match="encode_covariates=False"):
        ss.tl.map_query(query, model, max_epochs=1, progress_bar=False)


def test_knn_label_transfer_from_scvi_reference(reference):
    _ref, model = reference
    _, query = split()
    truth = query.obs["labels"].astype(str).to_numpy()
    query.obs = query.obs.drop(columns="labels")
    ss.tl.map_query(query, model, labels_key="labels", max_epochs=20, progress_bar=False)
    pred = query.obs["labels_pred"].astype(str).to_numpy()
    assert (pred == truth).mean() > 0.8  # chance: 1/3
    unc = query.obs["labels_uncertainty"].to_numpy()
    assert unc.min() >= 0 and unc.max() <= 1 and unc.mean() < 0.3
    assert unc[pred != truth].mean() > unc[pred == truth].mean()  # wrong calls are the uncertain ones


def test_scanvi_reference_predicts_query_labels():
    ref, query = split(n_obs=800)
    ref.obs["cell_type"] = ref.obs["labels"].astype(str)
    truth = query.obs["labels"].astype(str).to_numpy()
    model = SCANVI(ref, labels_key="cell_type", unlabeled_category="Unknown", batch_key="batch", **ARCH)
    model.train(max_epochs=25, progress_bar=False)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    qm = ss.tl.map_query(query, model, progress_bar=False)
    assert type(qm) is SCANVI and "X_scanvi" in query.obsm
    assert (query.obs["cell_type_pred"].astype(str).to_numpy() == truth).mean() > 0.9
    probs = qm.predict(soft=True).to_numpy()
    np.testing.assert_allclose(query.obs["cell_type_uncertainty"], 1 - probs.max(1), atol=1e-6)
    for k in ("classifier.logits.weight", "u_encoder.mean.weight", "z_decoder.mean.weight"):
        assert torch.equal(qm.module.state_dict()[k], before[k])
    with pytest.raises(ValueError, match="predicts its own labels"):
        ss.tl.map_query(query, model, labels_key="labels", progress_bar=False)


def test_reference_as_anndata_with_stored_model():
    ref, query = split()
    ss.pp.scvi(ref, batch_key="batch", use_highly_variable_genes=False, n_epochs=5, expression=False,
               progress_bar=False, **ARCH)  # fmt: skip
    qm = ss.tl.map_query(query, ref, labels_key="labels", max_epochs=2, progress_bar=False)
    assert "labels_pred" in query.obs and qm.setup.batch_categories[-1] == "batch_3"


def test_save_load_map_and_chain_in_a_fresh_process(mapped, tmp_path):
    _ref, model, _, _, _ = mapped
    model.save(tmp_path / "ref")
    _, query = split()
    query.write_h5ad(tmp_path / "q.h5ad")
    more, _ = split(n_obs=600, n_batches=4, seed=1)
    more = more[more.obs["batch"] == "batch_0"].copy()
    more.obs["batch"] = "lab_2"
    more.write_h5ad(tmp_path / "q2.h5ad")
    script = textwrap.dedent(
        f"""
        import warnings, numpy as np, anndata as ad, scanpy_scvi as ss
        q = ad.read_h5ad({str(tmp_path / "q.h5ad")!r})
        qm = ss.tl.map_query(q, {str(tmp_path / "ref")!r}, max_epochs=3, progress_bar=False)
        qm.save({str(tmp_path / "qm")!r})
        q2 = ad.read_h5ad({str(tmp_path / "q2.h5ad")!r})
        qm2 = ss.tl.map_query(q2, {str(tmp_path / "qm")!r}, max_epochs=3, progress_bar=False)
        assert qm2.setup.batch_categories[-2:] == ["batch_3", "lab_2"], qm2.setup.batch_categories
        assert np.isfinite(q2.obsm["X_scvi"]).all()
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_query_in_csc_with_padding(reference):
    _, model = reference
    _, query = split()
    q = query[:, 2:].copy()
    q.X = sp.csc_matrix(q.X)
    with pytest.warns(UserWarning, match="2 of the reference"):
        ss.tl.map_query(q, model, max_epochs=1, progress_bar=False)
    assert np.isfinite(q.obsm["X_scvi"]).all()


def test_docs_workflow_on_kang_ifnb(tmp_path):
    """The worked example of docs/mapping.rst on real data: CTRL reference, STIM query."""
    import anndata as ad
    import scanpy as sc
    from conftest import IFNB

    if not IFNB.is_file():
        pytest.skip(f"real data not found at {IFNB}")
    adata = ad.read_h5ad(IFNB)
    ref = adata[adata.obs["batch"] == "CTRL"].copy()
    query = adata[adata.obs["batch"] == "STIM"].copy()
    truth = query.obs.pop("cell_type").astype(str).to_numpy()
    sc.pp.highly_variable_genes(ref, flavor="seurat_v3", n_top_genes=2000)
    ss.pp.scvi(ref, batch_key="batch", n_epochs=100, expression=False, progress_bar=False, **ss.pp.REFERENCE_MAPPING)
    model = ss.pp.scanvi(ref, labels_key="cell_type", unlabeled_category="Unknown", scvi_model="scvi",
                         return_model=True, progress_bar=False)  # fmt: skip
    model.save(tmp_path / "pbmc_reference")
    query_model = ss.tl.map_query(query, tmp_path / "pbmc_reference", progress_bar=False)
    pred = query.obs["cell_type_pred"].astype(str).to_numpy()
    # scvi-tools' scANVI surgery reaches 0.62 on this split (benchmarks/RESULTS.md); chance ~0.3
    assert (pred == truth).mean() > 0.6
    for t in ("CD14 Mono", "B"):  # the large, distinct types transfer almost perfectly
        assert (pred[truth == t] == t).mean() > 0.85, t
    assert query_model.setup.batch_categories == ["CTRL", "STIM"]
    query_model.save(tmp_path / "pbmc_reference_plus_stim")
