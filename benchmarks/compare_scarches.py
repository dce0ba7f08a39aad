"""scanpy-scvi's scArches models against scArches 0.6.1 itself, one after the other in one process.

Data: ``pbmc_multistudy_5batch_14989cells_2003genes.h5ad`` (5 batches from three studies,
harmonised labels). Reference = four batches, query = ``--query-batch`` (default the Zheng
sorted PBMCs, whose labels come from FACS gates). Both systems get the same cells, genes,
architecture, epochs and seed. Per model and system the report gives: training throughput
(cells x epochs / s), integration scores of the reference latent
(:func:`scanpy_scvi.tl.integration_scores`: k-means NMI/ARI, label and batch silhouettes,
graph connectivity, bio / batch / total), the query mapping time (building the query model,
training it, embedding it), the query's kNN label-transfer accuracy and macro-F1 from the
reference latent (cells with a known label), and the scores of reference + query together.

Models: ``trvae`` (scArches ``TRVAE`` vs :class:`scanpy_scvi.TRVAE`) and ``scpoli`` (``scPoli``
vs :class:`scanpy_scvi.SCPOLI`: prototypes after 80 % of the epochs, ``eta`` 5 as in the scArches
tutorial, no query cell labelled; the report adds the query's nearest-prototype accuracy and
macro-F1), and ``expimap`` (``EXPIMAP`` vs :class:`scanpy_scvi.EXPIMAP`, on its own data: the non-Kang
studies as reference with the MSigDB hallmark programs, the Kang CTRL + STIM cells mapped as one
study; the report gives the ranks and Bayes factors of the interferon programs in STIM vs CTRL).
Reference cells labelled ``unknown``/``other`` count as unlabelled. scArches needs dense
float32 counts in ``X`` and anndata < 0.12; run in the venv that
``../shared/tools/scarches_venv.sh`` builds, with this package installed into it
(``pip install --no-deps -e .``)::

    /tmp/anchor/scarches-venv/bin/python benchmarks/compare_scarches.py --epochs 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_scvi_tools import load_average, machine_info

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DATA = "pbmc_multistudy_5batch_14989cells_2003genes.h5ad"
UNLABELLED = ("unknown", "other")  # not scored in label transfer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="trvae,scpoli,expimap", help="comma-separated (default: all three)")
    p.add_argument("--query-batch", default="zheng2017_sorted")
    p.add_argument("--epochs", type=int, default=50, help="reference training epochs (both systems)")
    p.add_argument("--query-epochs", type=int, default=40, help="query training epochs (both systems)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=SHARED, help="folder of the datasets (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="ours: 'cpu' or 'cuda' (scArches takes CUDA when it finds it)")
    p.add_argument("--systems", default="scanpy-scvi,scArches",
                   help="comma-separated: both (default), or one of them (e.g. ours alone across seeds)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


# -- data ---------------------------------------------------------------------------------------------------
def load(args):
    import anndata as ad

    query_batch = args.query_batch
    adata = ad.read_h5ad(args.data_dir / DATA)
    adata.X = adata.X.toarray().astype(np.float32)  # scArches reads dense float32 counts
    for key in ("batch", "cell_type"):
        adata.obs[key] = adata.obs[key].astype(str).astype("category")
    is_query = (adata.obs["batch"] == query_batch).to_numpy()
    if not is_query.any():
        msg = f"--query-batch {query_batch!r} is not a batch of {DATA}: {sorted(adata.obs['batch'].unique())}."
        raise SystemExit(msg)
    ref, query = adata[~is_query].copy(), adata[is_query].copy()
    for part in (ref, query):
        part.obs["batch"] = part.obs["batch"].cat.remove_unused_categories()
    return ref, query


# -- scoring --------------------------------------------------------------------------------------------------
def scores(latent: np.ndarray, obs, seed: int) -> dict:
    import anndata as ad

    import scanpy_scvi

    scored = ad.AnnData(obs=obs.copy())
    scored.obsm["X_latent"] = latent
    table = scanpy_scvi.tl.integration_scores(
        scored, batch_key="batch", label_key="cell_type", use_rep="X_latent", max_cells=None, random_state=seed
    )
    return {k: float(v) for k, v in table.loc["X_latent"].items()}


def label_transfer(ref_latent, ref_labels, query_latent, query_labels, k: int = 15) -> dict:
    """kNN vote of the reference labels in the latent space; accuracy and macro-F1 on the query
    cells whose label is known and exists in the reference."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier

    known = np.isin(ref_labels, UNLABELLED, invert=True)
    knn = KNeighborsClassifier(n_neighbors=k).fit(ref_latent[known], ref_labels[known])
    pred = knn.predict(query_latent)
    scored = np.isin(query_labels, np.unique(ref_labels[known]))
    return {
        "accuracy": float(accuracy_score(query_labels[scored], pred[scored])),
        "macro_f1": float(f1_score(query_labels[scored], pred[scored], average="macro")),
        "n_scored": int(scored.sum()),
    }


