"""Bayesian differential expression with scVI (Lopez et al. 2018; Boyeau et al. 2019).

For two groups of cells, normalised expression (the decoder's frequencies) is sampled from
the posterior of each group and the log fold changes of paired samples are tested. This
module holds the public functions: argument checks, the comparisons, and the
:func:`scanpy.tl.rank_genes_groups` layout of the results. Sampling and statistics are the
engine's (:mod:`scanpy_scvi.tl._de_engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._compat import logg
from ._de_engine import REST, Comparison, run
from ._model import resolve_model

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import SCVI


def differential_expression(
    adata: AnnData,
    *,
    groupby: str | None = None,
    group1: str | Sequence[str] | None = None,
    group2: str | None = None,
    idx1: Sequence[int] | np.ndarray | None = None,
    idx2: Sequence[int] | np.ndarray | None = None,
    mode: Literal["change", "vanilla"] = "change",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    pseudocounts: float | None = None,
    batch_correction: bool = False,
    batchid1: Sequence[str] | None = None,
    batchid2: Sequence[str] | None = None,
    n_samples: int = 5000,
    model: SCVI | None = None,
    model_key: str = "scvi",
    key_added: str = "scvi_de",
    rank_by: Literal["up", "down", "both"] = "up",
    inplace: bool = True,
    random_state: int | None = 0,
    progress_bar: bool = True,
    batch_size: int | None = None,
    protein_prior_count: float = 0.1,
    include_protein_background: bool = False,
) -> pd.DataFrame | None:
    """Bayesian differential expression between groups of cells.

    ``mode='change'`` (default) estimates the posterior of the log2 fold change (LFC) of
    normalised expression, ``log2(s1 + pc) - log2(s2 + pc)``, and calls a gene DE when the
    posterior probability that ``abs(LFC) >= delta`` (``proba_de``) is high; the genes flagged in
    ``is_de_fdr_<fdr_target>`` control the posterior expected false discovery rate.
    ``mode='vanilla'`` computes the Bayes factor of ``s1 > s2`` against ``s1 <= s2``.
    These are posterior probabilities, not p-values: none are computed.

    With ``inplace=True`` (default), ``adata.uns[key_added]`` holds ``names``, ``scores``,
    ``logfoldchanges`` (``lfc_median``) and every column listed under Returns as record
    arrays with one field per ``group1``, all genes of each group ranked by ``scores`` (see
    ``rank_by``: by default up-regulated genes first, as scanpy's markers), plus ``params``.
    ``pvals`` and ``pvals_adj`` are present only so that scanpy's readers work, and are NaN.
    ``sc.get.rank_genes_groups_df(adata, group, key=key_added)`` and
    ``sc.pl.rank_genes_groups_dotplot(adata, key=key_added)`` read it.

    Parameters
    ----------
    adata
        The AnnData the model was fitted on, or one with the same genes (by name) and known
        batches.
    groupby
        ``obs`` column of groups. Default comparison: each group against the rest
        (one-vs-all).
    group1
        Group(s) of ``groupby`` to test (default: all of them).
    group2
        Reference group; ``None`` compares with all other cells (``'rest'``).
    idx1, idx2
        Instead of ``groupby``: boolean masks or integer positions of the two groups
        (``idx2=None``: all other cells).
    mode
        ``'change'`` or ``'vanilla'``.
    delta
        LFC threshold of the change mode (log2 scale; 0.25 as in scvi-tools).
    fdr_target
        Target of the posterior expected FDR for ``is_de_fdr_<fdr_target>``.
    pseudocounts
        Added to the frequencies before the LFC. ``None``: estimated as in scvi-tools (the
        0.9 quantile of the largest sampled frequency among genes with mean raw count < 0.01
        in a group, divided by the number of genes); LFC summaries use 1e-3 times it.
    batch_correction
        Decode both groups in the same batches (``batchid1`` / ``batchid2``, default all
        batches) and compare samples within a batch, so batch effects cancel. ``False``:
        decode each cell in its own batch.
    batchid1, batchid2
        Batches to decode group 1 / group 2 in with ``batch_correction``. When they are
        disjoint the samples are compared across batches.
    n_samples
        Posterior samples per group (cells drawn with replacement, one z draw each).
    model
        A fitted :class:`~scanpy_scvi.SCVI`, :class:`~scanpy_scvi.SCANVI` or
        :class:`~scanpy_scvi.TOTALVI`. Default: the model a ``pp`` function stored in
        ``adata.uns[model_key]['model']`` (``model_key='totalvi'`` for ``pp.totalvi``).
    model_key
        ``uns`` key of the stored model.
    key_added
        ``uns`` key of the results.
    rank_by
        Order of the genes in the ``rank_genes_groups`` layout, and its ``scores``:

        ``'up'`` (default)
            Up-regulated in group 1 first: by the posterior probability of up-regulation,
            ``proba_up`` = P(LFC >= ``delta``) in change mode, ``proba_m1`` = P(s1 > s2) in
            vanilla mode.
        ``'down'``
            Down-regulated first: by ``proba_down`` = P(LFC < -``delta``) (change) or
            ``proba_m2`` (vanilla).
        ``'both'``
            Either direction (the order before ``rank_by`` existed): by ``proba_de`` (change)
            or ``bayes_factor`` (vanilla; that of s1 > s2, so the same order as ``'up'``
            except for ties).

        With ``'up'`` and ``'down'``, genes of equal probability (e.g. many at 1) are ordered
        by ``lfc_median``, the largest change in that direction first; ``'both'`` keeps the
        DataFrame's order. Recorded as ``params['rank_by']`` (and the ranking column as
        ``params['scores']``). The DataFrame returned with ``inplace=False`` is not
        reordered by it (see Returns).
    inplace
        Write the results into ``adata.uns[key_added]`` (``rank_genes_groups`` layout) and
        return None; ``False`` returns the DataFrame instead and leaves ``adata`` unchanged.
    random_state
        Seed of the cell draws and posterior samples; the same seed gives the same result.
    progress_bar
        Show a bar over the comparisons.
    batch_size
        Draws decoded per minibatch (default 256; cells encoded per minibatch as in the model).
    protein_prior_count, include_protein_background
        totalVI only: the features are the genes and then the proteins; the protein values are
        the foreground expression (plus the background with ``include_protein_background``)
        plus ``protein_prior_count`` (scvi-tools' defaults 0.1 and off). Proteins a cell's batch
        did not measure are imputed, as in ``TOTALVI.get_normalized_expression``.

    Returns
    -------
    With ``inplace=False``, a DataFrame with one row per gene and comparison (all genes),
    indexed by gene and sorted within each comparison by ``proba_de`` (change) or
    ``bayes_factor`` (vanilla) whatever ``rank_by`` (sort by ``proba_up`` or ``proba_down``
    for a directional order), with columns:

    ``proba_de``, ``proba_not_de``
        Posterior probability that ``abs(LFC) >= delta`` (the larger of ``proba_up`` and
        ``proba_down``), and one minus it (change mode).
    ``proba_up``, ``proba_down``
        Posterior probability that ``LFC >= delta`` (up in group 1) and that
        ``LFC < -delta`` (down) (change mode).
    ``proba_m1``, ``proba_m2``
        Posterior probability that ``s1 > s2`` and its complement (vanilla mode).
    ``bayes_factor``
        ``log(p / (1 - p))`` of ``proba_de`` (change) or ``proba_m1`` (vanilla); > 0 favours DE / up.
    ``scale1``, ``scale2``
        Mean sampled normalised expression (frequencies summing to 1 over the model genes).
    ``pseudocounts``, ``delta``
        The pseudocount and threshold used.
    ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max``
        Summaries of the posterior LFC samples (log2, group 1 over group 2; both modes).
    ``raw_mean1``, ``raw_mean2``
        Mean raw count per cell in each group.
    ``non_zeros_proportion1``, ``non_zeros_proportion2``
        Fraction of cells with a nonzero count.
    ``raw_normalized_mean1``, ``raw_normalized_mean2``
        Mean of the counts scaled to 10,000 per cell (over the model genes).
    ``is_de_fdr_<fdr_target>``
        The largest set of top genes (by ``proba_de``) whose posterior expected FDR
        (mean of ``proba_not_de``) is at most ``fdr_target`` (change mode).
    ``comparison``, ``group1``, ``group2``
        ``'<group1> vs <group2>'`` and the two labels.

    """
    _check_test_args(mode, delta, fdr_target, n_samples, rank_by)
    model = resolve_model(adata, model, model_key, _de_models())
    comparisons = _comparisons(adata, groupby, group1, group2, idx1, idx2)
    start = logg.info(f"scVI differential expression ({mode} mode), {len(comparisons)} comparison(s)")
    result = run(
        adata, model, comparisons, mode=mode, delta=delta, fdr_target=fdr_target, pseudocounts=pseudocounts,
        codes1=_batch_codes(model, batch_correction, batchid1), codes2=_batch_codes(model, batch_correction, batchid2),
        n_samples=n_samples, random_state=random_state, progress_bar=progress_bar, batch_size=batch_size,
        decode_options=_decode_options(model, protein_prior_count, include_protein_background),
    )  # fmt: skip
    if not inplace:
        logg.info("    finished", time=start)
        return result
    adata.uns[key_added] = _rank_genes_groups_layout(
        result,
        mode=mode,
        rank_by=rank_by,
        params={
            "groupby": groupby if groupby is not None else "idx1",
            "reference": group2 if group2 is not None else REST,
            **_params(model, mode, delta, fdr_target, n_samples, batch_correction, model_key, random_state),
        },
    )
    logg.info("    finished", time=start, deep=f"added\n    '{key_added}', DE results (adata.uns)")
    return None


def within_cluster_differential_expression(
    adata: AnnData,
    *,
    cluster_key: str,
    condition_key: str,
    condition1: str,
    condition2: str,
    clusters: Sequence[str] | None = None,
    min_cells: int = 10,
    mode: Literal["change", "vanilla"] = "change",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    pseudocounts: float | None = None,
    n_samples: int = 5000,
    model: SCVI | None = None,
    model_key: str = "scvi",
    key_added: str = "scvi_de_within",
    rank_by: Literal["up", "down", "both"] = "up",
    inplace: bool = True,
    random_state: int | None = 0,
    progress_bar: bool = True,
    batch_size: int | None = None,
    protein_prior_count: float = 0.1,
    include_protein_background: bool = False,
) -> pd.DataFrame | None:
    """Within each cluster, compare two conditions (e.g. stimulated vs control).

    The within-cluster loop of the original scVI ``Posterior`` API: for every cluster of
    ``cluster_key`` with at least ``min_cells`` cells in each condition, the cells of
    ``condition1`` are tested against those of ``condition2`` as in
    :func:`differential_expression` (same parameters and output columns). Each cell is
    decoded in its own batch; give the condition as ``condition_key``, not as the model's
    batch, or the condition effect is what the model removed.

    Parameters
    ----------
    adata
        AnnData with the model's genes.
    cluster_key
        ``obs`` column of clusters or cell types.
    condition_key
        ``obs`` column of conditions.
    condition1, condition2
        The conditions compared (LFC = condition1 over condition2).
    clusters
        Clusters to test (default: all with enough cells).
    min_cells
        Minimum cells per condition in a cluster; smaller clusters are skipped with a log message.
    mode, delta, fdr_target, pseudocounts, n_samples, model, model_key, rank_by, random_state, progress_bar, batch_size, protein_prior_count, include_protein_background
        As in :func:`differential_expression` (``rank_by='up'``: genes up in ``condition1``
        first).
    key_added
        ``uns`` key of the results (``rank_genes_groups`` layout, one field per cluster, with
        ``params['groupby'] = cluster_key``, so scanpy's DE plots show the clusters).
    inplace
        Write into ``adata.uns[key_added]``; ``False`` returns the DataFrame.

    Returns
    -------
    As :func:`differential_expression`: ``group1`` is the cluster and ``comparison`` reads
    ``'<cluster>: <condition1> vs <condition2>'``.
    """
    _check_test_args(mode, delta, fdr_target, n_samples, rank_by)
    model = resolve_model(adata, model, model_key, _de_models())
    for key in (cluster_key, condition_key):
        if key not in adata.obs.columns:
            msg = f"{key!r} not found in adata.obs (columns: {list(adata.obs.columns)[:20]})."
            raise KeyError(msg)
    cluster = adata.obs[cluster_key].astype(str).to_numpy()
    condition = adata.obs[condition_key].astype(str).to_numpy()
    for c in (condition1, condition2):
        if c not in set(condition):
            msg = f"Condition {c!r} not found in obs[{condition_key!r}] ({sorted(set(condition))})."
            raise ValueError(msg)
    names = list(dict.fromkeys(cluster)) if clusters is None else [str(c) for c in clusters]
    comparisons = []
    for name in names:
        cells1 = np.flatnonzero((cluster == name) & (condition == condition1))
        cells2 = np.flatnonzero((cluster == name) & (condition == condition2))
        if min(len(cells1), len(cells2)) < min_cells:
            logg.info(f"    skipping {name!r}: {len(cells1)} vs {len(cells2)} cells (< min_cells={min_cells})")
            continue
        comparisons.append(Comparison(name, condition2, cells1, cells2))
    if not comparisons:
        msg = f"No cluster has at least min_cells={min_cells} cells in both {condition1!r} and {condition2!r}."
        raise ValueError(msg)
    start = logg.info(f"scVI within-cluster DE, {condition1} vs {condition2}, {len(comparisons)} clusters")
    result = run(
        adata, model, comparisons, mode=mode, delta=delta, fdr_target=fdr_target, pseudocounts=pseudocounts,
        codes1=[None], codes2=[None], n_samples=n_samples, random_state=random_state, progress_bar=progress_bar,
        batch_size=batch_size, decode_options=_decode_options(model, protein_prior_count, include_protein_background),
    )  # fmt: skip
    result["comparison"] = [f"{g}: {condition1} vs {condition2}" for g in result["group1"]]
    if not inplace:
        logg.info("    finished", time=start)
        return result
    adata.uns[key_added] = _rank_genes_groups_layout(
        result,
        mode=mode,
        rank_by=rank_by,
        params={
            "groupby": cluster_key,
            "reference": condition2,
            "condition_key": condition_key,
            "condition1": condition1,
            "condition2": condition2,
            **_params(model, mode, delta, fdr_target, n_samples, False, model_key, random_state),
        },
    )
    logg.info("    finished", time=start, deep=f"added\n    '{key_added}', DE results (adata.uns)")
    return None


def _de_models() -> tuple[type, ...]:
    from ..model import SCVI, TOTALVI

    return (SCVI, TOTALVI)


def _decode_options(model, protein_prior_count: float, include_protein_background: bool) -> dict:
    """totalVI's protein options of the decoded features (none for RNA-only models)."""
    if not model.setup.protein_names:
        return {}
    if not protein_prior_count >= 0:
        msg = f"protein_prior_count must be >= 0, got {protein_prior_count}."
        raise ValueError(msg)
    return {"protein_prior_count": float(protein_prior_count), "include_protein_background": include_protein_background}


def _params(model, mode, delta, fdr_target, n_samples, batch_correction, model_key, random_state) -> dict:
    return {
        "method": f"scvi_{mode}",
        "use_raw": False,
        "layer": model.setup.layer if model.setup.layer is not None else "X",
        "corr_method": "posterior expected FDR (no p-values)",
        "delta": float(delta),
        "fdr_target": float(fdr_target),
        "n_samples": int(n_samples),
        "batch_correction": bool(batch_correction),
        "model_key": model_key,
        "random_state": -1 if random_state is None else int(random_state),
    }


def _check_test_args(mode, delta, fdr_target, n_samples, rank_by) -> None:
    if mode not in ("change", "vanilla"):
        msg = f"mode must be 'change' or 'vanilla', got {mode!r}."
        raise ValueError(msg)
    if not (isinstance(delta, (int, float)) and delta > 0):
        msg = f"delta must be a positive number (log2 fold change), got {delta!r}."
        raise ValueError(msg)
    if not 0 < fdr_target < 1:
        msg = f"fdr_target must be in (0, 1), got {fdr_target}."
        raise ValueError(msg)
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        msg = f"n_samples must be an integer >= 2, got {n_samples!r}."
        raise ValueError(msg)
    if rank_by not in ("up", "down", "both"):
        msg = f"rank_by must be 'up', 'down' or 'both', got {rank_by!r}."
        raise ValueError(msg)


# -- groups ---------------------------------------------------------------------------------------
def _comparisons(adata, groupby, group1, group2, idx1, idx2) -> list[Comparison]:
    n = adata.n_obs
    if idx1 is not None:
        if groupby is not None:
            msg = "Pass either groupby (with group1/group2) or idx1/idx2, not both."
            raise ValueError(msg)
        cells1 = _positions(idx1, n, "idx1")
        cells2 = np.setdiff1d(np.arange(n), cells1) if idx2 is None else _positions(idx2, n, "idx2")
        if np.intersect1d(cells1, cells2).size:
            msg = "idx1 and idx2 overlap; the two groups must be disjoint."
            raise ValueError(msg)
        return [Comparison("group1", REST if idx2 is None else "group2", cells1, cells2)]
    if groupby is None:
        msg = "Pass groupby (an obs column) or idx1 to define the groups."
        raise ValueError(msg)
    if groupby not in adata.obs.columns:
        msg = f"groupby={groupby!r} not found in adata.obs (columns: {list(adata.obs.columns)[:20]})."
        raise KeyError(msg)
    labels = adata.obs[groupby]
    if labels.isna().any():
        msg = f"obs[{groupby!r}] has {int(labels.isna().sum())} missing values; fill or drop them first."
        raise ValueError(msg)
    values = labels.astype(str).to_numpy()
    present = list(labels.cat.categories.astype(str)) if hasattr(labels, "cat") else sorted(set(values))
    present = [g for g in present if np.any(values == g)]
    groups = present if group1 is None else ([group1] if isinstance(group1, str) else [str(g) for g in group1])
    for g in [*groups, *([] if group2 is None else [group2])]:
        if g not in present:
            msg = f"Group {g!r} not found in obs[{groupby!r}] (groups with cells: {present})."
            raise ValueError(msg)
    if group1 is None and len(groups) < 2:
        msg = f"obs[{groupby!r}] has a single group; one-vs-rest needs at least two."
        raise ValueError(msg)
    out = []
    for g in groups:
        if g == group2:
            continue
        cells1 = np.flatnonzero(values == g)
        cells2 = np.flatnonzero(values != g) if group2 is None else np.flatnonzero(values == group2)
        out.append(Comparison(g, REST if group2 is None else group2, cells1, cells2))
    return out


def _positions(idx, n: int, name: str) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (n,):
            msg = f"{name} as a boolean mask must have length n_obs={n}."
            raise ValueError(msg)
        arr = np.flatnonzero(arr)
    elif arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= n):
        msg = f"{name} must be a boolean mask or integer positions in [0, {n})."
        raise ValueError(msg)
    arr = np.unique(arr.astype(np.int64))
    if arr.size == 0:
        msg = f"{name} selects no cells."
        raise ValueError(msg)
    return arr


def _batch_codes(model: SCVI, batch_correction: bool, batchid) -> list[int | None]:
    if not batch_correction:
        if batchid is not None:
            msg = "batchid1/batchid2 need batch_correction=True."
            raise ValueError(msg)
        return [None]
    values = model.setup.batch_categories if batchid is None else batchid
    values = [values] if isinstance(values, str) else list(values)
    return [model.setup.batch_code(v) for v in values]


# -- the rank_genes_groups layout --------------------------------------------------------------------
RANK_SCORES = {  # mode -> rank_by -> the column a group's genes are ranked by: the layout's scores
    "change": {"up": "proba_up", "down": "proba_down", "both": "proba_de"},
    "vanilla": {"up": "proba_m1", "down": "proba_m2", "both": "bayes_factor"},
}


def _ranked(genes: pd.DataFrame, score: str, rank_by: str) -> pd.DataFrame:
    """One comparison's rows by ``score``, highest first; ties by the LFC in that direction
    (``'both'``: the table's own order, sorted by ``score`` already)."""
    if rank_by == "both":
        return genes
    lfc = genes["lfc_median"].to_numpy()
    return genes.iloc[np.lexsort((lfc if rank_by == "down" else -lfc, -genes[score].to_numpy()))]


def _rank_genes_groups_layout(result: pd.DataFrame, *, mode: str, rank_by: str, params: dict) -> dict:
    """The ``rank_genes_groups`` structure: one record-array field per group1, ranked by score."""
    score = RANK_SCORES[mode][rank_by]
    groups = list(dict.fromkeys(result["group1"]))
    per_group = {g: _ranked(result[result["group1"] == g], score, rank_by) for g in groups}
    n = len(next(iter(per_group.values())))

    def records(values_of) -> np.recarray:
        return np.rec.fromarrays([values_of(per_group[g]) for g in groups], names=groups)

    out = {
        "params": {**params, "rank_by": rank_by, "scores": score},
        "names": records(lambda d: d.index.to_numpy().astype(object)),
        "scores": records(lambda d: d[score].to_numpy(np.float32)),
        "logfoldchanges": records(lambda d: d["lfc_median"].to_numpy(np.float32)),
        "pvals": records(lambda d: np.full(n, np.nan, dtype=np.float32)),
        "pvals_adj": records(lambda d: np.full(n, np.nan, dtype=np.float32)),
    }
    extra = [c for c in result.columns if c not in ("comparison", "group1", "group2", "pseudocounts", "delta")]
    for c in extra:
        dtype = bool if c.startswith("is_de_fdr") else np.float32
        out[c] = records(lambda d, c=c, dtype=dtype: d[c].to_numpy(dtype))
    return out
