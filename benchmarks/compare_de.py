"""Compare scanpy-scvi's ``tl.differential_expression`` with scvi-tools' ``SCVI.differential_expression``.

One run, one process, each system's own model and its own DE, on identical inputs:

1. read a dataset (raw counts in ``X``, a condition in ``obs['batch']``, cell types in
   ``obs['cell_type']``; default: Kang 2018 IFN-beta PBMC, 1000 CTRL + 1000 STIM cells);
2. select ``--n-top-genes`` HVGs once (scanpy ``flavor='seurat_v3'`` on the counts, no batch
   key); scvi-tools gets a copy subset to them, scanpy-scvi gets ``genes=`` the same list in
   the same order;
3. train both without a batch key (``obs['batch']`` is the biological condition here, so it
   must not be corrected away) with the scVI defaults (n_hidden 128, n_latent 10,
   n_layers 1, ZINB, gene dispersion, Adam lr 1e-3, KL warm-up over 400 epochs) on all cells
   (``train_size=1.0``, ``--batch-size``, CPU, ``--threads`` torch threads);
4. time one-vs-rest DE over all cell types with each system's own function, change mode,
   ``delta=--delta``, default sample counts (5000 posterior samples per group in both):
   scvi-tools ``model.differential_expression(groupby='cell_type', mode='change', delta=...)``
   and ours ``scanpy_scvi.tl.differential_expression(adata, groupby='cell_type',
   mode='change', delta=..., model=model, inplace=False, progress_bar=False)`` on the AnnData
   the model was built on (all genes; the model keeps its HVG list), and once more, timed
   only, on the HVG-only copy that scvi-tools works on;
5. per cell type, compare the two result tables: Spearman correlation of ``lfc_mean`` over
   all genes and over the union of the two systems' top ``--top-spearman`` genes by
   ``proba_de``, the overlap of the top ``--top-overlap`` genes by ``proba_de`` (ties, common
   at ``proba_de == 1``, broken by ``|lfc_mean|``), and the genes flagged
   ``is_de_fdr_0.05`` by each (and by both);
6. within ``--within-type`` (default CD14 Mono), STIM vs CTRL (``idx1`` / ``idx2``) in both
   systems: are the interferon-stimulated genes ``--isgs`` flagged DE with a positive LFC?
7. with ``--baseline-seed S``: both systems trained again with seed S and their one-vs-rest
   rerun, each compared with its own first run by the figures of step 5, so that the
   cross-system agreement can be read against each system's seed-to-seed agreement.

Needs scvi-tools (the ``bench`` extra); it is only imported here, never by the package::

    /opt/scvi-bench/bin/python benchmarks/compare_de.py --epochs 100 --json out.json

Paths are resolved relative to this file, not the working directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_scvi_tools import fmt, load_average, machine_info, read_with_hvgs

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "data" / "kang2018_ifnb_pbmc_2k.h5ad"
CONDITION_KEY, LABEL_KEY = "batch", "cell_type"
ARCH = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "gene_likelihood": "zinb", "dispersion": "gene"}
FDR = 0.05
FDR_COL = f"is_de_fdr_{FDR}"
DEFAULT_ISGS = "ISG15,IFI6,IFIT1,MX1,IFIT3"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="h5ad with raw counts (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=100, help="training epochs for both systems (default: 100)")
    p.add_argument("--n-top-genes", type=int, default=2000, help="HVGs (seurat_v3, no batch key) (default: 2000)")
    p.add_argument("--batch-size", type=int, default=128, help="training minibatch size (default: 128)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, training and DE (default: 0)")
    p.add_argument("--delta", type=float, default=0.25, help="LFC threshold of the change mode (default: 0.25)")
    p.add_argument("--top-overlap", type=int, default=50, help="top genes by proba_de to intersect (default: 50)")
    p.add_argument(
        "--top-spearman", type=int, default=100, help="top genes (by either system) for the restricted Spearman"
    )
    p.add_argument("--de-repeats", type=int, default=1, help="timed repeats of each one-vs-rest DE (default: 1)")
    p.add_argument(
        "--within-type", default="CD14 Mono", help="cell type of the STIM vs CTRL check (default: %(default)s)"
    )
    p.add_argument("--condition1", default="STIM", help="idx1 condition of the within-type check (default: STIM)")
    p.add_argument("--condition2", default="CTRL", help="idx2 condition of the within-type check (default: CTRL)")
    p.add_argument("--isgs", default=DEFAULT_ISGS, help="comma-separated genes expected up (default: %(default)s)")
    p.add_argument(
        "--baseline-seed",
        type=int,
        default=None,
        help="also train both systems again with this seed and report each system against itself "
        "(the seed-to-seed agreement that the cross-system figures should be read against)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if min(args.epochs, args.n_top_genes, args.batch_size, args.threads, args.de_repeats) < 1:
        p.error("--epochs, --n-top-genes, --batch-size, --threads and --de-repeats must be positive")
    if args.delta <= 0 or args.top_overlap < 1 or args.top_spearman < 2:
        p.error("--delta must be > 0, --top-overlap >= 1, --top-spearman >= 2")
    args.isgs = [g.strip() for g in args.isgs.split(",") if g.strip()]
    return args


# -- data ----------------------------------------------------------------------------------------------
def prepare_data(args):
    """Read and pick HVGs on all cells (no batch key). Returns (path, adata, hvg list)."""
    return read_with_hvgs(args.dataset, (CONDITION_KEY, LABEL_KEY), args.n_top_genes, None)


def train_scvi_tools(args, adata, genes, seed=None):
    import scvi
    import torch

    warnings.filterwarnings("ignore", module="lightning")
    scvi.settings.seed = args.seed if seed is None else seed
    scvi.settings.dl_num_workers = 0
    torch.set_num_threads(args.threads)
    hvg = adata[:, genes].copy()  # same genes, same order, same cells
    scvi.model.SCVI.setup_anndata(hvg)  # no batch key
    model = scvi.model.SCVI(hvg, **ARCH)
    t0 = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        train_size=1.0,
        batch_size=args.batch_size,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        early_stopping=False,
    )
    train_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    hist = model.history
    info = {
        "train_seconds": train_s,
        "epochs_run": len(hist["elbo_train"]),
        "train_elbo_last_epoch": -float(hist["elbo_train"].iloc[-1, 0]),
    }
    return model, hvg, info


def train_ours(args, adata, genes, seed=None):
    import torch

    import scanpy_scvi

    seed = args.seed if seed is None else seed
    torch.set_num_threads(args.threads)
    model = scanpy_scvi.SCVI(adata, genes=genes, random_state=seed, **ARCH)  # no batch key
    t0 = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        train_size=1.0,
        batch_size=args.batch_size,
        device="cpu",
        random_state=seed,
        progress_bar=False,
    )
    train_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    info = {
        "train_seconds": train_s,
        "epochs_run": len(model.history_["elbo_train"]),
        "train_elbo_last_epoch": -float(model.history_["elbo_train"][-1]),
    }
    return model, info


# -- DE calls ----------------------------------------------------------------------------------------------
def timed(fn, repeats: int):
    """Wall and CPU seconds of each of ``repeats`` calls, and the first call's result."""
    walls, cpus, first = [], [], None
    for i in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if i == 0:
            first = out
    return first, {
        "wall_seconds": float(np.median(walls)),
        "wall_seconds_all": walls,
        "cpu_seconds": float(np.median(cpus)),
    }


