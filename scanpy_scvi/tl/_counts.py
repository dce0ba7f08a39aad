"""Batch-corrected counts: every cell decoded in one batch, then sampled from the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._compat import logg
from ..nn._likelihoods import sample_counts
from ._model import resolve_model

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import SCVI


def batch_corrected_counts(
    adata: AnnData,
    *,
    transform_batch: str | Sequence[str],
    library_size: Literal["observed", "latent"] | float = "observed",
    expected: bool = False,
    model: SCVI | None = None,
    model_key: str = "scvi",
    layer_added: str | None = None,
    random_state: int | None = 0,
    batch_size: int | None = None,
    inplace: bool = True,
) -> sp.csr_matrix | np.ndarray | None:
    """Counts "as if every cell came from one batch", for tools that need counts.

    Each cell's latent z (one posterior draw) is decoded in ``transform_batch`` (a list
    averages the decoded frequencies, dispersions and zero-inflation over those batches),
    scaled by a library size, and a count is drawn from the model's own likelihood (NB, ZINB
    or Poisson). Cells are processed in minibatches; only the sparse result is kept.

    Parameters
    ----------
    adata
        AnnData with the model's genes. The model must cover **all** of ``adata``'s genes
        (train with ``use_highly_variable_genes=False``), since a layer has a column for
        every gene.
    transform_batch
        Batch category (or list of categories) to decode every cell in.
    library_size
        ``'observed'``: the cell's total counts over the model genes; ``'latent'``: the
        model's library (observed, or a draw of the learned one); a number: the same library
        for every cell (e.g. ``1e4``).
    expected
        Write the expected counts (the likelihood mean; ZINB: ``(1 - pi) * mu``) as a dense
        float32 layer instead of a sample.
    model
        A fitted :class:`~scanpy_scvi.SCVI`; default the model stored by ``pp.scvi`` in
        ``adata.uns[model_key]['model']``.
    model_key
        ``uns`` key of the stored model.
    layer_added
        Layer to write; default ``'scvi_corrected_counts'`` (``'scvi_expected_counts'`` with
        ``expected``). Its parameters go to ``adata.uns[layer_added]['params']``.
    random_state
        Seed of the posterior draws and count samples; the same seed gives the same counts.
    batch_size
        Cells per minibatch.
    inplace
        Write the layer; ``False`` returns the matrix and leaves ``adata`` unchanged.

    Returns
    -------
    With ``inplace=False``: a CSR matrix of integer-valued float32 counts (cells x genes, in
    ``adata.var_names`` order), or a dense float32 array with ``expected``.
    """
    from ..model._scvi import _seeded

    model = resolve_model(adata, model, model_key)
    genes = model.setup.genes
    if len(genes) != adata.n_vars or set(genes) != set(adata.var_names.astype(str)):
        msg = (
            f"The model covers {len(genes)} of adata's {adata.n_vars} genes; a counts layer needs every gene. "
            "Train on all genes (`pp.scvi(..., use_highly_variable_genes=False)`), or work on "
            "`adata[:, model.setup.genes]`."
        )
        raise ValueError(msg)
    codes = model._transform_codes(transform_batch)
    if not (library_size in ("observed", "latent") or (isinstance(library_size, (int, float)) and library_size > 0)):
        msg = f"library_size must be 'observed', 'latent' or a positive number, got {library_size!r}."
        raise ValueError(msg)
    bound, idx = model._select(adata, None)
    perm = pd.Index(genes).get_indexer(adata.var_names.astype(str))  # model columns in adata order
    likelihood = model.module.gene_likelihood

    blocks = []
    with _seeded(random_state, model.device), model._inference():
        for rows, t in model._minibatches(bound, idx, batch_size, encoder_only=True):
            inf = model.module.inference(t)
            gens = [model.module.generative(inf["z"], inf["library"], t, transform_batch=c) for c in codes]
            rho = sum(g["px_scale"] for g in gens) / len(gens)
            theta = sum(g["theta"].expand_as(rho) for g in gens) / len(gens)
            pi = sum(torch.sigmoid(g["zi_logits"]) for g in gens) / len(gens)
            if library_size == "observed":
                lib = torch.as_tensor(bound.library[idx[rows]], dtype=rho.dtype, device=rho.device)[:, None]
            elif library_size == "latent":
                lib = torch.exp(inf["library"])
            else:
                lib = torch.full((rho.shape[0], 1), float(library_size), dtype=rho.dtype, device=rho.device)
            mu = lib * rho
            if expected:
                value = mu * (1 - pi) if likelihood == "zinb" else mu
                blocks.append(value.cpu().numpy()[:, perm])
            else:
                logits = torch.logit(pi, eps=1e-7) if likelihood == "zinb" else None
                counts = sample_counts(mu, theta, logits, likelihood)
                blocks.append(sp.csr_matrix(counts.cpu().numpy()[:, perm]))
    result = np.concatenate(blocks).astype(np.float32) if expected else sp.vstack(blocks, format="csr")
    if not inplace:
        return result
    key = layer_added or ("scvi_expected_counts" if expected else "scvi_corrected_counts")
    adata.layers[key] = result
    batches = [model.setup.batch_categories[c] for c in codes]
    adata.uns[key] = {
        "params": {
            "transform_batch": batches,
            "library_size": str(library_size) if isinstance(library_size, str) else float(library_size),
            "expected": bool(expected),
            "gene_likelihood": likelihood,
            "model_key": model_key,
            "random_state": -1 if random_state is None else int(random_state),
        }
    }
    logg.info(f"    added '{key}' ({'expected' if expected else 'sampled'} counts in batch {batches}) (adata.layers)")
    return None
