"""``pp.scpoli``: fit scPoli (condition embeddings and cell-type prototypes) and write its outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._compat import logg
from .._settings import keyword_settings, split_settings
from ..data import SetupArguments
from ..nn import SCPOLIArchitecture, to_numpy
from ._run import Run, RunArguments, check_key_added, setup_params

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import SCPOLI


@keyword_settings(RunArguments, SetupArguments, SCPOLIArchitecture)
def scpoli(
    adata: AnnData,
    *,
    condition_keys: str | Sequence[str] | None = None,
    cell_type_keys: str | None = None,
    unknown_ct_names: Sequence[str] | None = None,
    labeled_indices=None,
    lr: float = 1e-3,
    train_size: float = 0.9,
    batch_size: int = 128,
    early_stopping: bool = True,
    weight_decay: float = 0.04,
    pretraining_epochs: int | None = None,
    eta: float = 1.0,
    n_epochs_kl_warmup: int | None = 100,
    trainer_kwargs: Mapping[str, Any] | None = None,
    key_added: str = "X_scpoli",
    **settings,
) -> SCPOLI | AnnData | tuple[AnnData, SCPOLI] | None:
    """Fit scPoli on raw counts: an integrated latent space, sample embeddings and label transfer
    (scArches' ``scPoli``).

    Each condition key (samples, studies, ...) gets a learned embedding that conditions the
    encoder and the decoder; after ``pretraining_epochs`` each cell type gets a prototype (the
    mean latent of its labelled cells) that pulls its cells together. Cells are classified by
    their nearest prototype. Same conventions and argument vocabulary as
    :func:`scanpy_scvi.pp.scvi`.

    Parameters
    ----------
    adata
        Annotated data with raw counts in ``X`` or ``layer`` (never subset).
    condition_keys
        ``obs`` column(s) of conditions, each with its own embedding; the first is the model's
        ``batch_key`` (pass either).
    cell_type_keys
        ``obs`` column of cell types; without it no prototypes (and no predictions).
    unknown_ct_names
        Values of ``cell_type_keys`` that mean "not labelled" (e.g. ``['unknown']``).
    labeled_indices
        Cells whose labels may be used (positions, names or a boolean mask; default all).
    lr, train_size, batch_size, early_stopping, weight_decay
        scArches' training defaults (1e-3, 0.9, 128, on from the end of pretraining with the
        best weights restored, 0.04 except on the embeddings).
    pretraining_epochs, eta
        Epochs before the prototypes (default 90 % of the epochs) and the prototype loss weight (1).
    n_epochs_kl_warmup
        Epochs of linear KL warm-up (scArches' ``alpha_epoch_anneal``, default 100).
    trainer_kwargs
        Further arguments of :meth:`scanpy_scvi.SCPOLI.train`.
    key_added
        ``obsm`` key of the latent space; the ``uns`` entry is its name without ``'X_'``.
    {RunArguments}
    {SetupArguments}
    {SCPOLIArchitecture}

    Returns
    -------
    ``None`` by default; the model if ``return_model``; the copy if ``copy``; ``(adata, model)``
    if both. Writes:

    ``adata.obsm['X_scpoli']`` : (cells, n_latent) float32
        Posterior mean of z.
    ``adata.obs['<cell_type_keys>_scpoli_pred']`` : categorical
        Nearest prototype's cell type, for every cell (labelled ones too: a check of the fit).
    ``adata.obs['<cell_type_keys>_scpoli_uncertainty']`` : float32
        Distance to that prototype in the latent space (high for unknown cell types).
    ``adata.uns['scpoli']`` : dict
        ``params``, ``genes``, ``history`` (with ``prototype_loss_*``), ``versions``, ``device``,
        ``condition_embeddings`` (DataFrame: conditions of the first key x embedding dimensions;
        ``model.get_conditional_embeddings()`` gives them as an AnnData with sample metadata),
        ``prototypes`` (DataFrame: cell types x latent dimensions) and, with ``store_model``, ``model``.
    """
    from ..model import SCPOLI

    run_args, rest = split_settings(settings, RunArguments)
    setup_args, architecture = split_settings(rest, SetupArguments)
    run = Run(run_args, default_epochs=None, default_return_model=False)
    uns_key = check_key_added(key_added)
    start = logg.info(f"computing scPoli on {adata.n_obs} cells")
    model = SCPOLI(
        adata, condition_keys=condition_keys, cell_type_keys=cell_type_keys, unknown_ct_names=unknown_ct_names,
        labeled_indices=labeled_indices, genes=run.genes(adata), random_state=run.random_state, **setup_args,
        **architecture,
    )  # fmt: skip
    extra = dict(trainer_kwargs or {})
    model.train(
        run.max_epochs, lr=lr, train_size=train_size, batch_size=batch_size, early_stopping=early_stopping,
        weight_decay=weight_decay, pretraining_epochs=pretraining_epochs, eta=eta, n_epochs_kl_warmup=n_epochs_kl_warmup,
        device=run.device, strategy=run.strategy, random_state=run.random_state, progress_bar=run.progress_bar, **extra,
    )  # fmt: skip

    adata = run.target(adata, model)
    with model.seeded(run.random_state):
        latent = model.get_latent_representation()
    adata.obsm[key_added] = latent
    written = [f"'{key_added}' (adata.obsm)"]
    ct_key = model.setup.labels_key
    if ct_key is not None:
        calls = model.classify()
        adata.obs[f"{ct_key}_scpoli_pred"] = calls["pred"].array
        adata.obs[f"{ct_key}_scpoli_uncertainty"] = calls["uncertainty"].to_numpy(np.float32)
        written.append(f"'{ct_key}_scpoli_pred', '{ct_key}_scpoli_uncertainty' (adata.obs)")
    setup = setup_params(setup_args, model, ("batch_key", "categorical_covariate_keys", "check_counts"))
    params = {
        "condition_keys": [model.setup.batch_key, *model.setup.categorical_covariate_keys], "cell_type_keys": ct_key,
        "unknown_ct_names": list(unknown_ct_names or []), "labeled_cells": int(model.labeled_mask.sum())
        if model.labeled_mask is not None else adata.n_obs, "lr": lr, "train_size": train_size, "batch_size": batch_size,
        "early_stopping": early_stopping, "weight_decay": weight_decay, "pretraining_epochs": model.pretraining_epochs,
        "eta": eta, "n_epochs_kl_warmup": n_epochs_kl_warmup, **run.params(model, key_added), **setup, **extra,
    }  # fmt: skip
    record = model.uns_record(params, store_model=run.store_model)
    embeddings = model.get_conditional_embeddings()
    record["condition_embeddings"] = pd.DataFrame(
        embeddings.X, index=embeddings.obs_names, columns=[f"E_{i}" for i in range(embeddings.n_vars)]
    )
    if ct_key is not None:
        prototypes = to_numpy(model.module.prototypes)
        record["prototypes"] = pd.DataFrame(
            prototypes,
            index=pd.Index(model.setup.label_categories),
            columns=[f"Z_{i}" for i in range(prototypes.shape[1])],
        )
    adata.uns[uns_key] = record
    logg.info("    finished", time=start, deep="added\n    " + "\n    ".join([*written, f"'{uns_key}' (adata.uns)"]))
    return run.result(adata, model)