def de_scvi_tools(args, model, seed=None, **kw):
    import scvi
    import torch

    def call():
        scvi.settings.seed = args.seed if seed is None else seed  # seeds torch, numpy, random
        torch.set_num_threads(args.threads)
        return model.differential_expression(mode="change", delta=args.delta, fdr_target=FDR, silent=True, **kw)

    return call


def de_ours(args, model, adata, seed=None, **kw):
    import scanpy_scvi

    def call():
        return scanpy_scvi.tl.differential_expression(
            adata,
            mode="change",
            delta=args.delta,
            fdr_target=FDR,
            model=model,
            inplace=False,
            progress_bar=False,
            random_state=args.seed if seed is None else seed,
            **kw,
        )

    return call


# -- agreement ---------------------------------------------------------------------------------------------
def top_genes(df, k: int) -> list[str]:
    """Top ``k`` genes by proba_de; ties (many genes at proba_de == 1) broken by larger |lfc_mean|."""
    order = np.lexsort((-np.abs(df["lfc_mean"].to_numpy()), -df["proba_de"].to_numpy()))
    return list(df.index.to_numpy()[order[:k]])


def agreement(ours, theirs, k_overlap: int, k_spearman: int) -> dict:
    """Figures comparing two DE tables of one comparison (indexed by gene)."""
    from scipy.stats import spearmanr

    genes = ours.index.intersection(theirs.index)
    o, t = ours.loc[genes], theirs.loc[genes]
    top_o, top_t = top_genes(o, k_spearman), top_genes(t, k_spearman)
    union = list(dict.fromkeys(top_o + top_t))
    ov_o, ov_t = set(top_genes(o, k_overlap)), set(top_genes(t, k_overlap))
    de_o, de_t = set(genes[o[FDR_COL].to_numpy(bool)]), set(genes[t[FDR_COL].to_numpy(bool)])
    return {
        "n_genes": len(genes),
        "spearman_lfc_all": float(spearmanr(o["lfc_mean"], t["lfc_mean"]).statistic),
        f"spearman_lfc_top{k_spearman}_union": float(
            spearmanr(o.loc[union, "lfc_mean"], t.loc[union, "lfc_mean"]).statistic
        ),
        f"n_top{k_spearman}_union": len(union),
        "spearman_proba_de_all": float(spearmanr(o["proba_de"], t["proba_de"]).statistic),
        f"top{k_overlap}_overlap": len(ov_o & ov_t),
        "n_de_ours": len(de_o),
        "n_de_scvi_tools": len(de_t),
        "n_de_both": len(de_o & de_t),
        "n_proba_de_1_ours": int((o["proba_de"] >= 1).sum()),
        "n_proba_de_1_scvi_tools": int((t["proba_de"] >= 1).sum()),
        "top10_ours": top_genes(o, 10),
        "top10_scvi_tools": top_genes(t, 10),
    }


