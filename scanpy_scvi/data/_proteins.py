"""Protein counts of CITE-seq data in ``adata.obsm``: names, checks, which proteins a batch
measured, and the empirical prior of their background."""

from __future__ import annotations

import warnings
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


def background_prior(
    Y: np.ndarray,
    batch: np.ndarray,
    measured: np.ndarray,
    rng: np.random.Generator,
    n_cells: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """scvi-tools' empirical prior of the protein background, (proteins, batches) mean and scale.

    Per batch: for each of ``n_cells`` cells drawn with replacement, a two-component Gaussian
    mixture on log1p of its measured protein counts; the lower component's mean and standard
    deviation are that cell's background. The batch prior is the mean of the means and the
    scale of the mean (root of the summed variances over ``n_cells``); it is shared by all
    proteins. Batches with fewer than 5 measured proteins or no cells keep (0, 0.05).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    n_batch = measured.shape[0]
    means, scales = np.zeros(n_batch), np.full(n_batch, 0.05)
    for b in range(n_batch):
        rows = np.flatnonzero(batch == b)
        if len(rows) == 0 or measured[b].sum() < 5:
            continue
        cells = Y[rng.choice(rows, size=n_cells)][:, measured[b]]
        mus, sds = [], []
        for counts in cells:
            gmm = GaussianMixture(n_components=2, random_state=int(rng.integers(2**31)))
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConvergenceWarning)
                try:
                    gmm.fit(np.log1p(counts).reshape(-1, 1))
                except (ConvergenceWarning, ValueError):  # e.g. a cell with all counts equal
                    mus.append(0.0)
                    sds.append(0.05)
                    continue
            low = int(np.argmin(gmm.means_.ravel()))
            mus.append(float(gmm.means_.ravel()[low]))
            sds.append(float(np.sqrt(gmm.covariances_.ravel()[low])))
        means[b] = np.mean(mus)
        scales[b] = np.sqrt(np.sum(np.square(sds)) / n_cells**2)
    n_proteins = Y.shape[1]
    return np.tile(means, (n_proteins, 1)).astype(np.float32), np.tile(scales, (n_proteins, 1)).astype(np.float32)


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
