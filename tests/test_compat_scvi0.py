"""Code written for ``scanpy.external.pp.scvi`` (scvi 0.x) runs here with only the import changed.

The first two tests are scanpy's own tests of that wrapper (scverse/scanpy,
``scanpy/tests/external/test_scvi.py``, 1.5-1.7 era) as they were written, but for the import.
The rest check the 0.x argument names of ``model_kwargs`` / ``trainer_kwargs`` and every method
of the 0.x ``Posterior`` that ``return_posterior=True`` returns, against our own API.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from anndata import AnnData

import scanpy_scvi as sce
import scanpy_scvi as ss
from scanpy_scvi.compat.scvi0 import Posterior, load_posterior

# -- scanpy's tests, verbatim but for the import ------------------------------------------------------


def test_scvi_linear():
    n_samples = 4
    n_genes = 7
    batch1 = np.random.randint(1, 5, size=(n_samples, n_genes))  # noqa: NPY002
    batch2 = np.random.randint(1, 5, size=(n_samples, n_genes))  # noqa: NPY002
    ad1 = AnnData(batch1)
    ad2 = AnnData(batch2)
    adata = ad1.concatenate(ad2, batch_categories=["test1", "test2"])
    n_latent = 30
    gene_subset = ["1", "4", "6"]
    sce.pp.scvi(
        adata,
        use_cuda=False,
        n_epochs=1,
        n_latent=n_latent,
        return_posterior=True,
        batch_key="batch",
        linear_decoder=True,
        subset_genes=gene_subset,
    )

    assert adata.obsm["X_scvi"].shape == (n_samples * 2, n_latent)
    assert adata.obsm["X_scvi_denoised"].shape == (n_samples * 2, len(gene_subset))
    assert adata.obsm["X_scvi_sample_rate"].shape == (n_samples * 2, len(gene_subset))
    assert adata.uns["ldvae_loadings"].shape == (len(gene_subset), n_latent)
    assert len(adata.uns["ldvae_loadings"].index) == len(gene_subset)
    assert set(adata.uns["ldvae_loadings"].index) == set(gene_subset)


def test_scvi():
    n_samples = 4
    n_genes = 7
    batch1 = np.random.randint(1, 5, size=(n_samples, n_genes))  # noqa: NPY002
    batch2 = np.random.randint(1, 5, size=(n_samples, n_genes))  # noqa: NPY002
    ad1 = AnnData(batch1)
    ad2 = AnnData(batch2)
    adata = ad1.concatenate(ad2, batch_categories=["test1", "test2"])
    n_latent = 30
    sce.pp.scvi(
        adata,
        use_cuda=False,
        n_epochs=1,
        n_latent=n_latent,
        return_posterior=True,
        batch_key="batch",
        model_kwargs={"reconstruction_loss": "nb"},
    )
    assert adata.obsm["X_scvi"].shape == (n_samples * 2, n_latent)
    assert adata.obsm["X_scvi_denoised"].shape == adata.shape
    assert adata.obsm["X_scvi_sample_rate"].shape == adata.shape


# -- model_kwargs and trainer_kwargs by their 0.x names ----------------------------------------------------
FAST = {"n_hidden": 16, "n_latent": 4, "n_epochs": 3, "progress_bar": False, "use_highly_variable_genes": False}


def test_vae_names_build_the_same_model_as_ours(adata):
    a, b = adata.copy(), adata.copy()
    old = ss.pp.scvi(a, batch_key="batch", model_kwargs={"reconstruction_loss": "nb", "dropout_rate": 0.2,
                                                         "log_variational": True}, **FAST)  # fmt: skip
    new = ss.pp.scvi(b, batch_key="batch", gene_likelihood="nb", dropout_rate=0.2, **FAST)
    assert old.architecture == new.architecture
    np.testing.assert_array_equal(a.obsm["X_scvi"], b.obsm["X_scvi"])


def test_ldvae_names():
    from scanpy_scvi.compat.scvi0 import architecture_from_vae_kwargs

    got = architecture_from_vae_kwargs({"n_layers_encoder": 2, "use_batch_norm": False, "bias": False},
                                       linear_decoder=True)  # fmt: skip
    assert got == {"n_layers": 2, "use_batch_norm": "encoder"}  # 0.6 LDVAE's encoder was always batch-normalised
    assert architecture_from_vae_kwargs({"use_batch_norm": True}, linear_decoder=False) == {"use_batch_norm": "both"}


@pytest.mark.parametrize(
    ("model_kwargs", "exc", "match"),
    [
        ({"n_batch": 2}, TypeError, "set by the data"),
        ({"log_variational": False}, ValueError, "log\\(1 \\+ counts\\)"),
        ({"bias": True}, ValueError, "no bias"),
        ({"kl_weight": 2}, TypeError, "'kl_weight'"),
        ({"reconstruction_loss": "nb", "gene_likelihood": "zinb"}, ValueError, "twice"),
    ],
)
def test_vae_names_without_meaning_are_errors(adata, model_kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ss.pp.scvi(adata, model_kwargs=model_kwargs, **FAST)
    assert "X_scvi" not in adata.obsm


def test_trainer_names_map_to_our_training(adata):
    model = ss.pp.scvi(
        adata,
        batch_key="batch",
        trainer_kwargs={
            "test_size": 0.2,
            "n_iter_kl_warmup": 7,
            "frequency": 5,
            "data_loader_kwargs": {"batch_size": 64},
            "early_stopping_kwargs": {"early_stopping_metric": "elbo", "save_best_state_metric": "elbo",
                                      "on": "test_set", "patience": 2, "threshold": 0.5},
            "seed": 3,
        },
        **FAST,
    )  # fmt: skip
    c = model.train_config
    assert c["train_size"] == pytest.approx(0.8) and len(model.validation_indices) == 60
    assert c["n_steps_kl_warmup"] == 7 and c["batch_size"] == 64 and c["random_state"] == 3
    assert c["early_stopping"] and c["early_stopping_patience"] == 2 and c["early_stopping_min_delta"] == 0.5
    assert "elbo_validation" in model.history_
    assert adata.uns["scvi"]["params"]["train_size"] == pytest.approx(0.8)


def test_seed_is_random_state(adata):
    a, b = adata.copy(), adata.copy()
    ss.pp.scvi(a, trainer_kwargs={"seed": 5}, **FAST)
    ss.pp.scvi(b, random_state=5, **FAST)
    np.testing.assert_array_equal(a.obsm["X_scvi"], b.obsm["X_scvi"])


@pytest.mark.parametrize(
    ("trainer_kwargs", "extra", "exc", "match"),
    [
        ({"use_cuda_please": True}, {}, TypeError, "'use_cuda_please'"),
        ({"normalize_loss": False}, {}, ValueError, "mean over cells"),
        ({"seed": 1}, {"random_state": 2}, ValueError, "contradicts"),
        ({"train_size": 0.5}, {"train_size": 0.7}, ValueError, "contradicts"),
        ({"metrics_to_monitor": ["ll"]}, {}, ValueError, "metrics_to_monitor"),
        ({"early_stopping_kwargs": {"early_stopping_metric": "ll"}}, {}, ValueError, "only 'elbo'"),
        ({"early_stopping_kwargs": {"early_stopping_metric": "elbo", "on": "test_set"}}, {}, ValueError, "held-out"),
        ({"data_loader_kwargs": {"sampler": None}}, {}, TypeError, "sampler"),
        ({"max_nans": 3}, {}, TypeError, "non-finite"),
    ],
)
def test_trainer_names_without_meaning_are_errors(adata, trainer_kwargs, extra, exc, match):
    with pytest.raises(exc, match=match):
        ss.pp.scvi(adata, trainer_kwargs=trainer_kwargs, **{**FAST, **extra})
    assert "X_scvi" not in adata.obsm


def test_return_model_still_returns_the_model(adata):
    assert isinstance(ss.pp.scvi(adata, return_model=True, **FAST), ss.SCVI)
    assert isinstance(ss.pp.scvi(adata, return_posterior=True, **FAST), Posterior)
    copy, post = ss.pp.scvi(adata, return_posterior=True, copy=True, **FAST)
    assert post.gene_dataset is copy


# -- the Posterior ---------------------------------------------------------------------------------------------
# The public methods and attributes of scvi 0.x's Posterior (its API page's summaries).
POSTERIOR_METHODS = [
    "accuracy", "apply_t_sne", "clustering_scores", "corrupted", "differential_expression_score",
    "differential_expression_stats", "elbo", "entropy_batch_mixing", "generate", "generate_denoised_samples",
    "generate_feature_correlation_matrix", "generate_parameters", "get_bayes_factors", "get_latent",
    "get_sample_scale", "get_stats", "imputation", "imputation_benchmark", "imputation_list", "imputation_score",
    "knn_purity", "marginal_ll", "nn_overlap_score", "one_vs_all_degenes", "raw_data", "reconstruction_error",
    "save_posterior", "scale_sampler", "sequential", "show_t_sne", "to_cuda", "uncorrupted", "update",
    "update_sampler_indices", "within_cluster_degenes",
]  # fmt: skip
POSTERIOR_ATTRIBUTES = ["indices", "nb_cells", "posterior_type"]


def test_every_posterior_method_exists():
    assert len(POSTERIOR_METHODS) == 35
    missing = [m for m in POSTERIOR_METHODS if not callable(getattr(Posterior, m, None))]
    assert missing == []
    assert all(isinstance(getattr(Posterior, a, None), property) for a in POSTERIOR_ATTRIBUTES)


@pytest.fixture(scope="module")
def fitted():
    """The bundled CellBench data (5 cell lines, 5 batches), 200 expressed genes, a Posterior."""
    adata = ss.datasets.cellbench_lung()
    genes = adata.var_names[np.argsort(-np.asarray(adata.layers["counts"].mean(0)).ravel())[:200]]
    post = ss.pp.scvi(adata, layer="counts", batch_key="batch", labels_key="cell_type", subset_genes=list(genes),
                      n_epochs=15, n_hidden=64, progress_bar=False, return_posterior=True)  # fmt: skip
    return adata, post


def _seeded(f, *args, **kwargs):
    torch.manual_seed(0)
    return f(*args, **kwargs)


def test_posterior_over_all_cells(fitted):
    adata, post = fitted
    assert post.nb_cells == adata.n_obs and post.posterior_type == "Posterior"
    np.testing.assert_array_equal(post.indices, np.arange(adata.n_obs))
    latent, batch, labels = post.get_latent()
    np.testing.assert_array_equal(latent, adata.obsm["X_scvi"])
    np.testing.assert_array_equal(batch, adata.obs["batch"].cat.codes.to_numpy())
    np.testing.assert_array_equal(labels, adata.obs["cell_type"].cat.codes.to_numpy())
    assert latent.dtype == np.float32 and batch.dtype == np.int64


def test_fit_scores_are_the_model_s(fitted):
    adata, post = fitted
    model = post.model
    assert _seeded(post.elbo) == _seeded(model.get_elbo, batch_size=post.batch_size)
    assert post.elbo() < 0  # the bound itself; 0.x returned the (positive) loss
    assert _seeded(post.reconstruction_error) == _seeded(model.get_reconstruction_error)["reconstruction_loss"]
    assert _seeded(post.marginal_ll, n_mc_samples=5) == _seeded(model.get_marginal_ll, n_mc_samples=5)
    assert post.entropy_batch_mixing() == model.entropy_batch_mixing()
    assert post.knn_purity() == model.knn_purity()
    s = model.clustering_scores()
    assert post.clustering_scores() == (s["silhouette"], s["nmi"], s["ari"])
    lib = np.asarray(adata.layers["counts"][:, adata.var_names.get_indexer(model.setup.genes)].sum(1)).ravel()
    np.testing.assert_allclose(post.get_stats(), np.log(lib), rtol=1e-6)
    with pytest.raises(ValueError, match="classifier"):
        post.accuracy()


def test_expression_methods(fitted):
    adata, post = fitted
    model = post.model
    scale = _seeded(post.get_sample_scale, library_size=1e4)
    np.testing.assert_array_equal(scale, _seeded(model.get_normalized_expression, library_size=1e4, return_numpy=True))
    np.testing.assert_allclose(scale.sum(1), 1e4, rtol=1e-4)
    # transform_batch by 0.x's integer code is the category with that code
    np.testing.assert_array_equal(
        _seeded(post.get_sample_scale, transform_batch=2),
        _seeded(
            model.get_normalized_expression, transform_batch=adata.obs["batch"].cat.categories[2], return_numpy=True
        ),
    )
    genes = model.setup.genes[:3]
    df = post.get_sample_scale(gene_list=genes)
    assert list(df.columns) == genes  # several genes: a DataFrame, as 0.x
    rate = _seeded(post.imputation)
    np.testing.assert_array_equal(
        rate, _seeded(model.get_normalized_expression, library_size="latent", return_numpy=True)
    )
    x_new, x_old = post.generate(n_samples=3, genes=[0, 1])
    assert x_new.shape == (adata.n_obs, 2, 3) and x_old.shape == (adata.n_obs, 2)
    np.testing.assert_array_equal(x_old.numpy(), post.raw_data()[0][:, :2].toarray())
    dropout, mean, dispersion = post.generate_parameters()
    assert dropout.shape == mean.shape == dispersion.shape == (adata.n_obs, 200)
    assert ((dropout > 0) & (dropout < 1)).all() and (dispersion > 0).all()
    np.testing.assert_array_equal(
        _seeded(post.generate_parameters)[1], _seeded(model.get_likelihood_parameters)["mean"]
    )
    denoised = post.generate_denoised_samples(n_samples=2)
    assert denoised.shape == (adata.n_obs, 200, 2) and (denoised >= 0).all()
    corr = _seeded(post.generate_feature_correlation_matrix, n_samples=2, correlation_type="pearson")
    expected = _seeded(model.get_feature_correlation_matrix, n_samples=2, batch_size=64, correlation_type="pearson")
    np.testing.assert_array_equal(corr, expected.to_numpy())
    scales, labels = post.differential_expression_stats(M_sampling=2)
    assert scales.shape == (2 * adata.n_obs, 200) and labels.shape == (2 * adata.n_obs,)
    sampled = post.scale_sampler(np.arange(10), n_samples_per_cell=2, batchid=[0, 1])
    assert sampled["scale"].shape == (40, 200)
    np.testing.assert_array_equal(sampled["batch"], np.repeat([0, 1], 20))


def test_differential_expression_score_is_tl_differential_expression(fitted):
    adata, post = fitted
    a549 = (adata.obs["cell_type"] == "A549").to_numpy()
    df = post.differential_expression_score(a549, ~a549, mode="change", n_samples=500)
    assert list(df.columns[:10]) == ["proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "lfc_mean",
                                     "lfc_median", "lfc_std", "lfc_min", "lfc_max"]  # fmt: skip
    assert df["proba_de"].is_monotonic_decreasing
    ours = ss.tl.differential_expression(adata, idx1=np.flatnonzero(a549), idx2=np.flatnonzero(~a549), mode="change",
                                         delta=0.5 / math.log(2), batch_correction=True, n_samples=500,
                                         model=post.model, inplace=False, progress_bar=False)  # fmt: skip
    np.testing.assert_array_equal(df["proba_de"].to_numpy(), ours["proba_de"].to_numpy())
    np.testing.assert_allclose(df["lfc_median"].to_numpy(), ours["lfc_median"].to_numpy() * math.log(2))
    # the top genes by the Bayes factor of vanilla mode are up in A549 (scale1 > scale2)
    vanilla = post.differential_expression_score(a549, ~a549, n_samples=500)
    top = vanilla.head(10)
    assert (top["scale1"] > top["scale2"]).all() and (top["bayes_factor"] > 2).all()
    bf = post.get_bayes_factors(a549, ~a549, n_samples=500)
    assert set(bf) == {"proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"}
    np.testing.assert_array_equal(bf["bayes_factor"], vanilla.loc[post.model.setup.genes, "bayes_factor"].to_numpy())
    with pytest.raises(NotImplementedError, match="paired"):
        post.differential_expression_score(a549, ~a549, use_permutation=True)


def test_one_vs_all_and_within_cluster(fitted, tmp_path):
    adata, post = fitted
    de_res, clusters = post.one_vs_all_degenes(n_samples=200, output_file=True, save_dir=str(tmp_path))
    assert sorted(clusters) == sorted(adata.obs["cell_type"].cat.categories)
    for res, name in zip(de_res, clusters, strict=True):
        assert (res["clusters"] == name).all()
        assert res.iloc[0]["scale1"] > res.iloc[0]["scale2"]
        assert (tmp_path / f"one2all.{name}.csv").exists()
    states = (adata.obs["batch"] == "Dropseq_3cl").to_numpy()  # Drop-seq vs CEL-seq2 within each cell line
    de_res, clusters = post.within_cluster_degenes(states, n_samples=200, min_cells=20)
    # the Drop-seq batch holds three cell lines
    expected = [c for c in adata.obs["cell_type"].cat.categories
                if min(((adata.obs["cell_type"] == c) & states).sum(), ((adata.obs["cell_type"] == c) & ~states).sum()) >= 20]  # fmt: skip
    assert sorted(clusters) == sorted(expected) and len(expected) == 3


def test_copies_loader_state_and_iteration(fitted):
    adata, post = fitted
    seq = post.sequential(batch_size=100)
    assert seq is not post and seq.batch_size == 100 and post.batch_size == 128
    assert post.update({"batch_size": 32}).batch_size == 32
    # 0.x's documented pattern: restrict the cells for a while, then restore the loader
    old_loader = seq.data_loader
    seq.update_sampler_indices(np.array([1, 2, 3]))
    batches = list(seq)
    assert len(batches) == 1
    x, l_mean, l_var, batch, labels = batches[0]
    np.testing.assert_array_equal(x.numpy(), post.raw_data()[0][[1, 2, 3]].toarray())
    assert l_mean.shape == l_var.shape == batch.shape == labels.shape == (3, 1)
    np.testing.assert_array_equal(seq.get_latent()[0], adata.obsm["X_scvi"][[1, 2, 3]])
    seq.data_loader = old_loader
    assert seq.nb_cells == adata.n_obs
    with pytest.raises(TypeError, match="sampler"):
        post.update({"sampler": None})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            post.to_cuda([torch.zeros(1)])


def test_corruption_and_imputation(fitted):
    adata, post = fitted
    bad = post.corrupted()
    rows, cols, originals = bad._originals
    assert len(rows) > 0 and (originals > 0).all()
    counts = bad.raw_data()[0]
    assert (np.asarray(counts[rows, cols]).ravel() == 0).all()  # uniform corruption zeroes the chosen counts
    np.testing.assert_array_equal(post.raw_data()[0].toarray(), bad.uncorrupted().raw_data()[0].toarray())
    original_list, imputed_list = post.imputation_list()
    assert len(original_list) == adata.n_obs and sum(map(len, original_list)) == len(rows)
    score = post.imputation_score(original_list, imputed_list)
    assert 0 < score < np.median(originals)  # better than imputing zero
    median, mean = post.imputation_benchmark(n_samples=2, show_plot=False)
    assert median > 0 and mean > 0


def test_t_sne_and_protein_overlap(fitted):
    adata, post = fitted
    coords, idx = Posterior.apply_t_sne(adata.obsm["X_scvi"], n_samples=200)
    assert coords.shape == (200, 2) and len(np.unique(idx)) == 200
    post.show_t_sne(n_samples=200, color_by="batches and labels")
    with pytest.raises(ValueError, match="protein"):
        post.nn_overlap_score()
    # proteins that follow the latent space overlap with it far more than chance
    copy = adata.copy()
    rng = np.random.default_rng(0)
    copy.obsm["protein_expression"] = rng.poisson(np.exp(2 + adata.obsm["X_scvi"][:, :4]))
    rho, enrichment = Posterior(post.model, copy).nn_overlap_score(k=30)
    assert enrichment > 3 and rho > 0


def test_save_and_load_posterior(fitted, tmp_path):
    adata, post = fitted
    sub = post.sequential(batch_size=64)
    sub.update_sampler_indices(np.arange(0, adata.n_obs, 2))
    sub.save_posterior(tmp_path / "p")
    with pytest.raises(ValueError, match="exists"):
        sub.save_posterior(tmp_path / "p")
    back = load_posterior(tmp_path / "p")
    assert back.batch_size == 64
    np.testing.assert_array_equal(back.indices, sub.indices)
    np.testing.assert_array_equal(back.get_latent()[0], sub.get_latent()[0])
    assert not list((tmp_path / "p").rglob("*.pkl"))
