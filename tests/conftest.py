"""Shared fixtures: a small synthetic AnnData and a small trained model (session-scoped).

Everything here is sized for a 2-core CPU: a few hundred cells, 80 genes, 32 hidden units.
Session-scoped objects must not be modified by tests; tests that write into an AnnData
take the function-scoped ``adata`` fixture (a fresh copy).
"""

from __future__ import annotations

import copy
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scanpy_scvi import SCVI
from scanpy_scvi.datasets import synthetic_counts

N_OBS, N_VARS, N_LATENT, N_HIDDEN = 300, 80, 5, 32
SMALL_MODEL = {"n_hidden": N_HIDDEN, "n_latent": N_LATENT}


def make_adata(n_obs: int = N_OBS, n_vars: int = N_VARS, n_batches: int = 2, random_state: int = 0):
    """Synthetic counts with obs['batch'] (batch_0, ...) and obs['labels'] (label_0, ...)."""
    adata = synthetic_counts(n_obs=n_obs, n_vars=n_vars, n_batches=n_batches, n_labels=3, random_state=random_state)
    # synthetic data can contain empty cells; the model rightly refuses them
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    if np.any(totals == 0):
        adata = adata[totals > 0].copy()
    return adata


@pytest.fixture(scope="session")
def base_adata():
    """Read-only session AnnData: 300 cells x 80 genes, 2 batches, 3 labels, CSR counts."""
    adata = make_adata()
    assert adata.n_obs == N_OBS
    return adata


@pytest.fixture
def adata(base_adata):
    """A fresh, writable copy of the session AnnData."""
    return base_adata.copy()


@pytest.fixture(scope="session")
def trained_model(base_adata):
    """Batch- and label-aware scVI (zinb, gene-batch dispersion) trained for a few epochs.

    Holds its own copy of the data. Tests must not retrain or move it.
    """
    data = base_adata.copy()
    model = SCVI(data, batch_key="batch", labels_key="labels", dispersion="gene-batch", **SMALL_MODEL)
    model.train(max_epochs=15, train_size=0.8, progress_bar=False)
    return model


def snapshot(adata) -> dict:
    """Deep copy of everything an AnnData carries, for 'left unchanged' checks."""
    X = adata.X
    return {
        "X": X.copy() if X is not None else None,
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "obs_names": adata.obs_names.copy(),
        "var_names": adata.var_names.copy(),
        "obsm": sorted(adata.obsm.keys()),
        "varm": sorted(adata.varm.keys()),
        "uns": copy.deepcopy(dict(adata.uns)),
        "layers": {k: v.copy() for k, v in adata.layers.items()},
        "shape": adata.shape,
    }


def _same_matrix(a, b) -> bool:
    if sp.issparse(a) != sp.issparse(b):
        return False
    if sp.issparse(a):
        a, b = a.toarray(), b.toarray()
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def assert_unchanged(adata, snap: dict) -> None:
    """Fail if ``adata`` differs in any way from ``snapshot``."""
    assert adata.shape == snap["shape"]
    assert _same_matrix(adata.X, snap["X"]), "adata.X was modified"
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    assert adata.obs_names.equals(snap["obs_names"])
    assert adata.var_names.equals(snap["var_names"])
    assert sorted(adata.obsm.keys()) == snap["obsm"], "obsm keys changed"
    assert sorted(adata.varm.keys()) == snap["varm"], "varm keys changed"
    assert sorted(adata.uns.keys()) == sorted(snap["uns"].keys()), "uns keys changed"
    assert sorted(adata.layers.keys()) == sorted(snap["layers"].keys()), "layers keys changed"
    for k, v in snap["layers"].items():
        assert _same_matrix(adata.layers[k], v), f"layers[{k!r}] was modified"


def grown_columns_only(before: dict, after: dict) -> list[str]:
    """Check a query model's state against its reference's: every tensor whose shape is unchanged
    is bit-identical, and a tensor that grew keeps its reference columns bit-identical. Returns
    the names of the grown tensors, sorted."""
    import torch

    grown = sorted(k for k in before if after[k].shape != before[k].shape)
    for k, old in before.items():
        kept = after[k] if k not in grown else after[k][:, : old.shape[1]]
        assert torch.equal(kept, old), f"{k} moved"
    return grown


IFNB = Path(__file__).resolve().parents[2] / "shared" / "data" / "kang2018_ifnb_pbmc_2k.h5ad"


@pytest.fixture(scope="session")
def ifnb():
    """Kang 2018 IFN-beta PBMC (CTRL/STIM in obs['batch']), 2000 HVGs, scVI fitted without the
    condition as batch (60 epochs). Read-only: tests copy it before writing."""
    import anndata as ad
    import scanpy as sc

    import scanpy_scvi as ss

    if not IFNB.is_file():
        pytest.skip(f"real data not found at {IFNB}")
    adata = ad.read_h5ad(IFNB)
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000)
    ss.pp.scvi(adata, n_epochs=60, progress_bar=False)
    return adata
