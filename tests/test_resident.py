"""Counts held on the compute device (the GPU training path), checked on the CPU.

:class:`ResidentSource` must give exactly the tensors the host source gives, for every
layout of the counts the host source reads; the GPU tests check the CUDA path itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import make_adata

from scanpy_scvi.data import DataSetup, MinibatchSource, ResidentSource, resident_source
from scanpy_scvi.train import Sums, Terms


def _bound(adata):
    return DataSetup.from_adata(adata, batch_key="batch", labels_key="labels").bind(adata).source


def _same(host: MinibatchSource, idx: np.ndarray):
    resident = ResidentSource(host, "cpu")
    want = host.get(idx, "cpu", nonzero=True)
    got = resident.get(idx, "cpu", nonzero=True)
    assert set(got) == set(want) | {"nz_index"}  # the host path gives it only for CSR counts
    assert torch.equal(got["X"], want["X"])
    for key in host.obs:
        assert torch.equal(got[key], want[key]), key
    flat = torch.flatten(want["X"]).nonzero().ravel()
    assert torch.equal(got["nz_index"], flat)  # row-major order, exactly the nonzero entries
    return resident


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_resident_gives_the_host_tensors(layout):
    adata = make_adata(n_obs=120, n_vars=40, random_state=3)
    if layout == "csc":
        adata.X = sp.csc_matrix(adata.X)
    elif layout == "dense":
        adata.X = adata.X.toarray()
    host = _bound(adata)
    idx = np.random.default_rng(0).permutation(adata.n_obs)[:50]  # unsorted, as training shuffles
    _same(host, idx)
    _same(host, np.array([7]))  # a single cell


def test_resident_with_subset_and_absent_genes_and_stored_zeros():
    adata = make_adata(n_obs=80, n_vars=30, random_state=4)
    setup = DataSetup.from_adata(adata[:, 5:25].copy(), batch_key="batch")
    setup = dataclasses.replace(setup, max_missing_genes=0.5)
    query = adata[:, 10:].copy()  # model genes 5..9 absent: read as zeros
    X = query.X.tocsr()
    X.data[::7] = 0  # explicit zeros in the structure
    query.X = X
    host = setup.bind(query).source
    assert host.positions is not None and host.gene_idx is not None
    _same(host, np.arange(query.n_obs)[::-1].copy())


def test_resident_only_for_cuda_in_memory_counts():
    adata = make_adata(n_obs=40, n_vars=20)
    host = _bound(adata)
    assert resident_source(host, "cpu") is host  # the host path stays the CPU path


def test_epoch_sums_are_float64_of_the_float32_terms():
    sums = Sums()
    rng = np.random.default_rng(0)
    want = np.zeros(3)
    for n in (5, 3):
        r = torch.tensor(rng.normal(size=n), dtype=torch.float32)
        k = torch.tensor(rng.normal(size=n), dtype=torch.float32)
        loss = (r + k).mean()
        sums.add(Terms(loss=loss, reconstruction=r, kl=k))
        want += [r.sum().item(), k.sum().item(), loss.item() * n]
    assert sums.n == 8
    assert (sums.recon, sums.kl, sums.loss) == tuple(want)  # bit-identical to summing Python floats


def test_training_on_held_counts_is_bit_identical_on_cpu():
    from scanpy_scvi import SCVI

    adata = make_adata(n_obs=150, n_vars=40, random_state=5)
    histories = []
    for on_device in (False, True):
        model = SCVI(adata, batch_key="batch", n_hidden=16, n_latent=3)
        model.train(max_epochs=3, device="cpu", counts_on_device=on_device, progress_bar=False)
        histories.append(model.history_)
        assert model.train_config["counts_on_device"] is on_device
    assert histories[0] == histories[1]
