"""``pp.expimap``: fit expiMap (gene programs as the latent space) and write program activities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._compat import logg
from .._settings import keyword_settings, split_settings
from ..data import SetupArguments
from ..nn import EXPIMAPArchitecture
from ._run import Run, RunArguments, check_key_added, setup_params

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import EXPIMAP


@keyword_settings(RunArguments, SetupArguments, EXPIMAPArchitecture)
def expimap(
    adata: AnnData,
    *,
    condition_key: str | None = None,
    mask_key: str = "I",
    terms_key: str = "terms",
    alpha: float | None = 0.7,
    alpha_l1: float | None = None,
    only_active: bool = False,
    lr: float = 1e-3,
    train_size: float = 0.9,
    batch_size: int = 128,
    early_stopping: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
    key_added: str = "X_expimap",
    **settings,
) -> EXPIMAP | AnnData | tuple[AnnData, EXPIMAP] | None:
    """Fit expiMap on raw counts: a latent space whose dimensions are gene programs (scArches' ``EXPIMAP``).

    Build the program mask first with :func:`scanpy_scvi.tl.add_gene_programs`. Same conventions
    and argument vocabulary as :func:`scanpy_scvi.pp.scvi`; then
    :func:`scanpy_scvi.tl.gene_program_enrichment` compares programs between groups of cells.

    Parameters
    ----------
    adata
        Annotated data with raw counts in ``X`` or ``layer`` and the mask in ``varm[mask_key]``.
    condition_key
        scArches' name of ``batch_key`` (the ``obs`` column of studies / samples); pass either.
    mask_key, terms_key
        The (genes, programs) mask and the program names (``add_gene_programs`` writes them).
    alpha
        Group-lasso coefficient: programs the data do not support are switched off (default 0.7,
        the scArches tutorial's; ``None`` keeps all).
    alpha_l1
        L1 coefficient of out-of-mask weights, with ``soft_mask=True``.
    only_active
        Write only the active programs' columns.
    lr, train_size, batch_size, early_stopping
        Training settings (scArches' defaults; KL weight 0.35 reached after ``min(130, epochs)``).
    trainer_kwargs
        Further arguments of :meth:`scanpy_scvi.EXPIMAP.train`.
    key_added
        ``obsm`` key of the program activities; the ``uns`` entry is its name without ``'X_'``.
    {RunArguments}
    {SetupArguments}
    {EXPIMAPArchitecture}

    Returns
    -------
    ``None`` by default; the model if ``return_model``; the copy if ``copy``; ``(adata, model)``
    if both. Writes:

    ``adata.obsm['X_expimap']`` : (cells, programs) float32
        Posterior mean of the program activities (columns: ``uns['expimap']['programs']`` rows,
        or its active ones with ``only_active``).
    ``adata.uns['expimap']`` : dict
        ``params``, ``genes``, ``history``, ``versions``, ``device``, ``programs`` (DataFrame:
        ``active``, ``direction``, ``direction_confidence``, ``n_genes`` per program) and, with
        ``store_model``, ``model``.
    """
    from ..model import EXPIMAP

    run_args, rest = split_settings(settings, RunArguments)
    setup_args, architecture = split_settings(rest, SetupArguments)
    run = Run(run_args, default_epochs=None, default_return_model=False)
    uns_key = check_key_added(key_added)
    start = logg.info(f"computing expiMap on {adata.n_obs} cells")
    model = EXPIMAP(adata, condition_key=condition_key, mask_key=mask_key, terms_key=terms_key, genes=run.genes(adata),
                    random_state=run.random_state, **setup_args, **architecture)  # fmt: skip
    extra = dict(trainer_kwargs or {})
    model.train(
        run.max_epochs, alpha=alpha, alpha_l1=alpha_l1, lr=lr, train_size=train_size, batch_size=batch_size,
        early_stopping=early_stopping, device=run.device, strategy=run.strategy, random_state=run.random_state,
        progress_bar=run.progress_bar, **extra,
    )  # fmt: skip

    adata = run.target(adata, model)
    with model.seeded(run.random_state):
        latent = model.get_latent_representation(only_active=only_active)
    adata.obsm[key_added] = latent
    table = model.programs()
    setup = setup_params(setup_args, model)
    params = {
        "mask_key": mask_key, "terms_key": terms_key, "alpha": alpha, "alpha_l1": alpha_l1, "only_active": only_active,
        "lr": lr, "train_size": train_size, "batch_size": batch_size, "early_stopping": early_stopping,
        **run.params(model, key_added), **setup, **extra,
    }  # fmt: skip
    record = model.uns_record(params, store_model=run.store_model)
    record["programs"] = table
    adata.uns[uns_key] = record
    logg.info(
        f"    finished: {int(table['active'].sum())} of {len(table)} programs active",
        time=start,
        deep=f"added\n    '{key_added}' (adata.obsm)\n    '{uns_key}' (adata.uns)",
    )
    return run.result(adata, model)
