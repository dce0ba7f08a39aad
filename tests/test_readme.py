"""The README's API tour runs as written (with fewer epochs and Monte Carlo samples)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

README = Path(__file__).resolve().parents[1] / "README.md"

# the tour's sizes -> small ones; each pattern must occur in the tour (so the test follows it)
SHRINK = {
    r"\bn_epochs=\d+": "n_epochs=2",
    r"\bmax_epochs=\d+": "max_epochs=2",
    r"\bn_mc_samples=\d+": "n_mc_samples=5",
}


def api_tour() -> str:
    """The first ```python block after the '## API tour' heading."""
    text = README.read_text(encoding="utf-8")
    heading = re.search(r"^## API tour\s*$", text, flags=re.MULTILINE)
    assert heading, "README.md has no '## API tour' heading"
    block = re.compile(r"^```python\n(.*?)^```", flags=re.MULTILINE | re.DOTALL).search(text, heading.end())
    assert block, "no ```python block after '## API tour'"
    return block.group(1)


def test_api_tour_runs(tmp_path, monkeypatch):
    code = api_tour()
    for pattern, small in SHRINK.items():
        code, n = re.subn(pattern, small, code)
        assert n, f"{pattern} not found in the README tour"
    monkeypatch.chdir(tmp_path)  # model.save writes a folder
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    autoshow = sc.settings.autoshow  # a property of scanpy's settings class: monkeypatch cannot restore it
    sc.settings.autoshow = False
    namespace: dict = {"__name__": "readme_api_tour"}
    try:
        exec(compile(code, str(README), "exec"), namespace)
    finally:
        sc.settings.autoshow = autoshow
        plt.close("all")

    adata, ref, query, scanvi = (namespace[k] for k in ("adata", "ref", "query", "scanvi"))
    n_hvg = int(adata.var["highly_variable"].sum())
    assert adata.obsm["X_scvi"].shape == (adata.n_obs, 10)
    for key in ("X_scvi_denoised", "X_scvi_sample_rate"):
        assert adata.obsm[key].shape == (adata.n_obs, n_hvg)
    assert {"params", "genes", "history"} <= set(adata.uns["scvi"])
    assert "X_umap" in adata.obsm
    assert namespace["corrected"].shape == (adata.n_obs, n_hvg)
    assert (tmp_path / "my_model").is_dir()
    # LDVAE under its own key: the scVI model in uns['scvi'] stays the one DE and counts use
    assert "X_ldvae" in adata.obsm and isinstance(adata.uns["ldvae_loadings"], pd.DataFrame)
    assert adata.uns["ldvae_loadings"].shape == (n_hvg, 10)
    # DE, readable by scanpy
    de = sc.get.rank_genes_groups_df(adata, "A549", key="scvi_de")
    assert len(de) == n_hvg and de["names"].notna().all()
    # batch-corrected counts of the HVG model: obsm, columns named in uns
    counts = adata.obsm["scvi_corrected_counts"]
    genes = list(adata.uns["scvi_corrected_counts"]["genes"])
    assert sp.issparse(counts) and counts.shape == (adata.n_obs, n_hvg) and len(genes) == n_hvg
    assert set(genes) == set(adata.var_names[adata.var["highly_variable"]])
    assert np.all(counts.data == np.round(counts.data)) and counts.data.min() >= 0
    # scANVI on the reference, then the query mapped onto it
    assert set(ref.obs["batch"]) == {"CELseq2_3cl", "CELseq2_5cl_p1", "CELseq2_5cl_p2", "CELseq2_5cl_p3"}
    assert set(query.obs["batch"]) == {"Dropseq_3cl"} and ref.n_obs + query.n_obs == adata.n_obs
    assert ref.obsm["X_scanvi"].shape == (ref.n_obs, 10)
    assert ref.obs["labels_scanvi_pred"].notna().all()
    assert set(ref.obs["labels_scanvi_pred"]) <= set(adata.obs["cell_type"].astype(str))
    assert type(scanvi).__name__ == "SCANVI"
    assert query.obsm["X_scanvi"].shape == (query.n_obs, 10)
    assert np.isfinite(query.obsm["X_scanvi"]).all()
    pred = query.obs["labels_pred"]
    assert pred.notna().all() and set(pred.astype(str)) <= set(adata.obs["cell_type"].astype(str))
    assert "Unknown" not in set(pred.astype(str))
    # trVAE on the reference, the query mapped onto it
    assert ref.obsm["X_trvae"].shape == (ref.n_obs, 10) and query.obsm["X_trvae"].shape == (query.n_obs, 10)
    assert ref.uns["trvae"]["params"]["batch_key"] == "batch"
    # scPoli: predictions for every reference cell, the batches as samples, the query labelled
    assert set(ref.obs["cell_type_scpoli_pred"].astype(str)) <= set(adata.obs["cell_type"].astype(str))
    samples = namespace["samples"]
    assert samples.n_obs == 4 and samples.n_vars == 10
    assert query.obsm["X_scpoli"].shape == (query.n_obs, 10)
    assert set(query.obs["cell_type_pred"].astype(str)) <= set(adata.obs["cell_type"].astype(str))
    assert np.all(query.obs["cell_type_uncertainty"] >= 0)


def test_quick_start_unchanged():
    """The first quick-start command is the one users copy; keep it as it is."""
    text = README.read_text(encoding="utf-8")
    assert 'pip install "torch==2.13.0" . && scanpy-scvi demo\n' in text


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
