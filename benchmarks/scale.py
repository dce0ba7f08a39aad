"""Scale benchmark: time and peak memory of scanpy-scvi's ``SCVI`` from 10k to 1M cells.

Datasets of N cells x ``--n-top-genes`` genes are resampled from REAL cells, so every
profile is a real one (no invented expression):

1. the parent reads ``--dataset`` (default Kang 2018 lupus PBMC, 8684 cells, raw counts,
   5 donors in ``obs['batch']``) and selects the HVGs once (scanpy ``flavor='seurat_v3'``,
   ``batch_key='batch'``, on the counts);
2. for each size N, a FRESH child process (so its peak RSS is that size's alone) rebuilds
   the data itself with the same seed: each synthetic cell is a real cell drawn at random
   (with replacement) whose counts over the HVGs are binomially thinned with a keep
   probability drawn uniformly from ``[--keep-low, --keep-high]`` (default 0.5-1.0): every
   count ``c`` becomes ``Binomial(c, p)``, i.e. the same cell sequenced less deeply. The
   cell keeps its donor (batch). A thinned cell left with no counts keeps its original
   counts. The matrix is written chunk by chunk straight into preallocated CSR arrays
   (float32 data, int32 indices and indptr); it is never densified and never held twice;
3. the child wraps the matrix in an in-memory ``AnnData`` (no copy of ``X``; checked),
   then times and measures, each as one stage:

   - ``warmup`` (skipped with ``--no-warmup``): one epoch and the latent space of a throwaway
     model on a 1024-cell copy, which absorbs torch's one-time start-up in a new process
     (about 1 s, on the first training step), so that the timed epoch is the steady-state cost;
   - ``setup``: ``SCVI(adata, batch_key='batch')`` (binds the data: the streamed count
     checks and per-cell totals over all cells);
   - ``train``: exactly one epoch, ``max_epochs=1, train_size=1.0, batch_size=--batch-size,
     device='cpu', progress_bar=False`` with ``--threads`` torch threads;
   - ``latent``: ``get_latent_representation()`` for all cells.

Memory. Peak RSS per stage is read from ``VmHWM`` in ``/proc/self/status``, and the
high-water mark is reset between stages (``echo 5 > /proc/self/clear_refs``); the
whole-process peak is the maximum over stages, which is what
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` would report at the end of a child that never
reset it (where the reset is unavailable, stage peaks are cumulative and the last one is the
process peak). RSS is also sampled at each stage boundary (e.g. just before training).
The process peak includes the interpreter with torch, scanpy and anndata imported and the
data generation. The data are generated in memory, not read from an ``.h5ad``: the figures
are those of a user whose AnnData is already loaded; reading a file is not measured.

The issue's target (issue 3): peak RSS at most the size of the sparse matrix (data +
indices + indptr bytes) + ``--target-gb`` (1.5 GB).

    python benchmarks/scale.py --sizes 10000,100000,1000000 --json out.json

Paths are resolved relative to this file, not the working directory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from compare_scvi_tools import fmt, load_average, machine_info

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "data" / "kang2018_lupus_pbmc_8k_2511genes.h5ad"
BATCH_KEY = "batch"
GB = 1e9  # decimal gigabytes throughout (the target is "1.5 GB")
MB = 1e6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="h5ad with raw counts (default: %(default)s)")
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated cell counts (default: %(default)s)")
    p.add_argument("--n-top-genes", type=int, default=2000, help="HVGs (seurat_v3, per batch) (default: 2000)")
    p.add_argument("--batch-size", type=int, default=128, help="training minibatch size (default: 128)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling, initialisation, training (default: 0)")
    p.add_argument("--keep-low", type=float, default=0.5, help="lowest binomial keep probability (default: 0.5)")
    p.add_argument("--keep-high", type=float, default=1.0, help="highest binomial keep probability (default: 1.0)")
    p.add_argument(
        "--chunk-cells", type=int, default=10000, help="cells generated per chunk (bounds temporaries) (default: 10000)"
    )
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="time the process's first epoch cold (default: a 1024-cell warm-up epoch runs first, timed separately)",
    )
    p.add_argument("--target-gb", type=float, default=1.5, help="allowed peak RSS above the CSR, GB (default: 1.5)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per child process (default: 1800)")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # internal: config of one size
    args = p.parse_args(argv)
    if args.child is None:
        try:
            args.sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
        except ValueError:
            p.error("--sizes must be comma-separated integers")
        if not args.sizes or min(args.sizes) < 3:
            p.error("--sizes must hold cell counts >= 3")
        if args.n_top_genes < 1 or args.batch_size < 1 or args.threads < 1 or args.chunk_cells < 1:
            p.error("--n-top-genes, --batch-size, --threads and --chunk-cells must be positive")
        if not 0 < args.keep_low <= args.keep_high <= 1:
            p.error("need 0 < --keep-low <= --keep-high <= 1")
    return args


# -- memory probes (Linux) ------------------------------------------------------------------------------
def proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def rss_bytes() -> int | None:
    kb = proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_bytes() -> int:
    """High-water RSS since the last reset (VmHWM), or ru_maxrss where /proc is missing."""
    kb = proc_status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb * 1024


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Stages:
    """Wall/CPU seconds, RSS at the start and end, and peak RSS of consecutive stages."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self.can_reset = reset_peak()

    def run(self, name: str, fn):
        gc.collect()
        self.can_reset = reset_peak() and self.can_reset
        rss0 = rss_bytes()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        gc.collect()
        self.stages[name] = {
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "rss_start_bytes": rss0,
            "rss_end_bytes": rss_bytes(),
            "peak_rss_bytes": peak_bytes(),
        }
        print(
            f"    {name:<8} {wall:8.2f} s   RSS {rss0 / GB:6.2f} -> {rss_bytes() / GB:6.2f} GB, "
            f"peak {self.stages[name]['peak_rss_bytes'] / GB:6.2f} GB",
            flush=True,
        )
        return out


