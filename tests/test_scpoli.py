"""scPoli: condition embeddings, prototypes, label transfer, sample embeddings, reference mapping."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import assert_unchanged, make_adata, snapshot

import scanpy_scvi as ss
from scanpy_scvi.model import query_model
from scanpy_scvi.nn import EmbeddingVAE

SMALL = {"hidden_layer_sizes": (32,), "n_latent": 4, "embedding_dims": 3}


def test_prototype_loss_is_the_sum_over_types_of_mean_distances():
    m = EmbeddingVAE(10, n_batch=2, n_labels=2, **SMALL)
    m.prototypes.copy_(torch.tensor([[0.0, 0, 0, 0], [1.0, 1, 1, 1]]))
    z = torch.tensor([[3.0, 4, 0, 0], [0, 0, 0, 1], [1, 1, 1, 3], [9, 9, 9, 9]])
    labels = torch.tensor([0, 0, 1, 2])  # code 2 = unlabelled: no term
    # type 0: mean(5, 1) = 3; type 1: 2
    assert float(m.prototype_loss(z, labels)) == pytest.approx(5.0)
    assert float(m.prototype_loss(z, torch.full((4,), 2))) == 0.0


def test_embeddings_are_norm_limited_and_replace_one_hot_columns():
    m = EmbeddingVAE(10, n_batch=3, n_cats_per_cov=(2,), embedding_max_norm=0.5, **SMALL)
    with torch.no_grad():
        m.embeddings[0].weight.mul_(10.0)
    norms = [t.norm(dim=-1) for t in m.condition_embeddings()]
    assert all(torch.all(n <= 0.5 + 1e-6) for n in norms)
    assert tuple(m.encoder.condition.weight.shape) == (32, 6)  # two keys x 3 dimensions
    assert m.architecture.hidden_layer_sizes == (32,)
    default = EmbeddingVAE(2003, n_batch=2)
    assert default.architecture.hidden_layer_sizes == (45,)  # ceil(sqrt(2003)), scArches


@pytest.fixture(scope="module")
def fitted():
    data = make_adata(n_obs=300, n_batches=3)
    data.obs["study"] = data.obs["batch"].map({"batch_0": "s1", "batch_1": "s1", "batch_2": "s2"}).astype("category")
    model = ss.pp.scpoli(data, condition_keys="batch", cell_type_keys="labels", use_highly_variable_genes=False,
                         max_epochs=20, pretraining_epochs=14, return_model=True, progress_bar=False, **SMALL)  # fmt: skip
    return data, model


def test_pp_scpoli_writes_its_outputs(fitted):
    data, _model = fitted
    assert data.obsm["X_scpoli"].shape == (data.n_obs, 4)
    assert set(data.obs["labels_scpoli_pred"].cat.categories) == {"label_0", "label_1", "label_2"}
    assert data.obs["labels_scpoli_uncertainty"].dtype == np.float32
    rec = data.uns["scpoli"]
    assert rec["params"]["pretraining_epochs"] == 14 and rec["params"]["condition_keys"] == ["batch"]
    assert rec["condition_embeddings"].shape == (3, 3) and rec["prototypes"].shape == (3, 4)
    assert len(rec["history"]["prototype_loss_train"]) == 20 - 14  # only after pretraining
    assert len(rec["history"]["elbo_train"]) == 20


def test_prototypes_are_the_mean_latent_of_their_labelled_cells(fitted):
    data, model = fitted
    z = model.get_latent_representation(indices=model.train_indices)
    labels = data.obs["labels"].to_numpy()[model.train_indices]
    for code, name in enumerate(model.setup.label_categories):
        np.testing.assert_allclose(model.module.prototypes[code].numpy(), z[labels == name].mean(0), atol=1e-5)


def test_soft_predictions_are_a_distribution(fitted):
    _, model = fitted
    soft = model.predict(soft=True)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    assert list(soft.columns) == model.setup.label_categories
    assert np.array_equal(soft.to_numpy().argmax(1), model.classify()["pred"].cat.codes.to_numpy())


def test_prototypes_pull_cell_lines_apart():
    """CellBench cell lines (5 batches): nearest-prototype calls are right for most cells, and
    more often with the prototype loss than without it."""
    import scanpy as sc

    data = ss.datasets.cellbench_lung()
    sc.pp.highly_variable_genes(data, flavor="seurat_v3", n_top_genes=500, layer="counts")
    genes = list(data.var_names[data.var["highly_variable"]])
    truth = data.obs["cell_type"].astype(str).to_numpy()
    accuracy = {}
    for pretraining in (40, 20):  # all epochs without prototypes, then half of them with
        model = ss.SCPOLI(data, layer="counts", condition_keys="batch", cell_type_keys="cell_type", genes=genes)
        model.train(40, pretraining_epochs=pretraining, eta=5.0, progress_bar=False)
        accuracy[pretraining] = np.mean(model.classify()["pred"].astype(str).to_numpy() == truth)
    assert accuracy[20] > 0.85 and accuracy[20] > accuracy[40] + 0.03, accuracy


def test_conditional_embeddings_are_an_anndata_of_samples(fitted):
    _data, model = fitted
    emb = model.get_conditional_embeddings()
    assert emb.shape == (3, 3) and list(emb.obs_names) == ["batch_0", "batch_1", "batch_2"]
    assert list(emb.obs["study"]) == ["s1", "s1", "s2"]  # constant within each sample: carried over
    assert "labels" not in emb.obs  # varies within samples
    assert np.all(np.linalg.norm(emb.X, axis=1) <= 1.0 + 1e-6)


def test_unknown_names_and_labeled_indices_mark_unlabelled_cells():
    data = make_adata(n_obs=120, n_batches=2)
    data.obs["labels"] = data.obs["labels"].cat.add_categories("unknown")
    data.obs.loc[data.obs_names[:10], "labels"] = "unknown"
    model = ss.SCPOLI(data, condition_keys="batch", cell_type_keys="labels", unknown_ct_names=["unknown"],
                      labeled_indices=np.arange(60), **SMALL)  # fmt: skip
    assert model.setup.label_categories == ["label_0", "label_1", "label_2"]
    codes = model.bind().source.obs["labels"]
    assert np.all(codes[:10] == 3) and np.all(codes[60:] == 3) and np.all(codes[10:60] < 3)
    assert data.obs["labels"].iloc[70] != "unknown"  # the AnnData itself is untouched


def test_save_load_keeps_prototypes(fitted, tmp_path):
    data, model = fitted
    model.save(tmp_path / "m")
    loaded = ss.SCPOLI.load(tmp_path / "m", adata=data)
    assert torch.equal(loaded.module.prototypes, model.module.prototypes)
    assert torch.equal(loaded.module.unlabeled_prototypes, model.module.unlabeled_prototypes)
    assert loaded.classify()["pred"].equals(model.classify()["pred"])
    data.write_h5ad(tmp_path / "a.h5ad")
    back = ss.SCPOLI.from_anndata(ad.read_h5ad(tmp_path / "a.h5ad"))
    np.testing.assert_array_equal(back.get_latent_representation(), model.get_latent_representation())


def test_bad_input_raises_and_leaves_adata_unchanged():
    data = make_adata(n_obs=60)
    snap = snapshot(data)
    with pytest.raises(ValueError, match="condition_keys"):
        ss.pp.scpoli(data, condition_keys="batch", batch_key="labels", use_highly_variable_genes=False)
    with pytest.raises(KeyError, match="nope"):
        ss.pp.scpoli(data, condition_keys="batch", cell_type_keys="nope", use_highly_variable_genes=False)
    with pytest.raises(KeyError, match="labeled_indices"):
        ss.pp.scpoli(data, condition_keys="batch", cell_type_keys="labels", labeled_indices=["no_such_cell"],
                     use_highly_variable_genes=False)  # fmt: skip
    with pytest.raises(ValueError, match="one cell_type_keys"):
        ss.pp.scpoli(data, condition_keys="batch", cell_type_keys=["labels", "batch"], use_highly_variable_genes=False)
    assert_unchanged(data, snap)


# -- reference mapping ------------------------------------------------------------------------------------
def test_map_query_trains_only_new_embedding_rows_and_adds_new_cell_types():
    data = make_adata(n_obs=480, n_batches=4)
    is_query = (data.obs["batch"] == "batch_3").to_numpy()
    ref = data[~is_query & (data.obs["labels"] != "label_2").to_numpy()].copy()  # label_2: unseen in the reference
    query = data[is_query].copy()
    for part in (ref, query):
        part.obs["batch"] = part.obs["batch"].cat.remove_unused_categories()
    model = ss.SCPOLI(ref, condition_keys="batch", cell_type_keys="labels", **SMALL)
    model.train(max_epochs=20, pretraining_epochs=14, progress_bar=False)
    assert model.setup.label_categories == ["label_0", "label_1"]
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    initial = query_model(model, query)[0].module.state_dict()
    # the new sample starts as the mean reference sample
    torch.testing.assert_close(
        initial["embeddings.0.weight"][3], before["embeddings.0.weight"].mean(0), rtol=0, atol=1e-7
    )

    # without labels: the reference's two types are predicted; the unseen type is far from both prototypes
    unlabelled = query.copy()
    qm = ss.tl.map_query(unlabelled, model, max_epochs=10, progress_bar=False)
    after = qm.module.state_dict()
    assert after["embeddings.0.weight"].shape == (4, 3)
    assert torch.equal(after["embeddings.0.weight"][:3], before["embeddings.0.weight"])
    assert not torch.equal(after["embeddings.0.weight"][3], initial["embeddings.0.weight"][3])
    for k, old in before.items():
        if k in ("embeddings.0.weight", "log_theta", "unlabeled_prototypes"):
            continue
        assert torch.equal(after[k], old), f"{k} moved"
    assert torch.equal(after["log_theta"][:, :3], before["log_theta"])
    assert set(unlabelled.obs["labels_pred"].astype(str)) <= {"label_0", "label_1"}
    labelled = query.copy()  # labels for part of the query: label_2 becomes a third prototype
    qm = ss.tl.map_query(labelled, model, labeled_indices=np.arange(0, query.n_obs, 2), max_epochs=10,
                         progress_bar=False)  # fmt: skip
    assert qm.setup.label_categories == ["label_0", "label_1", "label_2"]
    assert torch.equal(qm.module.prototypes[:2], before["prototypes"])
    assert not torch.equal(qm.module.prototypes[2], torch.zeros(4))
    trvae = ss.TRVAE(ref, batch_key="batch", n_latent=4)
    trvae.train(1, progress_bar=False)
    with pytest.raises(ValueError, match="labeled_indices: not an option of trVAE references"):
        ss.tl.map_query(query.copy(), trvae, labeled_indices=[0], max_epochs=0)


def test_a_cell_line_the_reference_never_saw_is_flagged_then_learned():
    """CellBench: H838 is left out of the reference. Mapped without labels, the query's H838 cells
    lie farther from every prototype than the known lines; with half of the query labelled, H838
    becomes a prototype and the unlabelled half is classified."""
    import scanpy as sc

    data = ss.datasets.cellbench_lung()
    sc.pp.highly_variable_genes(data, flavor="seurat_v3", n_top_genes=500, layer="counts")
    data = data[:, data.var["highly_variable"]].copy()
    in_query = (data.obs["batch"] == "CELseq2_5cl_p3").to_numpy()
    ref = data[
        ~in_query & (data.obs["cell_type"] != "H838").to_numpy() & (data.obs["batch"] != "Dropseq_3cl").to_numpy()
    ].copy()
    query = data[in_query].copy()
    model = ss.SCPOLI(ref, layer="counts", condition_keys="batch", cell_type_keys="cell_type")
    model.train(40, pretraining_epochs=20, eta=5.0, progress_bar=False)

    unlabelled = query.copy()
    ss.tl.map_query(unlabelled, model, max_epochs=20, progress_bar=False)
    novel = (unlabelled.obs["cell_type"] == "H838").to_numpy()
    unc = unlabelled.obs["cell_type_uncertainty"].to_numpy()
    assert np.median(unc[novel]) > 1.5 * np.median(unc[~novel])
    known_right = (
        unlabelled.obs["cell_type_pred"].astype(str)[~novel] == unlabelled.obs["cell_type"].astype(str)[~novel]
    )
    assert known_right.mean() > 0.85

    labelled = query.copy()
    half = np.arange(query.n_obs) % 2 == 0
    qm = ss.tl.map_query(labelled, model, labeled_indices=half, max_epochs=20, progress_bar=False)
    assert "H838" in qm.setup.label_categories
    right = labelled.obs["cell_type_pred"].astype(str) == labelled.obs["cell_type"].astype(str)
    assert right[~half].mean() > 0.85 and right[~half & novel].mean() > 0.7


def test_random_state_reproduces_bit_for_bit():
    a, b = make_adata(n_obs=120, n_batches=2), make_adata(n_obs=120, n_batches=2)
    for x in (a, b):
        ss.pp.scpoli(x, condition_keys="batch", cell_type_keys="labels", use_highly_variable_genes=False,
                     max_epochs=4, pretraining_epochs=2, progress_bar=False, **SMALL)  # fmt: skip
    np.testing.assert_array_equal(a.obsm["X_scpoli"], b.obsm["X_scpoli"])
    np.testing.assert_array_equal(a.obs["labels_scpoli_uncertainty"], b.obs["labels_scpoli_uncertainty"])


def test_early_stopping_watches_only_after_pretraining():
    data = make_adata(n_obs=120, n_batches=2)
    model = ss.SCPOLI(data, condition_keys="batch", cell_type_keys="labels", **SMALL)
    model.train(max_epochs=12, pretraining_epochs=8, early_stopping=True, early_stopping_patience=1,
                progress_bar=False)  # fmt: skip
    assert model.train_config["best_epoch"] >= 8  # never a weight state from before the prototypes
