"""``pp.scanvi``: fit scANVI (semi-supervised scVI) and write its latent space and label predictions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._compat import logg
from .._settings import keyword_settings, split_settings
from ..data import SetupArguments
from ..nn import SCANVIArchitecture
from ._run import Run, RunArguments, check_key_added

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import SCANVI, SCVI


@keyword_settings(RunArguments, SetupArguments, SCANVIArchitecture)
def scanvi(
    adata: AnnData,
    *,
    labels_key: str,
    unlabeled_category: str,
    scvi_model: SCVI | str | None = None,
    lr: float = 1e-3,
    train_size: float = 0.9,
    batch_size: int = 128,
    classification_ratio: float = 50.0,
    early_stopping: bool = False,
    key_added: str = "X_scanvi",
    **settings,
) -> SCANVI | AnnData | tuple[AnnData, SCANVI] | None:
    """Fit scANVI on raw counts: a latent space informed by the known labels, and label transfer.

    Cells labelled ``unlabeled_category`` in ``obs[labels_key]`` get predicted labels from the
    labelled ones. Same conventions and argument vocabulary as :func:`scanpy_scvi.pp.scvi`.

    Parameters
    ----------
    adata
        Annotated data with raw counts in ``X`` or ``layer`` (never subset).
    labels_key
        ``obs`` column of cell types; ``unlabeled_category`` marks the cells to predict.
    unlabeled_category
        The value of unlabelled cells, e.g. ``'Unknown'``. Missing values (NaN) are an error:
        fill them with this category first.
    scvi_model
        Start from a trained scVI model (scvi-tools' ``SCANVI.from_scvi_model``): a
        :class:`~scanpy_scvi.SCVI`, or the ``uns`` key where ``pp.scvi`` stored one (e.g.
        ``'scvi'``). Genes, layer, batches, covariates and architecture then come from that
        model (the corresponding arguments here are ignored), and the epochs default to
        a short fine-tuning (at most 10).
    lr, train_size, batch_size, early_stopping
        Training settings. ``train_size`` (default 0.9) applies to labelled and unlabelled
        cells separately; the held-out labelled cells give ``accuracy_validation``.
    classification_ratio
        Weight of the labelled cells' cross-entropy (reference default 50).
    key_added
        ``obsm`` key of the latent space; the ``uns`` entry is its name without ``'X_'``.
    {RunArguments}
    {SetupArguments}
    {SCANVIArchitecture}

    Returns
    -------
    ``None`` by default; the model if ``return_model``; the copy if ``copy``; ``(adata, model)``
    if both. Writes:

    ``adata.obsm['X_scanvi']`` : (cells, n_latent) float32
        Posterior mean of the latent z.
    ``adata.obs['<labels_key>_scanvi_pred']`` : categorical
        Predicted label of every cell (labelled ones too: a check of the fit).
    ``adata.obs['<labels_key>_scanvi_proba']`` : float32
        The classifier's probability of the predicted label.
    ``adata.uns['scanvi']`` : dict
        ``params``, ``genes``, ``history`` (with ``accuracy_train``/``_validation``),
        ``versions``, ``device`` and, with ``store_model``, ``model``.
    """
    from ..model import SCANVI, SCVI

    run_args, rest = split_settings(settings, RunArguments)
    setup_args, architecture = split_settings(rest, SetupArguments)
    run = Run(run_args, default_epochs=None, default_return_model=False)
    uns_key = check_key_added(key_added)
    start = logg.info(f"computing scANVI on {adata.n_obs} cells")
    if scvi_model is not None:
        if isinstance(scvi_model, str):
            scvi_model = SCVI.from_anndata(adata, key=scvi_model, device=run.device)
        model = SCANVI.from_scvi_model(
            scvi_model,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category,
            adata=adata,
            linear_classifier=architecture.get("linear_classifier", False),
            random_state=run.random_state,
        )
    else:
        model = SCANVI(adata, labels_key=labels_key, unlabeled_category=unlabeled_category, genes=run.genes(adata),
                       random_state=run.random_state, **setup_args, **architecture)  # fmt: skip
    model.train(
        run.max_epochs, lr=lr, train_size=train_size, batch_size=batch_size, classification_ratio=classification_ratio,
        early_stopping=early_stopping, device=run.device, strategy=run.strategy, random_state=run.random_state, progress_bar=run.progress_bar,
    )  # fmt: skip

    adata = run.target(adata, model)
    with model.seeded(run.random_state):
        latent = model.get_latent_representation()
    calls, confidence = model.label_calls()
    adata.obsm[key_added] = latent
    adata.obs[f"{labels_key}_scanvi_pred"] = calls
    adata.obs[f"{labels_key}_scanvi_proba"] = confidence.astype(np.float32)
    params = {
        "labels_key": labels_key, "unlabeled_category": str(unlabeled_category), "batch_key": model.setup.batch_key,
        "layer": model.setup.layer, "from_scvi_model": scvi_model is not None, "lr": lr, "train_size": train_size,
        "batch_size": batch_size, "classification_ratio": classification_ratio, "early_stopping": early_stopping,
        "check_counts": model.setup.check_counts,
        **run.params(model, key_added, genes_from="scvi_model" if scvi_model is not None else None),
    }  # fmt: skip
    adata.uns[uns_key] = model.uns_record(params, store_model=run.store_model)
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    '{key_added}' (adata.obsm)\n    '{labels_key}_scanvi_pred', "
        f"'{labels_key}_scanvi_proba' (adata.obs)\n    '{uns_key}' (adata.uns)",
    )
    return run.result(adata, model)
