"""The scanpy calls a user makes right after ``pp.scvi`` work in the installed environment.

scanpy switches from an exact to an approximate kNN search (pynndescent) from 8,192 cells
(4,096 with a non-euclidean metric), so a small dataset never reaches the code path that broke
with scanpy 1.11.5 and pynndescent 0.7 (pyproject.toml says why pynndescent is bounded).
``transformer='pynndescent'`` takes that path on any number of cells: the bundled dataset
checks it in CI; the multi-study PBMC set checks scanpy's own choice on 15k real cells.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scanpy as sc

import scanpy_scvi as scvi

PBMC = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc_multistudy_5batch_14989cells_2003genes.h5ad"


def _neighbors_then_umap(adata, **neighbors_args) -> None:
    sc.pp.neighbors(adata, use_rep="X_scvi", **neighbors_args)
    graph = adata.obsp["distances"]
    assert graph.shape == (adata.n_obs, adata.n_obs)
    # every cell has at least n_neighbors - 1 other cells (the approximate search may keep a few
    # more), at their euclidean distances in the latent space
    assert np.diff(graph.indptr).min() >= 14
    for i in (0, adata.n_obs // 2, adata.n_obs - 1):
        j = graph[i].indices
        distances = np.linalg.norm(adata.obsm["X_scvi"][j] - adata.obsm["X_scvi"][i], axis=1)
        np.testing.assert_allclose(graph[i].data, distances, rtol=1e-4, atol=1e-5)
    sc.tl.umap(adata, random_state=0)
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    assert np.isfinite(adata.obsm["X_umap"]).all()


def test_approximate_neighbors_and_umap_on_a_scvi_latent():
    adata = scvi.datasets.cellbench_lung()
    scvi.pp.scvi(adata, layer="counts", batch_key="batch", use_highly_variable_genes=False, n_epochs=2,
                 progress_bar=False, expression=False)  # fmt: skip
    _neighbors_then_umap(adata, transformer="pynndescent")


@pytest.mark.skipif(not PBMC.exists(), reason="needs ../shared/data")
def test_neighbors_and_umap_on_a_latent_of_15k_real_cells():
    adata = sc.read_h5ad(PBMC)
    assert adata.n_obs > 8192  # scanpy's own choice is the approximate search
    scvi.pp.scvi(adata, batch_key="batch", use_highly_variable_genes=False, n_epochs=1, progress_bar=False,
                 expression=False)  # fmt: skip
    _neighbors_then_umap(adata)
