"""Reference mapping and label transfer: scanpy-scvi's ``tl.map_query`` vs scvi-tools' scArches.

One process, both systems, identical inputs, per scenario:

1. split a dataset into a reference and a query (``ifnb``: Kang 2018 IFN-beta PBMC,
   reference = CTRL, query = STIM; ``lupus``: Kang 2018 lupus PBMC, reference = four
   donors, query = the fifth);
2. pick ``--n-top-genes`` seurat_v3 HVGs on the *reference* cells only;
3. reference, in both systems, with the scArches tutorial recipe (encode_covariates,
   layer norm, no batch norm, dropout 0.2, two layers; batch = ``obs['batch']``): scVI for
   ``--ref-epochs`` epochs, then scANVI initialised from it (all reference cells labelled with
   ``obs['cell_type']``) for ``--scanvi-epochs`` epochs;
4. query, in both systems: scvi-tools ``SCANVI.load_query_data`` + ``train(max_epochs=100,
   plan_kwargs={'weight_decay': 0.0})`` (the tutorial's query recipe) and ours
   ``tl.map_query`` with its default epochs and, for a like-for-like check, with the same
   100 epochs. Query labels are hidden from both (all cells unlabelled);
5. report for each: query training wall time (everything from the reference model to the
   trained query model), label-transfer accuracy and macro-F1 against the hidden labels,
   and how the query mixes with the reference in the joint latent space: iLISI (inverse
   Simpson index of reference/query among each cell's 30 nearest neighbours, 1 = unmixed,
   2 = perfectly mixed; mean over cells) and the kNN batch entropy (scvi's
   entropy_batch_mixing definition, 50 neighbours, natural log; max log 2 = 0.693).

Needs scvi-tools (the ``bench`` extra), imported only here::

    /opt/scvi-bench/bin/python benchmarks/compare_mapping.py --json benchmarks/results/mapping.json
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
from compare_scvi_tools import load_average, machine_info

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SCENARIOS = {
    "ifnb": (DATA / "kang2018_ifnb_pbmc_2k.h5ad", "STIM"),
    "lupus": (DATA / "kang2018_lupus_pbmc_8k_2511genes.h5ad", None),  # None: the last donor
}
BATCH, LABEL, UNLABELED = "batch", "cell_type", "Unknown"
RECIPE = {
    "encode_covariates": True,
    "use_layer_norm": "both",
    "use_batch_norm": "none",
    "dropout_rate": 0.2,
    "n_layers": 2,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default="ifnb,lupus")
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--ref-epochs", type=int, default=100)
    p.add_argument("--scanvi-epochs", type=int, default=10)
    p.add_argument("--query-epochs", type=int, default=100, help="scvi-tools' query epochs (tutorial: 100)")
    p.add_argument(
        "--our-epochs",
        default="default,100",
        help="comma list of map_query max_epochs to run ('default' = its own default)",
    )
    p.add_argument(
        "--query-seeds",
        type=int,
        default=3,
        help="map the query with this many seeds at our default epochs (seed-to-seed spread)",
    )
    p.add_argument("--skip-scvi-tools", action="store_true", help="only run ours (epoch sweeps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def split(name: str, n_top_genes: int):
    import anndata as ad
    import scanpy as sc

    path, query_batch = SCENARIOS[name]
    adata = ad.read_h5ad(path)
    for key in (BATCH, LABEL):
        adata.obs[key] = adata.obs[key].astype(str)
    if query_batch is None:
        query_batch = sorted(adata.obs[BATCH].unique())[-1]
    is_query = (adata.obs[BATCH] == query_batch).to_numpy()
    ref, query = adata[~is_query].copy(), adata[is_query].copy()
    n_ref_batches = ref.obs[BATCH].nunique()
    hv = sc.pp.highly_variable_genes(
        ref, flavor="seurat_v3", n_top_genes=min(n_top_genes, ref.n_vars),
        batch_key=BATCH if n_ref_batches > 1 else None, inplace=False,
    )  # fmt: skip
    genes = list(ref.var_names[np.asarray(hv["highly_variable"], dtype=bool)])
    ref, query = ref[:, genes].copy(), query[:, genes].copy()
    query.obs["truth"] = query.obs[LABEL].to_numpy()
    query.obs[LABEL] = UNLABELED  # hidden from both systems
    for a in (ref, query):
        for key in (BATCH, LABEL):
            a.obs[key] = a.obs[key].astype("category")
    return ref, query, query_batch


# -- metrics ------------------------------------------------------------------------------------------
def label_scores(truth: np.ndarray, pred: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    truth, pred = np.asarray(truth, dtype=str), np.asarray(pred, dtype=str)
    return {"accuracy": float(accuracy_score(truth, pred)), "macro_f1": float(f1_score(truth, pred, average="macro"))}


def mixing_scores(ref_latent: np.ndarray, query_latent: np.ndarray, seed: int) -> dict:
    """iLISI (k=30, inverse Simpson of ref/query) and kNN batch entropy (k=50) in the joint space."""
    from sklearn.neighbors import NearestNeighbors

    joint = np.vstack([ref_latent, query_latent])
    is_query = np.r_[np.zeros(len(ref_latent)), np.ones(len(query_latent))]
    out = {}
    for name, k in (("ilisi", 30), ("batch_entropy", 50)):
        nn = NearestNeighbors(n_neighbors=k + 1).fit(joint).kneighbors(joint, return_distance=False)[:, 1:]
        frac_q = is_query[nn].mean(1)
        p = np.stack([1 - frac_q, frac_q], axis=1)
        if name == "ilisi":
            out[name] = float(np.mean(1.0 / np.sum(p**2, axis=1)))
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                out[name] = float(np.mean(-np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)))
    return out


# -- the two systems --------------------------------------------------------------------------------------
def run_scvi_tools(ref, query, args) -> dict:
    import scvi

    scvi.settings.seed = args.seed
    scvi.settings.num_threads = args.threads
    ref = ref.copy()
    scvi.model.SCVI.setup_anndata(ref, batch_key=BATCH, labels_key=LABEL)
    t0 = time.perf_counter()
    vae = scvi.model.SCVI(ref, **RECIPE)
    vae.train(max_epochs=args.ref_epochs, accelerator="cpu", enable_progress_bar=False)
    lvae = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED, labels_key=LABEL)
    lvae.train(max_epochs=args.scanvi_epochs, accelerator="cpu", enable_progress_bar=False)
    ref_seconds = time.perf_counter() - t0
    ref_latent = lvae.get_latent_representation()

    q = query.copy()
    t0 = time.perf_counter()
    qm = scvi.model.SCANVI.load_query_data(q, lvae)
    qm.train(
        max_epochs=args.query_epochs, plan_kwargs={"weight_decay": 0.0}, check_val_every_n_epoch=10,
        accelerator="cpu", enable_progress_bar=False,
    )  # fmt: skip
    q_seconds = time.perf_counter() - t0
    pred = qm.predict()
    joint_ref = qm.get_latent_representation(ref)
    return {
        "reference_seconds": ref_seconds,
        "query_seconds": q_seconds,
        "query_epochs": args.query_epochs,
        **label_scores(query.obs["truth"], pred),
        **mixing_scores(joint_ref, qm.get_latent_representation(), args.seed),
        "reference_latent_moved": float(np.abs(joint_ref - ref_latent).max()),
    }


def run_ours(ref, query, args, query_epochs: list) -> tuple[dict, list]:
    import torch

    import scanpy_scvi as ss

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    vae = ss.SCVI(ref, batch_key=BATCH, random_state=args.seed, **RECIPE)
    vae.train(max_epochs=args.ref_epochs, device="cpu", random_state=args.seed, progress_bar=False)
    lvae = ss.SCANVI.from_scvi_model(vae, labels_key=LABEL, unlabeled_category=UNLABELED, random_state=args.seed)
    lvae.train(max_epochs=args.scanvi_epochs, device="cpu", random_state=args.seed, progress_bar=False)
    ref_seconds = time.perf_counter() - t0
    ref_latent = lvae.get_latent_representation()
    runs = []
    for epochs, seed in query_epochs:
        q = query.copy()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = ss.tl.map_query(
                q, lvae, max_epochs=epochs, device="cpu", random_state=seed, progress_bar=False, store_model=False
            )
        q_seconds = time.perf_counter() - t0
        joint_ref = qm.get_latent_representation(ref)
        runs.append({
            "query_seconds": q_seconds,
            "query_epochs": qm.train_config.get("max_epochs", 0),
            "query_seed": seed,
            **label_scores(q.obs["truth"], q.obs[f"{LABEL}_pred"]),
            **mixing_scores(joint_ref, q.obsm["X_scanvi"], args.seed),
            "reference_latent_moved": float(np.abs(joint_ref - ref_latent).max()),
        })  # fmt: skip
    return {"reference_seconds": ref_seconds}, runs


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info(args.threads)
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "scenarios": {}}
    for name in args.scenarios.split(","):
        ref, query, qb = split(name, args.n_top_genes)
        print(f"\n== {name}: reference {ref.n_obs} cells ({ref.obs[BATCH].nunique()} batches), "
              f"query {query.n_obs} cells (batch {qb!r}), {ref.n_vars} genes, load {load_average()}")  # fmt: skip
        theirs = None if args.skip_scvi_tools else run_scvi_tools(ref, query, args)
        epochs = []
        for e in args.our_epochs.split(","):
            seeds = range(args.seed, args.seed + args.query_seeds) if e == "default" else [args.seed]
            epochs += [(None if e == "default" else int(e), s) for s in seeds]
        ours_ref, ours = run_ours(ref, query, args, epochs)
        rows = ([("scvi-tools 1.4.2", theirs)] if theirs else []) + [
            (f"scanpy-scvi ({r['query_epochs']} ep, seed {r['query_seed']})", r) for r in ours
        ]
        their_ref = f"{theirs['reference_seconds']:.1f} s" if theirs else "(skipped)"
        print(f"reference training: scvi-tools {their_ref}, ours {ours_ref['reference_seconds']:.1f} s")
        print(
            f"{'system':34s} {'epochs':>6s} {'query s':>8s} {'speedup':>8s} {'acc':>6s} {'macroF1':>7s} {'iLISI':>6s} {'entropy':>7s} {'ref moved':>9s}"
        )
        for label, r in rows:
            speed = theirs["query_seconds"] / r["query_seconds"] if theirs else float("nan")
            print(f"{label:34s} {r['query_epochs']:6d} {r['query_seconds']:8.2f} {speed:8.2f} {r['accuracy']:6.3f} "
                  f"{r['macro_f1']:7.3f} {r['ilisi']:6.3f} {r['batch_entropy']:7.3f} {r['reference_latent_moved']:9.2g}")  # fmt: skip
        results["scenarios"][name] = {
            "reference_cells": ref.n_obs, "query_cells": query.n_obs, "query_batch": qb, "genes": ref.n_vars,
            "scvi_tools": theirs, "ours_reference_seconds": ours_ref["reference_seconds"], "ours": ours,
        }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
