"""CITE-seq in a MuData: ``data.anndata_from_mudata`` and ``pp.totalvi(mdata)``, against
``pp.totalvi`` on the equivalent single AnnData (synthetic data, and the real CITE-seq set)."""

from __future__ import annotations

import ast
import re
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import assert_unchanged, make_adata, snapshot

import scanpy_scvi as ss
from scanpy_scvi.data import anndata_from_mudata

md = pytest.importorskip("mudata")
ad = pytest.importorskip("anndata")

TINY = {"n_hidden": 16, "n_latent": 4, "progress_bar": False, "device": "cpu", "max_epochs": 3}
FIT = {"batch_key": "batch", "use_highly_variable_genes": False, **TINY}
TRAINED = {**FIT, "max_epochs": 30}  # enough steps for the DE of a 5-fold protein change
OUTPUTS = ("X_totalvi", "X_totalvi_denoised_rna", "X_totalvi_denoised_protein", "X_totalvi_protein_foreground")


def _mudata(mods: dict, obs: pd.DataFrame | None = None):
    """A MuData as mudata >= 0.4 builds it (no modality columns pulled into the global obs)."""
    with md.set_options(pull_on_update=False):
        mdata = md.MuData(mods)
    if obs is not None:
        for column in obs.columns:
            mdata.obs[column] = obs.loc[mdata.obs_names, column]
    return mdata


def _cite_pair(n_obs: int = 240, n_proteins: int = 6, seed: int = 0):
    """Synthetic CITE-seq as one AnnData (proteins in obsm) and as the equivalent MuData, whose
    protein modality holds the cells in another order (rows are matched by name)."""
    adata = make_adata(n_obs=n_obs, n_vars=60, random_state=seed)
    rng = np.random.default_rng(seed)
    rates = rng.gamma(2.0, 10.0, n_proteins) * (1 + 4 * (adata.obs["labels"].cat.codes.to_numpy()[:, None] == 0))
    names = [f"CD{i}_TotalSeqB" for i in range(n_proteins)]
    Y = rng.poisson(rates).astype(np.float32)
    adata.obsm["protein_expression"] = pd.DataFrame(Y, index=adata.obs_names, columns=names)
    rna = ad.AnnData(adata.X, obs=adata.obs[["batch"]].copy(), var=adata.var.copy())
    order = rng.permutation(adata.n_obs)
    prot = ad.AnnData(Y[order], obs=pd.DataFrame(index=adata.obs_names[order]), var=pd.DataFrame(index=names))
    mdata = _mudata({"rna": rna, "prot": prot}, obs=adata.obs[["labels"]])
    assert mdata.obs_names.equals(adata.obs_names)
    return adata, mdata


def _mudata_snapshot(mdata) -> dict:
    return {
        "obs": mdata.obs.copy(deep=True),
        "obsm": sorted(mdata.obsm.keys()),
        "uns": sorted(mdata.uns.keys()),
        "mods": {k: snapshot(v) for k, v in mdata.mod.items()},
    }


def _assert_mudata_unchanged(mdata, snap: dict) -> None:
    pd.testing.assert_frame_equal(mdata.obs, snap["obs"])
    assert sorted(mdata.obsm.keys()) == snap["obsm"] and sorted(mdata.uns.keys()) == snap["uns"]
    assert sorted(mdata.mod) == sorted(snap["mods"])
    for k, s in snap["mods"].items():
        assert_unchanged(mdata.mod[k], s)


