"""CUDA training and inference (skipped without a GPU). Run with ``pytest -m gpu``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_adata

import scanpy_scvi as ss
from scanpy_scvi import SCVI

pytestmark = [
    pytest.mark.gpu,
    # eager steps after the capture must not reuse autograd nodes made on the capture's stream
    pytest.mark.filterwarnings("error:The AccumulateGrad node's stream:UserWarning"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def gpu_adata():
    return make_adata(n_obs=300, n_vars=60, random_state=7)


def test_train_and_infer_on_cuda(gpu_adata):
    model = SCVI(gpu_adata, batch_key="batch", n_hidden=32, n_latent=4)
    state = torch.cuda.get_rng_state()
    model.train(max_epochs=5, device="cuda", train_size=0.8, progress_bar=False)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert model.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in model.module.parameters())
    assert np.all(np.isfinite(model.history_["elbo_train"]))

    n, g = gpu_adata.shape
    z = model.get_latent_representation()
    assert isinstance(z, np.ndarray) and z.shape == (n, 4) and z.dtype == np.float32
    den = model.get_normalized_expression(return_numpy=True)
    assert den.shape == (n, g)
    np.testing.assert_allclose(den.sum(1), 1.0, rtol=1e-4)
    params = model.get_likelihood_parameters()
    assert set(params) == {"mean", "dispersions", "dropout"} and params["mean"].shape == (n, g)
    x = model.posterior_predictive_sample()
    assert x.shape == (n, g) and np.array_equal(x.data, np.round(x.data))
    assert model.get_elbo() < 0
    assert np.isfinite(model.get_marginal_ll(indices=np.arange(20), n_mc_samples=10))


def test_cuda_matches_cpu_after_move(gpu_adata, tmp_path):
    model = SCVI(gpu_adata, n_hidden=16, n_latent=3)
    model.train(max_epochs=3, device="cuda", progress_bar=False)
    z_gpu = model.get_latent_representation()
    model.save(tmp_path / "m")
    cpu = SCVI.load(tmp_path / "m", adata=gpu_adata, device="cpu")
    assert cpu.device.type == "cpu"
    np.testing.assert_allclose(cpu.get_latent_representation(), z_gpu, rtol=1e-4, atol=1e-5)
    back = SCVI.load(tmp_path / "m", adata=gpu_adata, device="cuda")
    assert back.device.type == "cuda"
    np.testing.assert_allclose(back.get_latent_representation(), z_gpu, rtol=1e-5, atol=1e-6)


def test_pp_scvi_on_cuda(gpu_adata):
    adata = gpu_adata.copy()
    model = ss.pp.scvi(
        adata, n_hidden=16, n_latent=3, max_epochs=3, device="cuda", use_highly_variable_genes=False,
        progress_bar=False,
    )  # fmt: skip
    assert model.device.type == "cuda"
    assert adata.uns["scvi"]["device"].startswith("cuda")
    assert adata.obsm["X_scvi"].shape == (adata.n_obs, 3)
    assert adata.obsm["X_scvi_denoised"].shape == adata.shape
    np.testing.assert_allclose(adata.obsm["X_scvi_sample_rate"].sum(1), np.asarray(adata.X.sum(1)).ravel(), rtol=1e-4)


def _count_replays(monkeypatch) -> list[int]:
    replays = [0]
    replay = torch.cuda.CUDAGraph.replay

    def counted(self):
        replays[0] += 1
        return replay(self)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)
    return replays


def test_counts_held_on_the_gpu_train_like_the_host_path(gpu_adata, monkeypatch):
    replays = _count_replays(monkeypatch)
    histories = {}
    for on_device in (False, None):  # None: held on the GPU (they fit), the step a CUDA graph
        model = SCVI(gpu_adata, batch_key="batch", n_hidden=32, n_latent=4)
        model.train(max_epochs=6, device="cuda", counts_on_device=on_device, progress_bar=False)
        histories[on_device] = model.history_
    # 270 training cells: minibatches of 128, 128 and 14 (eager); 3 eager warm-up steps, then
    # the capture and replays of every full minibatch
    assert replays[0] == 2 * 6 - 3
    for key in ("elbo_train", "elbo_validation"):
        np.testing.assert_allclose(histories[None][key], histories[False][key], rtol=2e-3)


def test_trvae_step_with_its_mmd_is_captured_and_trains_like_the_host_path(gpu_adata, monkeypatch):
    replays = _count_replays(monkeypatch)
    histories = {}
    for on_device in (False, None):  # None: counts on the GPU, the step (MMD included) a CUDA graph
        model = ss.TRVAE(gpu_adata, batch_key="batch", hidden_layer_sizes=(32,), n_latent=4)
        model.train(max_epochs=6, device="cuda", counts_on_device=on_device, progress_bar=False)
        histories[on_device] = model.history_
    assert replays[0] > 0
    for key in ("elbo_train", "elbo_validation", "mmd_train"):
        np.testing.assert_allclose(histories[None][key], histories[False][key], rtol=2e-3, atol=1e-6)
    assert all(isinstance(v, float) for v in histories[None]["mmd_train"])


def test_totalvi_on_cuda_with_and_without_the_captured_step(gpu_adata, monkeypatch):
    adata = gpu_adata.copy()
    rng = np.random.default_rng(0)
    adata.obsm["protein_expression"] = pd.DataFrame(
        rng.poisson(rng.gamma(2.0, 20.0, size=(adata.n_obs, 5))),
        index=adata.obs_names,
        columns=[f"P{i}" for i in range(5)],
    )
    replays = _count_replays(monkeypatch)
    for plateau in (True, False):  # the schedule fills the captured step's learning-rate tensor
        before = replays[0]
        model = ss.TOTALVI(adata, protein_expression_obsm_key="protein_expression", batch_key="batch", n_hidden=32,
                           n_latent=4)  # fmt: skip
        model.train(max_epochs=6, device="cuda", reduce_lr_on_plateau=plateau, progress_bar=False)
        assert replays[0] > before
        assert all(isinstance(v, float) for v in model.history_.get("lr", []))
        assert np.all(np.isfinite(model.history_["elbo_train"]))
        assert model.get_latent_representation().shape == (adata.n_obs, 4)
        fg = model.get_protein_foreground_probability()
        fg = np.asarray(fg)
        assert fg.shape == (adata.n_obs, 5) and np.all((fg >= 0) & (fg <= 1))


def test_captured_step_follows_the_learning_rate_schedule():
    from scanpy_scvi.train import GraphedStep, Objective, Terms

    class Squares(Objective):
        def loss(self, module, batch, kl_weight):
            r = (module(batch["X"]) ** 2).sum(-1)
            return Terms(loss=r.mean(), reconstruction=r, kl=torch.zeros_like(r))

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 2).cuda()
    optimizer = torch.optim.Adam(
        module.parameters(), lr=torch.tensor(0.1, device="cuda"), fused=True, capturable=True
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.0, patience=0)
    step = GraphedStep(module, Squares(), optimizer, batch_size=8)
    batch = {"X": torch.randn(8, 4, device="cuda")}
    for _ in range(6):  # warm-up, capture, replays
        before = module.weight.detach().clone()
        assert step.step(batch, 1.0) is not None
        assert not torch.equal(module.weight, before)
    scheduler.step(1.0)
    scheduler.step(1.0)  # no improvement: the rate becomes 0
    before = module.weight.detach().clone()
    step.step(batch, 1.0)
    assert torch.equal(module.weight, before)
