"""Differential expression: known biology on real data, a null comparison, scanpy's readers."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from conftest import IFNB, make_adata

import scanpy_scvi as ss
from scanpy_scvi.tl._de_engine import _fdr_flags

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
    df = ss.tl.differential_expression(ifnb, idx1=cells[:half], idx2=cells[half:], inplace=False, progress_bar=False)
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
def test_layout_puts_up_regulated_genes_first_by_default(ifnb):
    """scanpy users read the layout as markers: by default (rank_by='up') the top genes of each
    group are up-regulated in it, with 'down' down-regulated; 'both' is the two-sided proba_de
    order, which put down-regulated genes among the top (all of the erythrocytes' top 10)."""
    adata = ifnb.copy()
    kwargs = {"groupby": "cell_type", "n_samples": 1000, "progress_bar": False}
    for rank_by, proba, sign in (("up", "proba_up", 1), ("down", "proba_down", -1), ("both", "proba_de", 0)):
        key = f"de_{rank_by}"
        ss.tl.differential_expression(adata, key_added=key, **kwargs, **({"rank_by": rank_by} if sign <= 0 else {}))
        res = adata.uns[key]
        assert res["params"]["rank_by"] == rank_by and res["params"]["scores"] == proba
        checked, down_in_top = 0, 0
        for g in res["names"].dtype.names:
            df = sc.get.rank_genes_groups_df(adata, g, key=key)
            assert len(df) == 2000 and np.all(np.diff(df["scores"]) <= 0)
            np.testing.assert_array_equal(df["scores"], res[proba][g])
            down_in_top += int((df["logfoldchanges"][:10] < 0).sum())
            if sign and (res[proba][g] > 0.5).sum() >= 10:
                assert (sign * res["lfc_mean"][g][:10] > 0).all(), (rank_by, g, df[:10])
                assert (sign * df["logfoldchanges"][:10] > 0).all(), (rank_by, g, df[:10])
                checked += 1
        assert checked >= (10 if sign else 0)  # of 13 cell types
        if rank_by == "both":
            assert down_in_top >= 10


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
    assert res["params"]["rank_by"] == "up" and (df["logfoldchanges"][:10] > 0).all()  # up in STIM first
    assert res["is_de_fdr_0.05"]["CD14 Mono"][list(res["names"]["CD14 Mono"]).index("ISG15")]


def test_dataframe_columns_reproducibility_and_no_side_effects(trained_model):
    adata = trained_model.adata
    uns_before = set(adata.uns)
    kwargs = {"groupby": "labels", "model": trained_model, "n_samples": 300, "inplace": False, "progress_bar": False}
    df = ss.tl.differential_expression(adata, **kwargs)
    expected = [
        "proba_de", "proba_not_de", "proba_up", "proba_down", "bayes_factor", "scale1", "scale2", "pseudocounts",
        "delta", "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max", "raw_mean1", "raw_mean2",
        "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1", "raw_normalized_mean2",
        "is_de_fdr_0.05", "comparison", "group1", "group2",
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
    np.testing.assert_array_equal(df["proba_de"], np.maximum(df["proba_up"], df["proba_down"]))
    assert (df["proba_up"] + df["proba_down"] <= 1).all()


@pytest.mark.parametrize("mode", ["change", "vanilla"])
def test_rank_by_orders_the_layout_not_the_dataframe(trained_model, mode):
    """rank_by orders each group's genes in the layout by P(up) or P(down) (its scores; ties by
    the LFC in that direction) or, 'both', in the two-sided order of the DataFrame, as before;
    the DataFrame itself keeps that order whatever rank_by."""
    adata = trained_model.adata.copy()
    kwargs = {"groupby": "labels", "model": trained_model, "mode": mode, "n_samples": 300, "progress_bar": False}
    df = ss.tl.differential_expression(adata, inplace=False, **kwargs)
    assert df.equals(ss.tl.differential_expression(adata, inplace=False, rank_by="down", **kwargs))
    up, down, both = (
        ("proba_up", "proba_down", "proba_de") if mode == "change" else ("proba_m1", "proba_m2", "bayes_factor")
    )
    for rank_by, score, sign in (("up", up, 1), ("down", down, -1), ("both", both, 0)):
        key = f"de_{rank_by}"
        ss.tl.differential_expression(adata, key_added=key, rank_by=rank_by, **kwargs)
        res = adata.uns[key]
        assert res["params"]["rank_by"] == rank_by and res["params"]["scores"] == score
        for g in res["names"].dtype.names:
            d = df[df["group1"] == g]
            names = res["names"][g]
            assert sorted(names) == sorted(d.index)  # every gene, once
            ranked = d.loc[names]
            np.testing.assert_array_equal(res["scores"][g], ranked[score].to_numpy(np.float32))
            np.testing.assert_array_equal(res["logfoldchanges"][g], ranked["lfc_median"].to_numpy(np.float32))
            read = sc.get.rank_genes_groups_df(adata, g, key=key)
            assert list(read["names"]) == list(names)
            if not sign:
                assert list(names) == list(d.index)  # the order before rank_by
                continue
            s, lfc = ranked[score].to_numpy(), sign * ranked["lfc_median"].to_numpy()
            assert np.all(np.diff(s) <= 0)
            ties = s[1:] == s[:-1]
            assert np.all(lfc[:-1][ties] >= lfc[1:][ties])
            assert (lfc[s > 0.5] > 0).all()  # P(up) > 1/2 implies a positive median LFC
    with pytest.raises(ValueError, match="rank_by"):
        ss.tl.differential_expression(adata, rank_by="proba_de", **kwargs)


@pytest.mark.parametrize("group2", [None, "label_0"])
def test_pipelined_comparisons_equal_the_sequential_loop(trained_model, group2):
    """With two or more torch threads, drawing comparison k + 1 overlaps testing comparison k in
    alternating buffers; the table equals the one-thread sequential loop's (decoding rounds alike
    up to float summation order), and the caller's thread count is restored."""
    adata = trained_model.adata
    kwargs = {"groupby": "labels", "group2": group2, "model": trained_model, "n_samples": 300, "inplace": False}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = ss.tl.differential_expression(adata, progress_bar=False, **kwargs)
        torch.set_num_threads(2)
        pipelined = ss.tl.differential_expression(adata, progress_bar=False, **kwargs)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert list(pipelined["comparison"].unique()) == list(sequential["comparison"].unique())
    assert len(pipelined["comparison"].unique()) == (3 if group2 is None else 2)
    key = ["comparison", "gene"]
    a, b = (df.reset_index().set_index(key).sort_index() for df in (sequential, pipelined))
    numeric = [c for c in a.columns if a[c].dtype.kind == "f"]
    np.testing.assert_allclose(b[numeric].to_numpy(), a[numeric].to_numpy(), rtol=1e-4, atol=1e-6)


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
    # the CSR path (sums over stored entries) and the dense path agree
    dense = adata.copy()
    dense.X = X
    ova_dense = ss.tl.differential_expression(
        dense, groupby="labels", group1="label_0", model=trained_model, n_samples=100, inplace=False,
        progress_bar=False,
    )  # fmt: skip
    for col in ("raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1"):
        np.testing.assert_allclose(ova_dense[col], ova[col], rtol=1e-12)


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
    with pytest.raises(KeyError, match=r"not found in adata\.obs"):
        ss.tl.differential_expression(adata, groupby="nope", model=trained_model)
    with pytest.raises(ValueError, match="overlap"):
        ss.tl.differential_expression(adata, idx1=[0, 1, 2], idx2=[2, 3], model=trained_model)
    with pytest.raises(ValueError, match="mode"):
        ss.tl.differential_expression(adata, groupby="labels", mode="wilcoxon", model=trained_model)
    with pytest.raises(ValueError, match=r"missing from adata\.var_names"):
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


@pytest.mark.parametrize("n", [400, 401])
@pytest.mark.parametrize("mode", ["change", "vanilla"])
def test_statistics_equal_the_log_formula(n, mode):
    """The fused gene-major statistics equal the textbook formulas on the log2 fold changes."""
    from scanpy_scvi.tl._de_engine import Comparison, _compare, _pseudocount, _WorkBuffers

    rng = np.random.default_rng(0)
    G = 50
    s1 = rng.dirichlet(np.full(G, 0.3), size=n).T.astype(np.float32)  # (genes, draws) frequencies
    s2 = rng.dirichlet(np.full(G, 0.3), size=n + 7).T.astype(np.float32)  # extra draws: pairs truncate
    raw = {k: rng.random(G) for k in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean")}
    raw["raw_mean"][:10] = 0  # silent genes: the pseudocount is estimated from them
    comp = Comparison("a", "b", np.arange(2), np.arange(2, 4))
    genes = [f"g{i}" for i in range(G)]
    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)
    pc = _pseudocount(t1, t2, raw, raw, None)
    df = _compare(t1, t2, raw, raw, pc, genes, mode, 0.25, 0.05, comp, _WorkBuffers()).loc[genes]

    a, b = s1.astype(np.float64), s2[:, :n].astype(np.float64)
    silent = raw["raw_mean"] < 0.01
    pc = max(np.quantile(s.max(1)[silent], 0.9) for s in (a, b)) / G  # on the paired draws, as scvi-tools
    np.testing.assert_allclose(df["pseudocounts"], pc, rtol=1e-6)
    if mode == "change":
        lfc = np.log2(a + pc) - np.log2(b + pc)
        up, down = (lfc >= 0.25).mean(1), (lfc < -0.25).mean(1)
        np.testing.assert_allclose(df["proba_de"], np.maximum(up, down), atol=1.5 / n)  # a tie may flip
        np.testing.assert_allclose(df["proba_up"], up, atol=1.5 / n)
        np.testing.assert_allclose(df["proba_down"], down, atol=1.5 / n)
    else:
        np.testing.assert_allclose(df["proba_m1"], (a > b).mean(1), atol=1e-12)
    lfc = np.log2(a + 1e-3 * pc) - np.log2(b + 1e-3 * pc)
    for col, ref in [("lfc_mean", lfc.mean(1)), ("lfc_median", np.median(lfc, 1)), ("lfc_std", lfc.std(1)),
                     ("lfc_min", lfc.min(1)), ("lfc_max", lfc.max(1))]:  # fmt: skip
        np.testing.assert_allclose(df[col], ref, rtol=1e-4, atol=1e-4, err_msg=col)
    np.testing.assert_allclose(df["scale2"], s2.mean(1), rtol=1e-5)  # means over all draws, not only pairs


def test_given_pseudocount_is_used_as_is():
    """pseudocounts= skips the estimate: the column holds it and the LFC uses 1e-3 times it."""
    from scanpy_scvi.tl._de_engine import Comparison, _compare, _pseudocount, _WorkBuffers

    rng = np.random.default_rng(2)
    G, n, pc = 30, 300, 1e-4
    s1, s2 = (rng.dirichlet(np.full(G, 0.3), size=n).T.astype(np.float32) for _ in range(2))
    raw = {k: np.zeros(G) for k in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean")}  # all silent
    comp = Comparison("a", "b", np.arange(2), np.arange(2, 4))
    genes = [f"g{i}" for i in range(G)]
    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)
    df = _compare(
        t1, t2, raw, raw, _pseudocount(t1, t2, raw, raw, pc), genes, "change", 0.25, 0.05, comp, _WorkBuffers()
    ).loc[genes]
    np.testing.assert_array_equal(df["pseudocounts"], pc)
    lfc = np.log2(s1.astype(np.float64) + 1e-3 * pc) - np.log2(s2.astype(np.float64) + 1e-3 * pc)
    np.testing.assert_allclose(df["lfc_mean"], lfc.mean(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(df["scale1"], s1.mean(1), rtol=1e-5)


class _CellIdSampler:
    """Stands in for the posterior sampler: a draw of cell c is a column filled with c."""

    def __init__(self, n_obs):
        self.bound = type("Bound", (), {"n_obs": n_obs})()
        self.decoded = 0

    def empty(self, n):
        return torch.empty((1, n))

    def draw(self, cells, code, out, maxima=None):
        self.decoded += len(cells)
        out[:] = torch.as_tensor(cells, dtype=torch.float32)[None]
        if maxima is not None:
            torch.maximum(maxima, out.amax(1), out=maxima)
        return out


@pytest.mark.parametrize("sizes", [[300, 200, 100, 50, 350], [50, 40, 30, 880]])
def test_pooled_rest_draws_are_uniform_over_the_rest(sizes):
    """One-vs-rest shares one decoded pool: each rest gets n_samples draws, none from its own group,
    spread over the other cells in proportion; a dominant group (top-up path) included."""
    from scanpy_scvi.tl._de_engine import REST, Comparison, _Group2Draws

    n_obs = sum(sizes)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    cells = np.random.default_rng(1).permutation(n_obs)  # groups interleaved in cell order
    comps = [
        Comparison(str(g), REST, np.sort(cells[groups == g]), np.sort(cells[groups != g])) for g in range(len(sizes))
    ]
    sampler = _CellIdSampler(n_obs)
    n = 4000
    draws = _Group2Draws(sampler, comps, [None], n, np.random.default_rng(0))
    group_of = np.empty(n_obs, dtype=int)
    group_of[cells] = groups
    for comp in comps:
        drawn = torch.cat(draws.of(comp, draws.draws.empty()).views(), dim=1)[0].numpy().astype(int)
        assert drawn.shape == (n,)
        assert not np.isin(drawn, comp.cells1).any()
        counts = np.bincount(group_of[drawn], minlength=len(sizes)).astype(float)
        expected = np.array(sizes, float) / len(comp.cells2) * n
        expected[int(comp.label1)] = 0
        assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected) + 1), (counts, expected)
    assert sampler.decoded < 2 * n * len(comps)  # the pool saves decoding


def test_own_group_draws_from_the_pool_cost_no_decoding():
    """One-vs-rest: each group's own draws start with the pool's draws of that group, so the
    whole loop decodes n_samples per group (pool included); group 1 stays uniform over its cells."""
    from scanpy_scvi.tl._de_engine import REST, Comparison, _Draws, _Group2Draws

    sizes = [300, 200, 100, 50, 350]
    n_obs, n = sum(sizes), 4000
    groups = np.repeat(np.arange(len(sizes)), sizes)
    comps = [Comparison(str(g), REST, np.flatnonzero(groups == g), np.flatnonzero(groups != g)) for g in range(5)]
    sampler = _CellIdSampler(n_obs)
    rng = np.random.default_rng(0)
    group1, group2 = _Draws(sampler, [None], n, rng), _Group2Draws(sampler, comps, [None], n, rng)
    for comp in comps:
        own = group2.own_draws(comp)
        pooled = own[0].views()[0]
        assert 0 < pooled.shape[1] < n and np.isin(pooled.numpy(), comp.cells1).all()
        maxima = torch.full((1,), -torch.inf)
        drawn = group1.of(comp.cells1, group1.empty(), decoded=own, maxima=maxima)[0].numpy().astype(int)
        np.testing.assert_array_equal(drawn[: pooled.shape[1]], pooled[0].numpy())
        assert maxima.item() == drawn.max()  # pooled and decoded draws both counted
        assert np.isin(drawn, comp.cells1).all()
        k = len(comp.cells1)
        chi2 = (((np.bincount(drawn - comp.cells1[0], minlength=k) - n / k) ** 2) / (n / k)).sum()
        assert chi2 < (k - 1) + 5 * np.sqrt(2 * (k - 1))  # uniform over the group's cells
        group2.of(comp, group2.draws.empty())
    assert sampler.decoded == n * len(comps)


def test_pool_columns_read_in_place_give_the_statistics_of_the_copy():
    """The rest's draws are read from the pool's column ranges a gene block at a time; the table
    equals the one computed on the same draws copied into one array, across block boundaries."""
    from scanpy_scvi.tl._de_engine import (
        GENE_BLOCK,
        MAX_CHUNK,
        Comparison,
        _Columns,
        _compare,
        _Pool,
        _pseudocount,
        _WorkBuffers,
    )

    rng = np.random.default_rng(3)
    G, n = GENE_BLOCK + 20, 300  # two gene blocks, the second one short
    s1 = torch.from_numpy(rng.dirichlet(np.full(G, 0.3), size=n).T.astype(np.float32))
    freq = torch.from_numpy(rng.dirichlet(np.full(G, 0.3), size=700).T.astype(np.float32))
    raw = {k: rng.random(G) for k in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean")}
    raw["raw_mean"][:40] = 0
    pool = _Pool(freq)
    parts = [(pool, 10, 110), (pool, 200, 200), (pool, 300, 420), (pool, 600, 690)]  # 310 draws, one empty
    columns = _Columns(parts)
    assert _pseudocount(s1, columns, raw, raw, 1e-4) == 1e-4
    assert "chunk_max" not in vars(pool)  # a given pseudocount takes no maxima
    for a, b in [(0, 700), (5, 6), (3, 2 * MAX_CHUNK + 1), (MAX_CHUNK, 3 * MAX_CHUNK), (33, 40), (650, 700)]:
        torch.testing.assert_close(pool.range_max(a, b), freq[:, a:b].amax(1), rtol=0, atol=0)
    dense = torch.cat(columns.views(), dim=1)
    assert columns.shape == (G, 310) and dense.shape == (G, 310)
    for k in (1, 100, 150, 310):
        torch.testing.assert_close(columns.amax(k), dense[:, :k].amax(1), rtol=0, atol=0)
    comp = Comparison("a", "b", np.arange(2), np.arange(2, 4))
    genes = [f"g{i}" for i in range(G)]
    pc = _pseudocount(s1, columns, raw, raw, None)
    assert pc == _pseudocount(s1, dense, raw, raw, None)
    in_place = _compare(s1, columns, raw, raw, pc, genes, "change", 0.25, 0.05, comp, _WorkBuffers())
    copied = _compare(s1, dense.clone(), raw, raw, pc, genes, "change", 0.25, 0.05, comp, _WorkBuffers())
    pd.testing.assert_frame_equal(in_place, copied)
    np.testing.assert_allclose(in_place.loc[genes, "scale2"], dense.numpy().mean(1), rtol=1e-5)  # all 310 draws


def test_repeated_reference_group_is_decoded_once():
    from scanpy_scvi.tl._de_engine import Comparison, _Group2Draws

    sampler = _CellIdSampler(100)
    ref = np.arange(50, 100)
    comps = [Comparison(str(g), "ref", np.arange(g * 10, g * 10 + 10), ref) for g in range(5)]
    draws = _Group2Draws(sampler, comps, [None], 300, np.random.default_rng(0))
    first = draws.of(comps[0], draws.draws.empty())
    for comp in comps[1:]:
        assert draws.of(comp, draws.draws.empty()) is first
    assert sampler.decoded == 300


@pytest.mark.parametrize("n", [2, 5, 6])
def test_order_statistics_by_partition_and_by_sort_agree(n):
    """The CPU path (partition) and the GPU path (sort) give numpy's median, min and max."""
    from scanpy_scvi.tl._de_engine import _order_statistics

    x = np.random.default_rng(n).normal(size=(7, n)).astype(np.float32)
    for by_sort in (False, True):
        median, low, high = _order_statistics(torch.from_numpy(x.copy()), by_sort=by_sort)
        np.testing.assert_allclose(median, np.median(x, 1), rtol=1e-6)
        np.testing.assert_array_equal(low, x.min(1))
        np.testing.assert_array_equal(high, x.max(1))


@needs_ifnb
def test_scanvi_model_finds_interferon_genes(ifnb):
    """DE through a scANVI model (started from the fitted scVI, half the labels hidden): the ISGs
    are up in stimulated CD14 monocytes, as with scVI."""
    adata = ifnb.copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.random.default_rng(0).random(adata.n_obs) < 0.5] = "Unknown"
    adata.obs["partial_labels"] = pd.Categorical(labels)
    scvi_model = ss.SCVI.from_anndata(adata)
    model = ss.SCANVI.from_scvi_model(scvi_model, labels_key="partial_labels", unlabeled_category="Unknown")
    model.train(max_epochs=5, progress_bar=False)
    mono, stim = _cd14(adata)
    df = ss.tl.differential_expression(
        adata, idx1=mono & stim, idx2=mono & ~stim, model=model, inplace=False, progress_bar=False
    )
    hits = df.loc[ISGS]
    assert hits["is_de_fdr_0.05"].all(), hits
    assert (hits["lfc_median"] > 1).all(), hits
