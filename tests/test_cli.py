"""The scanpy-scvi command line: fit, demo, and errors as exit code 2."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from scanpy_scvi.cli import main
from scanpy_scvi.datasets import synthetic_counts


@pytest.fixture
def counts_h5ad(tmp_path):
    adata = synthetic_counts(n_obs=150, n_vars=60, n_batches=2, random_state=1)
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    return path


def test_fit_writes_outputs_and_model(counts_h5ad, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    model_dir = tmp_path / "model"
    rc = main(
        [
            "fit", str(counts_h5ad), "-o", str(out), "--batch-key", "batch", "--epochs", "2",
            "--n-top-genes", "40", "--model-dir", str(model_dir), "--device", "cpu", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    result = ad.read_h5ad(out)
    assert result.obsm["X_scvi"].shape == (150, 10)
    assert result.obsm["X_scvi_denoised"].shape == (150, 40)
    assert int(result.var["highly_variable"].sum()) == 40
    assert list(result.uns["scvi"]["genes"]) == list(result.var_names[result.var["highly_variable"]])
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "config.json").is_file()
    assert str(out) in capsys.readouterr().out


def test_fit_latent_only_and_all_genes(counts_h5ad, tmp_path):
    out = tmp_path / "out.h5ad"
    rc = main(["fit", str(counts_h5ad), "-o", str(out), "--epochs", "1", "--all-genes", "--latent-only", "--quiet"])
    assert rc == 0
    result = ad.read_h5ad(out)
    assert "X_scvi_denoised" not in result.obsm
    assert len(result.uns["scvi"]["genes"]) == 60


def test_fit_bad_input_is_exit_code_2(counts_h5ad, tmp_path, capsys):
    rc = main(["fit", str(counts_h5ad), "-o", str(tmp_path / "x.h5ad"), "--batch-key", "nope", "--epochs", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'nope' not found in adata.obs" in err
    assert not (tmp_path / "x.h5ad").exists()


def test_fit_rejects_log_data(tmp_path, capsys):
    adata = synthetic_counts(n_obs=100, n_vars=30, random_state=2)
    adata.X = np.log1p(adata.X.toarray())
    path = tmp_path / "log.h5ad"
    adata.write_h5ad(path)
    rc = main(["fit", str(path), "-o", str(tmp_path / "o.h5ad"), "--all-genes", "--epochs", "1"])
    assert rc == 2
    assert "non-integer" in capsys.readouterr().err


def test_demo_writes_h5ad_and_png(tmp_path, capsys):
    rc = main(["demo", "--outdir", str(tmp_path), "--epochs", "1", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    h5ad, png = tmp_path / "demo_scvi.h5ad", tmp_path / "demo_umap_scvi.png"
    assert str(h5ad) in printed and str(png) in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = ad.read_h5ad(h5ad)
    assert result.obsm["X_scvi"].shape == (1408, 10)
    assert "X_umap" in result.obsm


def test_hvg_fallback_without_scikit_misc_keeps_counts(monkeypatch):
    """Without scikit-misc, HVGs come from a log-normalised *copy*; X keeps the raw counts."""
    import scanpy as sc

    from scanpy_scvi.cli import _add_hvgs

    real = sc.pp.highly_variable_genes

    def no_skmisc(adata, **kwargs):
        if kwargs.get("flavor") == "seurat_v3":
            msg = "Please install skmisc"
            raise ImportError(msg)
        return real(adata, **kwargs)

    monkeypatch.setattr(sc.pp, "highly_variable_genes", no_skmisc)
    adata = synthetic_counts(n_obs=120, n_vars=50, random_state=3)
    before = adata.X.copy()
    assert _add_hvgs(adata, n_top_genes=20, layer=None, batch_key="batch") == "seurat"
    assert int(adata.var["highly_variable"].sum()) == 20
    assert (before != adata.X).nnz == 0


def test_unreadable_input_is_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "not.h5ad"
    bad.write_bytes(b"not an hdf5 file")
    assert main(["fit", str(bad), "-o", str(tmp_path / "o.h5ad")]) == 2
    assert "scanpy-scvi: error:" in capsys.readouterr().err


def test_map_query_onto_fitted_reference(tmp_path, capsys):
    """fit a reference (model dir and h5ad), then map a query with a new batch onto either."""
    full = synthetic_counts(n_obs=240, n_vars=60, n_batches=3, random_state=2)
    last = full.obs["batch"].cat.categories[-1]
    ref_path, query_path = tmp_path / "ref.h5ad", tmp_path / "query.h5ad"
    full[full.obs["batch"] != last].copy().write_h5ad(ref_path)
    query = full[full.obs["batch"] == last].copy()
    query.obs = query.obs[["batch"]]  # the query has no labels
    query.write_h5ad(query_path)
    fitted, model_dir = tmp_path / "ref_fit.h5ad", tmp_path / "ref_model"
    common = ["--device", "cpu", "--quiet"]
    assert main(["fit", str(ref_path), "-o", str(fitted), "--batch-key", "batch", "--epochs", "3",
                 "--all-genes", "--reference-mapping", "--model-dir", str(model_dir), *common]) == 0  # fmt: skip

    out = tmp_path / "mapped.h5ad"
    assert main(["map", str(query_path), "-r", str(model_dir), "-o", str(out), "--epochs", "2", *common]) == 0
    mapped = ad.read_h5ad(out)
    assert mapped.obsm["X_scvi"].shape == (query.n_obs, 10)
    assert np.isfinite(mapped.obsm["X_scvi"]).all()

    labelled = tmp_path / "labelled.h5ad"
    rc = main(["map", str(query_path), "-r", str(fitted), "-o", str(labelled), "--labels-key", "labels",
               "--epochs", "2", "--model-dir", str(tmp_path / "query_model"), *common])  # fmt: skip
    assert rc == 0
    pred = ad.read_h5ad(labelled).obs["labels_pred"]
    assert set(pred.astype(str)) <= set(full.obs["labels"].astype(str))
    assert (tmp_path / "query_model").is_dir()

    assert main(["map", str(query_path), "-r", str(tmp_path / "nowhere"), "-o", str(out), *common]) == 2
    assert "not found" in capsys.readouterr().err
