"""Compare scanpy-scvi's ``SCVI`` with scvi-tools' ``scvi.model.SCVI`` on the same data.

One run, one process, the two systems trained one after the other on identical inputs:

1. read a dataset (raw counts in ``X``, batches in ``obs['batch']``, cell types in
   ``obs['cell_type']``);
2. select ``--n-top-genes`` HVGs once (scanpy ``flavor='seurat_v3'``, ``batch_key='batch'``,
   on the counts); scvi-tools gets a copy subset to them, scanpy-scvi gets ``genes=`` the
   same list in the same order;
3. split the cells once into training cells and ``--heldout`` held-out cells (fixed seed);
4. train both with the scVI defaults (n_hidden 128, n_latent 10, n_layers 1, ZINB,
   gene dispersion, Adam lr 1e-3, KL warm-up over 400 epochs) on the training cells
   only (``train_size=1.0``, ``batch_size``, CPU, ``--threads`` torch threads);
5. report held-out ELBO (each system's own ``get_elbo``, averaged over several seeded
   evaluations), training ELBO of the last epoch, wall time, throughput,
   ``get_latent_representation`` time and a cheap latent-space check (cell-type
   silhouette, kNN cell-type purity, batch silhouette).

Needs scvi-tools (the ``bench`` extra); it is only imported here, never by the package::

    /opt/scvi-bench/bin/python benchmarks/compare_scvi_tools.py --epochs 50 --json out.json

Paths are resolved relative to this file, not the working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "data" / "kang2018_lupus_pbmc_8k_2511genes.h5ad"
BATCH_KEY, LABEL_KEY = "batch", "cell_type"
ARCH = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "gene_likelihood": "zinb", "dispersion": "gene"}


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--counts-on-device``, shared by the comparison scripts."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="train and infer on (default: cpu)")
    p.add_argument(
        "--counts-on-device",
        choices=("auto", "off"),
        default="auto",
        help="ours: hold the counts on a GPU when they fit ('auto'), or build minibatches on the host ('off')",
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="h5ad with raw counts (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=50, help="training epochs for both systems (default: 50)")
    p.add_argument("--n-top-genes", type=int, default=2000, help="HVGs (seurat_v3, per batch) (default: 2000)")
    p.add_argument("--batch-size", type=int, default=128, help="training minibatch size (default: 128)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, initialisation and training (default: 0)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of cells held out (default: 0.1)")
    p.add_argument("--elbo-evals", type=int, default=5, help="seeded repeats of each held-out evaluation (default: 5)")
    p.add_argument(
        "--marginal-ll-samples",
        type=int,
        default=0,
        help="also estimate the held-out marginal log-likelihood with this many importance samples (0: skip; slow)",
    )
    p.add_argument("--knn", type=int, default=15, help="neighbours for the kNN cell-type purity (default: 15)")
    add_device_arguments(p)
    p.add_argument("--only", choices=("both", "ours", "scvi-tools"), default="both", help="run only one system")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.n_top_genes < 1 or args.batch_size < 1 or args.threads < 1 or args.elbo_evals < 1:
        p.error("--epochs, --n-top-genes, --batch-size, --threads and --elbo-evals must be positive")
    if not 0 < args.heldout < 1:
        p.error("--heldout must be in (0, 1)")
    return args


# -- environment ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_state() -> dict:
    """Commit and dirty flag of the repository holding this script (None outside git)."""
    import subprocess

    def git(*cmd):
        try:
            return subprocess.run(
                ["git", "-C", str(REPO_ROOT), *cmd], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "scanpy_scvi")
    return {"commit": commit, "scanpy_scvi_dirty": None if status is None else bool(status)}


def machine_info(threads: int) -> dict:
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads_requested": threads,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git": git_state(),
        "versions": {
            name: pkg_version(name)
            for name in (
                "scanpy-scvi",
                "scvi-tools",
                "torch",
                "lightning",
                "numpy",
                "scipy",
                "anndata",
                "scanpy",
                "scikit-learn",
                "scikit-misc",
            )
        },
    }


# -- data ----------------------------------------------------------------------------------------------
def read_with_hvgs(dataset: Path, keys: tuple[str, ...], n_top_genes: int, batch_key: str | None):
    """Read the dataset, make ``keys`` categorical, pick seurat_v3 HVGs on all cells once.

    Returns (resolved path, adata, HVG names in the original var order, used by both systems).
    """
    import anndata as ad
    import scanpy as sc

    path = dataset.expanduser().resolve()
    if not path.is_file():
        sys.exit(f"dataset not found: {path}")
    adata = ad.read_h5ad(path)
    for key in keys:
        if key not in adata.obs:
            sys.exit(f"{path} has no obs[{key!r}]")
        adata.obs[key] = adata.obs[key].astype(str).astype("category")
    n_top = min(n_top_genes, adata.n_vars)
    hv = sc.pp.highly_variable_genes(
        adata, flavor="seurat_v3", n_top_genes=n_top, batch_key=batch_key, inplace=False, subset=False
    )
    genes = list(adata.var_names[np.asarray(hv["highly_variable"], dtype=bool)])
    return path, adata, genes


def prepare_data(args):
    """Read, pick HVGs on all cells, split once. Returns (path, adata, hvg list, train idx, held-out idx)."""
    path, adata, genes = read_with_hvgs(args.dataset, (BATCH_KEY, LABEL_KEY), args.n_top_genes, BATCH_KEY)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(adata.n_obs)
    n_held = max(1, round(args.heldout * adata.n_obs))
    held_idx, train_idx = np.sort(perm[:n_held]), np.sort(perm[n_held:])
    return path, adata, genes, train_idx, held_idx


# -- metrics -------------------------------------------------------------------------------------------
def latent_checks(latent: np.ndarray, labels: np.ndarray, batches: np.ndarray, k: int, seed: int) -> dict:
    """Cell-type silhouette (higher: types separate), kNN cell-type purity, batch silhouette (lower: mixed)."""
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    n = latent.shape[0]
    sample = min(n, 5000)
    out = {
        "silhouette_cell_type": float(silhouette_score(latent, labels, sample_size=sample, random_state=seed)),
        "silhouette_batch": float(silhouette_score(latent, batches, sample_size=sample, random_state=seed)),
    }
    nn = NearestNeighbors(n_neighbors=k + 1).fit(latent)
    _, nbr = nn.kneighbors(latent)
    same = labels[nbr[:, 1:]] == labels[:, None]
    out[f"knn{k}_cell_type_purity"] = float(same.mean())
    same_b = batches[nbr[:, 1:]] == batches[:, None]
    out[f"knn{k}_same_batch_fraction"] = float(same_b.mean())
    return out


def repeated(fn, n: int, seed: int) -> tuple[float, float, list[float]]:
    """Mean and std of ``fn()`` over ``n`` evaluations under torch seeds seed+1000+i."""
    import torch

    values = []
    for i in range(n):
        torch.manual_seed(seed + 1000 + i)
        values.append(float(fn()))
    arr = np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1)) if n > 1 else 0.0, values


def timed_latent(fn, repeats: int = 3) -> tuple[float, np.ndarray]:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (posterior means: deterministic) and its result."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        latent = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), np.asarray(latent)


# -- the two systems -----------------------------------------------------------------------------------
def train_summary(history: dict, seconds: float, cpu_seconds: float, threads: list[int]) -> dict:
    """Training figures from a history in scvi-tools' form (one single-column DataFrame per
    metric), which both systems' ``model.history`` return."""

    def last(key: str) -> float:
        return float(history[key].iloc[-1, 0])

    return {
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "threads_during_train": threads,
        "epochs_run": len(history["elbo_train"]),
        "train_elbo_last_epoch": -last("elbo_train"),
        "train_reconstruction_last_epoch": last("reconstruction_loss_train"),
        "train_kl_last_epoch": last("kl_local_train"),
    }


