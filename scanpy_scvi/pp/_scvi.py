"""``pp.scvi``: fit scVI / LDVAE on an AnnData and write its results in place."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._compat import logg

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import SCVI

# The scArches recipe for a reference that queries will be mapped onto (``tl.map_query``):
# covariates enter the encoder (so a query's batch can move its latent), layer norm instead of
# batch norm, more dropout, two layers. Use as ``pp.scvi(adata, batch_key=..., **REFERENCE_MAPPING)``.
REFERENCE_MAPPING: dict[str, Any] = {
    "encode_covariates": True,
    "use_batch_norm": "none",
    "use_layer_norm": "both",
    "dropout_rate": 0.2,
    "n_layers": 2,
}

# Settings reachable through the historical kwargs dicts (the first three are also arguments).
MODEL_KWARGS = ("encode_covariates", "use_batch_norm", "use_layer_norm", "deeply_inject_covariates")
ARCH_DEFAULTS = {"encode_covariates": False, "use_batch_norm": "both", "use_layer_norm": "none"}
TRAINER_KWARGS = (
    "weight_decay",
    "eps",
    "n_epochs_kl_warmup",
    "min_kl_weight",
    "max_kl_weight",
    "early_stopping_patience",
    "early_stopping_min_delta",
)


def scvi(
    adata: AnnData,
    *,
    n_hidden: int = 128,
    n_latent: int = 10,
    n_layers: int = 1,
    dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
    n_epochs: int = 400,
    max_epochs: int | None = None,
    lr: float = 1e-3,
    train_size: float = 1.0,
    batch_key: str | None = None,
    use_highly_variable_genes: bool = True,
    subset_genes: Sequence[str] | Sequence[int] | np.ndarray | None = None,
    linear_decoder: bool = False,
    copy: bool = False,
    use_cuda: bool = True,
    return_posterior: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    layer: str | None = None,
    labels_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
    size_factor_key: str | None = None,
    gene_likelihood: Literal["zinb", "nb", "poisson"] | None = None,
    latent_distribution: Literal["normal", "ln"] = "normal",
    dropout_rate: float = 0.1,
    use_observed_lib_size: bool | None = None,
    encode_covariates: bool = False,
    use_batch_norm: Literal["encoder", "decoder", "both", "none"] = "both",
    use_layer_norm: Literal["encoder", "decoder", "both", "none"] = "none",
    batch_size: int = 128,
    early_stopping: bool = False,
    check_counts: bool = True,
    expression: bool = True,
    store_model: bool = True,
    device: str = "auto",
    random_state: int | None = 0,
    key_added: str = "X_scvi",
    progress_bar: bool = True,
) -> SCVI | AnnData | tuple[AnnData, SCVI] | None:
    """Fit scVI (or LDVAE) on raw counts and write the latent space and denoised expression.

    The drop-in successor of the removed ``scanpy.external.pp.scvi``: it accepts the same
    arguments with the same meanings, and adds the settings of modern scvi-tools.

    Parameters
    ----------
    adata
        Annotated data with raw counts in ``X`` or in ``layer``. It is never subset: the
        model keeps its own gene list.
    n_hidden, n_latent, n_layers
        Hidden units per layer, latent dimensions, hidden layers.
    dispersion
        ``'gene'`` (one theta per gene), ``'gene-batch'``, ``'gene-label'`` or ``'gene-cell'``.
    n_epochs
        Training epochs (historical name).
    max_epochs
        Alias of ``n_epochs`` (scvi-tools' name); wins when given.
    lr
        Adam learning rate.
    train_size
        Fraction of cells to train on; the others give the validation ELBO in the history.
    batch_key
        ``obs`` column of batches to correct for.
    use_highly_variable_genes
        Train on ``adata.var['highly_variable']`` (run :func:`scanpy.pp.highly_variable_genes`
        first). ``False``: all genes.
    subset_genes
        Gene names, integer positions or a boolean mask of the genes to train on; overrides
        the HVG choice.
    linear_decoder
        Fit LDVAE (linear decoder) and write its loadings.
    copy
        Work on (and return) a copy of ``adata``.
    use_cuda
        ``False`` forces the CPU; ``True`` uses CUDA when available (see ``device``).
    return_posterior
        Return the trained model (historically the "posterior").
    trainer_kwargs
        Further training settings: ``weight_decay`` (1e-6), ``eps`` (0.01),
        ``n_epochs_kl_warmup`` (400), ``min_kl_weight`` (0), ``max_kl_weight`` (1),
        ``early_stopping_patience`` (45), ``early_stopping_min_delta`` (0).
    model_kwargs
        Further model settings: ``deeply_inject_covariates`` (True), and (as in older
        versions) ``encode_covariates``, ``use_batch_norm``, ``use_layer_norm``.
    layer
        Layer with the raw counts; default ``X``.
    labels_key
        ``obs`` column of labels (for ``dispersion='gene-label'``).
    categorical_covariate_keys, continuous_covariate_keys
        Further ``obs`` columns the decoder is conditioned on.
    size_factor_key
        ``obs`` column of size factors replacing the library size.
    gene_likelihood
        ``'zinb'``, ``'nb'`` or ``'poisson'``. Default: ``'zinb'`` for scVI, ``'nb'`` for
        LDVAE (the published defaults).
    latent_distribution
        ``'normal'`` or ``'ln'`` (logistic normal).
    dropout_rate
        Encoder dropout.
    use_observed_lib_size
        Library = log total counts (default for scVI), or learned with a per-batch
        log-normal prior (``False``; default for LDVAE).
    encode_covariates
        Feed the batch (and covariates) to the encoder too. Needed for a reference that
        queries will be mapped onto (:func:`scanpy_scvi.tl.map_query`); the whole scArches
        recipe is ``**scanpy_scvi.pp.REFERENCE_MAPPING``.
    use_batch_norm, use_layer_norm
        Where to normalise hidden layers: ``'encoder'``, ``'decoder'``, ``'both'`` or ``'none'``.
    batch_size
        Cells per minibatch.
    early_stopping
        Stop when the validation ELBO stalls (training ELBO with ``train_size=1``) and
        restore the best weights.
    check_counts
        Raise on non-integer values (``False`` accepts non-negative non-integer counts).
    expression
        Write ``X_scvi_denoised`` and ``X_scvi_sample_rate``: two dense cells x genes float32
        matrices (8 GB each for 1M cells x 2000 genes). ``False`` writes only the latent space.
        If they cannot fit in the available memory, this is an error before training.
    store_model
        Store the trained model (weights and configuration, a few MB) in
        ``adata.uns['scvi']['model']``, so that ``tl`` functions find it, also after
        ``write_h5ad`` / ``read_h5ad`` in a new process
        (:meth:`~scanpy_scvi.SCVI.from_anndata`). ``False`` keeps the AnnData free of it.
    device
        ``'auto'`` (CUDA if available, else CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
    random_state
        Seed of initialisation, split, shuffling and sampling; ``0`` gives identical results
        on CPU run after run. GPU kernels are not bit-reproducible.
    key_added
        ``obsm`` key of the latent space; the other outputs are named after it, and the
        ``uns`` entry is ``key_added`` without its ``'X_'`` prefix.
    progress_bar
        Show a per-epoch progress bar.

    Returns
    -------
    The trained :class:`~scanpy_scvi.SCVI` if ``return_posterior``; the AnnData copy if
    ``copy``; ``(adata, model)`` if both; else ``None``. Writes, rows aligned with ``obs_names``:

    ``adata.obsm['X_scvi']`` : :class:`numpy.ndarray` (cells, n_latent), float32
        Posterior mean of z.
    ``adata.obsm['X_scvi_denoised']`` : (cells, genes) float32
        Normalised expression: the decoder's frequencies (rows sum to 1), each cell decoded in
        its own batch (not batch-corrected; use ``model.get_normalized_expression(transform_batch=...)``).
        Columns are ``adata.uns['scvi']['genes']``.
    ``adata.obsm['X_scvi_sample_rate']`` : (cells, genes) float32
        Likelihood mean: library size times frequencies.
    ``adata.uns['ldvae_loadings']`` : :class:`pandas.DataFrame` (genes, n_latent)
        LDVAE only: loadings with the decoder batch norm folded in. With another
        ``key_added``: ``uns['<key>_loadings']`` (``key_added`` without ``'X_'``).
    ``adata.uns['scvi']`` : dict
        ``params``, ``genes``, per-epoch ``history``, ``versions``, ``device`` and, with
        ``store_model``, ``model``.
    """
    from ..model import SCVI

    if max_epochs is not None and n_epochs not in (400, max_epochs):
        msg = f"n_epochs={n_epochs} and max_epochs={max_epochs} disagree; pass only one."
        raise ValueError(msg)
    epochs = n_epochs if max_epochs is None else max_epochs
    if not use_cuda:
        if device not in ("auto", "cpu"):
            msg = f"use_cuda=False contradicts device={device!r}."
            raise ValueError(msg)
        device = "cpu"
    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added must be a non-empty string, got {key_added!r}."
        raise TypeError(msg)
    extra_model = _merge_arch(
        _check_kwargs(model_kwargs, MODEL_KWARGS, "model_kwargs"),
        encode_covariates=encode_covariates,
        use_batch_norm=use_batch_norm,
        use_layer_norm=use_layer_norm,
    )
    extra_train = _check_kwargs(trainer_kwargs, TRAINER_KWARGS, "trainer_kwargs")
    genes = _select_genes(adata, use_highly_variable_genes, subset_genes)
    if expression:
        _check_expression_fits(adata.n_obs, len(genes))

    start = logg.info(
        f"computing scVI{' (LDVAE)' if linear_decoder else ''} on {adata.n_obs} cells x {len(genes)} genes"
    )
    # Everything that can fail on the input fails here, before training and before any write.
    model = SCVI(
        adata,
        layer=layer,
        genes=genes,
        batch_key=batch_key,
        labels_key=labels_key,
        categorical_covariate_keys=categorical_covariate_keys,
        continuous_covariate_keys=continuous_covariate_keys,
        size_factor_key=size_factor_key,
        check_counts=check_counts,
        n_hidden=n_hidden,
        n_latent=n_latent,
        n_layers=n_layers,
        dropout_rate=dropout_rate,
        dispersion=dispersion,
        gene_likelihood=gene_likelihood,
        latent_distribution=latent_distribution,
        use_observed_lib_size=use_observed_lib_size,
        linear_decoder=linear_decoder,
        random_state=random_state,
        **extra_model,
    )
    model.train(
        max_epochs=epochs,
        lr=lr,
        train_size=train_size,
        batch_size=batch_size,
        early_stopping=early_stopping,
        device=device,
        random_state=random_state,
        progress_bar=progress_bar,
        **extra_train,
    )

    adata = adata.copy() if copy else adata
    if copy:  # the model's default data is the object that receives the results
        model.adata = adata
    from ..model._scvi import _seeded

    with _seeded(random_state, model.device):  # the encoder draws z (and ln averages draws)
        latent = model.get_latent_representation()
    if expression:
        with _seeded(random_state, model.device):
            denoised, rate = model._denoised_and_rate()
    uns_key = key_added.removeprefix("X_")
    adata.obsm[key_added] = latent
    if expression:
        adata.obsm[f"{key_added}_denoised"] = denoised
        adata.obsm[f"{key_added}_sample_rate"] = rate
    if linear_decoder:
        loadings_key = "ldvae_loadings" if key_added == "X_scvi" else f"{uns_key}_loadings"
        adata.uns[loadings_key] = model.get_loadings()
    params = dict(
        n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dispersion=dispersion, max_epochs=epochs,
        lr=lr, train_size=train_size, batch_size=batch_size, early_stopping=early_stopping,
        linear_decoder=linear_decoder, latent_distribution=latent_distribution, dropout_rate=dropout_rate,
        layer=layer, batch_key=batch_key, labels_key=labels_key,
        categorical_covariate_keys=categorical_covariate_keys, continuous_covariate_keys=continuous_covariate_keys,
        size_factor_key=size_factor_key, use_highly_variable_genes=use_highly_variable_genes,
        genes_from="subset_genes" if subset_genes is not None else "highly_variable" if use_highly_variable_genes else "all",
        check_counts=check_counts, random_state=random_state, key_added=key_added, **extra_model, **extra_train,
    )  # fmt: skip
    adata.uns[uns_key] = _uns_record(model, params)
    if store_model:
        adata.uns[uns_key]["model"] = model.to_uns()
    outputs = f"'{key_added}'" + (f", '{key_added}_denoised', '{key_added}_sample_rate'" if expression else "")
    logg.info("    finished", time=start, deep=f"added\n    {outputs} (adata.obsm)\n    '{uns_key}' (adata.uns)")

    if copy and return_posterior:
        return adata, model
    if copy:
        return adata
    return model if return_posterior else None


def _uns_record(model: SCVI, params: dict[str, Any]) -> dict[str, Any]:
    """The h5ad-writable ``uns`` entry: params (None values left out), genes, history, versions."""
    from importlib.metadata import version

    from .. import __version__

    params = {
        **params,
        "gene_likelihood": model.module_kwargs["gene_likelihood"],
        "use_observed_lib_size": model.module_kwargs["use_observed_lib_size"],
    }
    if "best_epoch" in model.train_config:
        params["best_epoch"] = model.train_config["best_epoch"]
    clean = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in params.items() if v is not None}
    return {
        "params": clean,
        "genes": np.asarray(model.setup.genes, dtype=object),
        "history": {k: np.asarray(v, dtype=np.float64) for k, v in model.history_.items()},
        "versions": {
            "scanpy_scvi": __version__,
            "torch": version("torch"),
            "scanpy": version("scanpy"),
            "anndata": version("anndata"),
        },
        "device": str(model.device),
    }


def _available_memory() -> int | None:
    """Bytes of physical memory available now, or None where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_expression_fits(n_obs: int, n_genes: int) -> None:
    """Fail before training, not after it, when the two dense expression matrices cannot fit."""
    needed = 2 * n_obs * n_genes * 4  # X_scvi_denoised + X_scvi_sample_rate, float32
    available = _available_memory()
    if available is not None and needed > 0.8 * available:
        msg = (
            f"The denoised and sample-rate matrices ({n_obs} cells x {n_genes} genes, float32) need "
            f"{needed / 1e9:.1f} GB but only {available / 1e9:.1f} GB of memory is available. "
            "Pass `expression=False` to write only the latent space (compute expression later, in "
            "chunks, with `model.get_normalized_expression(indices=...)`), or use fewer genes."
        )
        raise ValueError(msg)


def _merge_arch(from_kwargs: dict[str, Any], **explicit) -> dict[str, Any]:
    """Explicit architecture arguments, with the historical ``model_kwargs`` spelling allowed."""
    for k, v in explicit.items():
        if k in from_kwargs and v != ARCH_DEFAULTS[k] and from_kwargs[k] != v:
            msg = f"{k} is given twice with different values ({v!r} and model_kwargs[{k!r}]={from_kwargs[k]!r})."
            raise ValueError(msg)
    return {**explicit, **from_kwargs}


def _check_kwargs(kwargs: Mapping[str, Any] | None, allowed: Sequence[str], name: str) -> dict[str, Any]:
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        explicit = set(inspect.signature(scvi).parameters)
        hint = [k for k in unknown if k in explicit]
        msg = f"{name} got unknown keys {unknown}; allowed: {list(allowed)}."
        if hint:
            msg += f" Pass {hint} as arguments of pp.scvi directly."
        raise TypeError(msg)
    return kwargs


def _select_genes(adata: AnnData, use_highly_variable_genes: bool, subset_genes) -> list[str]:
    names = adata.var_names
    if subset_genes is not None:
        sel = np.asarray(subset_genes)
        if sel.dtype == bool:
            if sel.shape != (adata.n_vars,):
                msg = f"A boolean subset_genes mask must have length n_vars={adata.n_vars}, got {sel.shape}."
                raise ValueError(msg)
            sel = np.flatnonzero(sel)
        if sel.size == 0:
            msg = "subset_genes is empty."
            raise ValueError(msg)
        if np.issubdtype(sel.dtype, np.integer):
            if sel.min() < 0 or sel.max() >= adata.n_vars:
                msg = f"subset_genes positions must be in [0, {adata.n_vars})."
                raise ValueError(msg)
            genes = list(names[sel])
        else:
            genes = [str(g) for g in sel]
            missing = [g for g in genes if g not in names]
            if missing:
                msg = f"{len(missing)} subset_genes are not in adata.var_names: {missing[:10]}."
                raise KeyError(msg)
        if len(set(genes)) != len(genes):
            msg = "subset_genes contains duplicates."
            raise ValueError(msg)
        return genes
    if not use_highly_variable_genes:
        return list(names)
    if "highly_variable" not in adata.var.columns:
        msg = (
            "adata.var['highly_variable'] not found. Run `sc.pp.highly_variable_genes(adata, ...)` first "
            "(on counts: flavor='seurat_v3', layer='counts'), pass `subset_genes=`, or "
            "`use_highly_variable_genes=False` to train on all genes."
        )
        raise KeyError(msg)
    hv = adata.var["highly_variable"]
    if hv.isna().any() or not pd.api.types.is_bool_dtype(hv):
        msg = "adata.var['highly_variable'] must be a boolean column without missing values."
        raise ValueError(msg)
    if not hv.any():
        msg = "adata.var['highly_variable'] marks no gene as highly variable."
        raise ValueError(msg)
    return list(names[hv.to_numpy()])