def summarise(ref, query, ref_latent, query_latent, train_seconds, epochs_run, query_seconds, seed) -> dict:
    import pandas as pd

    both = pd.concat([ref.obs[["batch", "cell_type"]], query.obs[["batch", "cell_type"]]])
    both["batch"] = both["batch"].astype(str).astype("category")
    return {
        "train_seconds": train_seconds,
        "epochs_run": epochs_run,
        "cells_per_second": ref.n_obs * epochs_run / train_seconds,
        "query_seconds": query_seconds,
        "reference_scores": scores(ref_latent, ref.obs, seed),
        "combined_scores": scores(np.concatenate([ref_latent, query_latent]), both, seed),
        "label_transfer": label_transfer(
            ref_latent, ref.obs["cell_type"].to_numpy(str), query_latent, query.obs["cell_type"].to_numpy(str)
        ),
    }


# -- trVAE ----------------------------------------------------------------------------------------------------
TRVAE_ARCH = {"hidden_layer_sizes": [256, 64], "latent_dim": 10, "dr_rate": 0.05, "recon_loss": "nb", "beta": 1.0}


def trvae_scarches(ref, query, args) -> dict:
    import scarches as sca
    import torch

    torch.manual_seed(args.seed)
    conditions = list(ref.obs["batch"].cat.categories)
    t0 = time.perf_counter()
    model = sca.models.TRVAE(adata=ref, condition_key="batch", conditions=conditions, use_mmd=True, mmd_on="z",
                             use_ln=True, use_bn=False, **TRVAE_ARCH)  # fmt: skip
    model.train(n_epochs=args.epochs, use_early_stopping=False, monitor=False, seed=args.seed)
    train_seconds = time.perf_counter() - t0
    epochs_run = len(model.trainer.logs["epoch_loss"])
    ref_latent = model.get_latent(mean=True)
    t0 = time.perf_counter()
    qm = sca.models.TRVAE.load_query_data(adata=query, reference_model=model)
    qm.train(n_epochs=args.query_epochs, use_early_stopping=False, monitor=False, seed=args.seed)
    query_latent = qm.get_latent(mean=True)
    query_seconds = time.perf_counter() - t0
    return summarise(ref, query, ref_latent, query_latent, train_seconds, epochs_run, query_seconds, args.seed)


def trvae_ours(ref, query, args) -> dict:
    import scanpy_scvi

    arch = {"hidden_layer_sizes": (256, 64), "n_latent": 10, "dropout_rate": 0.05, "gene_likelihood": "nb", "beta": 1.0}
    t0 = time.perf_counter()
    model = scanpy_scvi.TRVAE(ref, batch_key="batch", random_state=args.seed, **arch)
    # scArches' schedule without early stopping: no learning-rate reduction either (it is part of its early stopping)
    model.train(args.epochs, early_stopping=False, reduce_lr_on_plateau=False, device=args.device, random_state=args.seed,
                progress_bar=False)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    epochs_run = len(model.history_["elbo_train"])
    ref_latent = model.get_latent_representation()
    t0 = time.perf_counter()
    q = query.copy()
    qm = scanpy_scvi.tl.map_query(q, model, max_epochs=args.query_epochs, weight_decay=0.04, device=args.device,
                                  random_state=args.seed, progress_bar=False, store_model=False)  # fmt: skip
    query_latent = q.obsm["X_trvae"]
    query_seconds = time.perf_counter() - t0
    out = summarise(ref, query, ref_latent, query_latent, train_seconds, epochs_run, query_seconds, args.seed)
    out["query_epochs_run"] = len(qm.history_["elbo_train"])
    return out


