"""How well a latent space integrates batches and keeps cell types: scib-style scores.

The scores of the scIB benchmark (Luecken et al. 2022, Nat Methods 19:41), computed with
numpy, scipy and scikit-learn on any ``obsm`` representation, so that ``X_scvi`` can be
compared with ``X_pca`` or a Harmony embedding in one call:

- bio conservation: NMI and ARI between the labels and a k-means clustering with as many
  clusters as labels (the best of ``n_init`` restarts), and the label silhouette rescaled to
  [0, 1] (``(s + 1) / 2``);
- batch correction: the batch silhouette per label (``1 - |s|`` averaged over the cells of each
  label, then over labels) and graph connectivity (per label, the share of its cells in the
  largest connected component of the kNN graph restricted to that label, averaged);
- aggregates as scIB: ``bio`` and ``batch`` the means of their scores, ``total = 0.6 bio + 0.4
  batch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.sparse.csgraph import connected_components

from .._compat import logg

BIO = ("nmi_kmeans", "ari_kmeans", "silhouette_label")
BATCH = ("silhouette_batch", "graph_connectivity")


def integration_scores(
    adata: AnnData,
    *,
    batch_key: str,
    label_key: str,
    use_rep: str | Sequence[str] = "X_scvi",
    n_neighbors: int = 15,
    max_cells: int | None = 20_000,
    random_state: int | None = 0,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Score latent spaces for batch integration and cell-type conservation (scIB scores).

    Parameters
    ----------
    adata
        Annotated data with the representations in ``obsm``.
    batch_key, label_key
        ``obs`` columns of the batches and of the (ground-truth) cell types.
    use_rep
        ``obsm`` key or keys to score (``'X_scvi'``, ``'X_pca'``, ...).
    n_neighbors
        Neighbours of the kNN graph of graph connectivity.
    max_cells
        Score a random subsample of this many cells (silhouettes cost cells squared);
        ``None`` scores all cells.
    random_state
        Seed of the subsample and of k-means.
    key_added
        Also store the table in ``adata.uns[key_added]``.

    Returns
    -------
    One row per representation: ``nmi_kmeans``, ``ari_kmeans``, ``silhouette_label``,
    ``silhouette_batch``, ``graph_connectivity``, ``bio``, ``batch``, ``total`` (all in [0, 1],
    higher is better).
    """
    reps = [use_rep] if isinstance(use_rep, str) else list(use_rep)
    for key, what in ((batch_key, "batch_key"), (label_key, "label_key")):
        if key not in adata.obs.columns:
            msg = f"{what}={key!r} is not a column of adata.obs."
            raise KeyError(msg)
    missing = [r for r in reps if r not in adata.obsm]
    if missing:
        msg = f"{missing} not in adata.obsm (keys: {list(adata.obsm.keys())})."
        raise KeyError(msg)
    batches = adata.obs[batch_key].astype(str).to_numpy()
    labels = adata.obs[label_key].astype(str).to_numpy()
    if pd.isna(adata.obs[label_key]).any() or pd.isna(adata.obs[batch_key]).any():
        msg = f"adata.obs[{label_key!r}] or adata.obs[{batch_key!r}] has missing values; score the labelled cells."
        raise ValueError(msg)
    rng = np.random.default_rng(random_state)
    cells = np.arange(adata.n_obs)
    if max_cells is not None and adata.n_obs > max_cells:
        cells = np.sort(rng.choice(adata.n_obs, max_cells, replace=False))
    rows = {}
    for rep in reps:
        X = np.asarray(adata.obsm[rep], dtype=np.float64)[cells]
        if not np.isfinite(X).all():
            msg = f"adata.obsm[{rep!r}] has non-finite values."
            raise ValueError(msg)
        rows[rep] = scores_of(X, labels[cells], batches[cells], n_neighbors=n_neighbors, random_state=random_state)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "representation"
    if key_added is not None:
        adata.uns[key_added] = table
        logg.info(f"    added adata.uns[{key_added!r}]")
    return table


def scores_of(X: np.ndarray, labels: np.ndarray, batches: np.ndarray, *, n_neighbors: int, random_state) -> dict:
    """The scores of one representation ``X`` (cells x dimensions)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_samples

    out = {}
    n_labels = len(np.unique(labels))
    clusters = KMeans(n_clusters=n_labels, n_init=10, random_state=random_state).fit_predict(X)
    out["nmi_kmeans"] = float(normalized_mutual_info_score(labels, clusters))
    out["ari_kmeans"] = float(adjusted_rand_score(labels, clusters))
    out["silhouette_label"] = float((silhouette_samples(X, labels).mean() + 1) / 2) if n_labels > 1 else np.nan
    out["silhouette_batch"] = batch_silhouette(X, labels, batches)
    out["graph_connectivity"] = graph_connectivity(X, labels, n_neighbors)
    out["bio"] = float(np.nanmean([out[k] for k in BIO]))
    out["batch"] = float(np.nanmean([out[k] for k in BATCH]))
    out["total"] = 0.6 * out["bio"] + 0.4 * out["batch"]
    return out


def batch_silhouette(X: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """scIB's batch ASW: per label with cells of several batches, the mean of ``1 - |s|`` of the
    batch silhouette within that label; averaged over those labels."""
    from sklearn.metrics import silhouette_samples

    per_label = []
    for label in np.unique(labels):
        own = labels == label
        if len(np.unique(batches[own])) < 2 or own.sum() < 3:
            continue
        per_label.append(np.mean(1 - np.abs(silhouette_samples(X[own], batches[own]))))
    return float(np.mean(per_label)) if per_label else np.nan


def graph_connectivity(X: np.ndarray, labels: np.ndarray, n_neighbors: int) -> float:
    """Per label, the share of its cells in the largest connected component of the kNN graph
    restricted to its cells; averaged over labels (1: every label one connected piece)."""
    from sklearn.neighbors import kneighbors_graph

    k = min(n_neighbors, len(X) - 1)
    graph = kneighbors_graph(X, k, include_self=False)
    shares = []
    for label in np.unique(labels):
        own = np.flatnonzero(labels == label)
        _, comp = connected_components(graph[own][:, own], directed=False)
        shares.append(np.bincount(comp).max() / len(own))
    return float(np.mean(shares))
