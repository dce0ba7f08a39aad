"""tl.integration_scores: scIB-style scores against cases whose answers are known."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scanpy_scvi as ss


def _toy(seed: int = 0) -> ad.AnnData:
    """Three cell types x two batches, 60 cells each; three latent spaces:

    - ``X_ideal``: types far apart, batches mixed within each type;
    - ``X_batchy``: types far apart, each batch shifted far within its type;
    - ``X_noise``: no structure at all.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(["T", "B", "Mono"], 120)
    batches = np.tile(np.repeat(["b1", "b2"], 60), 3)
    centre = {"T": [0, 0], "B": [20, 0], "Mono": [0, 20]}
    ideal = np.array([centre[t] for t in labels], dtype=float) + rng.normal(size=(360, 2))
    shift = np.where(batches == "b1", 0.0, 6.0)[:, None] * np.array([[1.0, 1.0]])
    adata = ad.AnnData(
        X=np.zeros((360, 1), dtype=np.float32), obs=pd.DataFrame({"cell_type": labels, "batch": batches},
                                                                 index=[f"c{i}" for i in range(360)])
    )  # fmt: skip
    adata.obsm["X_ideal"] = ideal
    adata.obsm["X_batchy"] = ideal + shift
    adata.obsm["X_noise"] = rng.normal(size=(360, 2))
    return adata


def test_known_answers():
    adata = _toy()
    t = ss.tl.integration_scores(
        adata, batch_key="batch", label_key="cell_type", use_rep=["X_ideal", "X_batchy", "X_noise"], key_added="scores"
    )
    assert list(t.index) == ["X_ideal", "X_batchy", "X_noise"]
    assert t.loc["X_ideal", "nmi_kmeans"] == pytest.approx(1.0) and t.loc["X_ideal", "ari_kmeans"] == pytest.approx(1.0)
    assert t.loc["X_ideal", "graph_connectivity"] == pytest.approx(1.0)
    assert t.loc["X_ideal", "silhouette_batch"] > 0.9  # mixed batches: silhouette near 0
    assert t.loc["X_batchy", "silhouette_batch"] < 0.5  # separated batches: |s| large
    assert t.loc["X_noise", "nmi_kmeans"] < 0.1 and t.loc["X_noise", "silhouette_label"] < 0.55
    assert t.loc["X_ideal", "total"] > t.loc["X_batchy", "total"] > t.loc["X_noise", "total"] - 1  # ordered sanity
    assert t.loc["X_ideal", "total"] == pytest.approx(0.6 * t.loc["X_ideal", "bio"] + 0.4 * t.loc["X_ideal", "batch"])
    for col in t.columns:
        assert ((t[col] >= 0) & (t[col] <= 1)).all(), col
    assert adata.uns["scores"] is t


def test_silhouette_label_is_the_rescaled_sklearn_value():
    from sklearn.metrics import silhouette_score

    adata = _toy(1)
    t = ss.tl.integration_scores(adata, batch_key="batch", label_key="cell_type", use_rep="X_batchy")
    want = (silhouette_score(adata.obsm["X_batchy"], adata.obs["cell_type"]) + 1) / 2
    assert t.loc["X_batchy", "silhouette_label"] == pytest.approx(want)


def test_bad_input_is_a_clear_error_and_nothing_is_written():
    adata = _toy()
    before = set(adata.uns)
    with pytest.raises(KeyError, match="X_umap"):
        ss.tl.integration_scores(adata, batch_key="batch", label_key="cell_type", use_rep="X_umap")
    with pytest.raises(KeyError, match="label_key"):
        ss.tl.integration_scores(adata, batch_key="batch", label_key="celltype", use_rep="X_ideal")
    adata.obsm["X_ideal"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ss.tl.integration_scores(adata, batch_key="batch", label_key="cell_type", use_rep="X_ideal", key_added="s")
    assert set(adata.uns) == before


def test_subsample_is_seeded():
    adata = _toy()
    a = ss.tl.integration_scores(adata, batch_key="batch", label_key="cell_type", use_rep="X_batchy", max_cells=200)
    b = ss.tl.integration_scores(adata, batch_key="batch", label_key="cell_type", use_rep="X_batchy", max_cells=200)
    pd.testing.assert_frame_equal(a, b)