# -- scPoli ------------------------------------------------------------------------------------------------
SCPOLI_ETA = 5.0  # the scArches tutorial's reference eta


def predictions(pred, query) -> dict:
    """Accuracy and macro-F1 of a model's own query predictions (cells with a known label)."""
    from sklearn.metrics import accuracy_score, f1_score

    truth = query.obs["cell_type"].to_numpy(str)
    pred = np.asarray(pred, dtype=str)
    scored = np.isin(truth, UNLABELLED, invert=True)
    return {
        "accuracy": float(accuracy_score(truth[scored], pred[scored])),
        "macro_f1": float(f1_score(truth[scored], pred[scored], average="macro")),
        "n_scored": int(scored.sum()),
    }


def scpoli_scarches(ref, query, args) -> dict:
    import scarches as sca
    import torch

    torch.manual_seed(args.seed)
    pre = int(np.floor(0.8 * args.epochs))
    t0 = time.perf_counter()
    model = sca.models.scPoli(adata=ref, condition_keys="batch", cell_type_keys="cell_type",
                              unknown_ct_names=list(UNLABELLED), embedding_dims=10, latent_dim=10, recon_loss="nb")  # fmt: skip
    # unlabeled prototypes off: with scArches' default unlabeled_weight=0 they do not touch the model, and their
    # Leiden initialisation fails in scanpy 1.11's neighbors on scipy 1.17 sparse arrays (> 4096 cells)
    model.train(n_epochs=args.epochs, pretraining_epochs=pre, eta=SCPOLI_ETA, use_early_stopping=False, monitor=False,
                seed=args.seed, unlabeled_prototype_training=False)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    ref_latent = model.get_latent(ref, mean=True)
    t0 = time.perf_counter()
    qm = sca.models.scPoli.load_query_data(adata=query, reference_model=model, labeled_indices=[])
    qm.train(n_epochs=args.query_epochs, pretraining_epochs=int(np.floor(0.9 * args.query_epochs)), eta=SCPOLI_ETA,
             use_early_stopping=False, monitor=False, seed=args.seed, unlabeled_prototype_training=False)  # fmt: skip
    query_latent = qm.get_latent(query, mean=True)
    pred = qm.classify(query)["cell_type"]["preds"]
    query_seconds = time.perf_counter() - t0
    out = summarise(ref, query, ref_latent, query_latent, train_seconds, args.epochs, query_seconds, args.seed)
    out["prototype_transfer"] = predictions(pred, query)
    return out


def scpoli_ours(ref, query, args) -> dict:
    import scanpy_scvi

    pre = int(np.floor(0.8 * args.epochs))
    t0 = time.perf_counter()
    model = scanpy_scvi.SCPOLI(ref, condition_keys="batch", cell_type_keys="cell_type", unknown_ct_names=list(UNLABELLED),
                               embedding_dims=10, n_latent=10, random_state=args.seed)  # fmt: skip
    model.train(args.epochs, pretraining_epochs=pre, eta=SCPOLI_ETA, early_stopping=False, reduce_lr_on_plateau=False,
                device=args.device, random_state=args.seed, progress_bar=False)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    ref_latent = model.get_latent_representation()
    t0 = time.perf_counter()
    q = query.copy()
    scanpy_scvi.tl.map_query(q, model, max_epochs=args.query_epochs, weight_decay=0.04, device=args.device,
                             random_state=args.seed, progress_bar=False, store_model=False)  # fmt: skip
    query_seconds = time.perf_counter() - t0
    out = summarise(ref, query, ref_latent, q.obsm["X_scpoli"], train_seconds, len(model.history_["elbo_train"]),
                    query_seconds, args.seed)  # fmt: skip
    out["prototype_transfer"] = predictions(q.obs["cell_type_pred"], query)
    return out


