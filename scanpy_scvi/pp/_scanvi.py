"""``pp.scanvi``: fit scANVI (semi-supervised scVI) and write its latent space and label predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._compat import logg
from ._scvi import _select_genes, _uns_record

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import SCANVI, SCVI


def scanvi(
    adata: AnnData,
    *,
    labels_key: str,
    unlabeled_category: str,
    batch_key: str | None = None,
    layer: str | None = None,
    scvi_model: SCVI | str | None = None,
    use_highly_variable_genes: bool = True,
    subset_genes: Sequence[str] | Sequence[int] | np.ndarray | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
    n_hidden: int = 128,
    n_latent: int = 10,
    n_layers: int = 1,
    dropout_rate: float = 0.1,
    dispersion: Literal["gene", "gene-batch", "gene-cell"] = "gene",
    gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
    encode_covariates: bool = False,
    use_batch_norm: Literal["encoder", "decoder", "both", "none"] = "both",
    use_layer_norm: Literal["encoder", "decoder", "both", "none"] = "none",
    linear_classifier: bool = False,
    max_epochs: int | None = None,
    lr: float = 1e-3,
    train_size: float = 0.9,
    batch_size: int = 128,
    classification_ratio: float = 50.0,
    early_stopping: bool = False,
    check_counts: bool = True,
    store_model: bool = True,
    device: str = "auto",
    random_state: int | None = 0,
    key_added: str = "X_scanvi",
    copy: bool = False,
    return_model: bool = False,
    progress_bar: bool = True,
) -> SCANVI | AnnData | tuple[AnnData, SCANVI] | None:
    """Fit scANVI on raw counts: a latent space informed by the known labels, and label transfer.

    Cells labelled ``unlabeled_category`` in ``obs[labels_key]`` get predicted labels from the
    labelled ones. Same conventions as :func:`scanpy_scvi.pp.scvi`.

    Parameters
    ----------
    adata
        Annotated data with raw counts in ``X`` or ``layer`` (never subset).
    labels_key
        ``obs`` column of cell types; ``unlabeled_category`` marks the cells to predict.
    unlabeled_category
        The value of unlabelled cells, e.g. ``'Unknown'``. Missing values (NaN) are an error:
        fill them with this category first.
    batch_key
        ``obs`` column of batches to correct for.
    layer
        Layer with the raw counts; default ``X``.
    scvi_model
        Start from a trained scVI model (scvi-tools' ``SCANVI.from_scvi_model``): a
        :class:`~scanpy_scvi.SCVI`, or the ``uns`` key where ``pp.scvi`` stored one (e.g.
        ``'scvi'``). Genes, layer, batches, covariates and architecture then come from that
        model (the corresponding arguments here are ignored), and ``max_epochs`` defaults to
        a short fine-tuning (at most 10 epochs).
    use_highly_variable_genes, subset_genes
        Gene choice as in :func:`~scanpy_scvi.pp.scvi`.
    categorical_covariate_keys, continuous_covariate_keys
        Further ``obs`` columns the decoder is conditioned on.
    n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood
        Architecture (scANVI defaults 128, 10, 1, 0.1, ``'gene'``, ``'zinb'``).
    encode_covariates, use_batch_norm, use_layer_norm
        As in :func:`~scanpy_scvi.pp.scvi`; ``**scanpy_scvi.pp.REFERENCE_MAPPING`` gives the
        scArches reference recipe.
    linear_classifier
        A linear classifier on the latent space instead of an MLP.
    max_epochs
        Training epochs; ``None``: scvi-tools' heuristic (``min(400, 20000 / n_cells * 400)``).
    lr, train_size, batch_size, early_stopping
        Training settings. ``train_size`` (default 0.9) applies to labelled and unlabelled
        cells separately; the held-out labelled cells give ``accuracy_validation``.
    classification_ratio
        Weight of the labelled cells' cross-entropy (reference default 50).
    check_counts, store_model, device, random_state, progress_bar
        As in :func:`~scanpy_scvi.pp.scvi`.
    key_added
        ``obsm`` key of the latent space; the ``uns`` entry is its name without ``'X_'``.
    copy
        Work on (and return) a copy of ``adata``.
    return_model
        Return the trained :class:`~scanpy_scvi.SCANVI`.

    Returns
    -------
    The model if ``return_model``; the copy if ``copy``; ``(adata, model)`` if both; else
    ``None``. Writes:

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
    from ..model._scvi import _seeded

    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added must be a non-empty string, got {key_added!r}."
        raise TypeError(msg)
    start = logg.info(f"computing scANVI on {adata.n_obs} cells")
    if scvi_model is not None:
        if isinstance(scvi_model, str):
            scvi_model = SCVI.from_anndata(adata, key=scvi_model, device=device)
        model = SCANVI.from_scvi_model(
            scvi_model,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category,
            adata=adata,
            linear_classifier=linear_classifier,
            random_state=random_state,
        )
    else:
        model = SCANVI(
            adata,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category,
            layer=layer,
            genes=_select_genes(adata, use_highly_variable_genes, subset_genes),
            batch_key=batch_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            check_counts=check_counts,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            encode_covariates=encode_covariates,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            linear_classifier=linear_classifier,
            random_state=random_state,
        )
    model.train(
        max_epochs,
        lr=lr,
        train_size=train_size,
        batch_size=batch_size,
        classification_ratio=classification_ratio,
        early_stopping=early_stopping,
        device=device,
        random_state=random_state,
        progress_bar=progress_bar,
    )

    adata = adata.copy() if copy else adata
    if copy:
        model.adata = adata
    with _seeded(random_state, model.device):
        latent = model.get_latent_representation()
    calls, confidence = model._calls()
    adata.obsm[key_added] = latent
    adata.obs[f"{labels_key}_scanvi_pred"] = calls
    adata.obs[f"{labels_key}_scanvi_proba"] = confidence.astype(np.float32)
    uns_key = key_added.removeprefix("X_")
    params = dict(
        labels_key=labels_key, unlabeled_category=str(unlabeled_category), batch_key=model.setup.batch_key,
        layer=model.setup.layer, from_scvi_model=scvi_model is not None, max_epochs=model.train_config["max_epochs"],
        lr=lr, train_size=train_size, batch_size=batch_size, classification_ratio=classification_ratio,
        early_stopping=early_stopping, check_counts=check_counts, random_state=random_state, key_added=key_added,
        **{k: v for k, v in model.module_kwargs.items() if k != "linear_decoder"},
    )  # fmt: skip
    adata.uns[uns_key] = _uns_record(model, params)
    if store_model:
        adata.uns[uns_key]["model"] = model.to_uns()
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    '{key_added}' (adata.obsm)\n    '{labels_key}_scanvi_pred', "
        f"'{labels_key}_scanvi_proba' (adata.obs)\n    '{uns_key}' (adata.uns)",
    )
    if copy and return_model:
        return adata, model
    if copy:
        return adata
    return model if return_model else None