# -- the conversion ----------------------------------------------------------------------------------
def test_anndata_from_mudata_holds_the_counts_without_copies():
    adata, mdata = _cite_pair()
    converted = anndata_from_mudata(mdata)
    assert converted.obs_names.equals(mdata.obs_names) and converted.var_names.equals(mdata["rna"].var_names)
    assert converted.X is mdata["rna"].X  # RNA rows in the MuData's order: the matrix itself
    proteins = converted.obsm["protein_expression"]
    assert list(proteins.columns) == list(mdata["prot"].var_names)
    pd.testing.assert_frame_equal(proteins, adata.obsm["protein_expression"])  # realigned by obs_names
    assert list(converted.obs.columns) == ["labels", "batch"]  # the global columns, then the RNA modality's
    assert converted.obs["labels"].equals(adata.obs["labels"]) and converted.obs["batch"].equals(adata.obs["batch"])
    # the protein modality in the MuData's row order: its dense array is shared, not copied
    in_order = _mudata({"rna": mdata["rna"], "prot": mdata["prot"][mdata.obs_names].copy()})
    shared = anndata_from_mudata(in_order).obsm["protein_expression"]
    assert np.shares_memory(shared.to_numpy(), in_order["prot"].X)
    mdata.uns["note"] = {"a": 1}
    again = anndata_from_mudata(mdata)
    assert again.uns["note"] is mdata.uns["note"] and again.uns is not mdata.uns  # a shallow copy


def test_layers_and_named_modalities():
    adata, mdata = _cite_pair()
    rna, prot = mdata["rna"], mdata["prot"]
    gex = ad.AnnData(np.log1p(rna.X.toarray()), obs=rna.obs, var=rna.var, layers={"counts": rna.X})
    adt = ad.AnnData(np.log1p(prot.X), obs=prot.obs, var=prot.var, layers={"raw": prot.X})
    other = _mudata({"GEX": gex, "antibodies": adt})  # 'GEX' is found, 'antibodies' must be named
    with pytest.raises(ValueError, match=r"no protein modality among \['GEX', 'antibodies'\]"):
        anndata_from_mudata(other)
    converted = anndata_from_mudata(other, modalities={"protein_layer": "antibodies"}, rna_layer="counts",
                                    protein_layer="raw")  # fmt: skip
    assert converted.X is gex.layers["counts"]
    pd.testing.assert_frame_equal(converted.obsm["protein_expression"], adata.obsm["protein_expression"])
    with pytest.raises(KeyError, match=r"rna_layer='count' not found in mdata\['GEX'\]\.layers"):
        anndata_from_mudata(other, modalities={"rna_layer": "GEX", "protein_layer": "antibodies"}, rna_layer="count")


