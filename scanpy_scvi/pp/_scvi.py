"""``pp.scvi``: fit scVI / LDVAE on an AnnData and write its results in place."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._compat import logg
from .._settings import keyword_settings, split_settings
from ..compat.scvi0 import Posterior, architecture_from_vae_kwargs, train_from_trainer_kwargs
from ..data import SetupArguments
from ..nn import VAEArchitecture
from ._run import Run, RunArguments, check_key_added

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

MEMORY_SHARE = 0.8  # dense outputs may take at most this share of the available memory


@keyword_settings(RunArguments, SetupArguments, VAEArchitecture)
def scvi(
    adata: AnnData,
    *,
    labels_key: str | None = None,
    lr: float = 1e-3,
    train_size: float = 1.0,
    batch_size: int = 128,
    early_stopping: bool = False,
    expression: bool | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    key_added: str = "X_scvi",
    **settings,
) -> SCVI | AnnData | tuple[AnnData, SCVI] | None:
    """Fit scVI (or LDVAE) on raw counts and write the latent space and denoised expression.

    The drop-in successor of the removed ``scanpy.external.pp.scvi``: it accepts the same
    arguments with the same meanings, and adds the settings of modern scvi-tools.

    Parameters
    ----------
    adata
        Annotated data with raw counts in ``X`` or in ``layer``. It is never subset: the
        model keeps its own gene list.
    labels_key
        ``obs`` column of labels (for ``dispersion='gene-label'``).
    lr
        Adam learning rate.
    train_size
        Fraction of cells to train on; the others give the validation ELBO in the history.
    batch_size
        Cells per minibatch.
    early_stopping
        Stop when the validation ELBO stalls (training ELBO with ``train_size=1``) and
        restore the best weights.
    expression
        Write ``X_scvi_denoised`` and ``X_scvi_sample_rate``: two dense cells x genes float32
        matrices (8 GB each for 1M cells x 2000 genes). ``None`` (default): when together they
        take at most 80 % of the memory available now, else only the latent space (with a
        warning; compute expression in chunks with ``model.get_normalized_expression(out=...)``).
        ``True`` insists (an error before training when they do not fit); ``False`` skips them.
    trainer_kwargs
        Further training settings, by the names of the scvi 0.6 ``UnsupervisedTrainer`` that
        the historical function passed them to (``train_size``, ``test_size``,
        ``n_epochs_kl_warmup``, ``n_iter_kl_warmup``, ``frequency``, ``early_stopping_kwargs``,
        ``data_loader_kwargs``, ``weight_decay``, ``batch_size``, ``seed``, ...) or by ours:
        ``weight_decay`` (1e-6), ``eps`` (0.01), ``n_epochs_kl_warmup`` (400),
        ``n_steps_kl_warmup``, ``min_kl_weight`` (0), ``max_kl_weight`` (1),
        ``early_stopping_patience`` (45), ``early_stopping_min_delta`` (0),
        ``reduce_lr_on_plateau``, ``lr_factor``, ``lr_patience``. docs/compat-scvi0.rst maps each
        0.x name; one without a meaning here is an error that says why.
    model_kwargs
        Architecture settings as a dict: by the names of the scvi 0.6 ``VAE`` / ``LDVAE``
        (``reconstruction_loss``, ``n_layers_encoder``, ``log_variational``, ...) or by ours
        (each is also an argument).
    key_added
        ``obsm`` key of the latent space; the other outputs are named after it, and the
        ``uns`` entry is ``key_added`` without its ``'X_'`` prefix.
    {RunArguments}
    {SetupArguments}
    {VAEArchitecture}

    Returns
    -------
    The trained :class:`~scanpy_scvi.SCVI` (by default; ``return_model=False`` returns None).
    ``return_posterior=True`` returns a :class:`~scanpy_scvi.compat.scvi0.Posterior` over all
    cells instead, as ``scanpy.external.pp.scvi`` did. The AnnData copy if ``copy``;
    ``(adata, model)`` (or ``(adata, posterior)``) if both. Writes, rows aligned with ``obs_names``:

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

    run_args, rest = split_settings(settings, RunArguments)
    setup_args, architecture = split_settings(rest, SetupArguments)
    architecture = _merge_architecture(architecture, model_kwargs)
    # the pp.scvi arguments that 0.x trainers also took: trainer_kwargs may set them unless given here
    call = {"train_size": train_size, "batch_size": batch_size, "n_obs": adata.n_obs,
            "use_cuda": run_args.get("use_cuda", True), "random_state": run_args.get("random_state", 0)}  # fmt: skip
    call["explicit"] = {*(k for k in ("use_cuda", "random_state") if k in run_args),
                        *(k for k in ("train_size", "batch_size") if call[k] != _default_of(k))}  # fmt: skip
    extra_train, updates = train_from_trainer_kwargs(trainer_kwargs or {}, call)
    train_size, batch_size = updates.pop("train_size", train_size), updates.pop("batch_size", batch_size)
    early_stopping = extra_train.pop("early_stopping", early_stopping)
    run = Run({**run_args, **updates}, default_epochs=400, default_return_model=True)
    uns_key = check_key_added(key_added)
    genes = run.genes(adata)
    if expression is None:
        expression = expression_fits(adata.n_obs, len(genes))
        if not expression:
            logg.warning(
                f"    the dense expression outputs of {adata.n_obs} cells x {len(genes)} genes would not fit in "
                "memory: writing only the latent space (see `expression` and get_normalized_expression(out=...))"
            )
    elif expression:
        check_expression_fits(adata.n_obs, len(genes))

    start = logg.info(
        f"computing scVI{' (LDVAE)' if architecture.get('linear_decoder') else ''} on {adata.n_obs} cells x "
        f"{len(genes)} genes"
    )
    # Everything that can fail on the input fails here, before training and before any write.
    model = SCVI(adata, genes=genes, labels_key=labels_key, random_state=run.random_state, **setup_args,
                 **architecture)  # fmt: skip
    model.train(
        max_epochs=run.max_epochs, lr=lr, train_size=train_size, batch_size=batch_size, early_stopping=early_stopping,
        device=run.device, strategy=run.strategy, random_state=run.random_state, progress_bar=run.progress_bar, **extra_train,
    )  # fmt: skip

    adata = run.target(adata, model)
    with model.seeded(run.random_state):  # the encoder draws z (and ln averages draws)
        latent = model.get_latent_representation()
    if expression:
        with model.seeded(run.random_state):
            denoised, rate = model.denoised_and_rate()
    adata.obsm[key_added] = latent
    if expression:
        adata.obsm[f"{key_added}_denoised"] = denoised
        adata.obsm[f"{key_added}_sample_rate"] = rate
    if model.architecture.linear_decoder:
        loadings_key = "ldvae_loadings" if key_added == "X_scvi" else f"{uns_key}_loadings"
        adata.uns[loadings_key] = model.get_loadings()
    params = dict(
        lr=lr, train_size=train_size, batch_size=batch_size, early_stopping=early_stopping, labels_key=labels_key,
        **run.params(model, key_added), **SetupArguments(**setup_args).to_dict(), **extra_train,
    )  # fmt: skip
    adata.uns[uns_key] = model.uns_record(params, store_model=run.store_model)
    outputs = f"'{key_added}'" + (f", '{key_added}_denoised', '{key_added}_sample_rate'" if expression else "")
    logg.info("    finished", time=start, deep=f"added\n    {outputs} (adata.obsm)\n    '{uns_key}' (adata.uns)")
    if run.args.return_posterior:  # on the device the model trained on (Posterior's use_cuda would move it)
        return run.result(adata, Posterior(model, use_cuda=model.device.type == "cuda"))
    return run.result(adata, model)


