"""Latent-space quality scores of the original scVI ``Posterior`` API (pure numpy/sklearn)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData


def cell_labels(adata: AnnData, idx: np.ndarray, key: str | None) -> np.ndarray:
    """The labels (as strings) of cells ``idx`` in ``adata.obs[key]``, checked."""
    if key is None:
        msg = "Pass labels_key= (an obs column of cell labels); the model was built without one."
        raise ValueError(msg)
    if key not in adata.obs.columns:
        msg = f"{key!r} not found in adata.obs."
        raise KeyError(msg)
    return adata.obs[key].astype(str).to_numpy()[idx]


def _knn(latent: np.ndarray, n_neighbors: int) -> np.ndarray:
    """Indices of each cell's ``n_neighbors`` nearest other cells (Euclidean)."""
    from sklearn.neighbors import NearestNeighbors

    if not 0 < n_neighbors < len(latent):
        msg = f"n_neighbors must be in [1, {len(latent) - 1}], got {n_neighbors}."
        raise ValueError(msg)
    nn = NearestNeighbors(n_neighbors=n_neighbors + 1).fit(latent)
    idx = nn.kneighbors(latent, return_distance=False)
    # drop the cell itself (first column, unless exact duplicates reorder it)
    own = idx == np.arange(len(latent))[:, None]
    own[~own.any(1), -1] = True
    return idx[~own].reshape(len(latent), n_neighbors)


def entropy_batch_mixing(
    latent: np.ndarray,
    batches: np.ndarray,
    *,
    n_neighbors: int = 50,
    n_pools: int = 50,
    n_samples_per_pool: int = 100,
    random_state: int | None = 0,
) -> float:
    """Mean entropy (natural log) of the batch labels among each cell's neighbours.

    Averaged over ``n_pools`` random pools of ``n_samples_per_pool`` cells, as in scVI 0.6.
    0 means neighbourhoods hold a single batch; log(n_batches) is perfect mixing of balanced
    batches.
    """
    batches = np.asarray(batches)
    _, codes = np.unique(batches, return_inverse=True)
    neighbors = _knn(latent, n_neighbors)
    n_batches = codes.max() + 1
    counts = np.zeros((len(latent), n_batches))
    np.add.at(counts, (np.repeat(np.arange(len(latent)), n_neighbors), codes[neighbors].ravel()), 1)
    freq = counts / n_neighbors
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(freq > 0, freq * np.log(freq), 0.0).sum(1)
    rng = np.random.default_rng(random_state)
    pools = [entropy[rng.choice(len(latent), n_samples_per_pool)].mean() for _ in range(n_pools)]
    return float(np.mean(pools))


def knn_purity(latent: np.ndarray, labels: np.ndarray, *, n_neighbors: int = 30) -> float:
    """Fraction of each cell's neighbours sharing its label, averaged per label, then over labels."""
    labels = np.asarray(labels)
    neighbors = _knn(latent, n_neighbors)
    same = (labels[neighbors] == labels[:, None]).mean(1)
    return float(np.mean([same[labels == lab].mean() for lab in np.unique(labels)]))


def clustering_scores(latent: np.ndarray, labels: np.ndarray, *, random_state: int | None = 0) -> dict[str, float]:
    """k-means on the latent with as many clusters as labels: ARI and NMI against the labels,
    and the silhouette of the labels in the latent space."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    labels = np.asarray(labels)
    k = len(np.unique(labels))
    if k < 2:
        msg = "clustering_scores needs at least two labels."
        raise ValueError(msg)
    clusters = KMeans(n_clusters=k, n_init=10, random_state=random_state).fit_predict(latent)
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "silhouette": float(silhouette_score(latent, labels)),
    }
