"""Out-of-core scale run: scVI trained on counts that stay on disk, against counts in memory.

The companion of ``scale.py`` (same resampled real cells, same seed): for each size N,

1. ``write``: N resampled cells x the HVGs are generated chunk by chunk and appended to an
   uncompressed ``.h5ad`` (anndata's ``sparse_dataset(...).append``), never whole in memory;
2. a FRESH child process opens the file ``backed='r'`` and runs, each as one stage with its
   wall time and peak RSS (``VmHWM``, reset between stages): a 1024-cell warm-up (torch's
   start-up), ``setup`` (``SCVI(backed, batch_key='batch')``: the streamed count checks),
   ``train`` (one epoch, ``train_size=1.0``, batch 128, CPU, blocks read ahead by a thread),
   ``latent`` (``get_latent_representation()`` of every cell, read sequentially).

The per-cell epoch time is compared with an in-memory epoch of ``--memory-size`` cells run the
same way by ``scale.py``'s child in the same invocation. Targets (issue 17): peak RSS at most
3 GB; epoch time per cell within 1.5x of the in-memory one.

    python benchmarks/scale_on_disk.py --sizes 1000000,5000000 --memory-size 1000000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_scvi_tools import load_average, machine_info
from scale import (
    BATCH_KEY,
    DEFAULT_DATASET,
    GB,
    Stages,
    read_source,
    resample_chunks,
    rss_bytes,
    run_child,
    select_genes,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--sizes", default="1000000,5000000", help="cells written to disk (default: %(default)s)")
    p.add_argument("--memory-size", type=int, default=1000000, help="in-memory reference size (0: none)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/scvi_on_disk"), help="where the .h5ad files go")
    p.add_argument("--keep-files", action="store_true", help="keep the .h5ad files")
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-low", type=float, default=0.5)
    p.add_argument("--keep-high", type=float, default=1.0)
    p.add_argument("--chunk-cells", type=int, default=10000)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--target-gb", type=float, default=3.0, help="peak RSS target, GB (default 3)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-warmup", action="store_true", help=argparse.SUPPRESS)  # scale.py's child reads it
    return p.parse_args(argv)


def write_h5ad(path: Path, args, genes: list[str], n: int) -> dict:
    """Append the resampled cells to ``path`` chunk by chunk; obs holds the donor as batch."""
    import anndata as ad
    import h5py
    import pandas as pd

    source, batches = read_source(args.dataset.expanduser().resolve(), genes)
    t0 = time.perf_counter()
    codes, nnz = [], 0
    with h5py.File(path, "w") as f:
        X = None
        for chunk, src, _ in resample_chunks(
            source, n, seed=args.seed, keep_low=args.keep_low, keep_high=args.keep_high, chunk=args.chunk_cells
        ):
            if X is None:
                ad.io.write_elem(f, "X", chunk)
                X = ad.io.sparse_dataset(f["X"])
            else:
                X.append(chunk)
            codes.append(batches.cat.codes.to_numpy()[src])
            nnz += chunk.nnz
        obs = pd.DataFrame(
            {BATCH_KEY: pd.Categorical.from_codes(np.concatenate(codes), categories=batches.cat.categories)},
            index=pd.Index(np.arange(n).astype(str)),
        )
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", pd.DataFrame(index=pd.Index(genes)))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(f, key, {})
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
    return {"write_seconds": time.perf_counter() - t0, "file_bytes": path.stat().st_size, "nnz": nnz}


def child_main(config_path: Path) -> int:
    cfg = json.loads(config_path.read_text())
    import torch

    torch.set_num_threads(cfg["threads"])
    import anndata as ad

    import scanpy_scvi

    rss_imports = rss_bytes()
    st = Stages()
    adata = st.run("open", lambda: ad.read_h5ad(cfg["path"], backed="r"))

    def warmup():
        small = adata[:1024].to_memory()
        m = scanpy_scvi.SCVI(small, batch_key=BATCH_KEY, random_state=cfg["seed"])
        m.train(max_epochs=1, train_size=1.0, batch_size=cfg["batch_size"], device="cpu", progress_bar=False)
        m.get_latent_representation()

    st.run("warmup", warmup)
    model = st.run("setup", lambda: scanpy_scvi.SCVI(adata, batch_key=BATCH_KEY, random_state=cfg["seed"]))
    st.run(
        "train",
        lambda: model.train(
            max_epochs=1, train_size=1.0, batch_size=cfg["batch_size"], device="cpu", random_state=cfg["seed"],
            progress_bar=False,
        ),
    )  # fmt: skip
    latent = st.run("latent", lambda: model.get_latent_representation())
    s = st.stages
    n = adata.n_obs
    res = {
        "n_cells": n,
        "stages": s,
        "rss_after_imports_bytes": rss_imports,
        "peak_rss_bytes": max(v["peak_rss_bytes"] for v in s.values()),
        "epoch_seconds": s["train"]["wall_seconds"],
        "cells_per_second": n / s["train"]["wall_seconds"],
        "latent_seconds": s["latent"]["wall_seconds"],
        "train_elbo": -float(model.history_["elbo_train"][-1]),
        "latent_finite": bool(np.isfinite(latent).all()),
    }
    Path(cfg["result"]).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.dir.mkdir(parents=True, exist_ok=True)
    _, data_info, genes = select_genes(args)
    print(f"load average at start {load_average()}; {len(genes)} HVGs; sizes on disk {sizes}", flush=True)
    memory = None
    if args.memory_size:
        print(f"in memory, {args.memory_size:,d} cells (scale.py child) ...", flush=True)
        args.no_warmup = False
        memory = run_child(args, genes, args.memory_size, args.dir)
    results = []
    for n in sizes:
        path = args.dir / f"resampled_{n}.h5ad"
        print(f"writing {n:,d} cells to {path} ...", flush=True)
        written = write_h5ad(path, args, genes, n)
        print(f"  {written['file_bytes'] / GB:.2f} GB in {written['write_seconds']:.0f} s; child ...", flush=True)
        cfg = {"path": str(path), "seed": args.seed, "batch_size": args.batch_size, "threads": args.threads,
               "result": str(args.dir / f"on_disk_{n}.json")}  # fmt: skip
        cfg_path = args.dir / f"on_disk_{n}_config.json"
        cfg_path.write_text(json.dumps(cfg))
        load0 = load_average()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(cfg_path)], check=True,
                       timeout=args.timeout)  # fmt: skip
        res = {**json.loads(Path(cfg["result"]).read_text()), **written, "loadavg_start": load0,
               "loadavg_end": load_average()}  # fmt: skip
        if memory and not memory.get("failed"):
            res["epoch_time_per_cell_vs_memory"] = memory["cells_per_second"] / res["cells_per_second"]
        res["peak_rss_target_met"] = res["peak_rss_bytes"] <= args.target_gb * GB
        results.append(res)
        if not args.keep_files:
            path.unlink()
    print(
        "\n| cells | where | file GB | write s | epoch s | cells/s | per-cell time vs memory | latent s | peak RSS GB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    if memory and not memory.get("failed"):
        print(f"| {memory['n_cells']:,d} | memory | | | {memory['epoch_seconds']:.1f} | {memory['cells_per_second']:,.0f} "
              f"| 1 | {memory['latent_seconds']:.1f} | {memory['peak_rss_bytes'] / GB:.2f} |")  # fmt: skip
    for r in results:
        ratio = r.get("epoch_time_per_cell_vs_memory")
        print(f"| {r['n_cells']:,d} | disk | {r['file_bytes'] / GB:.2f} | {r['write_seconds']:.0f} | "
              f"{r['epoch_seconds']:.1f} | {r['cells_per_second']:,.0f} | "
              f"{'' if ratio is None else f'{ratio:.2f}x'} | {r['latent_seconds']:.1f} | {r['peak_rss_bytes'] / GB:.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(args.threads), "data": data_info, "memory": memory,
                                         "on_disk": results}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
