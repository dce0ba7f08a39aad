"""Batch-corrected counts: every cell decoded in one batch, then sampled from the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._compat import logg
from ..nn import sample_counts, to_numpy
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
    key_added: str | None = None,
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

    A model trained on all of ``adata``'s genes gives a layer (a column for every gene); a
    model trained on some of them (e.g. the highly variable genes, ``pp.scvi``'s default)
    gives an ``obsm`` matrix over the model's genes, whose names are stored next to it (as
    ``pp.scvi`` does for ``obsm['X_scvi_denoised']``).

    Parameters
    ----------
    adata
        AnnData with (at least) the model's genes, matched by name.
    transform_batch
        Batch category (or list of categories) to decode every cell in.
    library_size
        ``'observed'``: the cell's total counts over the model genes; ``'latent'``: the
        model's library (observed, or a draw of the learned one); a number: the same library
        for every cell (e.g. ``1e4``).
    expected
        Write the expected counts (the likelihood mean; ZINB: ``(1 - pi) * mu``) as a dense
        float32 matrix instead of a sample.
    model
        A fitted :class:`~scanpy_scvi.SCVI`; default the model stored by ``pp.scvi`` in
        ``adata.uns[model_key]['model']``.
    model_key
        ``uns`` key of the stored model.
    key_added
        Key of the result in ``layers`` or ``obsm`` (see below) and in ``uns``; default
        ``'scvi_corrected_counts'`` (``'scvi_expected_counts'`` with ``expected``).
    layer_added
        The historical name of ``key_added``; give one of them (or both with the same value).
    random_state
        Seed of the posterior draws and count samples; the same seed gives the same counts.
    batch_size
        Cells per minibatch.
    inplace
        Write the result into ``adata``; ``False`` returns the matrix and leaves ``adata``
        unchanged.

    Returns
    -------
    With ``inplace=False``: a CSR matrix of integer-valued float32 counts, or a dense float32
    array with ``expected``; cells x genes, the columns in ``adata.var_names`` order for a
    model of all ``adata``'s genes, else in the model's gene order (``model.setup.genes``).
    With ``inplace=True``: ``None``, and writes (``key`` is ``key_added``):

    ``adata.layers[key]`` : CSR float32 (or dense float32 with ``expected``)
        When the model covers all of ``adata``'s genes: cells x genes in
        ``adata.var_names`` order.
    ``adata.obsm[key]`` : CSR float32 (or dense float32 with ``expected``)
        When the model covers only some of ``adata``'s genes: cells x model genes; the
        columns are ``adata.uns[key]['genes']``.
    ``adata.uns[key]`` : dict
        ``params`` (``transform_batch``, ``library_size``, ``expected``,
        ``gene_likelihood``, ``model_key``, ``random_state``) and, for the ``obsm`` result,
        ``genes``.
    """
    key = _resolve_key(key_added, layer_added, expected)
    from ..model import SCVI

    model = resolve_model(adata, model, model_key, (SCVI,))
    genes = list(model.setup.genes)
    codes = model.batch_codes(transform_batch)
    if not (library_size in ("observed", "latent") or (isinstance(library_size, (int, float)) and library_size > 0)):
        msg = f"library_size must be 'observed', 'latent' or a positive number, got {library_size!r}."
        raise ValueError(msg)
    bound, idx = model.select(adata, None)  # checks adata against the model (genes, batches, counts)
    var_names = adata.var_names.astype(str)
    all_genes = len(genes) == adata.n_vars and set(genes) == set(var_names)
    # columns: adata's genes in adata order for an all-gene model (a layer), else the model's genes
    perm = pd.Index(genes).get_indexer(var_names) if all_genes else slice(None)
    likelihood = model.module.gene_likelihood
    if likelihood not in ("nb", "zinb", "poisson"):
        msg = f"batch_corrected_counts needs a count likelihood; this model reconstructs with {likelihood!r}."
        raise ValueError(msg)

    blocks = []
    with model.seeded(random_state), model.inference_mode():
        for rows, t in model.minibatches(bound, idx, batch_size, encoder_only=True):
            inf = model.module.inference(t)
            gens = [model.module.generative(inf["z"], inf["library"], t, transform_batch=c) for c in codes]
            rho = sum(g["px_scale"] for g in gens) / len(gens)
            theta = sum(g["theta"].expand_as(rho) for g in gens) / len(gens)
            pi = sum(torch.sigmoid(g["zi_logits"]) for g in gens) / len(gens) if likelihood == "zinb" else None
            if library_size == "observed":
                lib = torch.as_tensor(bound.library[idx[rows]], dtype=rho.dtype, device=rho.device)[:, None]
            elif library_size == "latent":
                lib = torch.exp(inf["library"])
            else:
                lib = torch.full((rho.shape[0], 1), float(library_size), dtype=rho.dtype, device=rho.device)
            mu = lib * rho
            if expected:
                value = mu * (1 - pi) if likelihood == "zinb" else mu
                blocks.append(to_numpy(value)[:, perm])
            else:
                logits = torch.logit(pi, eps=1e-7) if likelihood == "zinb" else None
                counts = sample_counts(mu, theta, logits, likelihood)
                blocks.append(sp.csr_matrix(to_numpy(counts)[:, perm]))
    result = np.concatenate(blocks) if expected else sp.vstack(blocks, format="csr", dtype=np.float32)
    if not inplace:
        return result

    batches = [model.setup.batch_categories[c] for c in codes]
    record = {
        "params": {
            "transform_batch": batches,
            "library_size": str(library_size) if isinstance(library_size, str) else float(library_size),
            "expected": bool(expected),
            "gene_likelihood": likelihood,
            "model_key": model_key,
            "random_state": -1 if random_state is None else int(random_state),
        }
    }
    if all_genes:
        adata.layers[key] = result
        where = f"adata.layers['{key}'], all {adata.n_vars} genes"
    else:
        adata.obsm[key] = result
        record["genes"] = np.asarray(genes, dtype=object)
        where = (
            f"adata.obsm['{key}'], the model's {len(genes)} of adata's {adata.n_vars} genes, "
            f"named in adata.uns['{key}']['genes']"
        )
    adata.uns[key] = record
    logg.info(f"    added '{key}' ({'expected' if expected else 'sampled'} counts in batch {batches}) ({where})")
    return None


def _resolve_key(key_added: str | None, layer_added: str | None, expected: bool) -> str:
    """``key_added`` or its historical name ``layer_added`` (equal if both), else the default."""
    for name, value in (("key_added", key_added), ("layer_added", layer_added)):
        if value is not None and (not isinstance(value, str) or not value):
            msg = f"{name} must be a non-empty string, got {value!r}."
            raise TypeError(msg)
    if key_added is not None and layer_added is not None and key_added != layer_added:
        msg = (
            f"key_added={key_added!r} and layer_added={layer_added!r} disagree; layer_added is the "
            "historical name of key_added, so give one of them."
        )
        raise ValueError(msg)
    return key_added or layer_added or ("scvi_expected_counts" if expected else "scvi_corrected_counts")
