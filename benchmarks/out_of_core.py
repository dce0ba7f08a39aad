"""Counts on disk against counts in memory: what reading in blocks costs in fit and in time.

Training on a backed (on-disk) AnnData reads the file in blocks of consecutive rows, shuffled
block-wise and within buffers of blocks (``scanpy_scvi/data/_order.py``), instead of drawing
every cell at random. This script trains the same scVI on the same cells three ways and
reports the held-out ELBO (mean of seeded evaluations) and the training time per epoch:

- ``memory``: the counts in memory, every cell shuffled (the reference);
- ``disk RxB``: the counts in an uncompressed ``.h5ad`` opened ``backed='r'``, blocks of R
  rows, B blocks shuffled together (the default geometry is 1024 x 16).

The dataset is kept in its file order (the multi-study PBMC set is sorted by batch, so every
block holds one batch: the hard case for block shuffling). With few cells the default geometry
holds the whole dataset in one buffer (no difference expected); a smaller geometry such as
64 x 16 gives an epoch the number of buffers that the default gives 16x more cells.

    python benchmarks/out_of_core.py --epochs 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_scvi_tools import load_average, machine_info

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "data" / "pbmc_multistudy_5batch_14989cells_2003genes.h5ad"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="h5ad, raw counts in X, obs['batch']")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--geometries", default="1024x16,64x16", help="on-disk block rows x buffer blocks")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of cells held out (default 0.1)")
    p.add_argument("--elbo-evals", type=int, default=5, help="seeded held-out evaluations (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def heldout_elbo(model, held, n: int) -> tuple[float, float]:
    import torch

    values = []
    for seed in range(n):
        torch.manual_seed(seed)
        values.append(model.get_elbo(adata=held))
    return float(np.mean(values)), float(np.std(values))


def run(name: str, adata, held, args, geometry: tuple[int, int] | None) -> dict:
    import scanpy_scvi

    model = scanpy_scvi.SCVI(adata, batch_key="batch", random_state=args.seed)
    if geometry is not None:
        source = model.bind().source
        source.block_rows, source.buffer_blocks = geometry
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, train_size=1.0, batch_size=128, device="cpu", progress_bar=False)
    seconds = time.perf_counter() - t0
    mean, std = heldout_elbo(model, held, args.elbo_evals)
    res = {
        "name": name,
        "geometry": geometry,
        "train_seconds": seconds,
        "epoch_seconds": seconds / args.epochs,
        "cells_per_second": adata.n_obs * args.epochs / seconds,
        "heldout_elbo": mean,
        "heldout_elbo_std": std,
        "train_elbo_last": -float(model.history_["elbo_train"][-1]),
        "load_average": load_average(),
    }
    print(f"  {name}: held-out ELBO {mean:.3f} +- {std:.3f}, {res['epoch_seconds']:.2f} s/epoch", flush=True)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    import anndata as ad
    import torch

    torch.set_num_threads(args.threads)
    full = ad.read_h5ad(args.dataset)
    rng = np.random.default_rng(args.seed)
    held_mask = rng.random(full.n_obs) < args.heldout
    train, held = full[~held_mask].copy(), full[held_mask].copy()
    print(f"{args.dataset.name}: {train.n_obs} training / {held.n_obs} held-out cells x {full.n_vars} genes, "
          f"load average {load_average()}", flush=True)  # fmt: skip
    results = [run("memory (every cell shuffled)", train, held, args, None)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.h5ad"
        train.write_h5ad(path)
        for spec in args.geometries.split(","):
            rows, blocks = (int(v) for v in spec.split("x"))
            backed = ad.read_h5ad(path, backed="r")
            n_buffers = int(np.ceil(np.ceil(backed.n_obs / rows) / blocks))
            results.append(run(f"disk {rows}x{blocks} ({n_buffers} buffers/epoch)", backed, held, args, (rows, blocks)))
            backed.file.close()
    ref = results[0]
    print("\n| reading | held-out ELBO | vs memory | s / epoch | cells/s |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        rel = 100 * (r["heldout_elbo"] - ref["heldout_elbo"]) / abs(ref["heldout_elbo"])
        print(f"| {r['name']} | {r['heldout_elbo']:.3f} +- {r['heldout_elbo_std']:.3f} | {rel:+.3f} % | "
              f"{r['epoch_seconds']:.2f} | {r['cells_per_second']:,.0f} |")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine_info(args.threads),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
