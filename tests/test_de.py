"""Differential expression: known biology on real data, a null comparison, scanpy's readers."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from conftest import IFNB, make_adata

import scanpy_scvi as ss
from scanpy_scvi.tl._de import _fdr_flags

ISGS = ["ISG15", "IFI6", "IFIT1", "MX1", "IFIT3"]
needs_ifnb = pytest.mark.skipif(not IFNB.is_file(), reason=f"real data not found at {IFNB}")


def _cd14(adata):
    mono = (adata.obs["cell_type"] == "CD14 Mono").to_numpy()
    stim = (adata.obs["batch"] == "STIM").to_numpy()
    return mono, stim


@needs_ifnb
def test_interferon_stimulated_genes_are_de_up_in_stimulated_monocytes(ifnb):
    mono, stim = _cd14(ifnb)
    df = ss.tl.differential_expression(ifnb, idx1=mono & stim, idx2=mono & ~stim, inplace=False, progress_bar=False)
    hits = df.loc[ISGS]
    assert hits["is_de_fdr_0.05"].all(), hits
    assert (hits["lfc_median"] > 1).all(), hits
    assert (hits["proba_de"] > 0.95).all()
    assert (hits["scale1"] > hits["scale2"]).all()
    assert (hits["raw_normalized_mean1"] > hits["raw_normalized_mean2"]).all()


@needs_ifnb
def test_null_comparison_calls_almost_nothing(ifnb):
    mono, stim = _cd14(ifnb)
    cells = np.flatnonzero(mono & ~stim)
    np.random.default_rng(1).shuffle(cells)
    half = len(cells) // 2
    df = ss.tl.differential_expression(
        ifnb, idx1=cells[:half], idx2=cells[half:], inplace=False, progress_bar=False
    )
    assert df["is_de_fdr_0.05"].sum() <= 5  # of 2000 genes
    assert np.abs(df["lfc_median"]).median() < 0.1


@needs_ifnb
def test_one_vs_rest_in_rank_genes_groups_layout(ifnb, tmp_path):
    adata = ifnb.copy()
    ss.tl.differential_expression(adata, groupby="cell_type", n_samples=1000, progress_bar=False)
    res = adata.uns["scvi_de"]
    groups = [g for g in adata.obs["cell_type"].cat.categories if (adata.obs["cell_type"] == g).any()]
    assert list(res["names"].dtype.names) == groups
    assert res["params"]["groupby"] == "cell_type" and res["params"]["reference"] == "rest"
    scores = res["scores"]["CD14 Mono"]
    assert np.all(np.diff(scores) <= 0)  # ranked
    assert np.isnan(res["pvals"]["CD14 Mono"]).all()  # no invented p-values
    df = sc.get.rank_genes_groups_df(adata, "CD14 Mono", key="scvi_de")
    assert list(df.columns[:3]) == ["names", "scores", "logfoldchanges"]
    assert len(df) == 2000
    # monocyte markers rank high against all other cells
    top = set(df["names"][:100])
    assert {"CD14", "LYZ"} & top or {"S100A8", "S100A9"} & top
    sc.pl.rank_genes_groups_dotplot(adata, key="scvi_de", n_genes=2, show=False)
    adata.write_h5ad(tmp_path / "de.h5ad")
    back = ad.read_h5ad(tmp_path / "de.h5ad")
    assert list(back.uns["scvi_de"]["names"]["CD14 Mono"][:5]) == list(res["names"]["CD14 Mono"][:5])


@needs_ifnb
def test_within_cluster_stimulated_vs_control(ifnb):
    adata = ifnb.copy()
    ss.tl.within_cluster_differential_expression(
        adata, cluster_key="cell_type", condition_key="batch", condition1="STIM", condition2="CTRL",
        n_samples=1000, progress_bar=False,
    )  # fmt: skip
    res = adata.uns["scvi_de_within"]
    assert res["params"]["groupby"] == "cell_type"
    df = sc.get.rank_genes_groups_df(adata, "CD14 Mono", key="scvi_de_within").set_index("names")
    assert (df.loc[["ISG15", "IFIT3"], "logfoldchanges"] > 1).all()
    assert res["is_de_fdr_0.05"]["CD14 Mono"][list(res["names"]["CD14 Mono"]).index("ISG15")]


def test_dataframe_columns_reproducibility_and_no_side_effects(trained_model):
    adata = trained_model.adata
    uns_before = set(adata.uns)
    kwargs = dict(groupby="labels", model=trained_model, n_samples=300, inplace=False, progress_bar=False)
    df = ss.tl.differential_expression(adata, **kwargs)
    expected = [
        "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta", "lfc_mean",
        "lfc_median", "lfc_std", "lfc_min", "lfc_max", "raw_mean1", "raw_mean2", "non_zeros_proportion1",
        "non_zeros_proportion2", "raw_normalized_mean1", "raw_normalized_mean2", "is_de_fdr_0.05", "comparison",
        "group1", "group2",
    ]  # fmt: skip
    assert list(df.columns) == expected
    assert sorted(df["comparison"].unique()) == [f"label_{i} vs rest" for i in range(3)]
    assert set(adata.uns) == uns_before
    again = ss.tl.differential_expression(adata, **kwargs)
    assert df.equals(again)
    other = ss.tl.differential_expression(adata, **{**kwargs, "random_state": 1})
    assert not df["lfc_mean"].equals(other["lfc_mean"])
    assert ((df["proba_de"] >= 0) & (df["proba_de"] <= 1)).all()
    np.testing.assert_allclose(df["proba_de"] + df["proba_not_de"], 1)


def test_raw_statistics_match_direct_computation(trained_model):
    adata = trained_model.adata
    df = ss.tl.differential_expression(
        adata, groupby="labels", group1="label_0", group2="label_1", model=trained_model, n_samples=100,
        inplace=False, progress_bar=False,
    )  # fmt: skip
    X = adata.X.toarray()
    lab = adata.obs["labels"].to_numpy()
    g1, g2 = X[lab == "label_0"], X[lab == "label_1"]
    genes = df.index
    idx = adata.var_names.get_indexer(genes)
    np.testing.assert_allclose(df["raw_mean1"], g1.mean(0)[idx], rtol=1e-6)
    np.testing.assert_allclose(df["raw_mean2"], g2.mean(0)[idx], rtol=1e-6)
    np.testing.assert_allclose(df["non_zeros_proportion1"], (g1 > 0).mean(0)[idx], rtol=1e-6)
    norm = (g1 / g1.sum(1, keepdims=True) * 1e4).mean(0)
    np.testing.assert_allclose(df["raw_normalized_mean1"], norm[idx], rtol=1e-5)
    assert (df["group2"] == "label_1").all()
    # one-vs-rest derives the rest from the all-cell totals: same figures as a direct pass
    ova = ss.tl.differential_expression(
        adata, groupby="labels", group1="label_0", model=trained_model, n_samples=100, inplace=False,
        progress_bar=False,
    )  # fmt: skip
    rest = X[lab != "label_0"]
    np.testing.assert_allclose(ova["raw_mean2"], rest.mean(0)[adata.var_names.get_indexer(ova.index)], rtol=1e-6)
    np.testing.assert_allclose(
        ova["non_zeros_proportion2"], (rest > 0).mean(0)[adata.var_names.get_indexer(ova.index)], rtol=1e-6
    )


def test_vanilla_mode_and_batch_correction(trained_model):
    adata = trained_model.adata
    df = ss.tl.differential_expression(
        adata, groupby="labels", group1="label_0", model=trained_model, mode="vanilla", n_samples=200,
        batch_correction=True, inplace=False, progress_bar=False,
    )  # fmt: skip
    assert {"proba_m1", "proba_m2", "bayes_factor"} <= set(df.columns)
    assert "is_de_fdr_0.05" not in df.columns
    assert np.all(np.diff(df["bayes_factor"].to_numpy()) <= 0)
    np.testing.assert_allclose(df["proba_m1"] + df["proba_m2"], 1)
    with pytest.raises(ValueError, match="Unknown batch"):
        ss.tl.differential_expression(
            adata, groupby="labels", model=trained_model, batch_correction=True, batchid1=["nope"],
            progress_bar=False,
        )  # fmt: skip


def test_fdr_flags_posterior_expected_fdr():
    proba = np.array([1.0, 0.99, 0.97, 0.9, 0.5, 0.1])
    # running mean of 1 - p: 0, .005, .0133, .035, .128, ... -> top 4 at target 0.05
    assert _fdr_flags(proba, 0.05).tolist() == [True, True, True, True, False, False]
    assert not _fdr_flags(np.array([0.5, 0.4]), 0.05).any()


def test_bad_input(trained_model):
    adata = trained_model.adata
    with pytest.raises(KeyError, match="No model stored"):
        ss.tl.differential_expression(adata.copy(), groupby="labels")
    with pytest.raises(ValueError, match="not found in obs"):
        ss.tl.differential_expression(adata, groupby="labels", group1="nope", model=trained_model)
    with pytest.raises(KeyError, match="not found in adata.obs"):
        ss.tl.differential_expression(adata, groupby="nope", model=trained_model)
    with pytest.raises(ValueError, match="overlap"):
        ss.tl.differential_expression(adata, idx1=[0, 1, 2], idx2=[2, 3], model=trained_model)
    with pytest.raises(ValueError, match="mode"):
        ss.tl.differential_expression(adata, groupby="labels", mode="wilcoxon", model=trained_model)
    with pytest.raises(ValueError, match="missing from adata.var_names"):
        ss.tl.differential_expression(adata[:, :40].copy(), groupby="labels", model=trained_model)


def test_model_found_after_h5ad_round_trip_in_new_process(tmp_path):
    adata = make_adata(n_obs=200, n_vars=40, random_state=5)
    ss.pp.scvi(adata, batch_key="batch", use_highly_variable_genes=False, n_epochs=3, progress_bar=False)
    path = tmp_path / "fitted.h5ad"
    adata.write_h5ad(path)
    code = (
        "import anndata as ad, scanpy_scvi as ss; "
        f"a = ad.read_h5ad({str(path)!r}); "
        "df = ss.tl.differential_expression(a, groupby='labels', n_samples=100, inplace=False, progress_bar=False); "
        "print(len(df))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(3 * 40)


def test_store_model_false_leaves_no_model(adata):
    ss.pp.scvi(adata, use_highly_variable_genes=False, n_epochs=1, store_model=False, progress_bar=False)
    assert "model" not in adata.uns["scvi"]
    with pytest.raises(KeyError, match="No model stored"):
        ss.tl.differential_expression(adata, groupby="labels")
