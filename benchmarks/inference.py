"""Inference speed on 100k cells: scanpy-scvi vs scvi-tools (issue 3, target 2).

1. ``--n-cells`` cells x ``--n-top-genes`` HVGs resampled from the real Kang 2018 lupus cells
   exactly as in ``scale.py`` (a random real cell, binomially thinned; CSR, never dense);
2. each system trains its own scVI on them for ``--epochs`` epoch(s) (defaults, batch key =
   donor; the weights only need to be a trained model, the timings do not depend on them);
3. each system's own calls are timed, with each system's default inference batch size
   (scvi-tools 128, ours 1024), one after the other in one process:

   - ``get_latent_representation()`` (posterior means, all cells);
   - ``get_normalized_expression()`` (one posterior sample per cell, all genes);
   - ``get_normalized_expression(n_samples=25)`` (mean of 25 samples per cell) on the first
     ``--n-cells-25`` cells (default 20,000): on all 100k cells scvi-tools 1.4.2 was killed
     by the kernel (out of memory on this 23 GiB machine: it keeps every sample of every cell,
     25 x 100k x 2000 float32 = 20 GB, before averaging); ours is also timed on all cells.

   The median of ``--repeats`` calls is reported (one call for the 25-sample expression,
   which takes minutes in scvi-tools). Outputs are dense (cells x genes float32: 0.8 GB
   at 100k x 2000), as both packages return them.

    /opt/scvi-bench/bin/python benchmarks/inference.py --json benchmarks/results/inference_100k.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_scvi_tools import load_average, machine_info
from scale import BATCH_KEY, DEFAULT_DATASET, read_source, resample_csr, select_genes

CALLS = {
    "latent": lambda m: m.get_latent_representation(),
    "expression_1": lambda m: m.get_normalized_expression(),
    "expression_25": lambda m, idx: m.get_normalized_expression(n_samples=25, indices=idx),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--n-cells", type=int, default=100_000)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--n-cells-25", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return float(np.median(times))


def main(argv=None) -> int:
    import anndata as ad
    import scvi
    import torch

    import scanpy_scvi as ss

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    scvi.settings.num_threads = args.threads
    scvi.settings.seed = args.seed
    path, _info, genes = select_genes(args)
    source, batches = read_source(path, genes)
    X, src, _ = resample_csr(source, args.n_cells, seed=args.seed, keep_low=0.5, keep_high=1.0, chunk=50_000)
    obs = {BATCH_KEY: batches.to_numpy()[src]}
    import pandas as pd

    adata = ad.AnnData(X=X, obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(args.n_cells)]))
    adata.var_names = genes
    adata.obs[BATCH_KEY] = adata.obs[BATCH_KEY].astype("category")
    print(f"{args.n_cells} cells x {len(genes)} genes, nnz {X.nnz:,}, load {load_average()}")

    theirs_data = adata.copy()
    scvi.model.SCVI.setup_anndata(theirs_data, batch_key=BATCH_KEY)
    theirs = scvi.model.SCVI(theirs_data)
    theirs.train(max_epochs=args.epochs, accelerator="cpu", enable_progress_bar=False, train_size=1.0)
    ours = ss.SCVI(adata, batch_key=BATCH_KEY)
    ours.train(max_epochs=args.epochs, device="cpu", train_size=1.0, progress_bar=False)

    results = {"machine": machine_info(args.threads), "args": {k: str(v) for k, v in vars(args).items()}, "calls": {}}
    print(f"{'call':16s} {'scvi-tools s':>12s} {'ours s':>8s} {'speed-up':>8s}")
    sub = np.arange(min(args.n_cells_25, args.n_cells))
    for name, call in CALLS.items():
        repeats = 1 if name == "expression_25" else args.repeats
        run = (lambda m, call=call: call(m, sub)) if name == "expression_25" else call
        t_theirs = timed(lambda run=run: run(theirs), repeats)
        t_ours = timed(lambda run=run: run(ours), repeats)
        results["calls"][name] = {"scvi_tools_seconds": t_theirs, "ours_seconds": t_ours, "speedup": t_theirs / t_ours}
        print(f"{name:16s} {t_theirs:12.2f} {t_ours:8.2f} {t_theirs / t_ours:8.2f}")
    t_all = timed(lambda: CALLS["expression_25"](ours, None), 1)
    results["calls"]["expression_25_all_cells_ours_seconds"] = t_all
    print(f"expression_25 on all {args.n_cells} cells, ours only: {t_all:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