def test_obs_name_clashes_resolve_as_scvi_tools_reads_obs_keys():
    _, mdata = _cite_pair()
    rna_batch = mdata["rna"].obs["batch"].astype(str)
    mdata.obs["batch"] = np.where(np.arange(mdata.n_obs) < 100, "early", "late")
    with pytest.warns(UserWarning, match=r"'batch' \(mdata\['rna'\]\.obs and mdata\.obs\)"):
        by_default = anndata_from_mudata(mdata)
    assert list(by_default.obs["batch"]) == list(mdata.obs["batch"])  # no obs modality named: the global obs
    with pytest.warns(UserWarning, match="'batch'"):
        from_rna = anndata_from_mudata(mdata, modalities={"batch_key": "rna"})
    assert list(from_rna.obs["batch"].astype(str)) == list(rna_batch)
    mdata.obs["batch"] = mdata["rna"].obs["batch"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal values are no clash
        anndata_from_mudata(mdata)
    with pytest.raises(ValueError, match="several modalities"):
        anndata_from_mudata(mdata, modalities={"batch_key": "rna", "labels_key": "prot"})


def test_modalities_are_detected_or_a_clear_error():
    _, mdata = _cite_pair()
    rna, prot = mdata["rna"], mdata["prot"]
    with pytest.raises(ValueError, match=r"no protein modality among \['rna'\]"):
        anndata_from_mudata(_mudata({"rna": rna}))
    with pytest.raises(ValueError, match="several protein modalities"):
        anndata_from_mudata(_mudata({"rna": rna, "prot": prot, "adt": prot.copy()}))
    picked = anndata_from_mudata(_mudata({"rna": rna, "prot": prot, "adt": prot.copy()}),
                                 modalities={"protein_layer": "adt"})  # fmt: skip
    assert list(picked.obsm["protein_expression"].columns) == list(prot.var_names)
    with pytest.raises(ValueError, match=r"modalities\['protein_layer'\]='ab' is not a modality"):
        anndata_from_mudata(mdata, modalities={"protein_layer": "ab"})
    three = _mudata({"rna": rna, "prot": prot, "atac": rna.copy()})
    with pytest.raises(ValueError, match=r"reads obs keys from modality 'atac'"):
        anndata_from_mudata(three, modalities={"batch_key": "atac"})
    with pytest.raises(ValueError, match=r"Unknown modalities keys \['protein'\]"):
        anndata_from_mudata(mdata, modalities={"protein": "prot"})
    with pytest.raises(TypeError, match=r"Expected a mudata\.MuData"):
        anndata_from_mudata(rna)


def test_unpaired_cells_are_an_error_that_says_how_to_keep_the_paired_ones():
    _, mdata = _cite_pair()
    unpaired = _mudata({"rna": mdata["rna"], "prot": mdata["prot"][10:].copy()})
    with pytest.raises(ValueError, match=r"10 cells of mdata are not in modality 'prot'") as e:
        anndata_from_mudata(unpaired)
    keep = re.search(r"`(mdata = .*?)`", str(e.value)).group(1)
    namespace = {"mdata": unpaired}
    exec(keep, namespace)  # the advice works
    assert anndata_from_mudata(namespace["mdata"]).n_obs == mdata.n_obs - 10


def _import_time_imports(tree: ast.AST) -> list[str]:
    """Modules a module imports when it is imported: not in functions, not under TYPE_CHECKING."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found += [n for child in node.orelse for n in _import_time_imports(ast.Module([child], []))]
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append(node.module or "")
        else:
            found += _import_time_imports(node)
    return found


def test_mudata_is_optional(monkeypatch):
    package = Path(ss.__file__).parent
    eager = [str(p.relative_to(package)) for p in package.rglob("*.py")
             if any(m.split(".")[0] == "mudata" for m in _import_time_imports(ast.parse(p.read_text())))]  # fmt: skip
    assert not eager, f"import scanpy_scvi would import mudata: {eager}"
    assert "mudata" in _import_time_imports(ast.parse("import numpy\nif x:\n    from mudata import MuData"))
    _, mdata = _cite_pair(n_obs=40)
    monkeypatch.setitem(sys.modules, "mudata", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install scanpy-scvi\[mudata\]"):
        anndata_from_mudata(mdata)
    with pytest.raises(ImportError, match=r"pip install scanpy-scvi\[mudata\]"):
        ss.pp.totalvi(mdata, **FIT)


# -- pp.totalvi on a MuData ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_pair():
    """pp.totalvi on the AnnData and on the equivalent MuData, same seed (read-only)."""
    adata, mdata = _cite_pair()
    model = ss.pp.totalvi(adata, return_model=True, **TRAINED)
    mdata_model = ss.pp.totalvi(mdata, return_model=True, **TRAINED)
    return adata, model, mdata, mdata_model


def test_mudata_fit_is_the_anndata_fit_and_lands_where_scverse_looks(fitted_pair):
    adata, _, mdata, model = fitted_pair
    prot, rna = mdata["prot"], mdata["rna"]
    latent = mdata.obsm["X_totalvi"]
    assert latent.dtype == np.float32 and np.array_equal(latent, adata.obsm["X_totalvi"])  # bit for bit
    assert np.array_equal(rna.obsm["X_totalvi_denoised_rna"], adata.obsm["X_totalvi_denoised_rna"])
    for key in ("X_totalvi_denoised_protein", "X_totalvi_protein_foreground"):  # the protein modality's rows
        expected = adata.obsm[key].loc[prot.obs_names, list(prot.var_names)].to_numpy()
        assert prot.layers[key].dtype == np.float32 and np.array_equal(prot.layers[key], expected)
    assert not any(k in prot.obsm or k in rna.layers for k in OUTPUTS)
    record, reference = mdata.uns["totalvi"], adata.uns["totalvi"]
    assert list(record["protein_names"]) == list(prot.var_names) and list(record["genes"]) == list(rna.var_names)
    np.testing.assert_array_equal(record["history"]["elbo_train"], reference["history"]["elbo_train"])
    assert record["params"]["modalities"] == {"rna_layer": "rna", "protein_layer": "prot"}
    assert {k: v for k, v in record["params"].items() if k != "modalities"} == reference["params"]
    assert model.adata.obsm["protein_expression"].shape == (mdata.n_obs, prot.n_vars)


def test_tl_functions_take_the_converted_anndata(fitted_pair, tmp_path):
    adata, model, mdata, _ = fitted_pair
    options = {"groupby": "labels", "group1": "label_0", "n_samples": 200, "inplace": False, "progress_bar": False}
    de = ss.tl.differential_expression(anndata_from_mudata(mdata), model_key="totalvi", **options)
    expected = ss.tl.differential_expression(adata, model=model, **options)
    pd.testing.assert_frame_equal(de, expected)
    names = list(mdata["prot"].var_names)
    counts = adata.obsm["protein_expression"]
    group = (adata.obs["labels"] == "label_0").to_numpy()
    np.testing.assert_allclose(de.loc[names, "raw_mean1"], counts[group].mean(), rtol=1e-5)
    np.testing.assert_allclose(de.loc[names, "raw_mean2"], counts[~group].mean(), rtol=1e-5)
    assert de.loc[names, "lfc_mean"].min() > 0  # label_0 has 5 times the protein rate of the other cells
    mdata.write_h5mu(tmp_path / "cite.h5mu")  # the model travels in mdata.uns
    again = ss.TOTALVI.from_anndata(anndata_from_mudata(md.read_h5mu(tmp_path / "cite.h5mu")), device="cpu")
    np.testing.assert_array_equal(again.get_latent_representation(), mdata.obsm["X_totalvi"])


def test_copy_returns_a_mudata_and_layers_are_read():
    adata, mdata = _cite_pair()
    rna = mdata["rna"]
    rna.layers["counts"] = rna.X
    rna.X = sp.csr_matrix(np.log1p(rna.X.toarray()))  # normalised X, raw counts in a layer
    snap = _mudata_snapshot(mdata)
    copy, model = ss.pp.totalvi(mdata, layer="counts", copy=True, return_model=True, **FIT)
    _assert_mudata_unchanged(mdata, snap)
    ss.pp.totalvi(adata, **FIT)
    assert isinstance(copy, md.MuData) and np.array_equal(copy.obsm["X_totalvi"], adata.obsm["X_totalvi"])
    assert model.adata.X is copy["rna"].layers["counts"]  # the model's data is the copy's
    assert copy.uns["totalvi"]["params"]["layer"] == "counts"
    with pytest.raises(ValueError, match="non-integer") as e:
        ss.pp.totalvi(mdata, **FIT)  # X is normalised
    assert "anndata_from_mudata" in "".join(e.value.__notes__)
    _assert_mudata_unchanged(mdata, snap)


def _negative_proteins(mdata):
    mdata["prot"].X = -mdata["prot"].X


def _fractional_rna(mdata):
    mdata["rna"].X = mdata["rna"].X * 0.5


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "match"),
    [
        (_negative_proteins, {}, ValueError, r"adata\.obsm\['protein_expression'\] contains negative"),
        (_fractional_rna, {}, ValueError, "non-integer"),
        (None, {"protein_layer": "raw"}, KeyError, r"protein_layer='raw' not found in mdata\['prot'\]"),
        (None, {"modalities": {"rna_layer": "gex"}}, ValueError, r"modalities\['rna_layer'\]='gex' is not"),
        (None, {"protein_expression_obsm_key": "adt"}, TypeError, "apply to an AnnData"),
        (None, {"batch_key": "sample"}, KeyError, "sample"),
    ],
    ids=["negative-proteins", "non-integer-rna", "missing-layer", "missing-modality", "obsm-key", "missing-obs"],
)
def test_bad_mudata_input_raises_and_leaves_it_unchanged(change, kwargs, error, match):
    _, mdata = _cite_pair(n_obs=60)
    if change is not None:
        change(mdata)
    snap = _mudata_snapshot(mdata)
    with pytest.raises(error, match=match):
        ss.pp.totalvi(mdata, **{**FIT, **kwargs})
    _assert_mudata_unchanged(mdata, snap)


def test_mudata_arguments_on_an_anndata_and_other_objects_are_errors():
    adata, _ = _cite_pair(n_obs=60)
    snap = snapshot(adata)
    with pytest.raises(TypeError, match="protein_layer and modalities apply to a MuData"):
        ss.pp.totalvi(adata, protein_layer="raw", **FIT)
    assert_unchanged(adata, snap)
    with pytest.raises(TypeError, match=r"takes an AnnData or a mudata\.MuData, got DataFrame"):
        ss.pp.totalvi(adata.obsm["protein_expression"], **FIT)


# -- the real CITE-seq set and the documented example -------------------------------------------------
CITE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc10k_5k_cite_2batch_10849cells_4000genes_9prot.h5ad"
)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "citeseq.rst"
DOCS_SMALL = {"max_epochs": 12, "batch_size": 32, "n_hidden": 32, "device": "cpu", "progress_bar": False}


@pytest.fixture(scope="module")
def cite():
    """200 cells x 200 genes x 9 proteins of the 10x PBMC CITE-seq set (see test_totalvi)."""
    from test_totalvi import _cite

    if not CITE.is_file():
        pytest.skip(f"real data not found at {CITE}")
    return _cite(n_per_batch=100, n_genes=200, seed=1)


def _docs_example() -> str:
    """The code block of the docs section 'CITE-seq in a MuData'."""
    text = DOCS.read_text(encoding="utf-8")
    heading = re.search(r"^CITE-seq in a MuData\n-+\n", text, flags=re.MULTILINE)
    assert heading, "docs/citeseq.rst has no section 'CITE-seq in a MuData'"
    block = re.compile(r"^\.\. code-block:: python\n\n(.*?)(?=^\S)", flags=re.MULTILINE | re.DOTALL)
    return textwrap.dedent(block.search(text, heading.end()).group(1))


def test_docs_example_runs_and_matches_the_anndata_fit(cite):
    code = _docs_example()
    small = {
        r'ad\.read_h5ad\("pbmc10k_5k_cite_2batch_10849cells_4000genes_9prot\.h5ad"\)': "small_cite.copy()",
        r"use_highly_variable_genes=False\)": "use_highly_variable_genes=False, **SMALL)",
        r'model_key="totalvi"': 'model_key="totalvi", n_samples=200, progress_bar=False',
    }
    for pattern, replacement in small.items():
        code, n = re.subn(pattern, replacement, code)
        assert n, f"{pattern} not found in the docs example"
    namespace = {"small_cite": cite, "SMALL": DOCS_SMALL}
    exec(compile(code, str(DOCS), "exec"), namespace)
    mdata, de = namespace["mdata"], namespace["de"]
    adata = cite.copy()
    ss.pp.totalvi(adata, batch_key="batch", use_highly_variable_genes=False, **DOCS_SMALL)
    assert np.array_equal(mdata.obsm["X_totalvi"], adata.obsm["X_totalvi"])
    prot = mdata["prot"]
    expected = adata.obsm["X_totalvi_protein_foreground"].loc[prot.obs_names, list(prot.var_names)].to_numpy()
    assert np.array_equal(prot.layers["X_totalvi_protein_foreground"], expected)
    cd19 = next(p for p in prot.var_names if p.startswith("CD19"))
    assert de.loc[cd19, "lfc_mean"] > 1  # CD19 up in B cells, already after a few epochs
