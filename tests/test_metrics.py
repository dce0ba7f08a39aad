"""Latent-space quality scores and the gene correlation matrix, on closed forms and real data."""

from __future__ import annotations

import numpy as np
import pytest

from scanpy_scvi.model._metrics import clustering_scores, entropy_batch_mixing, knn_purity

ISGS = ["ISG15", "IFI6", "IFIT1", "MX1", "IFIT3"]


def test_entropy_batch_mixing_closed_forms():
    rng = np.random.default_rng(0)
    batches = np.repeat(["a", "b"], 200)
    separated = np.where(batches == "a", 0.0, 100.0)[:, None] + rng.normal(size=(400, 2))
    assert entropy_batch_mixing(separated, batches, n_neighbors=20) == pytest.approx(0.0, abs=1e-12)
    mixed = rng.normal(size=(400, 2))  # batches independent of position
    assert entropy_batch_mixing(mixed, batches, n_neighbors=50) == pytest.approx(np.log(2), abs=0.05)


def test_knn_purity_and_clustering_closed_forms():
    rng = np.random.default_rng(1)
    labels = np.repeat(["x", "y", "z"], 100)
    centers = {"x": (0, 0), "y": (50, 0), "z": (0, 50)}
    clustered = np.array([centers[lab] for lab in labels]) + rng.normal(size=(300, 2))
    assert knn_purity(clustered, labels, n_neighbors=10) == 1.0
    scores = clustering_scores(clustered, labels)
    assert scores["ari"] == pytest.approx(1.0) and scores["nmi"] == pytest.approx(1.0)
    assert scores["silhouette"] > 0.9
    noise = rng.normal(size=(300, 2))
    assert knn_purity(noise, labels, n_neighbors=10) == pytest.approx(1 / 3, abs=0.08)
    assert clustering_scores(noise, labels)["ari"] < 0.05


def test_scores_on_real_data(ifnb):
    from scanpy_scvi import SCVI

    model = SCVI.from_anndata(ifnb)
    purity = model.knn_purity(labels_key="cell_type")
    labels = ifnb.obs["cell_type"].astype(str).to_numpy()
    chance = knn_purity(ifnb.obsm["X_scvi"], np.random.default_rng(0).permutation(labels))
    assert 0.5 < purity <= 1.0 and purity > 3 * chance, (purity, chance)  # measured 0.58 vs ~0.1
    scores = model.clustering_scores(labels_key="cell_type")
    assert scores["ari"] > 0.3 and scores["nmi"] > 0.5 and -1 <= scores["silhouette"] <= 1
    with pytest.raises(ValueError, match="no batch_key"):
        model.entropy_batch_mixing()
    with pytest.raises(ValueError, match="labels_key"):
        model.knn_purity()


def test_entropy_batch_mixing_on_real_data_rises_with_batch_correction(ifnb):
    """Treating the condition as batch mixes CTRL and STIM more than a model that keeps it."""
    import scanpy_scvi as ss

    adata = ifnb.copy()
    corrected = ss.pp.scvi(adata, batch_key="batch", n_epochs=60, progress_bar=False, store_model=False)
    mixed = corrected.entropy_batch_mixing()
    from scanpy_scvi.model._metrics import entropy_batch_mixing as ebm

    kept = ebm(ifnb.obsm["X_scvi"], ifnb.obs["batch"].to_numpy())
    assert 0 < kept < mixed <= np.log(2) + 1e-9, (kept, mixed)


@pytest.mark.parametrize("kind", ["spearman", "pearson"])
def test_feature_correlation_interferon_genes(ifnb, kind):
    from scanpy_scvi import SCVI

    model = SCVI.from_anndata(ifnb)
    torch_seed = 0
    import torch

    torch.manual_seed(torch_seed)
    corr = model.get_feature_correlation_matrix(n_samples=3, correlation_type=kind)
    assert corr.shape == (2000, 2000)
    np.testing.assert_allclose(np.diag(corr.to_numpy()), 1.0, atol=1e-6)
    np.testing.assert_allclose(corr.to_numpy(), corr.to_numpy().T, atol=1e-6)
    isg = corr.loc[ISGS, ISGS].to_numpy()[np.triu_indices(len(ISGS), 1)]
    others = corr.loc[ISGS].drop(columns=ISGS).to_numpy()
    assert isg.mean() > 0.4
    assert isg.mean() > np.median(others) + 0.3