def run_scvi_tools(args, adata, genes, train_idx, held_idx) -> dict:
    import scvi
    import torch

    warnings.filterwarnings("ignore", module="lightning")
    scvi.settings.seed = args.seed
    scvi.settings.dl_num_workers = 0
    torch.set_num_threads(args.threads)
    full = adata[:, genes].copy()  # same genes, same order
    train = full[train_idx].copy()
    scvi.model.SCVI.setup_anndata(train, batch_key=BATCH_KEY)
    model = scvi.model.SCVI(train, **ARCH)
    threads_before = torch.get_num_threads()
    t0, c0 = time.perf_counter(), time.process_time()
    model.train(
        max_epochs=args.epochs,
        train_size=1.0,
        batch_size=args.batch_size,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        enable_progress_bar=False,
        early_stopping=False,
    )
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    threads_after = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    res = train_summary(model.history, train_s, train_cpu, [threads_before, threads_after])
    # Held-out cells, evaluated through the full HVG AnnData (setup transferred by scvi-tools).
    held = full[held_idx].copy()
    res.update(evaluate(args, model, held))
    res["latent_seconds"], res["latent"] = timed_latent(lambda: model.get_latent_representation(adata=full))
    return res


def run_ours(args, adata, genes, train_idx, held_idx) -> dict:
    import torch

    import scanpy_scvi

    torch.set_num_threads(args.threads)
    train = adata[train_idx].copy()
    model = scanpy_scvi.SCVI(train, genes=genes, batch_key=BATCH_KEY, random_state=args.seed, **ARCH)
    threads_before = torch.get_num_threads()
    t0, c0 = time.perf_counter(), time.process_time()
    model.train(
        max_epochs=args.epochs,
        train_size=1.0,
        batch_size=args.batch_size,
        device=args.device,
        counts_on_device=None if args.counts_on_device == "auto" else False,
        random_state=args.seed,
        progress_bar=False,
    )
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    threads_after = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    res = train_summary(model.history, train_s, train_cpu, [threads_before, threads_after])
    held = adata[held_idx].copy()
    res.update(evaluate(args, model, held))
    res["latent_seconds"], res["latent"] = timed_latent(lambda: model.get_latent_representation(adata=adata))
    return res


