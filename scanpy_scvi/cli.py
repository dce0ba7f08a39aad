"""The ``scanpy-scvi`` command: ``fit`` an h5ad file, ``map`` a query onto a reference, or run the ``demo``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _add_hvgs(adata, *, n_top_genes: int, layer: str | None, batch_key: str | None) -> str:
    """Mark highly variable genes from the counts; return the flavor used.

    ``seurat_v3`` works on counts but needs scikit-misc; without it, the ``seurat`` flavor
    runs on a log-normalised copy. ``adata.X`` is never changed.
    """
    import scanpy as sc

    try:
        sc.pp.highly_variable_genes(
            adata, flavor="seurat_v3", n_top_genes=n_top_genes, layer=layer, batch_key=batch_key
        )
        return "seurat_v3"
    except ImportError:
        counts = (adata.layers[layer] if layer else adata.X).copy()  # normalised below; the user's stays as is
        tmp = sc.AnnData(counts, obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
        if batch_key:
            tmp.obs[batch_key] = adata.obs[batch_key].to_numpy()
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
        sc.pp.highly_variable_genes(tmp, flavor="seurat", n_top_genes=n_top_genes, batch_key=batch_key)
        adata.var["highly_variable"] = tmp.var["highly_variable"].to_numpy()
        return "seurat"


def _fit(args: argparse.Namespace) -> int:
    import anndata as ad

    from .pp import REFERENCE_MAPPING, scvi
    from .train import rank

    adata = ad.read_h5ad(args.input)
    for key in (args.batch_key, args.labels_key):
        if key is not None and key not in adata.obs.columns:
            msg = f"{key!r} not found in adata.obs (columns: {list(adata.obs.columns)[:20]})."
            raise KeyError(msg)
    if "highly_variable" not in adata.var.columns and not args.all_genes:
        flavor = _add_hvgs(adata, n_top_genes=args.n_top_genes, layer=args.layer, batch_key=args.batch_key)
        print(f"selected {args.n_top_genes} highly variable genes ({flavor})")
    model = scvi(
        adata,
        batch_key=args.batch_key,
        labels_key=args.labels_key,
        layer=args.layer,
        n_epochs=args.epochs,
        n_latent=args.n_latent,
        linear_decoder=args.linear_decoder,
        use_highly_variable_genes=not args.all_genes,
        expression=not args.latent_only,
        strategy=_strategy(args.strategy),
        **_run_options(args),
        **(REFERENCE_MAPPING if args.reference_mapping else {}),
    )
    if rank() == 0:  # under torchrun every process has the same model and outputs
        _write(adata, model, args, "the model")
    return 0


def _strategy(choice: str) -> str | None:
    """``--strategy``: 'auto' is DDP when torchrun launched several processes."""
    from .train import launched

    if choice == "auto":
        return "ddp" if launched() and int(os.environ.get("WORLD_SIZE", 1)) > 1 else None
    return None if choice == "none" else choice


def _map(args: argparse.Namespace) -> int:
    import anndata as ad

    from .tl import map_query

    reference = Path(args.reference)
    if not reference.exists():
        msg = f"reference {str(reference)!r} not found: give a model directory (fit --model-dir) or an .h5ad from fit."
        raise OSError(msg)
    if reference.is_file():
        reference = ad.read_h5ad(reference)
    query = ad.read_h5ad(args.input)
    model = map_query(
        query,
        reference,
        batch_key=args.batch_key,
        labels_key=args.labels_key,
        max_epochs=args.epochs,
        **_run_options(args),
    )
    _write(query, model, args, "the query model")
    return 0


def _run_options(args: argparse.Namespace) -> dict:
    """The options every training command shares."""
    return {"device": args.device, "random_state": args.seed, "progress_bar": not args.quiet}


def _write(adata, model, args: argparse.Namespace, what: str) -> None:
    """Write the output h5ad and, with ``--model-dir``, the model."""
    adata.write_h5ad(args.output, compression="gzip")
    print(f"wrote {args.output}")
    if args.model_dir:
        model.save(args.model_dir, overwrite=args.overwrite)
        print(f"saved {what} to {args.model_dir}")


def _demo(args: argparse.Namespace) -> int:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from .datasets import cellbench_lung
    from .pp import scvi

    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    adata = cellbench_lung()
    print(
        f"CellBench lung cell lines: {adata.n_obs} cells x {adata.n_vars} genes, {adata.obs['batch'].nunique()} batches"
    )
    sc.pp.normalize_total(adata, target_sum=1e4)  # X becomes log-normalised; counts stay in the layer
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=2000, batch_key="batch")
    scvi(adata, layer="counts", batch_key="batch", n_epochs=args.epochs, progress_bar=not args.quiet)
    sc.pp.neighbors(adata, use_rep="X_scvi", random_state=0)
    sc.tl.umap(adata, random_state=0)
    sc.pl.umap(adata, color=["batch", "cell_type"], show=False, wspace=0.45)
    png = out / "demo_umap_scvi.png"
    plt.savefig(png, dpi=110, bbox_inches="tight")
    plt.close("all")
    h5ad = out / "demo_scvi.h5ad"
    adata.write_h5ad(h5ad, compression="gzip")
    print(f"wrote {h5ad}")
    print(f"wrote {png}")
    return 0


def _add_run_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The options of every training command (read back by ``_run_options`` and ``_write``)."""
    parser.add_argument("--model-dir", help=f"also save {what} to this directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --model-dir")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scanpy-scvi", description="Fit scVI / LDVAE on AnnData files.")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit scVI on an h5ad file and write the results into a new h5ad")
    fit.add_argument("input", help="input .h5ad with raw counts (in X or --layer)")
    fit.add_argument("-o", "--output", required=True, help="output .h5ad (obsm['X_scvi'], ...)")
    fit.add_argument("--batch-key", help="obs column of batches")
    fit.add_argument("--labels-key", help="obs column of labels")
    fit.add_argument("--layer", help="layer holding raw counts (default: X)")
    fit.add_argument("--epochs", type=int, default=400, help="training epochs (default 400)")
    fit.add_argument("--n-latent", type=int, default=10, help="latent dimensions (default 10)")
    fit.add_argument(
        "--n-top-genes",
        type=int,
        default=2000,
        help="HVGs to select when var['highly_variable'] is missing (default 2000)",
    )
    fit.add_argument(
        "--strategy",
        choices=("auto", "none", "ddp"),
        default="auto",
        help="ddp: train across the processes of a torchrun launch (auto: when torchrun started several)",
    )
    fit.add_argument("--all-genes", action="store_true", help="train on all genes instead of HVGs")
    fit.add_argument("--linear-decoder", action="store_true", help="fit LDVAE (writes uns['ldvae_loadings'])")
    fit.add_argument("--latent-only", action="store_true", help="skip the dense denoised/sample-rate matrices")
    fit.add_argument(
        "--reference-mapping",
        action="store_true",
        help="train with the scArches recipe (pp.REFERENCE_MAPPING), as a reference for `map`",
    )
    _add_run_arguments(fit, "the trained model")
    fit.set_defaults(func=_fit)

    mapq = sub.add_parser("map", help="map a query h5ad onto a reference model (scArches surgery)")
    mapq.add_argument("input", help="query .h5ad with raw counts (genes matched to the reference by name)")
    mapq.add_argument("-r", "--reference", required=True, help="model directory (fit --model-dir) or .h5ad from fit")
    mapq.add_argument("-o", "--output", required=True, help="output .h5ad (obsm['X_scvi'] or ['X_scanvi'], labels)")
    mapq.add_argument("--batch-key", help="obs column of the query's batches (default: the reference's)")
    mapq.add_argument(
        "--labels-key", help="labels to transfer: a reference .h5ad's obs column (kNN vote), or a scANVI model's"
    )
    mapq.add_argument("--epochs", type=int, default=None, help="query training epochs (default: map_query's)")
    _add_run_arguments(mapq, "the query model")
    mapq.set_defaults(func=_map)

    demo = sub.add_parser("demo", help="run scVI on the bundled CellBench dataset and plot a UMAP")
    demo.add_argument("--outdir", default="scanpy_scvi_demo", help="output folder (default ./scanpy_scvi_demo)")
    demo.add_argument("--epochs", type=int, default=100, help="training epochs (default 100)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, TypeError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"scanpy-scvi: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