def _default_of(argument: str) -> Any:
    return inspect.signature(scvi).parameters[argument].default


def _available_memory() -> int | None:
    """Bytes of memory available for new allocations without swapping (Linux: MemAvailable,
    which counts reclaimable page cache), or None where the OS does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def expression_fits(n_obs: int, n_genes: int, *, n_matrices: int = 2) -> bool:
    """Whether ``n_matrices`` dense float32 cells x genes matrices fit the memory rule."""
    available = _available_memory()
    return available is None or n_matrices * n_obs * n_genes * 4 <= MEMORY_SHARE * available


def check_expression_fits(n_obs: int, n_genes: int, *, n_matrices: int = 2) -> None:
    """Fail before training, not after it, when the dense expression outputs (``n_matrices``
    float32 cells x genes matrices) would take more than ``MEMORY_SHARE`` of the available memory."""
    needed = n_matrices * n_obs * n_genes * 4
    available = _available_memory()
    if available is not None and needed > MEMORY_SHARE * available:
        msg = (
            f"The dense expression outputs ({n_matrices} x {n_obs} cells x {n_genes} genes, float32) need "
            f"{needed / 1e9:.1f} GB; the rule is to use at most {MEMORY_SHARE:.0%} of the memory available now, "
            f"{MEMORY_SHARE * available / 1e9:.1f} of {available / 1e9:.1f} GB. Pass `expression=False` to write "
            "only the latent space (compute expression later, in chunks, with "
            "`model.get_normalized_expression(indices=...)`), or use fewer genes."
        )
        raise ValueError(msg)


def _merge_architecture(explicit: dict[str, Any], model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Architecture keywords, with the historical ``model_kwargs`` dict (scvi 0.6 ``VAE``/``LDVAE``
    names, or ours) allowed for any of them."""
    linear = bool(explicit.get("linear_decoder", (model_kwargs or {}).get("linear_decoder", False)))
    from_dict = architecture_from_vae_kwargs(model_kwargs or {}, linear_decoder=linear)
    for k, v in from_dict.items():
        if k in explicit and explicit[k] != v:
            msg = f"{k} is given twice with different values ({explicit[k]!r} and model_kwargs[{k!r}]={v!r})."
            raise ValueError(msg)
    return {**explicit, **from_dict}