def evaluate(args, model, held) -> dict:
    """Held-out figures from the model's own methods (same names and arguments in both packages)."""
    bs = args.batch_size

    def elbo_fn():
        return model.get_elbo(adata=held, batch_size=bs)

    def recon_fn():
        return model.get_reconstruction_error(adata=held, batch_size=bs)["reconstruction_loss"]

    def mll_fn(n):
        return model.get_marginal_ll(adata=held, n_mc_samples=n, batch_size=bs)

    t0 = time.perf_counter()
    elbo_mean, elbo_std, elbo_values = repeated(elbo_fn, args.elbo_evals, args.seed)
    out = {
        "heldout_elbo": elbo_mean,
        "heldout_elbo_std": elbo_std,
        "heldout_elbo_values": elbo_values,
        "elbo_eval_seconds": (time.perf_counter() - t0) / args.elbo_evals,
    }
    recon_mean, recon_std, _ = repeated(recon_fn, args.elbo_evals, args.seed)
    out["heldout_reconstruction_loss"], out["heldout_reconstruction_loss_std"] = recon_mean, recon_std
    # KL of the held-out cells (ELBO = -(recon + KL)); difference of two noisy means, shown for orientation.
    out["heldout_kl_approx"] = -elbo_mean - recon_mean
    if args.marginal_ll_samples > 0:
        import torch

        torch.manual_seed(args.seed + 7)
        t0 = time.perf_counter()
        out["heldout_marginal_ll"] = float(mll_fn(args.marginal_ll_samples))
        out["marginal_ll_seconds"] = time.perf_counter() - t0
    return out


# -- report --------------------------------------------------------------------------------------------
ROWS = [
    ("held-out ELBO (mean of evals)", "heldout_elbo", "{:.3f}"),
    ("held-out ELBO std over evals", "heldout_elbo_std", "{:.3f}"),
    ("held-out reconstruction NLL", "heldout_reconstruction_loss", "{:.3f}"),
    ("held-out KL (= -ELBO - NLL)", "heldout_kl_approx", "{:.3f}"),
    ("held-out marginal log-lik.", "heldout_marginal_ll", "{:.3f}"),
    ("train ELBO, last epoch", "train_elbo_last_epoch", "{:.3f}"),
    ("train recon. NLL, last epoch", "train_reconstruction_last_epoch", "{:.3f}"),
    ("train KL, last epoch", "train_kl_last_epoch", "{:.3f}"),
    ("epochs run", "epochs_run", "{:d}"),
    ("training wall seconds", "train_seconds", "{:.1f}"),
    ("training CPU seconds (this process)", "train_cpu_seconds", "{:.1f}"),
    ("training cells/s (cells x epochs / s)", "cells_per_second", "{:.0f}"),
    ("get_elbo seconds (held-out, 1 eval)", "elbo_eval_seconds", "{:.2f}"),
    ("get_latent_representation s (all cells, median of 3)", "latent_seconds", "{:.2f}"),
    ("silhouette cell_type (higher better)", "silhouette_cell_type", "{:.3f}"),
    ("kNN cell_type purity (higher better)", "knn_cell_type_purity", "{:.3f}"),
    ("silhouette batch (near 0 = mixed)", "silhouette_batch", "{:.3f}"),
    ("kNN same-batch fraction", "knn_same_batch_fraction", "{:.3f}"),
]


def fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def rel_pct(ours: float, theirs: float) -> float:
    """Relative difference in percent of |theirs| (positive: ours larger)."""
    return 100 * (ours - theirs) / abs(theirs)


def compare(ours: dict, theirs: dict) -> dict:
    out = {}
    if ours and theirs:
        out["heldout_elbo_rel_diff_pct"] = rel_pct(ours["heldout_elbo"], theirs["heldout_elbo"])
        # Uncertainty of the difference from the evaluation noise alone (not from training randomness).
        n_evals = max(1, len(ours["heldout_elbo_values"]))
        se = np.sqrt((ours["heldout_elbo_std"] ** 2 + theirs["heldout_elbo_std"] ** 2) / n_evals)
        out["heldout_elbo_diff_eval_se_pct"] = float(100 * se / abs(theirs["heldout_elbo"]))
        out["heldout_elbo_within_1pct"] = bool(abs(out["heldout_elbo_rel_diff_pct"]) <= 1.0)
        out["train_elbo_rel_diff_pct"] = rel_pct(ours["train_elbo_last_epoch"], theirs["train_elbo_last_epoch"])
        if "heldout_marginal_ll" in ours and "heldout_marginal_ll" in theirs:
            mll = rel_pct(ours["heldout_marginal_ll"], theirs["heldout_marginal_ll"])
            out["heldout_marginal_ll_rel_diff_pct"] = mll
        out["train_time_ratio_ours_over_theirs"] = ours["train_seconds"] / theirs["train_seconds"]
        out["throughput_ratio_ours_over_theirs"] = ours["cells_per_second"] / theirs["cells_per_second"]
        out["latent_time_ratio_ours_over_theirs"] = ours["latent_seconds"] / theirs["latent_seconds"]
    return out


def print_header(title: str, info: dict, setup: dict, *, width: int) -> None:
    """The report's title and the run's machine, device, load, commit and versions."""
    print()
    print("=" * width)
    print(title)
    print("=" * width)
    print(f"machine      : {info['cpu_model']}; {info['logical_cpus']} logical CPUs ({info['usable_cpus']} usable)")
    print(
        f"torch threads: {info['torch_threads']} (requested {info['torch_threads_requested']}), "
        f"interop {info['torch_interop_threads']}"
    )
    print(
        f"device       : {setup['device']} ({info.get('gpu') or 'no GPU'}); ours' counts on device: "
        f"{setup['counts_on_device']}"
    )
    print(f"load average : start {setup['loadavg_start']}, end {setup['loadavg_end']}")
    print(f"platform     : {info['platform']}, Python {info['python']}")
    g = info["git"]
    print(f"repository   : commit {g['commit']}, scanpy_scvi/ modified: {g['scanpy_scvi_dirty']}")
    print("versions     : " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))


