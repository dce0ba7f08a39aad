"""How close does training get to this machine's matrix-multiply limit?

Measures the machine's float32 matmul throughput on the model's own layer shapes, counts the
model's matmul FLOPs per cell per training step (forward + backward, from the layer shapes),
times training steps on real data, and prints the fraction of the matmul roofline reached.
``--dense-likelihood`` times the same steps with the elementwise reference likelihood (the
code path before the nonzero-only likelihood), for a before/after comparison.

    python benchmarks/roofline.py [--batch-size 128] [--threads 2] [--steps 60]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "kang2018_lupus_pbmc_8k_2511genes.h5ad"


def matmul_gflops(m: int, k: int, n: int, seconds: float = 0.5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(5):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def linear_shapes(module: torch.nn.Module) -> list[tuple[str, int, int]]:
    return [
        (name, m.in_features, m.out_features) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)
    ]


def flops_per_cell(shapes: list[tuple[str, int, int]], used: set[str]) -> float:
    """Forward (1 matmul) + backward (weight grad, and input grad except for the first layer)."""
    total = 0.0
    for name, n_in, n_out in shapes:
        if name not in used:
            continue
        macs = n_in * n_out
        first_layer = name == "z_encoder.trunk.layers.0.0"  # its input (the counts) needs no gradient
        total += 2 * macs * (2 if first_layer else 3)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--dense-likelihood", action="store_true", help="time the elementwise reference likelihood")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import anndata as ad
    import scanpy as sc

    from scanpy_scvi import SCVI

    adata = ad.read_h5ad(DATA)
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000, batch_key="batch")
    model = SCVI(adata, genes=list(adata.var_names[adata.var["highly_variable"]]), batch_key="batch")
    module = model.module
    if args.dense_likelihood:
        module.log_likelihood = lambda x, gen, nz_index=None: module.elementwise_log_likelihood(x, gen).sum(-1)

    # Which linear layers run in a training step (the library encoder and gene-cell head may not exist).
    used: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: used.add(name))
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    rng = np.random.default_rng(0)
    batches = [
        model.bind().source.get(rng.choice(adata.n_obs, args.batch_size, replace=False), nonzero=True)
        for _ in range(args.steps)
    ]
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-6)

    def step(t):
        out = module.loss(t, kl_weight=0.5)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()

    step(batches[0])
    for h in hooks:
        h.remove()
    for t in batches[:10]:  # warm-up
        step(t)
    start = time.perf_counter()
    for t in batches:
        step(t)
    per_step = (time.perf_counter() - start) / len(batches)

    shapes = linear_shapes(module)
    flops = flops_per_cell(shapes, used)
    gflops = {
        f"{args.batch_size}x{n_in}x{n_out}": matmul_gflops(args.batch_size, n_in, n_out)
        for _, n_in, n_out in shapes
        if n_in * n_out >= 100_000
    }
    peak = max(gflops.values())
    cells_per_s = args.batch_size / per_step
    roofline_cells_per_s = peak * 1e9 / flops
    print(f"likelihood path     : {'elementwise reference' if args.dense_likelihood else 'nonzero-only (default)'}")
    print(f"threads             : {torch.get_num_threads()}, batch size {args.batch_size}")
    for shape, g in gflops.items():
        print(f"matmul {shape:>16}: {g:7.1f} GFLOP/s")
    print(f"matmul FLOPs / cell / step (fwd + bwd): {flops / 1e6:.2f} MFLOP")
    print(f"training step       : {per_step * 1e3:.2f} ms ({cells_per_s:,.0f} cells/s)")
    print(f"matmul roofline     : {roofline_cells_per_s:,.0f} cells/s at {peak:.0f} GFLOP/s")
    print(f"fraction of roofline: {cells_per_s / roofline_cells_per_s:.1%}")
    print(f"achieved matmul rate: {flops * cells_per_s / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
