"""``tl.map_query``: map a query onto a trained reference model (scArches) and transfer labels."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._compat import logg, warn
from ..data import Programs, gene_sets

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import SCVI

# the scArches tutorial trains a query this long; map_query defaults to a fifth of it
DEFAULT_QUERY_EPOCHS = {"SCVI": 200, "SCANVI": 100, "TOTALVI": 200, "TRVAE": 200, "SCPOLI": 50, "EXPIMAP": 200}


def map_query(
    query: AnnData,
    reference: SCVI | AnnData | str | os.PathLike,
    *,
    batch_key: str | None = None,
    labels_key: str | None = None,
    reference_key: str | None = None,
    max_missing_genes: float = 0.2,
    max_epochs: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    train_size: float = 1.0,
    n_epochs_kl_warmup: int | None = None,
    freeze_expression: bool = True,
    freeze_batchnorm_decoder: bool = False,
    labeled_indices=None,
    n_ext: int = 0,
    new_programs: Programs | None = None,
    new_programs_soft_mask: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
    n_neighbors: int = 15,
    key_added: str | None = None,
    store_model: bool = True,
    device: str = "auto",
    random_state: int | None = 0,
    progress_bar: bool = True,
) -> SCVI:
    """Map ``query`` into the latent space of a trained reference (scArches surgery).

    The reference's weights are frozen; the query's batches become new batch categories whose
    weights (and the library encoder, and the decoder's batch-norm scale and shift) are the only
    ones trained. A new batch's weights start at the mean of the reference batches' (the query
    is first embedded as a typical reference batch). The reference data is not needed (except
    for kNN label transfer from a scVI reference), and the reference model is not modified.

    Parameters
    ----------
    query
        AnnData with raw counts (``X`` or the reference's ``layer``). Its genes are matched to
        the reference's by name: extra genes are ignored, missing ones are read as zero counts
        (a warning says how many). Never modified except for the outputs below.
    reference
        A trained :class:`~scanpy_scvi.SCVI`, :class:`~scanpy_scvi.SCANVI`,
        :class:`~scanpy_scvi.TOTALVI`, :class:`~scanpy_scvi.TRVAE`, :class:`~scanpy_scvi.SCPOLI`
        or :class:`~scanpy_scvi.EXPIMAP`, a directory written by ``model.save``, or an AnnData
        carrying its model (``pp.scvi`` / ``pp.scanvi`` / ``pp.totalvi`` / ``pp.trvae`` /
        ``pp.scpoli`` / ``pp.expimap`` with ``store_model=True``).
        A totalVI query may have the reference's proteins, a smaller panel or none (RNA
        only): proteins it lacks are left out of its likelihood and imputed in the outputs.
    batch_key
        ``obs`` column of the query's batches (default: the reference's ``batch_key``).
        Batches the reference does not know become new categories; several at once work.
        Cells of batches the reference knows are embedded with the reference's weights.
    labels_key
        For a scVI (or totalVI, trVAE) reference: an ``obs`` column of the *reference* AnnData (``reference`` as
        an AnnData, or the model's own AnnData) whose labels are transferred to the query by a
        kNN vote in the latent space. For a scANVI reference its classifier predicts the
        labels and this must be ``None`` or its ``labels_key``.
    reference_key
        With ``reference`` an AnnData: the ``uns`` entry holding the model (default
        the first of ``'scanvi'``, ``'scpoli'``, ``'expimap'``, ``'totalvi'``, ``'trvae'``,
        ``'scvi'`` present).
    max_missing_genes
        Largest fraction of reference genes the query may lack (zero-padded) before it is an
        error. Raise it knowingly: padded genes carry no information about the query.
    max_epochs
        Query training epochs. Default: ``min(heuristic, 40)`` for scVI, totalVI, trVAE and
        expiMap, ``min(heuristic, 20)`` for scANVI and ``min(heuristic, 10)`` for scPoli, a fifth
        of the scArches tutorials' 200/100/50 epochs (the reference mapping
        page gives the measured accuracy against the tutorial's recipe); ``0`` embeds without
        training.
    lr, weight_decay, batch_size, train_size
        Adam settings, minibatch size and training fraction (default all cells). Weight decay
        never reaches frozen entries.
    n_epochs_kl_warmup
        KL warm-up epochs; default ``None`` (none: the reference is already trained).
    freeze_expression
        ``False`` also trains the encoder's first layer (expression inputs included).
    freeze_batchnorm_decoder
        ``True`` also freezes the decoder's batch-norm scale and shift.
    labeled_indices
        scPoli reference: query cells whose ``cell_type_keys`` labels the query model may use
        (positions, names or a boolean mask; default none, so no query label leaks into the
        mapping). Their cell types that the reference lacks become new prototypes.
    n_ext
        expiMap reference: unconstrained extension programs the query model adds and learns, to
        capture what the reference's programs miss (scArches' ``new_n_ext``); they appear as
        ``extension_0``, ... in its ``programs()``. Sparsify them with
        ``trainer_kwargs={'gamma_ext': ...}``.
    new_programs
        expiMap reference: new annotated programs the query model adds and learns (scArches'
        ``new_n_ext_m`` with ``new_ext_mask``): a GMT file, several, or a dict of program name ->
        genes, matched to the reference's genes by symbol; each must have at least one of them.
        They follow the reference's programs in ``programs()`` and the latent space.
    new_programs_soft_mask
        Let genes outside a new program's gene set enter it, kept sparse by an L1 step
        (``trainer_kwargs={'alpha_l1': ...}``; scArches' ``new_soft_ext_mask``).
    trainer_kwargs
        Further arguments of the query model's ``train`` (e.g. expiMap's ``alpha``, ``alpha_l1``,
        ``gamma_ext``, ``hsic_weight``; scVI's ``max_kl_weight``).
    n_neighbors
        Neighbours of the kNN label vote (scVI reference).
    key_added
        ``obsm`` key of the latent space; default ``'X_<kind>'`` of the reference's kind (``'X_scvi'``, ``'X_scanvi'``,
        ``'X_totalvi'``, ``'X_trvae'``).
        The ``uns`` entry is its name without ``'X_'``.
    store_model
        Store the query model in ``query.uns[<key>]['model']`` (``tl`` functions then find it).
    device, random_state, progress_bar
        As in :func:`scanpy_scvi.pp.scvi`.

    Returns
    -------
    The trained query model (save it with ``.save``; map further queries onto it). Writes:

    ``query.obsm['X_scvi']`` (or ``'X_<kind>'`` of the reference) : (cells, n_latent) float32
        Posterior mean in the reference's latent space.
    ``query.obs['<labels_key>_pred']`` : categorical
        Transferred labels (scANVI or scPoli reference, or ``labels_key`` given).
    ``query.obs['<labels_key>_uncertainty']`` : float
        ``1 - `` the top class probability (scANVI), the latent distance to the nearest
        prototype (scPoli: high for cell types the reference lacks) or ``1 - `` the fraction of
        the ``n_neighbors`` reference neighbours that voted for the label (kNN).
    ``query.uns['scvi']`` (or ``'<kind>'``) : dict
        ``params``, the padded ``missing_genes``, ``new_categories``, ``history`` and the model.
    """
    from ..model import SCANVI, SCPOLI, query_model

    ref_model, ref_adata = _resolve_reference(reference, reference_key)
    is_scanvi = isinstance(ref_model, SCANVI)
    is_scpoli = isinstance(ref_model, SCPOLI) and ref_model.setup.labels_key is not None
    predicts = is_scanvi or is_scpoli  # the model labels the query itself
    if not ref_model.is_trained:
        msg = "The reference model is not trained."
        raise ValueError(msg)
    if not 0 <= max_missing_genes < 1:
        msg = f"max_missing_genes must be a fraction in [0, 1), got {max_missing_genes}."
        raise ValueError(msg)
    if predicts and labels_key not in (None, ref_model.setup.labels_key):
        msg = (
            f"A {ref_model.name} reference predicts its own labels ({ref_model.setup.labels_key!r}); "
            f"labels_key={labels_key!r} is for kNN transfer from a scVI reference."
        )
        raise ValueError(msg)
    if labels_key is not None and not predicts:
        ref_adata = ref_adata if ref_adata is not None else ref_model.adata
        if ref_adata is None or labels_key not in ref_adata.obs.columns:
            msg = (
                f"labels_key={labels_key!r}: kNN label transfer needs the reference cells and their labels. "
                "Pass the reference AnnData (with its model in uns) as `reference`, or a model that holds its "
                "AnnData, with obs[labels_key]."
            )
            raise ValueError(msg)
    key_added = key_added or f"X_{type(ref_model).__name__.lower()}"
    uns_key = key_added.removeprefix("X_")

    query_options: dict[str, Any] = {}  # the reference model's own options, passed on only when set
    if labeled_indices is not None:
        query_options["labeled_indices"] = labeled_indices
    if n_ext:
        query_options["n_ext"] = n_ext
    if new_programs is not None:  # files read once, here: both of the model's query hooks match the sets
        query_options["new_programs"] = gene_sets(new_programs)
    if new_programs_soft_mask:
        if new_programs is None:
            msg = "new_programs_soft_mask applies to new_programs; none were given."
            raise ValueError(msg)
        query_options["new_programs_soft_mask"] = True
    missing = ref_model.setup.missing_genes(query)
    model, added = query_model(
        ref_model,
        query,
        batch_key=batch_key,
        max_missing_genes=max_missing_genes,
        freeze_expression=freeze_expression,
        freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        random_state=random_state,
        **query_options,
    )
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        warn(
            f"{len(missing)} of the reference's {len(ref_model.setup.genes)} genes are missing from the query "
            f"({shown}); they are read as zero counts."
        )
    if not getattr(ref_model.architecture, "encode_covariates", True):  # trVAE always encodes its conditions
        warn(
            "The reference was trained with encode_covariates=False: its encoder ignores batches, so the "
            "query's latent space is the reference encoder's output and query training cannot move it. "
            "For reference mapping train the reference with `**scanpy_scvi.pp.REFERENCE_MAPPING` settings."
        )
    kind = type(ref_model).__name__
    if max_epochs is None:
        max_epochs = min(model.default_max_epochs(query.n_obs), DEFAULT_QUERY_EPOCHS[kind] // 5)
    start = logg.info(f"mapping {query.n_obs} query cells onto a {model.name} reference; new categories: {added}")
    if added and max_epochs > 0:
        model.train(
            max_epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            train_size=train_size,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            device=device,
            random_state=random_state,
            progress_bar=progress_bar,
            **(trainer_kwargs or {}),
        )
    else:
        if not added:
            logg.warning("    every query batch is known to the reference: the query is embedded without training")
        model.to_device(device)
        model.is_trained = True

    with model.seeded(random_state):
        latent = model.get_latent_representation()
    outputs: dict[str, Any] = {}
    label_col = None
    if is_scanvi:
        label_col = ref_model.setup.labels_key
        calls, confidence = model.label_calls()
        outputs = {"pred": calls, "uncertainty": 1.0 - confidence}
    elif is_scpoli:
        label_col = ref_model.setup.labels_key
        calls = model.classify()
        outputs = {"pred": calls["pred"].array, "uncertainty": calls["uncertainty"].to_numpy()}
    elif labels_key is not None:
        label_col = labels_key
        ref_latent = ref_model.get_latent_representation(ref_adata)
        outputs = _knn_transfer(ref_latent, ref_adata.obs[labels_key], latent, n_neighbors)

    query.obsm[key_added] = latent
    if label_col is not None:
        query.obs[f"{label_col}_pred"] = outputs["pred"]
        query.obs[f"{label_col}_uncertainty"] = outputs["uncertainty"].astype(np.float32)
    params = {
        "reference_class": kind, "batch_key": model.setup.batch_key, "labels_key": label_col, "max_missing_genes": max_missing_genes,
        "max_epochs": max_epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "train_size": train_size,
        "n_epochs_kl_warmup": n_epochs_kl_warmup, "freeze_expression": freeze_expression,
        "freeze_batchnorm_decoder": freeze_batchnorm_decoder, "n_neighbors": n_neighbors if label_col and not predicts else None,
        "random_state": random_state, "key_added": key_added, "n_ext": n_ext,
        "new_programs": np.asarray(list(query_options.get("new_programs", {})), dtype=object),
        "new_programs_soft_mask": new_programs_soft_mask, **(trainer_kwargs or {}),
    }  # fmt: skip
    record = model.uns_record(params, store_model=store_model)
    record["missing_genes"] = np.asarray(missing, dtype=object)
    record["new_categories"] = np.asarray(added, dtype=object)
    query.uns[uns_key] = record
    written = f"'{key_added}' (obsm)" + (f", '{label_col}_pred', '{label_col}_uncertainty' (obs)" if label_col else "")
    logg.info("    finished", time=start, deep=f"added\n    {written}, '{uns_key}' (uns)")
    return model


def _resolve_reference(reference, reference_key: str | None) -> tuple[SCVI, AnnData | None]:
    from anndata import AnnData

    from ..model import BaseModel

    if isinstance(reference, BaseModel):
        return reference, None
    if isinstance(reference, (str, os.PathLike)):
        return BaseModel.load(reference, device="cpu"), None
    if isinstance(reference, AnnData):
        known = ("scanvi", "scpoli", "expimap", "totalvi", "trvae", "scvi")
        keys = [reference_key] if reference_key else [k for k in known if k in reference.uns]
        if not keys:
            msg = f"The reference AnnData carries no model (uns[{' / '.join(known)}]); pass `reference_key=`."
            raise KeyError(msg)
        return BaseModel.from_anndata(reference, key=keys[0], device="cpu"), reference
    msg = f"reference must be a model, a saved model directory or an AnnData, got {type(reference).__name__}."
    raise TypeError(msg)


def _knn_transfer(ref_latent: np.ndarray, ref_labels: pd.Series, latent: np.ndarray, n_neighbors: int) -> dict:
    """Majority vote of the ``n_neighbors`` nearest reference cells in the latent space."""
    from sklearn.neighbors import NearestNeighbors

    if ref_labels.isna().any():
        msg = "The reference labels have missing values; fill or drop them before label transfer."
        raise ValueError(msg)
    codes, categories = pd.factorize(ref_labels.astype(str), sort=True)
    k = min(int(n_neighbors), len(codes))
    neighbours = NearestNeighbors(n_neighbors=k).fit(ref_latent).kneighbors(latent, return_distance=False)
    votes = np.zeros((len(latent), len(categories)))
    np.add.at(votes, (np.repeat(np.arange(len(latent)), k), codes[neighbours].ravel()), 1.0)
    votes /= k
    names = np.asarray(categories, dtype=object)
    return {"pred": pd.Categorical(names[votes.argmax(1)], categories=names), "uncertainty": 1.0 - votes.max(1)}