def print_report(info: dict, setup: dict, results: dict, ratios: dict) -> None:
    print_header("scanpy-scvi vs scvi-tools: scVI on the same data", info, setup, width=96)
    print(f"dataset      : {setup['dataset']} ({setup['n_cells']} cells x {setup['n_genes_total']} genes)")
    print(
        f"setup        : {setup['n_hvg']} HVGs (seurat_v3, batch_key='batch'), {setup['n_batches']} batches, "
        f"{setup['n_train']} train / {setup['n_heldout']} held-out cells, {setup['epochs']} epochs, "
        f"batch size {setup['batch_size']}, seed {setup['seed']}, "
        "ZINB, gene dispersion, n_hidden 128, n_latent 10, n_layers 1"
    )
    print()
    names = [k for k in ("ours", "scvi-tools") if k in results]
    header = f"{'metric':<54}" + "".join(f"{n:>16}" for n in ["scanpy-scvi" if n == "ours" else n for n in names])
    print(header)
    print("-" * len(header))
    for label, key, spec in ROWS:
        vals = [results[n].get(key) for n in names]
        if all(v is None for v in vals):
            continue
        print(f"{label:<54}" + "".join(f"{fmt(v, spec):>16}" for v in vals))
    if ratios:
        print()
        print(
            f"held-out ELBO, ours vs scvi-tools : {ratios['heldout_elbo_rel_diff_pct']:+.3f} % "
            f"(positive = ours higher/better; evaluation-noise s.e. {ratios['heldout_elbo_diff_eval_se_pct']:.3f} %) "
            f"-> within 1 %: {'YES' if ratios['heldout_elbo_within_1pct'] else 'NO'}"
        )
        print(f"train ELBO (last epoch), ours vs scvi-tools : {ratios['train_elbo_rel_diff_pct']:+.3f} %")
        if "heldout_marginal_ll_rel_diff_pct" in ratios:
            print(f"held-out marginal LL, ours vs scvi-tools   : {ratios['heldout_marginal_ll_rel_diff_pct']:+.3f} %")
        print(f"training time ratio (ours / scvi-tools)     : {ratios['train_time_ratio_ours_over_theirs']:.3f}")
        print(f"throughput ratio (ours / scvi-tools)        : {ratios['throughput_ratio_ours_over_theirs']:.3f}")
        print(f"latent time ratio (ours / scvi-tools)       : {ratios['latent_time_ratio_ours_over_theirs']:.3f}")
    print("=" * 96)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load_start = load_average()
    t_all = time.perf_counter()
    path, adata, genes, train_idx, held_idx = prepare_data(args)
    labels = adata.obs[LABEL_KEY].to_numpy().astype(str)
    batches = adata.obs[BATCH_KEY].to_numpy().astype(str)
    print(
        f"data: {adata.n_obs} cells, {len(genes)} HVGs, {len(train_idx)} train / {len(held_idx)} held-out; "
        f"load average {load_start}",
        flush=True,
    )

    systems = {"ours": run_ours, "scvi-tools": run_scvi_tools}
    order = ["scvi-tools", "ours"] if args.only == "both" else [args.only]
    results = {}
    for name in order:
        print(f"training {name} for {args.epochs} epochs ...", flush=True)
        res = systems[name](args, adata, genes, train_idx, held_idx)
        latent = res.pop("latent")
        res.update(latent_checks(latent, labels, batches, args.knn, args.seed))
        res["knn_cell_type_purity"] = res[f"knn{args.knn}_cell_type_purity"]
        res["knn_same_batch_fraction"] = res[f"knn{args.knn}_same_batch_fraction"]
        res["cells_per_second"] = len(train_idx) * res["epochs_run"] / res["train_seconds"]
        results[name] = res
        print(
            f"  {name}: held-out ELBO {res['heldout_elbo']:.3f} +- {res['heldout_elbo_std']:.3f}, "
            f"{res['train_seconds']:.1f} s training, load average {load_average()}",
            flush=True,
        )

    info = machine_info(args.threads)
    setup = {
        "device": args.device,
        "counts_on_device": args.counts_on_device,
        "dataset": str(path),
        "n_cells": int(adata.n_obs),
        "n_genes_total": int(adata.n_vars),
        "n_hvg": len(genes),
        "n_batches": int(adata.obs[BATCH_KEY].nunique()),
        "n_train": len(train_idx),
        "n_heldout": len(held_idx),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "heldout_fraction": args.heldout,
        "elbo_evals": args.elbo_evals,
        "marginal_ll_samples": args.marginal_ll_samples,
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "loadavg_start": load_start,
        "loadavg_end": load_average(),
        "total_seconds": time.perf_counter() - t_all,
    }
    ratios = compare(results.get("ours", {}), results.get("scvi-tools", {}))
    print_report(info, setup, results, ratios)
    if args.json is not None:
        payload = {"machine": info, "setup": setup, "results": results, "comparison": ratios}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