def per_group(df, key: str = "group1") -> dict:
    """One table per comparison, keyed by its group1 label."""
    drop = ["comparison", "group1", "group2"]
    return {str(g): d.drop(columns=drop, errors="ignore") for g, d in df.groupby(key, observed=True)}


def isg_table(ours, theirs, isgs, model_genes) -> dict:
    out = {}
    for g in isgs:
        row = {"in_model_genes": g in model_genes}
        for name, df in (("ours", ours), ("scvi_tools", theirs)):
            if g in df.index:
                r = df.loc[g]
                de = bool(r[FDR_COL])
                row[name] = {
                    "proba_de": float(r["proba_de"]),
                    "lfc_mean": float(r["lfc_mean"]),
                    "is_de": de,
                    "de_and_up": bool(de and r["lfc_mean"] > 0),
                }
        out[g] = row
    return out


def source_state() -> dict:
    """Identify the DE code measured: sha256 of the imported ``tl/_de.py`` and of ``git diff HEAD -- scanpy_scvi``."""
    import hashlib
    import subprocess

    import scanpy_scvi.tl._de as de_module

    out = {
        "de_module": de_module.__file__,
        "de_module_sha256": hashlib.sha256(Path(de_module.__file__).read_bytes()).hexdigest(),
    }
    try:
        diff = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "diff", "HEAD", "--", "scanpy_scvi"],
            capture_output=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        out["scanpy_scvi_diff_sha256"] = hashlib.sha256(diff).hexdigest() if diff else None
    except (OSError, subprocess.SubprocessError):
        out["scanpy_scvi_diff_sha256"] = "unknown"
    return out


