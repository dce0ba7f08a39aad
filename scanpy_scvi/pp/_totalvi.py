"""``pp.totalvi``: fit totalVI on CITE-seq (RNA + proteins) and write its results in place, in an
AnnData (proteins in ``obsm``) or a MuData (RNA and protein modalities)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .._compat import logg
from .._settings import keyword_settings, split_settings
from ..data import SetupArguments, anndata_from_mudata, is_mudata, mudata_modalities
from ..nn import TOTALVIArchitecture
from ._run import Run, RunArguments, check_key_added
from ._scvi import check_expression_fits

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

    from ..model import TOTALVI


@keyword_settings(RunArguments, SetupArguments, TOTALVIArchitecture)
def totalvi(
    adata: AnnData | MuData,
    *,
    protein_expression_obsm_key: str = "protein_expression",
    protein_names_uns_key: str | None = None,
    labels_key: str | None = None,
    empirical_protein_background_prior: bool | None = None,
    override_missing_proteins: bool = False,
    lr: float = 4e-3,
    train_size: float = 0.9,
    batch_size: int = 256,
    early_stopping: bool = True,
    reduce_lr_on_plateau: bool = True,
    adversarial_classifier: bool | None = None,
    protein_layer: str | None = None,
    modalities: Mapping[str, str | None] | None = None,
    expression: bool = True,
    key_added: str = "X_totalvi",
    **settings,
) -> TOTALVI | AnnData | MuData | tuple[AnnData | MuData, TOTALVI] | None:
    """Fit totalVI on CITE-seq counts: one latent space for RNA and surface proteins, denoised
    protein expression and the probability that each protein count is foreground.

    Same conventions and argument vocabulary as :func:`scanpy_scvi.pp.scvi`; the training
    defaults are scvi-tools' for totalVI.

    Parameters
    ----------
    adata
        Annotated data with raw RNA counts in ``X`` or ``layer`` and raw antibody counts in
        ``adata.obsm[protein_expression_obsm_key]`` (never subset). Or a
        :class:`mudata.MuData` (``pip install scanpy-scvi[mudata]``) with an RNA and a protein
        modality holding raw counts of the same cells (see ``modalities``): it is read as
        :func:`scanpy_scvi.data.anndata_from_mudata` reads it (RNA counts from ``layer``,
        protein counts from ``protein_layer``, ``obs`` keys from the global ``mdata.obs`` and
        the RNA modality's ``obs``) and trains exactly as that AnnData would; the outputs go
        where a scverse user looks for them (see Returns).
    protein_expression_obsm_key
        ``obsm`` key of the protein counts: a DataFrame (columns = protein names) or an array.
        AnnData only.
    protein_names_uns_key
        For an array of protein counts: the ``uns`` key holding its protein names. AnnData only.
    labels_key
        ``obs`` column of labels (for the ``'gene-label'`` / ``'protein-label'`` dispersions).
    empirical_protein_background_prior
        Start the protein background prior from the data (a two-component mixture per cell);
        default on with more than 10 proteins.
    override_missing_proteins
        Treat every protein as measured in every batch, even where a batch has no count of it.
        By default a protein without any count in a batch is left out of that batch's
        likelihood and imputed in the outputs (panels that differ between batches).
    lr, train_size, batch_size, early_stopping, reduce_lr_on_plateau
        Training settings (scvi-tools' totalVI defaults 4e-3, 0.9, 256, on, on). With
        ``train_size=1.0`` early stopping and the learning-rate schedule watch the training
        ELBO (there is no validation set). The KL warm-up runs over ``0.75 * n_cells`` steps.
    adversarial_classifier
        Reward the model for fooling a batch classifier on z (weighted by ``1 - kl_weight``).
        Default: on when some batch did not measure some protein (scvi-tools' rule).
    protein_layer
        MuData only: the protein modality's layer of raw counts (default its ``X``); ``layer``
        is the RNA modality's (scvi-tools' ``rna_layer``).
    modalities
        MuData only: scvi-tools' ``modalities`` of ``TOTALVI.setup_mudata``, e.g.
        ``{'rna_layer': 'rna', 'protein_layer': 'prot', 'batch_key': 'rna'}``: the RNA and the
        protein modality, and the modality whose ``obs`` the obs keys are read from (left out:
        the global ``mdata.obs``; a column of the RNA modality is found too). Default: the
        modalities named ``'rna'`` / ``'gex'`` and ``'prot'`` / ``'protein'`` / ``'adt'``.
    expression
        Write the denoised RNA matrix (dense cells x genes float32) and the protein outputs.
        If they need more than 80 % of the memory available now, this is an error before
        training; ``False`` writes only the latent space.
    key_added
        ``obsm`` key of the latent space; the other outputs are named after it, and the
        ``uns`` entry is ``key_added`` without its ``'X_'`` prefix.
    {RunArguments}
    {SetupArguments}
    {TOTALVIArchitecture}

    Returns
    -------
    ``None`` by default; the model if ``return_model``; the copy if ``copy``; ``(adata, model)``
    if both. Writes, rows aligned with ``obs_names``:

    ``adata.obsm['X_totalvi']`` : (cells, n_latent) float32
        Posterior mean of z.
    ``adata.obsm['X_totalvi_denoised_rna']`` : (cells, genes) float32
        Normalised RNA expression (rows sum to 1), each cell in its own batch; columns are
        ``adata.uns['totalvi']['genes']``.
    ``adata.obsm['X_totalvi_denoised_protein']`` : DataFrame (cells, proteins)
        Foreground protein expression, ``(1 - pi) * foreground rate``; proteins a cell's batch
        did not measure are imputed.
    ``adata.obsm['X_totalvi_protein_foreground']`` : DataFrame (cells, proteins)
        Probability that each protein count is foreground (``1 - pi``).
    ``adata.uns['totalvi']`` : dict
        ``params``, ``genes``, ``protein_names``, per-epoch ``history``, ``versions``,
        ``device`` and, with ``store_model``, ``model``.

    For a MuData (``rna`` and ``prot`` stand for its RNA and protein modalities), the same
    values: the joint latent space in ``mdata.obsm['X_totalvi']``, the denoised RNA in
    ``mdata['rna'].obsm['X_totalvi_denoised_rna']``, the protein outputs as float32 layers of
    the protein modality, columns its ``var_names``
    (``mdata['prot'].layers['X_totalvi_denoised_protein']``,
    ``mdata['prot'].layers['X_totalvi_protein_foreground']``), and the record in
    ``mdata.uns['totalvi']`` (its ``params`` add ``protein_layer`` and the ``modalities``
    used). The model's data is ``anndata_from_mudata(mdata)``, and so is the AnnData to give
    the ``tl`` functions: ``tl.differential_expression(anndata_from_mudata(mdata),
    model_key='totalvi', ...)`` finds the model in its ``uns`` (a copy of ``mdata.uns``).
    The RNA modality alone lacks the protein counts the model reads.
    """
    from ..model import TOTALVI

    run_args, rest = split_settings(settings, RunArguments)
    setup_args, architecture = split_settings(rest, SetupArguments)
    run = Run(run_args, default_epochs=None, default_return_model=False)
    uns_key = check_key_added(key_added)
    mdata, read = None, {}
    if is_mudata(adata):
        if protein_expression_obsm_key != "protein_expression" or protein_names_uns_key is not None:
            msg = (
                "protein_expression_obsm_key and protein_names_uns_key apply to an AnnData; a MuData's protein "
                "counts are its protein modality's X (or `protein_layer=`), named by its var_names."
            )
            raise TypeError(msg)
        read = {"modalities": modalities, "rna_layer": setup_args.pop("layer", None), "protein_layer": protein_layer}
        mdata, adata = adata, anndata_from_mudata(adata, **read)
    elif not _is_anndata(adata):
        msg = f"pp.totalvi takes an AnnData or a mudata.MuData, got {type(adata).__name__}."
        raise TypeError(msg)
    elif protein_layer is not None or modalities is not None:
        msg = (
            "protein_layer and modalities apply to a MuData; an AnnData holds its protein counts in "
            "obsm[protein_expression_obsm_key]."
        )
        raise TypeError(msg)
    try:
        genes = run.genes(adata)
        if expression:
            check_expression_fits(adata.n_obs, len(genes), n_matrices=1)
        start = logg.info(f"computing totalVI on {adata.n_obs} cells x {len(genes)} genes")
        model = TOTALVI(
            adata, protein_expression_obsm_key=protein_expression_obsm_key,
            protein_names_uns_key=protein_names_uns_key, genes=genes, labels_key=labels_key,
            empirical_protein_background_prior=empirical_protein_background_prior,
            override_missing_proteins=override_missing_proteins, random_state=run.random_state, **setup_args,
            **architecture,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        if mdata is not None:
            e.add_note(_READ_NOTE)
        raise
    model.train(
        run.max_epochs, lr=lr, train_size=train_size, batch_size=batch_size, early_stopping=early_stopping,
        reduce_lr_on_plateau=reduce_lr_on_plateau, adversarial_classifier=adversarial_classifier, device=run.device,
        strategy=run.strategy, random_state=run.random_state, progress_bar=run.progress_bar,
    )  # fmt: skip

    if mdata is None:
        adata = run.target(adata, model)
    else:
        mdata = mdata.copy() if run.copy else mdata
        if run.copy:  # the copy's cells and counts: checked once, on the original (which warned already)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                model.attach(anndata_from_mudata(mdata, **read), bound=model.bind())
    with model.seeded(run.random_state):
        latent = model.get_latent_representation()
    values = {key_added: latent}
    if expression:
        with model.seeded(run.random_state):
            rna, protein = model.get_normalized_expression()
        with model.seeded(run.random_state):
            foreground = model.get_protein_foreground_probability()
        values[f"{key_added}_denoised_rna"] = rna.to_numpy(dtype=np.float32)
        values[f"{key_added}_denoised_protein"] = protein
        values[f"{key_added}_protein_foreground"] = foreground
    params = dict(
        protein_expression_obsm_key=protein_expression_obsm_key, protein_names_uns_key=protein_names_uns_key,
        labels_key=labels_key, empirical_protein_background_prior=empirical_protein_background_prior,
        override_missing_proteins=override_missing_proteins, lr=lr, train_size=train_size, batch_size=batch_size,
        early_stopping=early_stopping, reduce_lr_on_plateau=reduce_lr_on_plateau,
        adversarial_classifier=model.adversarial_classifier, **run.params(model, key_added),
        **SetupArguments(**setup_args).to_dict(),
    )  # fmt: skip
    if mdata is not None:
        params.update(_mudata_params(mdata, read))
    record = model.uns_record(params, store_model=run.store_model)
    record["protein_names"] = np.asarray(model.setup.protein_names, dtype=object)
    if mdata is None:
        adata.obsm.update(values)
        adata.uns[uns_key] = record
        where = f"{', '.join(repr(k) for k in values)} (adata.obsm)\n    '{uns_key}' (adata.uns)"
    else:
        where = _write_mudata(mdata, values, key_added, read["modalities"])
        mdata.uns[uns_key] = record
        where += f"\n    '{uns_key}' (mdata.uns)"
    logg.info("    finished", time=start, deep=f"added\n    {where}")
    return run.result(adata if mdata is None else mdata, model)


_READ_NOTE = (
    "pp.totalvi read the MuData as scanpy_scvi.data.anndata_from_mudata does: 'adata' is that AnnData, with "
    "X = the RNA modality's `layer` (default X), obsm['protein_expression'] = the protein modality's "
    "`protein_layer` (default X), obs = mdata.obs and the RNA modality's obs."
)


def _is_anndata(obj: Any) -> bool:
    from anndata import AnnData

    return isinstance(obj, AnnData)


def _mudata_params(mdata: MuData, read: dict[str, Any]) -> dict[str, Any]:
    """How the MuData was read, for ``uns[key]['params']``: the RNA layer (``layer``), the
    protein layer and the modalities (scvi-tools' form, the two matrices' always)."""
    rna, protein, _ = mudata_modalities(mdata, read["modalities"])
    used = {k: v for k, v in (read["modalities"] or {}).items() if v is not None}
    used.update(rna_layer=rna, protein_layer=protein)
    return {"layer": read["rna_layer"], "protein_layer": read["protein_layer"], "modalities": used}


def _write_mudata(mdata: MuData, values: dict[str, Any], key_added: str, modalities) -> str:
    """The outputs where a scverse user looks: the joint latent in ``mdata.obsm``, the RNA ones
    in the RNA modality's ``obsm``, the protein ones as layers of the protein modality (their
    columns are its ``var_names``), each in its table's row order."""
    rna, protein, _ = mudata_modalities(mdata, modalities)
    cells = mdata.obs_names
    mdata.obsm[key_added] = values[key_added]  # first: writing into a view makes it a MuData of its own
    written = [f"'{key_added}' (mdata.obsm)"]
    for name, key in ((rna, f"{key_added}_denoised_rna"), (protein, f"{key_added}_denoised_protein"),
                      (protein, f"{key_added}_protein_foreground")):  # fmt: skip
        if key not in values:
            continue
        mod = mdata.mod[name]
        value = values[key]
        if name == protein:
            value = value.reindex(columns=mod.var_names.astype(str)).to_numpy(dtype=np.float32)
        rows = cells.get_indexer(mod.obs_names)
        value = value if np.array_equal(rows, np.arange(len(cells))) else value[rows]
        if name == protein:
            mod.layers[key] = value
            written.append(f"'{key}' (mdata[{name!r}].layers)")
        else:
            mod.obsm[key] = value
            written.append(f"'{key}' (mdata[{name!r}].obsm)")
    return ", ".join(written)
