"""Protein counts of CITE-seq data in ``adata.obsm``: names, checks, which proteins a batch measured."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData


def protein_names_of(adata: AnnData, obsm_key: str, names_uns_key: str | None) -> list[str]:
    """The protein names of ``adata.obsm[obsm_key]``: its DataFrame columns, or for an array the
    list in ``adata.uns[names_uns_key]`` (default: ``protein_0``, ``protein_1``, ...)."""
    values = _obsm(adata, obsm_key)
    if isinstance(values, pd.DataFrame):
        names = [str(c) for c in values.columns]
    elif names_uns_key is not None:
        if names_uns_key not in adata.uns:
            msg = f"protein_names_uns_key={names_uns_key!r} not found in adata.uns (keys: {list(adata.uns)[:20]})."
            raise KeyError(msg)
        names = [str(n) for n in np.asarray(adata.uns[names_uns_key]).ravel()]
        if len(names) != values.shape[1]:
            msg = (
                f"adata.uns[{names_uns_key!r}] has {len(names)} protein names but adata.obsm[{obsm_key!r}] has "
                f"{values.shape[1]} columns."
            )
            raise ValueError(msg)
    else:
        names = [f"protein_{i}" for i in range(values.shape[1])]
    if not names:
        msg = f"adata.obsm[{obsm_key!r}] has no protein columns."
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = f"adata.obsm[{obsm_key!r}] has duplicate protein names; make them unique first."
        raise ValueError(msg)
    return names


def read_proteins(
    adata: AnnData,
    obsm_key: str,
    names: list[str],
    names_uns_key: str | None,
    *,
    check_counts: bool,
    allow_missing: bool = False,
) -> np.ndarray:
    """``adata.obsm[obsm_key]`` as float32 (cells, proteins) in the order of ``names``, checked:
    the same proteins (by name), finite, non-negative and (``check_counts``) integer.

    ``allow_missing`` (a query mapped onto a reference): proteins the AnnData lacks, or all of
    them when it has no protein counts, read as zeros; the model then treats them as not
    measured in the query's batches and imputes them."""
    if allow_missing and obsm_key not in adata.obsm:
        return np.zeros((adata.n_obs, len(names)), dtype=np.float32)
    values = _obsm(adata, obsm_key)
    where = f"adata.obsm[{obsm_key!r}]"
    if isinstance(values, pd.DataFrame):
        have = [str(c) for c in values.columns]
    elif names_uns_key is not None and names_uns_key in adata.uns:
        have = [str(n) for n in np.asarray(adata.uns[names_uns_key]).ravel()]
    elif values.shape[1] == len(names):
        have = list(names)  # an unnamed array: its columns are taken in the model's order
    else:
        have = [f"protein_{i}" for i in range(values.shape[1])]
    missing = [n for n in names if n not in have]
    if missing and allow_missing:
        return _with_zeros(values, have, names, where, check_counts)
    if missing:
        msg = (
            f"{where} lacks {len(missing)} of the model's {len(names)} proteins: {missing[:10]} (it has "
            f"{have[:10]}). Give the proteins the model was trained on, with the same names."
        )
        raise ValueError(msg)
    matrix = values.to_numpy() if isinstance(values, pd.DataFrame) else values
    matrix = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    return _checked(matrix[:, pd.Index(have).get_indexer(names)], where, check_counts)


def _checked(matrix: np.ndarray, where: str, check_counts: bool) -> np.ndarray:
    if not np.issubdtype(matrix.dtype, np.number) or np.issubdtype(matrix.dtype, np.complexfloating):
        msg = f"{where} has dtype {matrix.dtype}; totalVI needs numeric raw protein counts."
        raise TypeError(msg)
    Y = np.asarray(matrix, dtype=np.float32)
    if not np.all(np.isfinite(Y)):
        msg = f"{where} contains NaN or infinite values; totalVI needs raw protein counts."
        raise ValueError(msg)
    if Y.size and Y.min() < 0:
        msg = f"{where} contains negative values (min {Y.min():.3g}): not counts. Pass the raw antibody counts."
        raise ValueError(msg)
    if check_counts and not np.array_equal(Y, np.round(Y)):
        msg = (
            f"{where} contains non-integer values: it looks normalised (CLR or log). totalVI models raw "
            "antibody counts; pass them, or `check_counts=False` if they are legitimately non-integer."
        )
        raise ValueError(msg)
    return Y


def _with_zeros(values, have: list[str], names: list[str], where: str, check_counts: bool) -> np.ndarray:
    """The proteins of ``names`` present in ``values`` read and checked, the others zero."""
    present = [n for n in names if n in have]
    frame = values if isinstance(values, pd.DataFrame) else pd.DataFrame(np.asarray(values), columns=have)
    Y = np.zeros((frame.shape[0], len(names)), dtype=np.float32)
    if present:
        checked = _checked(frame[present].to_numpy(), where, check_counts)
        Y[:, [names.index(n) for n in present]] = checked
    return Y


def measured_proteins(Y: np.ndarray, batch: np.ndarray, n_batch: int) -> np.ndarray:
    """(n_batch, n_proteins) boolean: False where a protein has no count at all in a batch (a
    panel that lacks it; scvi-tools' rule). A batch without cells counts as measuring all."""
    measured = np.ones((n_batch, Y.shape[1]), dtype=bool)
    for b in range(n_batch):
        rows = batch == b
        if np.any(rows):
            measured[b] = Y[rows].sum(axis=0) > 0
    return measured


def _obsm(adata: AnnData, key: str):
    if not isinstance(key, str):
        msg = f"protein_expression_obsm_key must be an obsm key (str), got {type(key).__name__}."
        raise TypeError(msg)
    if key not in adata.obsm:
        msg = (
            f"protein_expression_obsm_key={key!r} not found in adata.obsm (keys: {list(adata.obsm.keys())}). "
            "Put the antibody counts there, e.g. `adata.obsm['protein_expression'] = protein_df`."
        )
        raise KeyError(msg)
    values = adata.obsm[key]
    if values.ndim != 2 or values.shape[0] != adata.n_obs:
        msg = f"adata.obsm[{key!r}] must be (cells, proteins); got shape {values.shape}."
        raise ValueError(msg)
    return values
