"""Training across processes (torchrun, gloo on the CPU) against one process, on real data.

One process trains with ``--batch-size`` cells per step; N processes (``--nproc``) with
``batch_size / N`` each, the same total batch and the same number of steps. Reported: the
held-out ELBO of each (mean of seeded evaluations on the same held-out cells), the wall time
per epoch, and whether the weights agree across ranks at the end. On a machine with fewer
cores than processes x threads, N processes cannot be faster: the figure shows the cost of
the synchronisation, not a speed-up.

    python benchmarks/distributed.py --epochs 20 --nproc 2 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_scvi_tools import DEFAULT_DATASET, load_average, machine_info, read_with_hvgs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128, help="total cells per step (default 128)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--heldout", type=float, default=0.1)
    p.add_argument("--elbo-evals", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", nargs=2, metavar=("DATA", "OUT"), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> int:
    import anndata as ad
    import torch

    from scanpy_scvi import SCVI
    from scanpy_scvi.train import rank

    torch.set_num_threads(args.threads)
    data, out = Path(args.worker[0]), Path(args.worker[1])
    adata = ad.read_h5ad(data)
    held = adata.obs["heldout"].to_numpy()
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    model = SCVI(adata[~held].copy(), batch_key="batch", random_state=args.seed)
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, train_size=1.0, device="cpu",
                strategy="ddp" if ddp else None, progress_bar=False)  # fmt: skip
    seconds = time.perf_counter() - t0
    h = hashlib.sha256()
    for t in model.module.state_dict().values():
        h.update(t.detach().contiguous().numpy().tobytes())
    res = {"rank": rank(), "train_seconds": seconds, "state": h.hexdigest(), "history": model.history_}
    if rank() == 0:
        elbos = []
        for s in range(args.elbo_evals):
            torch.manual_seed(s)
            elbos.append(model.get_elbo(adata=adata[held].copy()))
        res["heldout_elbo"], res["heldout_elbo_std"] = float(np.mean(elbos)), float(np.std(elbos))
    (out / f"rank{rank()}.json").write_text(json.dumps(res))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    _, adata, genes = read_with_hvgs(args.dataset, ("batch",), 2000, "batch")
    adata = adata[:, genes].copy()
    adata.obs["heldout"] = np.random.default_rng(args.seed).random(adata.n_obs) < args.heldout
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.h5ad"
        adata.write_h5ad(data)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        me = [str(Path(__file__).resolve())]
        runs = {
            "1 process": [sys.executable, *me, "--batch-size", str(args.batch_size)],
            f"{args.nproc} processes": [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(args.nproc),
                *me,
                "--batch-size",
                str(args.batch_size // args.nproc),
            ],
        }
        for name, cmd in runs.items():
            out = Path(tmp) / name.replace(" ", "_")
            out.mkdir()
            common = ["--epochs", str(args.epochs), "--threads", str(args.threads), "--seed", str(args.seed),
                      "--elbo-evals", str(args.elbo_evals), "--worker", str(data), str(out)]  # fmt: skip
            load0 = load_average()
            t0 = time.perf_counter()
            subprocess.run([*cmd, *common], check=True, env=env)
            ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
            results[name] = {
                "wall_seconds": time.perf_counter() - t0,
                "train_seconds": max(r["train_seconds"] for r in ranks),
                "epoch_seconds": max(r["train_seconds"] for r in ranks) / args.epochs,
                "heldout_elbo": ranks[0]["heldout_elbo"],
                "heldout_elbo_std": ranks[0]["heldout_elbo_std"],
                "train_elbo_last": -ranks[0]["history"]["elbo_train"][-1],
                "ranks_identical": len({r["state"] for r in ranks}) == 1,
                "loadavg": [load0, load_average()],
            }
            r = results[name]
            print(f"{name}: held-out ELBO {r['heldout_elbo']:.3f} +- {r['heldout_elbo_std']:.3f}, "
                  f"{r['epoch_seconds']:.2f} s/epoch, weights identical across ranks: {r['ranks_identical']}",
                  flush=True)  # fmt: skip
    one, many = results["1 process"], results[f"{args.nproc} processes"]
    rel = 100 * (many["heldout_elbo"] - one["heldout_elbo"]) / abs(one["heldout_elbo"])
    print(f"held-out ELBO, {args.nproc} processes vs 1: {rel:+.3f} % (target: within 0.5 %)")
    print(f"epoch time, {args.nproc} processes / 1: {many['epoch_seconds'] / one['epoch_seconds']:.2f}")
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
