"""Integration quality of scanpy-scvi's scVI against scvi-tools', across seeds (issue 18).

For each dataset and seed, both systems train scVI with the same settings on the same cells
(2000 seurat_v3 HVGs with ``batch_key``, ``--heldout`` of the cells held out, ``--epochs``
epochs, ZINB, defaults; the seed drives the split, initialisation and training of both) and
are scored on all cells with :func:`scanpy_scvi.tl.integration_scores` (k-means NMI/ARI,
label silhouette, batch silhouette, graph connectivity, bio / batch / total as scIB weighs
them), plus the held-out ELBO and how much the latent follows sequencing depth (``depth_rho``:
the largest |Spearman rho| of a latent dimension with log total counts). The report gives, per
dataset and metric, each system's mean and standard deviation over seeds and the paired
difference (ours - scvi-tools: mean, sd, paired t-test p, and in how many seeds ours was higher).

Needs scvi-tools (the ``bench`` extra); it is only imported here, never by the package::

    /opt/scvi-bench/bin/python benchmarks/compare_integration.py --seeds 0,1,2,3,4 --json out.json
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
from compare_scvi_tools import load_average, machine_info, read_with_hvgs

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DATASETS = {
    "kang2018_lupus": SHARED / "kang2018_lupus_pbmc_8k_2511genes.h5ad",
    "cellbench_lung": SHARED / "cellbench_lung_celllines_5batch_1k.h5ad",
    "pbmc_multistudy": SHARED / "pbmc_multistudy_5batch_14989cells_2003genes.h5ad",
}
METRICS = (
    "heldout_elbo", "nmi_kmeans", "ari_kmeans", "silhouette_label", "silhouette_batch", "graph_connectivity", "bio",
    "batch", "total", "depth_rho",
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated (default: all three)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: 0-4)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--heldout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def train_ours(train, genes, seed, epochs):
    import scanpy_scvi

    model = scanpy_scvi.SCVI(train, genes=genes, batch_key="batch", random_state=seed)
    model.train(max_epochs=epochs, train_size=1.0, device="cpu", random_state=seed, progress_bar=False)
    return model


def train_scvi_tools(train, genes, seed, epochs):
    import scvi

    warnings.filterwarnings("ignore", module="lightning")
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    data = train[:, genes].copy()
    scvi.model.SCVI.setup_anndata(data, batch_key="batch")
    model = scvi.model.SCVI(data)
    model.train(max_epochs=epochs, train_size=1.0, accelerator="cpu", devices=1, enable_progress_bar=False)
    return model


def run_one(name, adata, genes, seed, args) -> dict:
    import torch

    import scanpy_scvi

    rng = np.random.default_rng(seed)
    held = rng.random(adata.n_obs) < args.heldout
    out = {}
    for system, fit in (("ours", train_ours), ("scvi-tools", train_scvi_tools)):
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        model = fit(adata[~held].copy(), genes, seed, args.epochs)
        seconds = time.perf_counter() - t0
        full = adata if system == "ours" else adata[:, genes].copy()
        torch.manual_seed(seed)
        elbo = float(np.mean([model.get_elbo(adata=full[held].copy()) for _ in range(3)]))
        scored = adata.copy()
        scored.obsm["X_latent"] = model.get_latent_representation(adata=full)
        table = scanpy_scvi.tl.integration_scores(
            scored, batch_key="batch", label_key="cell_type", use_rep="X_latent", max_cells=None, random_state=seed
        )
        depth = depth_following(scored.obsm["X_latent"], adata[:, genes].X)
        out[system] = {
            "heldout_elbo": elbo, "train_seconds": seconds, **table.loc["X_latent"].to_dict(), "depth_rho": depth,
        }  # fmt: skip
        print(f"  {name} seed {seed} {system}: ELBO {elbo:.2f}, NMI {out[system]['nmi_kmeans']:.3f}, "
              f"ARI {out[system]['ari_kmeans']:.3f}, total {out[system]['total']:.3f}, depth_rho {depth:.3f} ({seconds:.0f} s)", flush=True)  # fmt: skip
    return out


def depth_following(latent: np.ndarray, counts) -> float:
    """How much the latent space follows sequencing depth: the largest |Spearman rho| between a
    latent dimension and the log total counts over the model genes (lower: less depth)."""
    from scipy.stats import spearmanr

    log_library = np.log(np.asarray(counts.sum(1)).ravel())
    return float(max(abs(spearmanr(latent[:, d], log_library)[0]) for d in range(latent.shape[1])))


def summarise(runs: list[dict]) -> dict:
    from scipy.stats import ttest_rel

    summary = {}
    for metric in METRICS:
        ours = np.array([r["ours"][metric] for r in runs])
        theirs = np.array([r["scvi-tools"][metric] for r in runs])
        diff = ours - theirs
        p = float(ttest_rel(ours, theirs).pvalue) if len(runs) > 1 and np.any(diff != diff[0]) else float("nan")
        summary[metric] = {
            "ours_mean": float(ours.mean()), "ours_sd": float(ours.std(ddof=1)) if len(ours) > 1 else 0.0,
            "theirs_mean": float(theirs.mean()), "theirs_sd": float(theirs.std(ddof=1)) if len(theirs) > 1 else 0.0,
            "diff_mean": float(diff.mean()), "diff_sd": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
            "paired_t_p": p, "ours_higher": int((diff > 0).sum()), "n": len(runs),
        }  # fmt: skip
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    print(f"load average at start {load_average()}", flush=True)
    for name in args.datasets.split(","):
        _, adata, genes = read_with_hvgs(DATASETS[name], ("batch", "cell_type"), 2000, "batch")
        runs = [run_one(name, adata, genes, seed, args) for seed in seeds]
        results[name] = {"runs": runs, "summary": summarise(runs)}
        print(f"\n{name}: {adata.n_obs} cells, {len(genes)} HVGs, seeds {seeds}")
        print("| metric | scanpy-scvi | scvi-tools | ours - theirs (sd) | paired t p | ours higher |")
        print("|---|---:|---:|---:|---:|---:|")
        for metric, s in results[name]["summary"].items():
            print(f"| {metric} | {s['ours_mean']:.3f} +- {s['ours_sd']:.3f} | {s['theirs_mean']:.3f} +- "
                  f"{s['theirs_sd']:.3f} | {s['diff_mean']:+.3f} ({s['diff_sd']:.3f}) | {s['paired_t_p']:.3f} | "
                  f"{s['ours_higher']}/{s['n']} |", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(args.threads), "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
