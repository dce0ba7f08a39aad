"""Counts on disk: epochs read in blocks of rows, served by a reader that reads ahead."""

from __future__ import annotations

import threading

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import make_adata

from scanpy_scvi import SCVI
from scanpy_scvi.data import BlockReader, DataSetup, epoch_minibatches, minibatches


def test_block_epoch_covers_every_cell_once_from_few_blocks():
    cells = np.sort(np.random.default_rng(0).choice(10_000, 9_000, replace=False))
    batches = epoch_minibatches(cells, np.random.default_rng(1), 128, blocks=True, block_rows=100, buffer_blocks=4)
    seen = np.concatenate(batches)
    assert np.array_equal(np.sort(seen), cells)
    # the blocks come in a random order, and a minibatch draws from one buffer (two at a seam)
    assert all(len(np.unique(b // 100)) <= 8 for b in batches)
    first_blocks = [b // 100 for b in batches[:3]]
    assert not np.array_equal(
        np.sort(np.unique(np.concatenate(first_blocks))), np.arange(len(np.unique(np.concatenate(first_blocks))))
    )
    # the same rng gives the same epoch; cells differ in order from the full shuffle
    again = epoch_minibatches(cells, np.random.default_rng(1), 128, blocks=True, block_rows=100, buffer_blocks=4)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_weighted_block_epoch_reads_the_drawn_cells_by_blocks():
    """trVAE's balanced sampling on disk: the epoch is the weighted draw (duplicates included,
    zero-weight cells never), read by blocks."""
    cells = np.arange(0, 6_000, 2)
    weights = np.where(cells < 1_000, 5.0, 1.0) * (cells % 10 != 4)  # some cells never drawn
    weights /= weights.sum()
    batches = epoch_minibatches(
        cells, np.random.default_rng(7), 64, blocks=True, block_rows=100, buffer_blocks=4, weights=weights
    )
    seen = np.concatenate(batches)
    drawn = np.random.default_rng(7).choice(cells, size=len(cells), p=weights)
    assert np.array_equal(np.sort(seen), np.sort(drawn))
    assert len(np.unique(seen)) < len(seen) and not np.any(seen % 10 == 4)
    assert all(len(np.unique(b // 100)) <= 8 for b in batches)  # one buffer (two at a seam)
    # in memory the same draw is the epoch, in the order drawn (as before)
    memory = epoch_minibatches(cells, np.random.default_rng(7), 64, weights=weights)
    assert np.array_equal(np.concatenate(memory), drawn)


def test_block_epoch_deals_blocks_to_ranks_with_equal_steps():
    cells = np.arange(5_000)
    parts = [
        epoch_minibatches(cells, np.random.default_rng(3), 64, blocks=True, rank=r, world_size=3, block_rows=100)
        for r in range(3)
    ]
    assert len({len(p) for p in parts}) == 1  # the same number of steps on every rank
    blocks = [set(np.unique(np.concatenate(p) // 100).tolist()) for p in parts]
    assert not (blocks[0] & blocks[1]) and not (blocks[1] & blocks[2]) and not (blocks[0] & blocks[2])
    assert np.array_equal(np.sort(np.concatenate([np.concatenate(p) for p in parts])), cells)
    assert all(len(b) >= 3 for p in parts for b in p)


def test_full_shuffle_epoch_is_the_permutation_the_loop_always_drew():
    cells = np.arange(1_000)
    batches = epoch_minibatches(cells, np.random.default_rng(5), 128)
    want = minibatches(np.random.default_rng(5).permutation(cells), 128)
    assert all(np.array_equal(a, b) for a, b in zip(batches, want, strict=True))


def test_reader_gives_the_in_memory_tensors(tmp_path):
    adata = make_adata(n_obs=500, n_vars=40, random_state=2)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    setup = DataSetup.from_adata(adata[:, 5:35].copy(), batch_key="batch", labels_key="labels")
    memory, disk = setup.bind(adata).source, setup.bind(backed).source
    assert disk.backed and not memory.backed
    batches = epoch_minibatches(
        np.arange(500), np.random.default_rng(0), 37, blocks=True, block_rows=64, buffer_blocks=2
    )
    before = threading.active_count()
    for rows, got in zip(batches, BlockReader(disk, block_rows=64, ahead=3).stream(batches, nonzero=True), strict=True):
        want = memory.get(rows, nonzero=True)
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert threading.active_count() == before  # the read-ahead thread has ended
    backed.file.close()


def test_reader_error_reaches_the_training_loop(tmp_path):
    adata = make_adata(n_obs=200, n_vars=20)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    source = DataSetup.from_adata(adata).bind(backed).source
    source.gene_idx = np.array([0, 99])  # a column the file does not have
    with pytest.raises(IndexError):
        list(BlockReader(source, block_rows=50).stream([np.arange(10)]))
    backed.file.close()


def test_training_on_a_backed_file_reads_blocks_and_learns(tmp_path):
    adata = make_adata(n_obs=400, n_vars=30, random_state=4)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    model = SCVI(backed, batch_key="batch", n_hidden=16, n_latent=3)
    model.train(max_epochs=8, batch_size=64, progress_bar=False)
    elbo = model.history_["elbo_train"]
    assert np.all(np.isfinite(elbo)) and elbo[-1] < elbo[0]
    assert model.get_latent_representation().shape == (400, 3)
    backed.file.close()


def test_trvae_trains_on_a_backed_file_with_balanced_sampling(tmp_path):
    import scanpy_scvi as ss

    adata = make_adata(n_obs=400, n_vars=30, n_batches=3, random_state=4)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    model = ss.pp.trvae(backed, hidden_layer_sizes=(16,), n_latent=3, max_epochs=8, batch_size=64,
                        use_highly_variable_genes=False, return_model=True, progress_bar=False)  # fmt: skip
    assert backed.isbacked and model.train_config["balanced_sampling"]
    elbo = model.history_["elbo_train"]
    assert np.all(np.isfinite(elbo)) and elbo[-1] < elbo[0]
    assert backed.obsm["X_trvae"].shape == (400, 3)
    backed.file.close()


def test_a_zarr_store_trains_as_a_backed_file(tmp_path):
    import zarr

    adata = make_adata(n_obs=300, n_vars=25, random_state=8)
    with pytest.warns(UserWarning, match="zarr"):  # anndata's note on the zarr format version
        adata.write_zarr(tmp_path / "a.zarr")
    store = zarr.open(tmp_path / "a.zarr", mode="r")
    lazy = ad.AnnData(X=ad.io.sparse_dataset(store["X"]), obs=adata.obs, var=adata.var)  # counts stay on disk
    model = SCVI(lazy, batch_key="batch", n_hidden=16, n_latent=3)
    assert model.bind().source.backed
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    in_memory = model.get_latent_representation(adata=adata)
    np.testing.assert_allclose(model.get_latent_representation(), in_memory, rtol=1e-5, atol=1e-6)


def test_several_files_as_one_on_disk_with_genes_matched_by_name(tmp_path):
    first = make_adata(n_obs=200, n_vars=30, random_state=1)
    second = make_adata(n_obs=150, n_vars=30, random_state=2)
    second = second[:, second.var_names[::-1][:25]].copy()  # other order, five genes fewer
    first.write_h5ad(tmp_path / "first.h5ad")
    second.write_h5ad(tmp_path / "second.h5ad")
    ad.experimental.concat_on_disk(
        [tmp_path / "first.h5ad", tmp_path / "second.h5ad"], tmp_path / "both.h5ad", join="inner",
        label="file", keys=["first", "second"], index_unique="-",
    )  # fmt: skip
    both = ad.read_h5ad(tmp_path / "both.h5ad", backed="r")
    assert both.n_obs == 350 and set(both.var_names) == set(second.var_names)
    model = SCVI(both, batch_key="file", n_hidden=16, n_latent=3)
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    z = model.get_latent_representation()
    # the second file's cells read through their own file give the same latent
    z2 = model.get_latent_representation(adata=_with_file(second, "second"))
    np.testing.assert_allclose(z[200:], z2, rtol=1e-5, atol=1e-6)
    both.file.close()


def _with_file(adata, name):
    adata = adata.copy()
    adata.obs["file"] = name
    return adata


def test_pp_scvi_and_de_on_a_backed_file(tmp_path):
    import scanpy_scvi as ss

    adata = make_adata(n_obs=300, n_vars=30, random_state=9)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    model = ss.pp.scvi(backed, batch_key="batch", n_hidden=16, n_latent=3, max_epochs=3, use_highly_variable_genes=False,
                       progress_bar=False)  # fmt: skip
    assert backed.obsm["X_scvi"].shape == (300, 3) and backed.obsm["X_scvi_denoised"].shape == (300, 30)
    de = ss.tl.differential_expression(
        backed, model=model, groupby="labels", n_samples=50, inplace=False, progress_bar=False
    )
    assert len(de) == 3 * 30 and np.isfinite(de["lfc_mean"]).all()  # one-vs-rest for 3 labels, 30 genes
    backed.file.close()
