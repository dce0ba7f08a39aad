"""``pp.trvae``: fit trVAE (scArches' conditional VAE with MMD) and write its latent space."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._compat import logg
from .._settings import keyword_settings, split_settings
from ..data import SetupArguments
from ..nn import TRVAEArchitecture
from ._run import Run, RunArguments, check_key_added, setup_params

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import TRVAE


@keyword_settings(RunArguments, SetupArguments, TRVAEArchitecture)
def trvae(
    adata: AnnData,
    *,
    condition_key: str | None = None,
    lr: float = 1e-3,
    train_size: float = 0.9,
    batch_size: int = 128,
    early_stopping: bool = True,
    weight_decay: float = 0.04,
    n_epochs_kl_warmup: int | None = None,
    balanced_sampling: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
    key_added: str = "X_trvae",
    **settings,
) -> TRVAE | AnnData | tuple[AnnData, TRVAE] | None:
    """Fit trVAE on raw counts and write its latent space (scArches' ``TRVAE``).

    A conditional VAE: the condition (``batch_key``, scArches' ``condition_key``) enters the
    first encoder and decoder layers; an MMD penalty pulls the conditions together in the latent
    space. A reference for :func:`scanpy_scvi.tl.map_query` as it is (new conditions get their
    own weights). Same conventions and argument vocabulary as :func:`scanpy_scvi.pp.scvi`.

    Parameters
    ----------
    adata
        Annotated data with raw counts in ``X`` or ``layer`` (never subset); log-normalised
        values with ``gene_likelihood='mse'``.
    condition_key
        scArches' name of ``batch_key``: the ``obs`` column of conditions. Pass either.
    lr, train_size, batch_size, early_stopping, weight_decay
        scArches' training defaults (1e-3, 0.9, 128, on with patience 20 and the best weights
        restored, 0.04), with its learning-rate schedule (x0.1 after 7 epochs without improvement).
    n_epochs_kl_warmup
        Epochs of linear KL warm-up (scArches' ``alpha_epoch_anneal``; its tutorials use 200).
        Default: none.
    balanced_sampling
        Each epoch draws cells with replacement, every condition equally often (scArches'
        stratified sampling); ``False``: every cell once per epoch.
    trainer_kwargs
        Further arguments of :meth:`scanpy_scvi.TRVAE.train` (e.g. ``max_kl_weight``, scArches'
        ``alpha_kl``; ``early_stopping_patience``; ``reduce_lr_on_plateau``).
    key_added
        ``obsm`` key of the latent space; the ``uns`` entry is its name without ``'X_'``.
    {RunArguments}
    {SetupArguments}
    {TRVAEArchitecture}

    Returns
    -------
    ``None`` by default; the model if ``return_model``; the copy if ``copy``; ``(adata, model)``
    if both. Writes:

    ``adata.obsm['X_trvae']`` : (cells, n_latent) float32
        Posterior mean of z.
    ``adata.uns['trvae']`` : dict
        ``params``, ``genes``, ``history`` (with ``mmd_train``/``_validation``), ``versions``,
        ``device`` and, with ``store_model``, ``model``.
    """
    from ..model import TRVAE

    run_args, rest = split_settings(settings, RunArguments)
    setup_args, architecture = split_settings(rest, SetupArguments)
    run = Run(run_args, default_epochs=None, default_return_model=False)
    uns_key = check_key_added(key_added)
    start = logg.info(f"computing trVAE on {adata.n_obs} cells")
    model = TRVAE(adata, condition_key=condition_key, genes=run.genes(adata), random_state=run.random_state,
                  **setup_args, **architecture)  # fmt: skip
    extra = dict(trainer_kwargs or {})
    model.train(
        run.max_epochs, lr=lr, train_size=train_size, batch_size=batch_size, early_stopping=early_stopping,
        weight_decay=weight_decay, n_epochs_kl_warmup=n_epochs_kl_warmup, balanced_sampling=balanced_sampling,
        device=run.device, strategy=run.strategy, random_state=run.random_state, progress_bar=run.progress_bar, **extra,
    )  # fmt: skip

    adata = run.target(adata, model)
    with model.seeded(run.random_state):
        latent = model.get_latent_representation()
    adata.obsm[key_added] = latent
    setup = setup_params(setup_args, model)
    params = {
        "lr": lr, "train_size": train_size, "batch_size": batch_size, "early_stopping": early_stopping,
        "weight_decay": weight_decay, "n_epochs_kl_warmup": n_epochs_kl_warmup, "balanced_sampling": balanced_sampling,
        **run.params(model, key_added), **setup, **extra,
    }  # fmt: skip
    adata.uns[uns_key] = model.uns_record(params, store_model=run.store_model)
    logg.info("    finished", time=start, deep=f"added\n    '{key_added}' (adata.obsm)\n    '{uns_key}' (adata.uns)")
    return run.result(adata, model)