# -- data: real cells, resampled -------------------------------------------------------------------------
def read_source(path: Path, genes: list[str]):
    """The real cells over ``genes`` (CSR float32, canonical) and their batch labels."""
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.read_h5ad(path)
    X = adata[:, genes].X
    X = sp.csr_matrix(X, dtype=np.float32)
    X.sum_duplicates()
    X.sort_indices()
    if X.data.size and (X.data.min() < 0 or not np.array_equal(X.data, np.round(X.data))):
        sys.exit(f"{path}: X is not raw counts")
    batches = adata.obs[BATCH_KEY].astype(str).astype("category")
    return X, batches


def resample_chunks(source, n_cells: int, *, seed: int, keep_low: float, keep_high: float, chunk: int):
    """``n_cells`` thinned copies of random rows of ``source``, as CSR chunks of ``chunk`` cells.

    Yields (chunk CSR float32 with sorted indices, source row of each of its cells, cells
    restored unthinned). The random draws depend only on ``seed``, not on how the chunks are
    consumed.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    src = rng.integers(0, source.shape[0], size=n_cells)
    keep = rng.uniform(keep_low, keep_high, size=n_cells)
    for start in range(0, n_cells, chunk):
        stop = min(start + chunk, n_cells)
        block = source[src[start:stop]]  # the chosen real rows (a chunk-sized CSR)
        lens = np.diff(block.indptr)
        row_of = np.repeat(np.arange(stop - start), lens)
        counts = block.data.astype(np.int64)
        thinned = rng.binomial(counts, np.repeat(keep[start:stop], lens))
        totals = np.bincount(row_of, weights=thinned, minlength=stop - start)
        empty = totals == 0
        if empty.any():  # never leave a cell without counts (the model rejects those)
            hit = empty[row_of]
            thinned[hit] = counts[hit]
        kept = thinned > 0
        indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of[kept], minlength=stop - start))])
        out = sp.csr_matrix(
            (thinned[kept].astype(np.float32), block.indices[kept], indptr), shape=(stop - start, source.shape[1])
        )
        out.has_sorted_indices = True
        yield out, src[start:stop], int(empty.sum())


def resample_csr(source, n_cells: int, *, seed: int, keep_low: float, keep_high: float, chunk: int):
    """``n_cells`` thinned copies of random rows of ``source`` as one CSR matrix, built in place.

    Returns (matrix, source row of each cell, generation details). The data and index arrays
    are allocated once at an upper bound of the non-zeros (the source rows' non-zeros:
    thinning only removes entries); pages beyond the final size are never written, so never
    resident. Per chunk, the temporaries are a few arrays of the chunk's non-zeros.
    """
    import scipy.sparse as sp

    src = np.random.default_rng(seed).integers(0, source.shape[0], size=n_cells)  # as resample_chunks draws it
    upper = int(np.diff(source.indptr)[src].sum())
    idx_dtype = np.int32 if max(upper, source.shape[1]) < np.iinfo(np.int32).max else np.int64
    data = np.empty(upper, dtype=np.float32)
    indices = np.empty(upper, dtype=idx_dtype)
    indptr = np.empty(n_cells + 1, dtype=idx_dtype)
    indptr[0] = 0
    pos, restored, row = 0, 0, 0
    for block, _, n_restored in resample_chunks(
        source, n_cells, seed=seed, keep_low=keep_low, keep_high=keep_high, chunk=chunk
    ):
        n = block.nnz
        data[pos : pos + n] = block.data
        indices[pos : pos + n] = block.indices
        indptr[row + 1 : row + block.shape[0] + 1] = pos + block.indptr[1:]
        pos, row, restored = pos + n, row + block.shape[0], restored + n_restored
    X = sp.csr_matrix((data[:pos], indices[:pos], indptr), shape=(n_cells, source.shape[1]), copy=False)
    X.has_sorted_indices = True
    details = {
        "nnz_upper_bound": upper,
        "cells_restored_unthinned": restored,
        "shares_memory_with_buffers": bool(np.shares_memory(X.data, data) and np.shares_memory(X.indices, indices)),
    }
    return X, src, details


def csr_bytes(X) -> int:
    return int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)


# -- one size, in a fresh process ------------------------------------------------------------------------
def child_main(config_path: Path) -> int:
    cfg = json.loads(config_path.read_text())
    rss_interpreter = rss_bytes()
    import torch

    torch.set_num_threads(cfg["threads"])
    import anndata as ad
    import pandas as pd

    import scanpy_scvi

    gc.collect()
    rss_imports = rss_bytes()
    n = cfg["n_cells"]
    st = Stages()
    print(f"  child {os.getpid()}: {n} cells; RSS after imports {rss_imports / GB:.2f} GB", flush=True)

    def generate():
        source, batches = read_source(Path(cfg["dataset"]), cfg["genes"])
        X, src, details = resample_csr(
            source, n, seed=cfg["seed"], keep_low=cfg["keep_low"], keep_high=cfg["keep_high"], chunk=cfg["chunk_cells"]
        )
        codes = batches.cat.codes.to_numpy()[src]
        obs = pd.DataFrame(
            {BATCH_KEY: pd.Categorical.from_codes(codes, categories=batches.cat.categories)},
            index=pd.Index([f"cell{i}" for i in range(n)]),
        )
        return X, obs, details

    X, obs, gen_details = st.run("generate", generate)

    def build():
        # X and obs: the closure reads them before the `del` below frees them
        adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(cfg["genes"])))  # noqa: F821
        return adata

    adata = st.run("anndata", build)
    x_copied = not (adata.X is X or np.shares_memory(adata.X.data, X.data))
    nbytes = csr_bytes(adata.X)
    nnz = int(adata.X.nnz)
    del X, obs
    if cfg["warmup"]:
        # torch's one-time start-up (about 1 s on the first training step of a process) on a
        # small copy, so that the timed epoch is the steady-state cost per cell.
        def warmup():
            small = adata[: min(n, 1024)].copy()
            m = scanpy_scvi.SCVI(small, batch_key=BATCH_KEY, random_state=cfg["seed"])
            m.train(max_epochs=1, train_size=1.0, batch_size=cfg["batch_size"], device="cpu", progress_bar=False)
            m.get_latent_representation()

        st.run("warmup", warmup)
    rss_before_setup = rss_bytes()

    model = st.run("setup", lambda: scanpy_scvi.SCVI(adata, batch_key=BATCH_KEY, random_state=cfg["seed"]))
    rss_before_train = rss_bytes()
    st.run(
        "train",
        lambda: model.train(
            max_epochs=1,
            train_size=1.0,
            batch_size=cfg["batch_size"],
            device="cpu",
            random_state=cfg["seed"],
            progress_bar=False,
        ),
    )
    latent = st.run("latent", lambda: model.get_latent_representation())

    s = st.stages
    package_stages = ("setup", "train", "latent")
    if st.can_reset:
        process_peak = max(v["peak_rss_bytes"] for v in s.values())
    else:  # stage peaks are cumulative: the last one is the process peak
        process_peak = s["latent"]["peak_rss_bytes"]
    import resource

    res = {
        "n_cells": n,
        "n_genes": int(adata.n_vars),
        "nnz": nnz,
        "density": nnz / (n * adata.n_vars),
        "csr_bytes": nbytes,
        "csr_dtypes": {k: str(getattr(adata.X, k).dtype) for k in ("data", "indices", "indptr")},
        "anndata_copied_X": bool(x_copied),
        "generation": gen_details,
        "mean_counts_per_cell": float(np.asarray(adata.X.sum(axis=1)).mean()),
        "stages": s,
        "peak_reset_between_stages": st.can_reset,
        "rss_interpreter_bytes": rss_interpreter,
        "rss_after_imports_bytes": rss_imports,
        "rss_before_setup_bytes": rss_before_setup,
        "rss_before_train_bytes": rss_before_train,
        "rss_end_bytes": rss_bytes(),
        "ru_maxrss_end_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_bytes": process_peak,
        "peak_rss_package_bytes": max(s[k]["peak_rss_bytes"] for k in package_stages),
        "peak_rss_minus_csr_bytes": process_peak - nbytes,
        "package_overhead_bytes": max(s[k]["peak_rss_bytes"] for k in package_stages) - rss_before_setup,
        "setup_seconds": s["setup"]["wall_seconds"],
        "epoch_seconds": s["train"]["wall_seconds"],
        "cells_per_second": n / s["train"]["wall_seconds"],
        "latent_seconds": s["latent"]["wall_seconds"],
        "generate_seconds": s["generate"]["wall_seconds"],
        "warmup_seconds": s["warmup"]["wall_seconds"] if "warmup" in s else None,
        "train_elbo": -float(model.history_["elbo_train"][-1]),
        "latent_shape": list(latent.shape),
        "latent_finite": bool(np.isfinite(latent).all()),
        "torch_threads": torch.get_num_threads(),
    }
    Path(cfg["result"]).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def run_child(args, genes: list[str], n: int, workdir: Path) -> dict:
    cfg = {
        "dataset": str(args.dataset.expanduser().resolve()),
        "genes": genes,
        "n_cells": n,
        "seed": args.seed,
        "keep_low": args.keep_low,
        "keep_high": args.keep_high,
        "chunk_cells": args.chunk_cells,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "warmup": not args.no_warmup,
        "result": str(workdir / f"result_{n}.json"),
    }
    cfg_path = workdir / f"config_{n}.json"
    cfg_path.write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    load0 = load_average()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(cfg_path)],
            stdout=None,
            stderr=subprocess.PIPE,
            text=True,
            timeout=args.timeout,
        )
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr) or ""
    result_path = Path(cfg["result"])
    if rc != 0 or not result_path.is_file():
        tail = "\n".join((err or "").strip().splitlines()[-15:])
        print(f"  child for {n} cells failed (exit {rc}; -9 usually means killed for memory):\n{tail}", flush=True)
        return {"n_cells": n, "failed": True, "returncode": rc, "stderr_tail": tail}
    if err and err.strip():
        sys.stderr.write(err)
    res = json.loads(result_path.read_text())
    res["child_wall_seconds"] = time.perf_counter() - t0
    res["loadavg_start"], res["loadavg_end"] = load0, load_average()
    res["target_bytes"] = res["csr_bytes"] + args.target_gb * GB
    res["target_met"] = bool(res["peak_rss_bytes"] <= res["target_bytes"])
    return res


# -- parent ----------------------------------------------------------------------------------------------
def select_genes(args) -> tuple[Path, dict, list[str]]:
    import anndata as ad
    import scanpy as sc

    path = args.dataset.expanduser().resolve()
    if not path.is_file():
        sys.exit(f"dataset not found: {path}")
    adata = ad.read_h5ad(path)
    if BATCH_KEY not in adata.obs:
        sys.exit(f"{path} has no obs[{BATCH_KEY!r}]")
    adata.obs[BATCH_KEY] = adata.obs[BATCH_KEY].astype(str).astype("category")
    n_top = min(args.n_top_genes, adata.n_vars)
    hv = sc.pp.highly_variable_genes(
        adata, flavor="seurat_v3", n_top_genes=n_top, batch_key=BATCH_KEY, inplace=False, subset=False
    )
    genes = list(adata.var_names[np.asarray(hv["highly_variable"], dtype=bool)])
    sub = adata[:, genes].X
    info = {
        "dataset": str(path),
        "n_real_cells": int(adata.n_obs),
        "n_genes_total": int(adata.n_vars),
        "n_batches": int(adata.obs[BATCH_KEY].nunique()),
        "real_density_hvg": float(sub.nnz / (sub.shape[0] * sub.shape[1])),
        "real_mean_counts_hvg": float(np.asarray(sub.sum(axis=1)).mean()),
    }
    return path, info, genes


COLUMNS = [
    ("cells", "n_cells", "{:,d}"),
    ("nnz", "nnz", "{:,d}"),
    ("density", "density", "{:.3f}"),
    ("CSR GB", "csr_bytes", "gb"),
    ("generate s", "generate_seconds", "{:.1f}"),
    ("warm-up s", "warmup_seconds", "{:.2f}"),
    ("setup s", "setup_seconds", "{:.2f}"),
    ("epoch s", "epoch_seconds", "{:.1f}"),
    ("cells/s", "cells_per_second", "{:,.0f}"),
    ("latent s", "latent_seconds", "{:.2f}"),
    ("RSS imports GB", "rss_after_imports_bytes", "gb"),
    ("RSS pre-setup GB", "rss_before_setup_bytes", "gb"),
    ("RSS pre-train GB", "rss_before_train_bytes", "gb"),
    ("peak setup GB", ("stages", "setup", "peak_rss_bytes"), "gb"),
    ("peak train GB", ("stages", "train", "peak_rss_bytes"), "gb"),
    ("peak latent GB", ("stages", "latent", "peak_rss_bytes"), "gb"),
    ("peak generate GB", ("stages", "generate", "peak_rss_bytes"), "gb"),
    ("PEAK RSS GB", "peak_rss_bytes", "gb"),
    ("peak - CSR GB", "peak_rss_minus_csr_bytes", "gb"),
    ("package overhead GB", "package_overhead_bytes", "gb"),
    ("target met", "target_met", "yesno"),
]


def get(res: dict, key):
    if isinstance(key, tuple):
        for k in key:
            if not isinstance(res, dict) or k not in res:
                return None
            res = res[k]
        return res
    return res.get(key)


def cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "gb":
        return f"{value / GB:.2f}"
    if spec == "yesno":
        return "YES" if value else "NO"
    return fmt(value, spec)


def growth(results: list[dict]) -> list[dict]:
    """Ratios between consecutive sizes (how time and memory grow)."""
    ok = [r for r in results if not r.get("failed")]
    out = []
    for a, b in itertools.pairwise(ok):
        out.append(
            {
                "from": a["n_cells"],
                "to": b["n_cells"],
                "cells_ratio": b["n_cells"] / a["n_cells"],
                "setup_time_ratio": b["setup_seconds"] / a["setup_seconds"],
                "epoch_time_ratio": b["epoch_seconds"] / a["epoch_seconds"],
                "latent_time_ratio": b["latent_seconds"] / a["latent_seconds"],
                "csr_bytes_ratio": b["csr_bytes"] / a["csr_bytes"],
                "peak_rss_ratio": b["peak_rss_bytes"] / a["peak_rss_bytes"],
                "peak_minus_csr_delta_bytes": b["peak_rss_minus_csr_bytes"] - a["peak_rss_minus_csr_bytes"],
            }
        )
    return out


def print_report(info: dict, setup: dict, results: list[dict], grow: list[dict]) -> None:
    print()
    print("=" * 100)
    print("scanpy-scvi at scale: one epoch and the latent space on resampled real cells")
    print("=" * 100)
    print(f"machine      : {info['cpu_model']}; {info['logical_cpus']} logical CPUs ({info['usable_cpus']} usable)")
    print(f"torch threads: {setup['threads']} per child")
    print(f"load average : start {setup['loadavg_start']}, end {setup['loadavg_end']}")
    print(f"platform     : {info['platform']}, Python {info['python']}")
    g = info["git"]
    print(f"repository   : commit {g['commit']}, scanpy_scvi/ modified: {g['scanpy_scvi_dirty']}")
    print("versions     : " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v != "not installed"))
    print(
        f"data         : {setup['n_real_cells']} real cells of {setup['dataset']}, {setup['n_hvg']} HVGs "
        f"(seurat_v3, batch_key='batch'), {setup['n_batches']} batches; resampled with binomial thinning, "
        f"keep p ~ U({setup['keep_low']}, {setup['keep_high']}), seed {setup['seed']}"
    )
    print(
        f"model        : SCVI(adata, batch_key='batch') defaults (n_hidden 128, n_latent 10, ZINB); "
        f"1 epoch, batch size {setup['batch_size']}, train_size 1.0, CPU"
    )
    print(f"target       : peak RSS <= CSR bytes + {setup['target_gb']} GB (GB = 1e9 bytes)")
    print()
    ok = [r for r in results if not r.get("failed")]
    width = 22
    print(f"{'':<{width}}" + "".join(f"{r['n_cells']:>14,d}" for r in results))
    print("-" * (width + 14 * len(results)))
    for label, key, spec in COLUMNS[1:]:
        print(f"{label:<{width}}" + "".join(f"{cell(get(r, key), spec):>14}" for r in results))
    for r in results:
        if r.get("failed"):
            print(f"{r['n_cells']:,d} cells: FAILED (exit {r['returncode']})")
    if grow:
        print()
        print("growth between sizes (ratio of the larger to the smaller):")
        for gr in grow:
            print(
                f"  {gr['from']:>9,d} -> {gr['to']:>9,d} cells (x{gr['cells_ratio']:.0f}): "
                f"setup x{gr['setup_time_ratio']:.1f}, epoch x{gr['epoch_time_ratio']:.1f}, "
                f"latent x{gr['latent_time_ratio']:.1f}, CSR x{gr['csr_bytes_ratio']:.1f}, "
                f"peak RSS x{gr['peak_rss_ratio']:.2f} (peak - CSR {gr['peak_minus_csr_delta_bytes'] / GB:+.2f} GB)"
            )
    if ok:
        big = ok[-1]
        print()
        print(
            f"largest size ({big['n_cells']:,d} cells): peak RSS {big['peak_rss_bytes'] / GB:.2f} GB = CSR "
            f"{big['csr_bytes'] / GB:.2f} GB + {big['peak_rss_minus_csr_bytes'] / GB:.2f} GB -> target "
            f"(+{setup['target_gb']} GB) {'MET' if big['target_met'] else 'NOT MET'}"
        )
    print("=" * 100)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    load_start = load_average()
    t_all = time.perf_counter()
    print(f"load average at start: {load_start}", flush=True)
    _path, data_info, genes = select_genes(args)
    print(f"data: {data_info['n_real_cells']} real cells, {len(genes)} HVGs; sizes {args.sizes}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="scvi_scale_") as tmp:
        for n in args.sizes:
            print(f"{n:,d} cells: fresh child process (load average {load_average()}) ...", flush=True)
            res = run_child(args, genes, n, Path(tmp))
            results.append(res)
            if not res.get("failed"):
                print(
                    f"  {n:,d} cells: epoch {res['epoch_seconds']:.1f} s ({res['cells_per_second']:.0f} cells/s), "
                    f"peak RSS {res['peak_rss_bytes'] / GB:.2f} GB (CSR {res['csr_bytes'] / GB:.2f} GB), "
                    f"load average {load_average()}",
                    flush=True,
                )
    info = machine_info(args.threads)
    setup = {
        **data_info,
        "n_hvg": len(genes),
        "sizes": args.sizes,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "seed": args.seed,
        "keep_low": args.keep_low,
        "keep_high": args.keep_high,
        "chunk_cells": args.chunk_cells,
        "warmup": not args.no_warmup,
        "target_gb": args.target_gb,
        "data_source": "generated in each child process (in memory); no h5ad is read",
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "loadavg_start": load_start,
        "loadavg_end": load_average(),
        "total_seconds": time.perf_counter() - t_all,
    }
    grow = growth(results)
    print_report(info, setup, results, grow)
    if args.json is not None:
        payload = {"machine": info, "setup": setup, "results": results, "growth": grow}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(not r.get("failed") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