def seed_baseline(args, adata, genes, labels, our_df, st_df) -> dict:
    """Each system retrained and its one-vs-rest DE rerun with ``--baseline-seed``, compared with
    its own first run by :func:`agreement` ("ours" = first run, "scvi_tools" = second run)."""
    seed = args.baseline_seed
    print(f"seed baseline: training both systems again with seed {seed} ...", flush=True)
    st_model, _, _ = train_scvi_tools(args, adata, genes, seed=seed)
    st_df2, _ = timed(de_scvi_tools(args, st_model, seed=seed, groupby=LABEL_KEY), 1)
    our_model, _ = train_ours(args, adata, genes, seed=seed)
    our_df2, _ = timed(de_ours(args, our_model, adata, seed=seed, groupby=LABEL_KEY), 1)
    out = {"seed": seed}
    for system, first, second in (("scvi-tools", st_df, st_df2), ("ours", our_df, our_df2)):
        a, b = per_group(first), per_group(second)
        out[system] = {
            name: {"n_cells": int((labels == name).sum())}
            | agreement(a[name], b[name], args.top_overlap, args.top_spearman)
            for name in adata.obs[LABEL_KEY].cat.categories
            if name in a and name in b
        }
    return out


# -- report ------------------------------------------------------------------------------------------------
def print_baseline(baseline, per_type, args) -> None:
    """Per cell type: Spearman of lfc_mean over all genes and top-k overlap, across systems and
    within each system between the two seeds."""
    ko = args.top_overlap
    print(f"seed baseline (seed {args.seed} vs {baseline['seed']}): rho lfc all genes / top{ko} overlap")
    print(f"{'cell type':<14}{'cells':>6}{'ours vs scvi':>16}{'scvi vs scvi':>16}{'ours vs ours':>16}")
    cols = (per_type, baseline["scvi-tools"], baseline["ours"])
    for name, r in per_type.items():
        cells = [f"{c[name]['spearman_lfc_all']:.3f} / {c[name][f'top{ko}_overlap']:>2}" for c in cols]
        print(f"{name:<14}{r['n_cells']:>6}" + "".join(f"{c:>16}" for c in cells))
    means = [np.nanmean([c[n]["spearman_lfc_all"] for n in per_type]) for c in cols]
    overlaps = [np.nanmean([c[n][f"top{ko}_overlap"] for n in per_type]) for c in cols]
    print(
        f"{'mean':<14}{'':>6}" + "".join(f"{f'{m:.3f} / {o:.1f}':>16}" for m, o in zip(means, overlaps, strict=False))
    )


