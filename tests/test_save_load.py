"""Saving and loading: exact round trips, gene matching, atomic writes, corrupt files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from conftest import N_OBS, assert_unchanged, snapshot

from scanpy_scvi import SCVI


@pytest.fixture(scope="module")
def saved(trained_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "scvi_model"
    trained_model.save(path)
    return path


def _state_equal(a: SCVI, b: SCVI) -> bool:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_dir_is_json_and_safetensors_only(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["format"] == "scanpy-scvi-model" and config["model_class"] == "SCVI"
    assert config["setup"]["batch_categories"] == ["batch_0", "batch_1"]
    assert config["architecture"]["dispersion"] == "gene-batch"
    assert len(config["history"]["elbo_train"]) == 15
    # the weights file is plain safetensors: no pickle opcodes, loadable without our code
    raw = (saved / "model.safetensors").read_bytes()
    assert not raw.startswith(b"\x80")  # pickle protocol marker
    tensors = safetensors.torch.load_file(saved / "model.safetensors")
    assert "log_theta" in tensors


def test_round_trip_is_exact(trained_model, saved, base_adata):
    loaded = SCVI.load(saved, adata=base_adata.copy())
    assert _state_equal(trained_model, loaded)
    assert loaded.is_trained and loaded.device.type == "cpu" and not loaded.module.training
    assert loaded.history_ == trained_model.history_
    assert loaded.train_config["max_epochs"] == trained_model.train_config["max_epochs"]
    assert loaded.setup == trained_model.setup and loaded.architecture == trained_model.architecture
    assert np.array_equal(loaded.get_latent_representation(), trained_model.get_latent_representation())
    torch.manual_seed(11)
    a = trained_model.get_normalized_expression(transform_batch="batch_1", return_numpy=True)
    torch.manual_seed(11)
    b = loaded.get_normalized_expression(transform_batch="batch_1", return_numpy=True)
    assert np.array_equal(a, b)
    torch.manual_seed(12)
    elbo_a = trained_model.get_elbo()
    torch.manual_seed(12)
    assert loaded.get_elbo() == elbo_a


def test_load_without_adata(saved, base_adata):
    loaded = SCVI.load(saved)
    assert loaded.adata is None
    with pytest.raises(ValueError, match="adata="):
        loaded.get_latent_representation()
    z = loaded.get_latent_representation(adata=base_adata)
    assert z.shape == (N_OBS, 5)


def test_load_with_reordered_and_extra_genes(trained_model, saved, base_adata):
    reference = trained_model.get_latent_representation()
    shuffled = base_adata[:, np.random.default_rng(0).permutation(base_adata.n_vars)].copy()
    loaded = SCVI.load(saved, adata=shuffled)
    assert np.array_equal(loaded.get_latent_representation(), reference)

    # a superset: extra genes (with counts) in the middle are ignored
    import anndata as ad
    import scipy.sparse as sp

    extra = ad.AnnData(
        X=sp.csr_matrix(np.random.default_rng(1).poisson(3.0, (N_OBS, 7)).astype(np.float32)),
        obs=pd.DataFrame(index=base_adata.obs_names),
        var=pd.DataFrame(index=[f"extra_{i}" for i in range(7)]),
    )
    superset = ad.concat([extra, base_adata], axis=1, merge="first")
    superset.obs = base_adata.obs.copy()
    assert superset.n_vars == base_adata.n_vars + 7
    snap = snapshot(superset)
    loaded = SCVI.load(saved, adata=superset)
    assert np.array_equal(loaded.get_latent_representation(), reference)
    np.testing.assert_allclose(loaded.get_latent_library_size(), trained_model.get_latent_library_size())
    assert list(loaded.get_normalized_expression().columns) == list(base_adata.var_names)
    assert_unchanged(superset, snap)


def test_load_with_missing_genes_raises(saved, base_adata):
    missing = base_adata[:, 3:].copy()
    with pytest.raises(ValueError, match="3 of the model's 80 genes are missing"):
        SCVI.load(saved, adata=missing)


def test_load_with_unknown_batch_raises(saved, base_adata):
    query = base_adata.copy()
    query.obs["batch"] = query.obs["batch"].cat.add_categories("batch_new")
    query.obs.iloc[:4, query.obs.columns.get_loc("batch")] = "batch_new"
    with pytest.raises(ValueError, match="batch_new"):
        SCVI.load(saved, adata=query)
    no_column = base_adata.copy()
    del no_column.obs["batch"]
    with pytest.raises(KeyError, match="batch"):
        SCVI.load(saved, adata=no_column)


def test_save_refuses_non_empty_dir_without_overwrite(trained_model, tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="overwrite"):
        trained_model.save(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    # an existing empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    trained_model.save(empty)
    assert (empty / "model.safetensors").is_file()
    # a file in the way is refused
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError):
        trained_model.save(tmp_path / "afile", overwrite=True)


def test_overwrite_replaces_previous_save(trained_model, base_adata, tmp_path):
    target = tmp_path / "m"
    other = SCVI(base_adata, batch_key="batch", n_hidden=16, n_latent=3, random_state=5)
    other.save(target)
    assert json.loads((target / "config.json").read_text())["is_trained"] is False
    (target / "stale.txt").write_text("old")
    trained_model.save(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    loaded = SCVI.load(target)
    assert _state_equal(loaded, trained_model) and loaded.is_trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or backup dirs left


@pytest.mark.parametrize("fail_in", ["save_file", "json_dump"])
def test_crash_mid_save_keeps_previous_save(trained_model, base_adata, tmp_path, monkeypatch, fail_in):
    target = tmp_path / "m"
    first = SCVI(base_adata, batch_key="batch", n_hidden=16, n_latent=3, random_state=5)
    first.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    calls = []
    if fail_in == "save_file":
        real = safetensors.torch.save_file

        def crash(tensors, filename, metadata=None):
            calls.append(filename)
            real(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # half-written file
            msg = "disk full"
            raise OSError(msg)

        # _io imports save_file from safetensors.torch at call time
        monkeypatch.setattr(safetensors.torch, "save_file", crash)
    else:
        import scanpy_scvi.model._io as io_mod

        def crash(*args, **kwargs):
            calls.append(1)
            msg = "disk full"
            raise OSError(msg)

        monkeypatch.setattr(io_mod.json, "dump", crash)

    with pytest.raises(OSError, match="disk full"):
        trained_model.save(target, overwrite=True)
    assert calls, "the patched writer was not used"
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # temp dir cleaned up
    loaded = SCVI.load(target, adata=base_adata)
    assert _state_equal(loaded, first) and not loaded.is_trained

    # and a crash on a first save leaves nothing behind
    with pytest.raises(OSError):
        trained_model.save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xfe\x00garbage\x9c", b"{not json", b"[1, 2, 3]", b'{"format": "something-else"}', b""],
    ids=["binary", "truncated-json", "list", "wrong-format", "empty"],
)
def test_corrupt_config_raises_value_error(saved, tmp_path, garbage):
    d = _copy_dir(saved, tmp_path / "m")
    (d / "config.json").write_bytes(garbage)
    with pytest.raises(ValueError, match=r"config\.json"):
        SCVI.load(d)


def test_inconsistent_config_raises_value_error(saved, tmp_path):
    d = _copy_dir(saved, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["architecture"]["n_latent"] = 7  # weights no longer fit
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="corrupt"):
        SCVI.load(d)
    del config["setup"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json"):
        SCVI.load(d)
    config = json.loads((saved / "config.json").read_text())
    config["format_version"] = 99
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="newer"):
        SCVI.load(d)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "missing"])
def test_corrupt_weights_raise_value_error(saved, tmp_path, how):
    d = _copy_dir(saved, tmp_path / "m")
    weights = d / "model.safetensors"
    raw = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        weights.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "empty":
        weights.write_bytes(b"")
    else:
        weights.unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        SCVI.load(d)


def test_weights_of_another_model_raise(saved, base_adata, tmp_path):
    d = _copy_dir(saved, tmp_path / "m")
    small = SCVI(base_adata, n_hidden=8, n_latent=2)
    state = {k: v.contiguous() for k, v in small.module.state_dict().items()}
    safetensors.torch.save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match="do not match"):
        SCVI.load(d)


def test_files_of_version_0_1_with_module_kwargs_still_load(saved, tmp_path, trained_model):
    """Models saved before the architecture was declared once stored it as ``module_kwargs``."""
    d = _copy_dir(saved, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["module_kwargs"] = config.pop("architecture")
    (d / "config.json").write_text(json.dumps(config))
    loaded = SCVI.load(d, device="cpu")
    assert loaded.architecture == trained_model.architecture
    config["module_kwargs"]["a_future_setting"] = 1
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="a_future_setting"):
        SCVI.load(d)