# -- expiMap ------------------------------------------------------------------------------------------------
KANG = "kang2018_ifnb_pbmc_2k.h5ad"
HALLMARK = "msigdb_h.all.v7.0.symbols.gmt"
INTERFERON = ("INTERFERON_ALPHA_RESPONSE", "INTERFERON_GAMMA_RESPONSE")


def load_interferon(args):
    """expiMap's demonstration: reference = the non-Kang PBMC studies, query = Kang CTRL + STIM as one
    study; genes shared by both; hallmark programs (scArches' add_annotations rule, clean names)."""
    import anndata as ad

    import scanpy_scvi

    ref = ad.read_h5ad(args.data_dir / DATA)
    ref = ref[~ref.obs["batch"].astype(str).str.startswith("kang")].copy()
    query = ad.read_h5ad(args.data_dir / KANG)
    genes = ref.var_names.intersection(query.var_names)
    ref, query = ref[:, genes].copy(), query[:, genes].copy()
    for part in (ref, query):
        part.X = part.X.toarray().astype(np.float32) if hasattr(part.X, "toarray") else part.X.astype(np.float32)
    ref.obs["study"] = ref.obs["batch"].astype(str).astype("category")
    ref.obs["batch"], ref.obs["cell_type"] = ref.obs["study"], ref.obs["cell_type"].astype(str).astype("category")
    query.obs["condition"] = query.obs["batch"].astype(str)
    query.obs["study"] = pd_category("kang2018", query.n_obs)
    scanpy_scvi.tl.add_gene_programs(ref, args.data_dir / HALLMARK, min_genes=12, clean=True)
    query.varm["I"] = ref.varm["I"]
    query.uns["terms"] = ref.uns["terms"]
    return ref, query


def pd_category(value: str, n: int):
    import pandas as pd

    return pd.Categorical([value] * n)


def ranks(names, bf) -> dict:
    order = list(np.asarray(names)[np.argsort(-np.asarray(bf), kind="stable")])
    return {p: {"rank": order.index(p) + 1, "bf": float(np.asarray(bf)[list(names).index(p)])} for p in INTERFERON}


def expimap_scarches(ref, query, args) -> dict:
    import scarches as sca
    import torch

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = sca.models.EXPIMAP(adata=ref, condition_key="study", hidden_layer_sizes=[256, 256], recon_loss="nb")
    model.train(n_epochs=args.epochs, alpha_epoch_anneal=min(130, args.epochs), alpha=0.7, alpha_kl=0.35,
                use_early_stopping=False, monitor=False, seed=args.seed)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    ref_latent = model.get_latent(mean=True)
    t0 = time.perf_counter()
    qm = sca.models.EXPIMAP.load_query_data(adata=query, reference_model=model)
    qm.train(n_epochs=args.query_epochs, alpha_epoch_anneal=min(130, args.query_epochs), alpha_kl=0.35,
             use_early_stopping=False, monitor=False, seed=args.seed)  # fmt: skip
    query_seconds = time.perf_counter() - t0
    qm.latent_directions(adata=query)
    qm.latent_enrich(groups="condition", comparison="CTRL", use_directions=True, adata=query)
    terms = list(ref.uns["terms"])
    return {"train_seconds": train_seconds, "epochs_run": args.epochs,
            "cells_per_second": ref.n_obs * args.epochs / train_seconds, "query_seconds": query_seconds,
            "reference_scores": scores(ref_latent, ref.obs, args.seed),
            "active_programs": int(model.model.decoder.nonzero_terms().sum()),
            "interferon": ranks(terms, query.uns["bf_scores"]["STIM"]["bf"])}  # fmt: skip