def print_report(info, setup, train, de_time, per_type, summary, within, args) -> None:
    ko, ks = args.top_overlap, args.top_spearman
    print()
    print("=" * 110)
    print("scanpy-scvi vs scvi-tools: scVI differential expression (change mode) on the same data")
    print("=" * 110)
    print(f"machine      : {info['cpu_model']}; {info['logical_cpus']} logical CPUs ({info['usable_cpus']} usable)")
    print(f"torch threads: {info['torch_threads']} (requested {info['torch_threads_requested']})")
    print(f"load average : start {setup['loadavg_start']}, end {setup['loadavg_end']}")
    print(f"platform     : {info['platform']}, Python {info['python']}")
    g = info["git"]
    print(f"repository   : commit {g['commit']}, scanpy_scvi/ modified: {g['scanpy_scvi_dirty']}")
    print("versions     : " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    src = setup["source"]
    print(
        f"DE source    : {src['de_module']} sha256 {src['de_module_sha256'][:12]}, "
        f"uncommitted scanpy_scvi diff sha256 {str(src['scanpy_scvi_diff_sha256'])[:12]}"
    )
    print(f"dataset      : {setup['dataset']} ({setup['n_cells']} cells x {setup['n_genes_total']} genes)")
    print(
        f"setup        : {setup['n_hvg']} HVGs (seurat_v3, no batch key), no batch key in the models, "
        f"{setup['epochs']} epochs, batch size {setup['batch_size']}, train_size 1.0, seed {setup['seed']}; "
        f"DE: one-vs-rest over {setup['n_cell_types']} cell types, change mode, delta {args.delta}, "
        f"5000 samples per group, FDR {FDR}"
    )
    print()
    print(f"{'':<40}{'scanpy-scvi':>16}{'scvi-tools':>16}")
    o, t = train["ours"], train["scvi-tools"]
    print(f"{'training wall seconds':<40}{o['train_seconds']:>16.1f}{t['train_seconds']:>16.1f}")
    print(
        f"{'train ELBO, last epoch':<40}{train['ours']['train_elbo_last_epoch']:>16.2f}"
        f"{train['scvi-tools']['train_elbo_last_epoch']:>16.2f}"
    )
    within_label = f"{args.within_type} {args.condition1} vs {args.condition2}"
    for label, key in (("one-vs-rest DE", "one_vs_rest"), (within_label, "within")):
        o, t = de_time["ours"][key], de_time["scvi-tools"][key]
        print(f"{label + ' wall s':<40}{o['wall_seconds']:>16.2f}{t['wall_seconds']:>16.2f}")
        print(f"{label + ' CPU s':<40}{o['cpu_seconds']:>16.2f}{t['cpu_seconds']:>16.2f}")
    print()
    header = (
        f"{'cell type':<14}{'cells':>6}{'rho all':>9}{f'rho top{ks}':>11}{'(genes)':>8}"
        f"{'rho p_de':>9}{f'top{ko} ov':>9}{'DE ours':>9}{'DE scvi':>9}{'DE both':>9}{'p=1 o/s':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, r in per_type.items():
        print(
            f"{name:<14}{r['n_cells']:>6}{fmt(r['spearman_lfc_all'], '{:.3f}'):>9}"
            f"{fmt(r[f'spearman_lfc_top{ks}_union'], '{:.3f}'):>11}{r[f'n_top{ks}_union']:>8}"
            f"{fmt(r['spearman_proba_de_all'], '{:.3f}'):>9}{r[f'top{ko}_overlap']:>9}"
            f"{r['n_de_ours']:>9}{r['n_de_scvi_tools']:>9}{r['n_de_both']:>9}"
            f"{str(r['n_proba_de_1_ours']) + '/' + str(r['n_proba_de_1_scvi_tools']):>10}"
        )
    print("-" * len(header))
    for stat in ("mean", "median"):
        s = summary[stat]
        print(
            f"{stat:<14}{'':>6}{s['spearman_lfc_all']:>9.3f}{s[f'spearman_lfc_top{ks}_union']:>11.3f}{'':>8}"
            f"{s['spearman_proba_de_all']:>9.3f}{s[f'top{ko}_overlap']:>9.1f}"
        )
    print()
    w = within["agreement"]
    print(
        f"{args.within_type}, {args.condition1} ({within['n_cells1']} cells) vs {args.condition2} "
        f"({within['n_cells2']} cells): rho lfc all {w['spearman_lfc_all']:.3f}, "
        f"rho top{ks} {w[f'spearman_lfc_top{ks}_union']:.3f}, top{ko} overlap {w[f'top{ko}_overlap']}, "
        f"DE ours {w['n_de_ours']}, DE scvi-tools {w['n_de_scvi_tools']}, both {w['n_de_both']}"
    )
    print(
        f"{'gene':<8}{'in HVGs':>8}{'p_de ours':>11}{'lfc ours':>10}{'DE&up':>7}"
        f"{'p_de scvi':>11}{'lfc scvi':>10}{'DE&up':>7}"
    )
    for gname, row in within["isgs"].items():
        o, t = row.get("ours", {}), row.get("scvi_tools", {})
        print(
            f"{gname:<8}{row['in_model_genes']!s:>8}{fmt(o.get('proba_de'), '{:.3f}'):>11}"
            f"{fmt(o.get('lfc_mean'), '{:+.2f}'):>10}{fmt(o.get('de_and_up'), '{}'):>7}"
            f"{fmt(t.get('proba_de'), '{:.3f}'):>11}{fmt(t.get('lfc_mean'), '{:+.2f}'):>10}"
            f"{fmt(t.get('de_and_up'), '{}'):>7}"
        )
    print(
        f"ISGs flagged DE and up: ours {within['isgs_de_up_ours']}/{len(within['isgs'])}, "
        f"scvi-tools {within['isgs_de_up_scvi_tools']}/{len(within['isgs'])}"
    )
    print()
    sp = summary["speedup_one_vs_rest"]
    print(
        f"one-vs-rest DE speed-up (scvi-tools wall / ours wall): {sp:.1f}x -> target >= 10x: "
        f"{'MET' if sp >= 10 else 'MISSED'}"
    )
    print(f"within-type DE speed-up: {summary['speedup_within']:.1f}x")
    hv = de_time["ours"]["one_vs_rest_hvg_adata"]["wall_seconds"]
    print(
        f"ours on the {setup['n_hvg']}-gene AnnData scvi-tools uses (instead of all {setup['n_genes_total']} genes): "
        f"{hv:.2f} s, speed-up {summary['speedup_one_vs_rest_hvg_adata']:.1f}x"
    )
    print("=" * 110)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load_start = load_average()
    t_all = time.perf_counter()
    path, adata, genes = prepare_data(args)
    labels = adata.obs[LABEL_KEY].to_numpy().astype(str)
    cond = adata.obs[CONDITION_KEY].to_numpy().astype(str)
    print(f"data: {adata.n_obs} cells, {len(genes)} HVGs; load average {load_start}", flush=True)
    missing = [g for g in args.isgs if g not in genes]
    if missing:
        print(f"note: not among the HVGs (so absent from both DE tables): {missing}", flush=True)

    train = {}
    print(f"training scvi-tools for {args.epochs} epochs ...", flush=True)
    st_model, st_adata, train["scvi-tools"] = train_scvi_tools(args, adata, genes)
    print(f"  {train['scvi-tools']['train_seconds']:.1f} s, load average {load_average()}", flush=True)
    print(f"training scanpy-scvi for {args.epochs} epochs ...", flush=True)
    our_model, train["ours"] = train_ours(args, adata, genes)
    print(f"  {train['ours']['train_seconds']:.1f} s, load average {load_average()}", flush=True)

    de_time = {"ours": {}, "scvi-tools": {}}
    print("one-vs-rest DE, scvi-tools ...", flush=True)
    st_df, de_time["scvi-tools"]["one_vs_rest"] = timed(
        de_scvi_tools(args, st_model, groupby=LABEL_KEY), args.de_repeats
    )
    print(f"  {de_time['scvi-tools']['one_vs_rest']['wall_seconds']:.2f} s", flush=True)
    print("one-vs-rest DE, scanpy-scvi ...", flush=True)
    our_df, de_time["ours"]["one_vs_rest"] = timed(de_ours(args, our_model, adata, groupby=LABEL_KEY), args.de_repeats)
    print(f"  {de_time['ours']['one_vs_rest']['wall_seconds']:.2f} s", flush=True)
    # Secondary timing: ours on the HVG-only copy scvi-tools works on (the model binds it by gene name).
    print("one-vs-rest DE, scanpy-scvi, on the HVG-only AnnData ...", flush=True)
    _, de_time["ours"]["one_vs_rest_hvg_adata"] = timed(
        de_ours(args, our_model, st_adata, groupby=LABEL_KEY), args.de_repeats
    )
    print(f"  {de_time['ours']['one_vs_rest_hvg_adata']['wall_seconds']:.2f} s", flush=True)

    ours_g, st_g = per_group(our_df), per_group(st_df)
    per_type = {}
    for name in adata.obs[LABEL_KEY].cat.categories:
        if name in ours_g and name in st_g:
            per_type[name] = {"n_cells": int((labels == name).sum())}
            per_type[name].update(agreement(ours_g[name], st_g[name], args.top_overlap, args.top_spearman))

    # Within one cell type: condition1 vs condition2.
    in_type = labels == args.within_type
    idx1 = np.flatnonzero(in_type & (cond == args.condition1))
    idx2 = np.flatnonzero(in_type & (cond == args.condition2))
    if idx1.size == 0 or idx2.size == 0:
        sys.exit(f"{args.within_type!r} has no cells in {args.condition1!r} or {args.condition2!r}")
    print(f"{args.within_type} {args.condition1} vs {args.condition2}, scvi-tools ...", flush=True)
    st_w, de_time["scvi-tools"]["within"] = timed(de_scvi_tools(args, st_model, idx1=idx1, idx2=idx2), args.de_repeats)
    print(f"{args.within_type} {args.condition1} vs {args.condition2}, scanpy-scvi ...", flush=True)
    our_w, de_time["ours"]["within"] = timed(de_ours(args, our_model, adata, idx1=idx1, idx2=idx2), args.de_repeats)
    our_w = our_w.drop(columns=["comparison", "group1", "group2"], errors="ignore")
    st_w = st_w.drop(columns=["comparison", "group1", "group2"], errors="ignore")
    isgs = isg_table(our_w, st_w, args.isgs, set(genes))
    within = {
        "cell_type": args.within_type,
        "condition1": args.condition1,
        "condition2": args.condition2,
        "n_cells1": int(idx1.size),
        "n_cells2": int(idx2.size),
        "agreement": agreement(our_w, st_w, args.top_overlap, args.top_spearman),
        "isgs": isgs,
        "isgs_de_up_ours": sum(bool(r.get("ours", {}).get("de_and_up")) for r in isgs.values()),
        "isgs_de_up_scvi_tools": sum(bool(r.get("scvi_tools", {}).get("de_and_up")) for r in isgs.values()),
    }

    ks, ko = args.top_spearman, args.top_overlap
    metrics = ("spearman_lfc_all", f"spearman_lfc_top{ks}_union", "spearman_proba_de_all", f"top{ko}_overlap")
    summary = {
        stat: {m: float(fn([r[m] for r in per_type.values()])) for m in metrics}
        for stat, fn in (("mean", np.nanmean), ("median", np.nanmedian))
    }
    summary["min_spearman_lfc_all"] = float(np.nanmin([r["spearman_lfc_all"] for r in per_type.values()]))
    summary["speedup_one_vs_rest"] = (
        de_time["scvi-tools"]["one_vs_rest"]["wall_seconds"] / de_time["ours"]["one_vs_rest"]["wall_seconds"]
    )
    summary["speedup_one_vs_rest_hvg_adata"] = (
        de_time["scvi-tools"]["one_vs_rest"]["wall_seconds"] / de_time["ours"]["one_vs_rest_hvg_adata"]["wall_seconds"]
    )
    summary["speedup_within"] = (
        de_time["scvi-tools"]["within"]["wall_seconds"] / de_time["ours"]["within"]["wall_seconds"]
    )
    summary["speedup_target_10x_met"] = bool(summary["speedup_one_vs_rest"] >= 10)
    baseline = None
    if args.baseline_seed is not None:
        baseline = seed_baseline(args, adata, genes, labels, our_df, st_df)

    info = machine_info(args.threads)
    setup = {
        "dataset": str(path),
        "n_cells": int(adata.n_obs),
        "n_genes_total": int(adata.n_vars),
        "n_hvg": len(genes),
        "n_cell_types": len(per_type),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "delta": args.delta,
        "fdr_target": FDR,
        "de_repeats": args.de_repeats,
        "top_overlap": ko,
        "top_spearman": ks,
        "source": source_state(),
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "loadavg_start": load_start,
        "loadavg_end": load_average(),
        "total_seconds": time.perf_counter() - t_all,
    }
    print_report(info, setup, train, de_time, per_type, summary, within, args)
    if baseline is not None:
        print_baseline(baseline, per_type, args)
    if args.json is not None:
        payload = {
            "machine": info,
            "setup": setup,
            "training": train,
            "de_timing": de_time,
            "summary": summary,
            "per_cell_type": per_type,
            "within_cell_type": within,
            "seed_baseline": baseline,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
