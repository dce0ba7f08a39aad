"""``pp.totalvi``: fit totalVI on CITE-seq (RNA + proteins) and write its results in place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._compat import logg
from .._settings import keyword_settings, split_settings
from ..data import SetupArguments
from ..nn import TOTALVIArchitecture
from ._run import Run, RunArguments, check_key_added
from ._scvi import check_expression_fits

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import TOTALVI


@keyword_settings(RunArguments, SetupArguments, TOTALVIArchitecture)
def totalvi(
    adata: AnnData,
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
    expression: bool = True,
    key_added: str = "X_totalvi",
    **settings,
) -> TOTALVI | AnnData | tuple[AnnData, TOTALVI] | None:
    """Fit totalVI on CITE-seq counts: one latent space for RNA and surface proteins, denoised
    protein expression and the probability that each protein count is foreground.

    Same conventions and argument vocabulary as :func:`scanpy_scvi.pp.scvi`; the training
    defaults are scvi-tools' for totalVI.

    Parameters
    ----------
    adata
        Annotated data with raw RNA counts in ``X`` or ``layer`` and raw antibody counts in
        ``adata.obsm[protein_expression_obsm_key]`` (never subset).
    protein_expression_obsm_key
        ``obsm`` key of the protein counts: a DataFrame (columns = protein names) or an array.
    protein_names_uns_key
        For an array of protein counts: the ``uns`` key holding its protein names.
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
    """
    from ..model import TOTALVI

    run_args, rest = split_settings(settings, RunArguments)
    setup_args, architecture = split_settings(rest, SetupArguments)
    run = Run(run_args, default_epochs=None, default_return_model=False)
    uns_key = check_key_added(key_added)
    genes = run.genes(adata)
    if expression:
        check_expression_fits(adata.n_obs, len(genes), n_matrices=1)
    start = logg.info(f"computing totalVI on {adata.n_obs} cells x {len(genes)} genes")
    model = TOTALVI(
        adata, protein_expression_obsm_key=protein_expression_obsm_key, protein_names_uns_key=protein_names_uns_key,
        genes=genes, labels_key=labels_key, empirical_protein_background_prior=empirical_protein_background_prior,
        override_missing_proteins=override_missing_proteins, random_state=run.random_state, **setup_args,
        **architecture,
    )  # fmt: skip
    model.train(
        run.max_epochs, lr=lr, train_size=train_size, batch_size=batch_size, early_stopping=early_stopping,
        reduce_lr_on_plateau=reduce_lr_on_plateau, adversarial_classifier=adversarial_classifier, device=run.device,
        strategy=run.strategy, random_state=run.random_state, progress_bar=run.progress_bar,
    )  # fmt: skip

    adata = run.target(adata, model)
    with model.seeded(run.random_state):
        latent = model.get_latent_representation()
    adata.obsm[key_added] = latent
    outputs = [key_added]
    if expression:
        with model.seeded(run.random_state):
            rna, protein = model.get_normalized_expression()
        with model.seeded(run.random_state):
            foreground = model.get_protein_foreground_probability()
        adata.obsm[f"{key_added}_denoised_rna"] = rna.to_numpy(dtype=np.float32)
        adata.obsm[f"{key_added}_denoised_protein"] = protein
        adata.obsm[f"{key_added}_protein_foreground"] = foreground
        outputs += [f"{key_added}_denoised_rna", f"{key_added}_denoised_protein", f"{key_added}_protein_foreground"]
    params = dict(
        protein_expression_obsm_key=protein_expression_obsm_key, protein_names_uns_key=protein_names_uns_key,
        labels_key=labels_key, empirical_protein_background_prior=empirical_protein_background_prior,
        override_missing_proteins=override_missing_proteins, lr=lr, train_size=train_size, batch_size=batch_size,
        early_stopping=early_stopping, reduce_lr_on_plateau=reduce_lr_on_plateau,
        adversarial_classifier=model.adversarial_classifier, **run.params(model, key_added),
        **SetupArguments(**setup_args).to_dict(),
    )  # fmt: skip
    record = model.uns_record(params, store_model=run.store_model)
    record["protein_names"] = np.asarray(model.setup.protein_names, dtype=object)
    adata.uns[uns_key] = record
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {', '.join(repr(o) for o in outputs)} (adata.obsm)\n    '{uns_key}' (adata.uns)",
    )
    return run.result(adata, model)
