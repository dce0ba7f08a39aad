"""Training across processes (strategy='ddp', torchrun with gloo on the CPU) against one process.

Two ranks with 64 cells each per step must train like one process with 128: the same
held-out ELBO (within 0.5 %), identical weights on both ranks after every step, and outputs
of the saved model identical to those of a single-process inference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from scanpy_scvi import SCVI
from scanpy_scvi.datasets import cellbench_lung

WORKER = Path(__file__).with_name("ddp_worker.py")
FAMILY_WORKER = Path(__file__).with_name("ddp_family_worker.py")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _run(args: list[str], tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    adata = cellbench_lung()
    adata = adata[:, :800].copy()
    adata.X = adata.layers["counts"]
    del adata.layers["counts"]
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    adata.obs["heldout"] = np.random.default_rng(0).random(adata.n_obs) < 0.15
    data = tmp / "data.h5ad"
    adata.write_h5ad(data)
    _run([sys.executable, str(WORKER), str(data), str(tmp / "one"), "--batch-size", "128"], tmp)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run([*torchrun, str(WORKER), str(data), str(tmp / "two"), "--batch-size", "64", "--ddp"], tmp)
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    return {
        "data": data,
        "tmp": tmp,
        "one": read(tmp / "one" / "rank0.json"),
        "ranks": [read(tmp / "two" / f"rank{r}.json") for r in (0, 1)],
    }


def test_weights_identical_on_every_rank_after_every_step(runs):
    rank0, rank1 = runs["ranks"]
    assert len(rank0["step_hashes"]) == len(rank1["step_hashes"]) > 0
    assert rank0["step_hashes"] == rank1["step_hashes"]
    assert rank0["final_state"] == rank1["final_state"]  # batch-norm statistics too
    # as many steps as one process with the same total batch
    assert len(rank0["step_hashes"]) == len(runs["one"]["step_hashes"])


def test_history_is_the_same_on_every_rank_and_counts_every_cell(runs):
    rank0, rank1 = runs["ranks"]
    assert rank0["history"] == rank1["history"]
    h1, h2 = runs["one"]["history"], rank0["history"]
    assert set(h1) == set(h2)
    np.testing.assert_allclose(h2["elbo_train"][-1], h1["elbo_train"][-1], rtol=0.01)


def test_two_processes_reach_the_heldout_elbo_of_one(runs):
    one, two = runs["one"]["heldout_elbo"], runs["ranks"][0]["heldout_elbo"]
    assert abs(two - one) / abs(one) < 0.005, (one, two)


def test_saved_model_gives_the_single_process_outputs(runs):
    import anndata as ad

    adata = ad.read_h5ad(runs["data"])
    model = SCVI.load(runs["tmp"] / "two" / "model", adata=adata[~adata.obs["heldout"].to_numpy()].copy())
    assert model.train_config["strategy"] == "ddp" and model.train_config["world_size"] == 2
    latent = model.get_latent_representation(adata=adata)
    np.testing.assert_array_equal(latent, np.load(runs["tmp"] / "two" / "latent.npy"))


def test_ddp_outside_torchrun_is_a_clear_error(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    adata = cellbench_lung()[:200, :100].copy()
    adata.X = adata.layers["counts"]
    model = SCVI(adata, n_hidden=8, n_latent=2)
    with pytest.raises(ValueError, match="torchrun"):
        model.train(max_epochs=1, strategy="ddp", progress_bar=False)
    with pytest.raises(ValueError, match="strategy"):
        model.train(max_epochs=1, strategy="fsdp", progress_bar=False)


def test_cli_fit_under_torchrun_writes_once(runs):
    import anndata as ad

    out = runs["tmp"] / "cli"
    out.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run(
        [*torchrun, "-m", "scanpy_scvi.cli", "fit", str(runs["data"]), "-o", str(out / "fit.h5ad"),
         "--model-dir", str(out / "model"), "--batch-key", "batch", "--epochs", "2", "--all-genes",
         "--latent-only", "--device", "cpu", "--quiet"],
        runs["tmp"],
    )  # fmt: skip
    fitted = ad.read_h5ad(out / "fit.h5ad")
    assert fitted.obsm["X_scvi"].shape == (fitted.n_obs, 10)
    model = SCVI.load(out / "model", adata=fitted)
    assert model.train_config["strategy"] == "ddp" and model.train_config["world_size"] == 2


def test_ranks_read_their_own_blocks_of_a_backed_file_and_stay_identical(runs):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = runs["tmp"] / "blocks"
    _run([*torchrun, str(WORKER), str(runs["data"]), str(out), "--batch-size", "64", "--ddp", "--blocks",
          "--epochs", "3"], runs["tmp"])  # fmt: skip
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["step_hashes"] == rank1["step_hashes"] and len(rank0["step_hashes"]) > 0
    assert rank0["final_state"] == rank1["final_state"]
    assert rank0["history"] == rank1["history"] and np.all(np.isfinite(rank0["history"]["elbo_train"]))


@pytest.mark.parametrize("model", ["trvae", "scpoli", "expimap"])
def test_the_scarches_family_trains_across_processes_from_disk(model, tmp_path):
    """Two ranks on a backed file (each reads its own blocks; trVAE and expiMap draw balanced,
    weighted epochs; scPoli computes prototypes; expiMap's proximal step) end identical."""
    import scanpy_scvi as ss
    from scanpy_scvi.datasets import synthetic_counts

    adata = synthetic_counts(n_obs=4000, n_vars=40, n_batches=3, n_labels=3, random_state=0)
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    genes = list(adata.var_names)
    ss.tl.add_gene_programs(adata, {"A": genes[:15], "B": genes[15:30]}, min_genes=12)
    adata.write_h5ad(tmp_path / "data.h5ad")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run([*torchrun, str(FAMILY_WORKER), str(tmp_path / "data.h5ad"), str(tmp_path / "out"), model], tmp_path)
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["final_state"] == ranks[1]["final_state"]
    assert ranks[0]["history"] == ranks[1]["history"]
    elbo = ranks[0]["history"]["elbo_train"]
    assert len(elbo) == 4 and np.all(np.isfinite(elbo))