def expimap_ours(ref, query, args) -> dict:
    import scanpy_scvi

    t0 = time.perf_counter()
    model = scanpy_scvi.EXPIMAP(ref, condition_key="study", random_state=args.seed)
    model.train(args.epochs, alpha=0.7, early_stopping=False, reduce_lr_on_plateau=False, device=args.device,
                random_state=args.seed, progress_bar=False)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    ref_latent = model.get_latent_representation()
    t0 = time.perf_counter()
    q = query.copy()
    scanpy_scvi.tl.map_query(q, model, batch_key="study", max_epochs=args.query_epochs, weight_decay=0.04,
                             device=args.device, random_state=args.seed, progress_bar=False)  # fmt: skip
    query_seconds = time.perf_counter() - t0
    table = scanpy_scvi.tl.gene_program_enrichment(q, groupby="condition", comparison="CTRL", only_active=False)
    stim = table[table["group"] == "STIM"]
    return {"train_seconds": train_seconds, "epochs_run": args.epochs,
            "cells_per_second": ref.n_obs * args.epochs / train_seconds, "query_seconds": query_seconds,
            "reference_scores": scores(ref_latent, ref.obs, args.seed),
            "active_programs": int(model.programs()["active"].sum()),
            "interferon": ranks(stim["program"].to_numpy(), stim["bf"].to_numpy())}  # fmt: skip


MODELS = {
    "trvae": (trvae_ours, trvae_scarches, load),
    "scpoli": (scpoli_ours, scpoli_scarches, load),
    "expimap": (expimap_ours, expimap_scarches, load_interferon),
}


# -- report ---------------------------------------------------------------------------------------------------
def print_report(name: str, ours: dict, theirs: dict) -> None:
    print(f"\n## {name}: scanpy-scvi vs scArches 0.6.1")
    print("| metric | scanpy-scvi | scArches | ratio / difference |")
    print("|---|---:|---:|---:|")
    print(f"| training, cells x epochs / s | {ours['cells_per_second']:.0f} | {theirs['cells_per_second']:.0f} | "
          f"{ours['cells_per_second'] / theirs['cells_per_second']:.2f}x |")  # fmt: skip
    print(f"| query mapping, s | {ours['query_seconds']:.1f} | {theirs['query_seconds']:.1f} | "
          f"{theirs['query_seconds'] / ours['query_seconds']:.2f}x faster |")  # fmt: skip
    for part in (k for k in ("reference_scores", "combined_scores") if k in ours):
        for metric in ("nmi_kmeans", "ari_kmeans", "silhouette_label", "silhouette_batch", "graph_connectivity",
                       "bio", "batch", "total"):  # fmt: skip
            a, b = ours[part][metric], theirs[part][metric]
            print(f"| {part.split('_')[0]} {metric} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    if "interferon" in ours:
        print(f"| active programs | {ours['active_programs']} | {theirs['active_programs']} | |")
        for p in INTERFERON:
            a, b = ours["interferon"][p], theirs["interferon"][p]
            print(
                f"| STIM vs CTRL {p}: rank (Bayes factor) | {a['rank']} ({a['bf']:.2f}) | {b['rank']} ({b['bf']:.2f}) | |"
            )
    for source, label in (("label_transfer", "query kNN"), ("prototype_transfer", "query prototype")):
        if source not in ours:
            continue
        for metric in ("accuracy", "macro_f1"):
            a, b = ours[source][metric], theirs[source][metric]
            print(f"| {label} {metric} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    print(f"load average at start {load_average()}", flush=True)
    results = {}
    for name in args.models.split(","):
        ours_fn, theirs_fn, loader = MODELS[name]
        ref, query = loader(args)
        print(f"{name}: reference {ref.n_obs} cells ({', '.join(ref.obs['batch'].cat.categories)}), query {query.n_obs} "
              f"cells, {ref.n_vars} genes, {args.epochs} + {args.query_epochs} epochs", flush=True)  # fmt: skip
        results[name] = {}
        for system, fn in (("scanpy-scvi", ours_fn), ("scArches", theirs_fn)):
            if system not in args.systems.split(","):
                continue
            torch.set_num_threads(args.threads)
            results[name][system] = fn(ref.copy(), query.copy(), args)
            r = results[name][system]
            print(f"  {name} {system}: {r['train_seconds']:.0f} s training, {r['query_seconds']:.1f} s query, "
                  f"total {r['reference_scores']['total']:.3f}", flush=True)  # fmt: skip
        if len(results[name]) == 2:
            print_report(name, results[name]["scanpy-scvi"], results[name]["scArches"])
    print(f"\nload average at end {load_average()}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(args.threads), "args": {**vars(args), "json": str(args.json)},
                                         "results": results}, indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
