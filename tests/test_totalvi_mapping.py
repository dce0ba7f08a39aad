"""Reference mapping onto a totalVI reference: the same panel, a smaller one, or RNA only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_totalvi import _cite

import scanpy_scvi as ss

TEN_K, FIVE_K = "pbmc_10k_protein_v3", "5k_pbmc_protein_v3"


@pytest.fixture(scope="module")
def reference():
    """totalVI on the 10k cells only (one batch), 100 epochs (200 steps); the 5k cells are the query."""
    adata = _cite(n_per_batch=300, n_genes=400, seed=4)
    ref = adata[(adata.obs["batch"] == TEN_K).to_numpy()].copy()
    query = adata[(adata.obs["batch"] == FIVE_K).to_numpy()].copy()
    ref.obs["batch"] = ref.obs["batch"].cat.remove_unused_categories()
    query.obs["batch"] = query.obs["batch"].cat.remove_unused_categories()
    model = ss.pp.totalvi(ref, batch_key="batch", use_highly_variable_genes=False, max_epochs=100, return_model=True,
                          n_hidden=64, progress_bar=False, device="cpu")  # fmt: skip
    return ref, query, model


def _map(query, model):
    return ss.tl.map_query(query, model, max_epochs=20, progress_bar=False, device="cpu")


def test_same_panel_query_trains_only_new_batch_weights(reference):
    _, query, model = reference
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    qm = _map(query.copy(), model)
    after = qm.module.state_dict()
    for key, old in before.items():
        new = after[key]
        if new.shape == old.shape and key in qm.trainable_masks:
            continue
        if new.shape == old.shape and not any(p in key for p in ("l_encoder", "_decoder.layers", "num_batches")):
            assert torch.equal(new, old), f"{key} changed"
    mask = qm.module.protein_mask.bool()
    assert mask.shape == (2, 9) and mask.all()  # the query measured every protein
    assert torch.equal(model.module.state_dict()["background_pro_alpha"], before["background_pro_alpha"])
    assert (
        qm.trainable_masks["background_pro_alpha"][:, 1].all()
        and not qm.trainable_masks["background_pro_alpha"][:, 0].any()
    )
    assert model.module.state_dict().keys() == before.keys()


def test_rna_only_query_gets_imputed_proteins(reference):
    _, query, model = reference
    rna_only = query.copy()
    del rna_only.obsm["protein_expression"]
    qm = _map(rna_only, model)
    assert "X_totalvi" in rna_only.obsm and rna_only.uns["totalvi"]["params"]["reference_class"] == "TOTALVI"
    assert not qm.module.protein_mask.bool()[1].any()  # the query's batch measured no protein
    foreground = qm.get_protein_foreground_probability(rna_only)
    cd19 = next(c for c in foreground.columns if c.startswith("CD19"))
    types = rna_only.obs["cell_type"].astype(str).to_numpy()
    b, t = foreground[cd19][types == "B"].median(), foreground[cd19][np.isin(types, ["CD4 T", "CD8 T"])].median()
    assert b > t + 0.3, (b, t)  # imputed from the reference's panel


def test_smaller_panel_masks_only_the_missing_proteins(reference):
    _, query, model = reference
    smaller = query.copy()
    proteins = smaller.obsm["protein_expression"]
    smaller.obsm["protein_expression"] = proteins.drop(columns=list(proteins.columns[:2]))
    qm = _map(smaller, model)
    row = qm.module.protein_mask.bool()[1].numpy()
    assert not row[:2].any() and row[2:].all()
    _, protein = qm.get_normalized_expression(smaller, indices=np.arange(10))
    assert list(protein.columns) == list(proteins.columns) and np.isfinite(protein.to_numpy()).all()
