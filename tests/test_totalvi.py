"""totalVI: pp.totalvi and the TOTALVI model on real CITE-seq (10x PBMC 10k + 5k, 9 proteins)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_unchanged, snapshot

import scanpy_scvi as ss

CITE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc10k_5k_cite_2batch_10849cells_4000genes_9prot.h5ad"
)
SMALL = {"n_hidden": 64, "n_latent": 10, "progress_bar": False, "device": "cpu"}


def _cite(n_per_batch: int = 400, n_genes: int = 600, seed: int = 0, extra_genes=()):
    """A subset of the 2-batch CITE-seq set: cells of both batches (B, T, monocytes, NK), the
    most variable genes by a simple dispersion rank, plus ``extra_genes``."""
    import anndata as ad

    if not CITE.is_file():
        pytest.skip(f"real data not found at {CITE}")
    full = ad.read_h5ad(CITE)
    keep = full.obs["cell_type"].isin(["B", "CD4 T", "CD8 T", "monocytes", "NK"]).to_numpy()
    rng = np.random.default_rng(seed)
    rows = np.concatenate(
        [rng.choice(np.flatnonzero(keep & (full.obs["batch"] == b).to_numpy()), n_per_batch, replace=False)
         for b in full.obs["batch"].cat.categories]
    )  # fmt: skip
    sub = full[np.sort(rows)]
    X = sub.X.toarray()
    mean, var = X.mean(0), X.var(0)
    genes = np.argsort(-(var / np.maximum(mean, 1e-3)) * (mean > 0.05))[:n_genes]
    genes = np.union1d(genes, np.flatnonzero(sub.var_names.isin(list(extra_genes))))
    adata = sub[:, genes].copy()
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    adata.obsm["protein_expression"] = adata.obsm["protein_expression"].copy()
    return adata


@pytest.fixture(scope="module")
def fitted():
    """totalVI on 800 cells x 600 genes x 9 proteins, 2 batches (read-only)."""
    adata = _cite()
    model = ss.pp.totalvi(adata, batch_key="batch", use_highly_variable_genes=False, max_epochs=60, return_model=True,
                          **SMALL)  # fmt: skip
    return adata, model


def test_outputs(fitted):
    adata, model = fitted
    n, proteins = adata.n_obs, list(adata.obsm["protein_expression"].columns)
    assert adata.obsm["X_totalvi"].shape == (n, 10)
    rna = adata.obsm["X_totalvi_denoised_rna"]
    assert rna.shape == (n, adata.n_vars) and rna.dtype == np.float32
    np.testing.assert_allclose(rna.sum(1), 1.0, rtol=1e-4)
    for key in ("X_totalvi_denoised_protein", "X_totalvi_protein_foreground"):
        frame = adata.obsm[key]
        assert isinstance(frame, pd.DataFrame) and list(frame.columns) == proteins
        assert frame.index.equals(adata.obs_names) and np.isfinite(frame.to_numpy()).all()
    fg = adata.obsm["X_totalvi_protein_foreground"].to_numpy()
    assert fg.min() >= 0 and fg.max() <= 1
    uns = adata.uns["totalvi"]
    assert list(uns["protein_names"]) == proteins
    assert uns["params"]["n_latent"] == 10 and uns["params"]["gene_likelihood"] == "nb"
    assert {"elbo_train", "elbo_validation", "lr", "reconstruction_loss_train"} <= set(uns["history"])
    assert model.train_config["lr"] == 4e-3 and model.train_config["batch_size"] == 256
    assert model.train_config["n_steps_kl_warmup"] == int(0.75 * n)


def test_cd19_is_foreground_in_b_cells_and_background_in_t_cells(fitted):
    adata, _ = fitted
    fg = adata.obsm["X_totalvi_protein_foreground"]
    cd19 = next(c for c in fg.columns if c.startswith("CD19"))
    types = adata.obs["cell_type"].astype(str)
    b_cells, t_cells = fg.loc[(types == "B").to_numpy(), cd19], fg.loc[types.isin(["CD4 T", "CD8 T"]).to_numpy(), cd19]
    assert b_cells.median() > 0.8 > 0.2 > t_cells.median(), (b_cells.median(), t_cells.median())
    denoised = adata.obsm["X_totalvi_denoised_protein"][cd19]
    assert (
        denoised[(types == "B").to_numpy()].median() > 10 * denoised[types.isin(["CD4 T", "CD8 T"]).to_numpy()].median()
    )


def test_latent_separates_cell_types(fitted):
    from sklearn.neighbors import KNeighborsClassifier

    adata, _ = fitted
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    half = np.arange(adata.n_obs) % 2 == 0
    knn = KNeighborsClassifier(15).fit(adata.obsm["X_totalvi"][half], labels[half])
    assert knn.score(adata.obsm["X_totalvi"][~half], labels[~half]) > 0.85


def test_model_in_uns_and_on_disk(fitted, tmp_path):
    adata, model = fitted
    again = ss.TOTALVI.from_anndata(adata, key="totalvi", device="cpu")
    np.testing.assert_array_equal(again.get_latent_representation(adata), model.get_latent_representation())
    model.save(tmp_path / "m")
    loaded = ss.TOTALVI.load(tmp_path / "m", adata=adata, device="cpu")
    with pytest.raises(ValueError, match="TOTALVI"):
        ss.SCVI.load(tmp_path / "m")
    assert isinstance(loaded, ss.TOTALVI) and loaded.setup.protein_names == model.setup.protein_names
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    assert model.get_elbo() < 0


def test_expression_options(fitted):
    adata, model = fitted
    cells = np.arange(20)
    with model.seeded(0):  # the same posterior draws with and without the background
        rna, protein = model.get_normalized_expression(indices=cells, transform_batch="5k_pbmc_protein_v3")
    assert rna.shape == (20, adata.n_vars) and protein.shape == (20, 9)
    with model.seeded(0):
        _, with_background = model.get_normalized_expression(
            indices=cells, include_protein_background=True, transform_batch="5k_pbmc_protein_v3"
        )
    assert (with_background.to_numpy() > protein.to_numpy()).all()
    _, scaled = model.get_normalized_expression(indices=cells, scale_protein=True, protein_list=["CD3_TotalSeqB"])
    assert scaled.shape == (20, 1)
    rna3, protein3 = model.get_normalized_expression(indices=cells, n_samples=3, return_mean=False)
    assert rna3.shape == (3, 20, adata.n_vars) and protein3.shape == (3, 20, 9)
    with pytest.raises(ValueError, match="protein_list"):
        model.get_normalized_expression(protein_list=["CD999"])


def test_missing_proteins_in_a_batch_are_masked_and_imputed():
    adata = _cite(n_per_batch=300, n_genes=400, seed=1)
    proteins = adata.obsm["protein_expression"]
    cd19 = next(c for c in proteins.columns if c.startswith("CD19"))
    second = (adata.obs["batch"] == "5k_pbmc_protein_v3").to_numpy()
    proteins.loc[second, cd19] = 0.0  # the 5k panel "lacks" CD19
    with pytest.warns(UserWarning, match="not measured"):
        model = ss.pp.totalvi(adata, batch_key="batch", use_highly_variable_genes=False, max_epochs=40,
                              return_model=True, **SMALL)  # fmt: skip
    assert model.train_config["adversarial_classifier"] is True  # scvi-tools' rule: a batch misses proteins
    assert len(model.history_["adversarial_loss_train"]) == len(model.history_["elbo_train"])
    mask = model.module.protein_mask.bool().numpy()
    assert not mask[model.setup.batch_categories.index("5k_pbmc_protein_v3"), list(proteins.columns).index(cd19)]
    assert mask.sum() == mask.size - 1
    # imputed from the batch that measured it: B cells of the 5k batch still light up
    fg = adata.obsm["X_totalvi_protein_foreground"][cd19]
    types = adata.obs["cell_type"].astype(str).to_numpy()
    # (the adversarial classifier, on here, costs some of the separation on this small fit)
    assert fg[second & (types == "B")].median() > fg[second & np.isin(types, ["CD4 T", "CD8 T"])].median() + 0.2


def test_without_validation_set_early_stopping_watches_the_training_elbo():
    adata = _cite(n_per_batch=100, n_genes=200, seed=2)
    model = ss.TOTALVI(adata, batch_key="batch", n_hidden=32, n_latent=5)
    model.train(6, train_size=1.0, early_stopping=True, reduce_lr_on_plateau=True, progress_bar=False, device="cpu")
    assert not any(k.endswith("_validation") for k in model.history_)
    assert len(model.history_["elbo_train"]) == 6 and "lr" in model.history_


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.obsm.__setitem__("protein_expression", -a.obsm["protein_expression"]), ValueError, "negative"),
        (lambda a: a.obsm.__setitem__("protein_expression", a.obsm["protein_expression"] + 0.5), ValueError,
         "non-integer"),
        (lambda a: a.obsm["protein_expression"].iloc.__setitem__((0, 0), np.nan), ValueError, "NaN"),
        (lambda a: a.obsm.pop("protein_expression"), KeyError, "protein_expression"),
    ],
    ids=["negative", "non-integer", "nan", "missing-key"],
)  # fmt: skip
def test_bad_protein_input_raises_and_leaves_adata_unchanged(change, error, match):
    adata = _cite(n_per_batch=50, n_genes=100, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        change(adata)
    snap = snapshot(adata)
    with pytest.raises(error, match=match):
        ss.pp.totalvi(adata, batch_key="batch", use_highly_variable_genes=False, max_epochs=1, **SMALL)
    assert_unchanged(adata, snap)


def test_protein_names_must_match_the_model(fitted):
    adata, model = fitted
    other = adata[:50].copy()
    renamed = other.obsm["protein_expression"].rename(columns={"CD3_TotalSeqB": "CD3"})
    other.obsm["protein_expression"] = renamed
    with pytest.raises(ValueError, match="CD3_TotalSeqB"):
        model.get_latent_representation(other)


def test_differential_expression_covers_genes_and_proteins(fitted):
    import scanpy as sc

    adata, model = fitted
    data = adata.copy()
    result = ss.tl.differential_expression(
        data, groupby="cell_type", group1=["B", "monocytes"], model_key="totalvi", n_samples=500, inplace=False,
        progress_bar=False,
    )  # fmt: skip
    proteins = list(adata.obsm["protein_expression"].columns)
    b = result[result["group1"] == "B"]
    assert set(proteins) <= set(b.index) and len(b) == adata.n_vars + len(proteins)
    cd19 = next(p for p in proteins if p.startswith("CD19"))
    cd14 = next(p for p in proteins if p.startswith("CD14"))
    assert b.loc[cd19, "proba_up"] > 0.9 and b.loc[cd19, "lfc_mean"] > 1
    mono = result[result["group1"] == "monocytes"]
    assert mono.loc[cd14, "proba_up"] > 0.9 and mono.loc[cd19, "lfc_mean"] < b.loc[cd19, "lfc_mean"] - 1
    assert b.loc[cd19, "raw_mean1"] > b.loc[cd19, "raw_mean2"]  # raw protein counts of each group
    ss.tl.differential_expression(data, groupby="cell_type", group1="B", model=model, n_samples=300,
                                  key_added="de", progress_bar=False)  # fmt: skip
    top = sc.get.rank_genes_groups_df(data, "B", key="de")["names"].head(30).tolist()
    assert cd19 in top
    with pytest.raises(TypeError, match=r"needs a scanpy_scvi\.SCVI model"):
        ss.tl.batch_corrected_counts(data, transform_batch="5k_pbmc_protein_v3", model=model)


def test_adversarial_objective_fools_and_trains_its_classifier():
    import torch
    import torch.nn.functional as F

    from scanpy_scvi.model._adversarial import AdversarialObjective
    from scanpy_scvi.nn import TOTALVAE

    torch.manual_seed(0)
    module = TOTALVAE(30, n_proteins=4, n_batch=3, n_hidden=16, n_latent=5).train()
    g = torch.Generator().manual_seed(1)
    t = {
        "X": torch.poisson(torch.full((12, 30), 2.0), generator=g),
        "Y": torch.poisson(torch.full((12, 4), 20.0), generator=g),
        "batch": torch.tensor([0, 1, 2] * 4),
        "labels": torch.zeros(12, dtype=torch.long),
    }
    objective = AdversarialObjective(5, 3)
    objective.classifier.eval()  # no dropout while the formulas are checked
    z = torch.randn(12, 5)
    logits = objective.classifier(z)
    true = objective.classification_loss(z, t["batch"], true_batch=True)
    torch.testing.assert_close(true, F.cross_entropy(logits, t["batch"]))
    fool = objective.classification_loss(z, t["batch"], true_batch=False)
    others = (1 - F.one_hot(t["batch"], 3).float()) / 2  # uniform over the other batches
    torch.testing.assert_close(fool, -(F.log_softmax(logits, -1) * others).sum(-1).mean())

    objective.epoch_start(module, 0)
    weights = [p.detach().clone() for p in objective.classifier.parameters()]
    terms = objective.loss(module, t, kl_weight=0.25)
    terms.loss.backward()
    assert module.z_encoder.mean.weight.grad is not None  # the fooling term reaches the encoder
    objective.after_step(module)
    assert any(not torch.equal(w, p) for w, p in zip(weights, objective.classifier.parameters(), strict=True))
    assert terms.extra["adversarial_loss"][1] == 1
    # with the KL weight at 1 the adversarial term is off: the classifier does not move
    weights = [p.detach().clone() for p in objective.classifier.parameters()]
    objective.loss(module, t, kl_weight=1.0)
    objective.after_step(module)
    assert all(torch.equal(w, p) for w, p in zip(weights, objective.classifier.parameters(), strict=True))


def test_latent_scores_come_from_the_base(fitted):
    _, model = fitted
    assert model.knn_purity(labels_key="cell_type") > 0.8
    assert 0 < model.entropy_batch_mixing(n_pools=5, n_samples_per_pool=50) <= np.log(2) + 1e-6
    assert set(model.clustering_scores(labels_key="cell_type")) == {"ari", "nmi", "silhouette"}
