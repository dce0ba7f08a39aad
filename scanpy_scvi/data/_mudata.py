"""CITE-seq in a MuData (RNA and protein modalities, the scverse layout) as the one AnnData that
totalVI reads: RNA counts in ``X``, protein counts in ``obsm['protein_expression']``.

``mudata`` is an optional dependency: it is imported only when a MuData is passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._compat import warn

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

PROTEIN_OBSM_KEY = "protein_expression"
# the keys of scvi-tools' `modalities` (the arguments of TOTALVI.setup_mudata): the two matrices,
# then the obs keys, each read from the named modality's obs (None: the global mdata.obs)
MATRIX_KEYS = ("rna_layer", "protein_layer")
OBS_KEYS = (
    "batch_key", "labels_key", "panel_key", "size_factor_key", "categorical_covariate_keys",
    "continuous_covariate_keys",
)  # fmt: skip
_RNA_NAMES = ("rna", "gex", "gene expression", "gene_expression")
_PROTEIN_NAMES = ("prot", "protein", "proteins", "adt", "antibody capture", "antibody_capture", "cite")


def anndata_from_mudata(
    mdata: MuData,
    *,
    modalities: Mapping[str, str | None] | None = None,
    rna_layer: str | None = None,
    protein_layer: str | None = None,
) -> AnnData:
    """The AnnData totalVI reads from a MuData with an RNA and a protein modality.

    Parameters
    ----------
    mdata
        A :class:`mudata.MuData` whose RNA and protein modalities hold raw counts of the same
        cells (any row order; rows are matched by ``obs_names``).
    modalities
        scvi-tools' ``modalities`` of ``TOTALVI.setup_mudata``: ``'rna_layer'`` and
        ``'protein_layer'`` name the RNA and the protein modality; an obs key
        (``'batch_key'``, ``'labels_key'``, ``'panel_key'``, ``'size_factor_key'``,
        ``'categorical_covariate_keys'``, ``'continuous_covariate_keys'``) names the
        modality whose ``obs`` it is read from (``None``: the global ``mdata.obs``). Default
        (and for a matrix key left out): the RNA modality is the one named ``'rna'`` (or
        ``'gex'``), the protein modality the one named ``'prot'``, ``'protein'`` or ``'adt'``
        (case-insensitive); no such modality, or more than one, is an error.
    rna_layer, protein_layer
        Layer of the RNA / protein modality holding the raw counts; default its ``X``.

    Returns
    -------
    An AnnData with ``mdata``'s cells in ``mdata.obs_names`` order:

    ``X``
        The RNA counts (``rna_layer`` of the RNA modality, else its ``X``); ``var`` is the
        RNA modality's (``var['highly_variable']`` included). The same matrix object, not a
        copy, when the modality's rows are in the MuData's order.
    ``obsm['protein_expression']``
        DataFrame of the protein counts, the protein modality's ``var_names`` as columns
        (sharing the protein modality's dense array when its rows are in order; a sparse
        matrix is densified). The other entries of ``mdata.obsm``, except the modality
        masks, are passed on.
    ``obs``
        The global ``mdata.obs`` columns and the RNA modality's ``obs`` columns (and, when
        ``modalities`` reads obs keys from the protein modality, its columns), so that
        ``batch_key='batch'`` finds a column of either. A column name in both is taken as
        scvi-tools reads an obs key: from the modality that ``modalities`` names for the obs
        keys, else from the global ``mdata.obs``; a warning names the columns whose values
        differ.
    ``uns``
        A shallow copy of ``mdata.uns`` (a model that ``pp.totalvi`` stored there is found by
        the ``tl`` functions; what they write stays in this AnnData).

    Every cell of ``mdata`` must be in both modalities, as scvi-tools' ``setup_mudata``
    requires (a ``ValueError`` says how to keep the paired cells): totalVI needs both
    counts of a cell. ``mdata`` is never modified.
    """
    from anndata import AnnData

    check_mudata(mdata)
    rna_name, protein_name, obs_name = mudata_modalities(mdata, modalities)
    rna, protein = mdata.mod[rna_name], mdata.mod[protein_name]
    rna_rows, protein_rows = _paired_rows(mdata, rna_name, protein_name)
    X = _rows(_counts(rna, rna_layer, rna_name, "rna_layer"), rna_rows)
    Y = _rows(_counts(protein, protein_layer, protein_name, "protein_layer"), protein_rows)
    if isinstance(Y, pd.DataFrame):
        Y = Y.to_numpy()
    Y = Y.toarray() if sp.issparse(Y) else np.asarray(Y)  # a handful of proteins: dense is small
    names = mdata.obs_names
    proteins = pd.DataFrame(Y, index=names, columns=protein.var_names.astype(str), copy=False)
    obsm = {k: v for k, v in mdata.obsm.items() if k not in mdata.mod}
    obsm[PROTEIN_OBSM_KEY] = proteins
    obs = _obs(mdata, rna_name, rna_rows, protein_name, protein_rows, obs_name)
    return AnnData(X=X, obs=obs, var=rna.var, obsm=obsm, uns=dict(mdata.uns))


def mudata_modalities(mdata: MuData, modalities: Mapping[str, str | None] | None = None) -> tuple[str, str, str | None]:
    """``(rna, protein, obs)`` modality names of ``mdata`` under scvi-tools' ``modalities``
    (see :func:`anndata_from_mudata`); ``obs`` is the modality the obs keys are read from,
    ``None`` for the global ``mdata.obs``."""
    check_mudata(mdata)
    given: dict[str, Any] = {}
    if modalities is not None:
        if not isinstance(modalities, Mapping):
            msg = f"modalities must be a dict (argument name -> modality name), got {type(modalities).__name__}."
            raise TypeError(msg)
        given = dict(modalities)
    unknown = sorted(set(given) - set(MATRIX_KEYS) - set(OBS_KEYS))
    if unknown:
        msg = f"Unknown modalities keys {unknown}: scvi-tools' keys are {list(MATRIX_KEYS + OBS_KEYS)}."
        raise ValueError(msg)
    names = list(mdata.mod)
    for key, mod in given.items():
        if mod is not None and mod not in mdata.mod:
            msg = f"modalities[{key!r}]={mod!r} is not a modality of mdata (modalities: {names})."
            raise ValueError(msg)
    rna = given.get("rna_layer") or _detect(names, _RNA_NAMES, "RNA", "rna_layer")
    protein = given.get("protein_layer") or _detect(names, _PROTEIN_NAMES, "protein", "protein_layer")
    if rna == protein:
        msg = f"The RNA and the protein counts must be different modalities; both are {rna!r}."
        raise ValueError(msg)
    obs_mods = sorted({given[k] for k in OBS_KEYS if given.get(k) is not None})
    if len(obs_mods) > 1:
        msg = (
            f"modalities reads obs keys from several modalities ({obs_mods}): totalVI takes them from one obs "
            "table. Copy the columns into one modality (or into mdata.obs, then leave the obs keys out)."
        )
        raise ValueError(msg)
    if obs_mods and obs_mods[0] not in (rna, protein):
        msg = (
            f"modalities reads obs keys from modality {obs_mods[0]!r}: totalVI reads them from mdata.obs, the RNA "
            f"modality {rna!r} or the protein modality {protein!r}. Copy the columns there."
        )
        raise ValueError(msg)
    return rna, protein, (obs_mods[0] if obs_mods else None)


def is_mudata(obj: Any) -> bool:
    """Whether ``obj`` is a MuData, without importing mudata (an optional dependency)."""
    return any(c.__name__ == "MuData" and c.__module__.split(".")[0] == "mudata" for c in type(obj).__mro__)


def check_mudata(mdata: Any) -> None:
    """Raise unless ``mdata`` is a MuData (an ``ImportError`` when ``mudata`` is not installed)."""
    try:
        from mudata import MuData
    except ImportError as e:
        msg = "Reading a MuData needs the mudata package: `pip install scanpy-scvi[mudata]`."
        raise ImportError(msg) from e
    if not isinstance(mdata, MuData):
        msg = f"Expected a mudata.MuData (RNA and protein modalities), got {type(mdata).__name__}."
        raise TypeError(msg)


def _detect(names: list[str], candidates: tuple[str, ...], what: str, key: str) -> str:
    found = [n for n in names if str(n).lower() in candidates]
    if len(found) == 1:
        return found[0]
    which = f"several {what} modalities" if found else f"no {what} modality"
    msg = (
        f"mdata has {which} among {names} (looked for {list(candidates)}). Name it: "
        f"`modalities={{{key!r}: <modality>}}`, e.g. modalities={{'rna_layer': 'rna', 'protein_layer': 'prot'}}."
    )
    raise ValueError(msg)


def _paired_rows(mdata: MuData, rna: str, protein: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Each modality's row of every cell of ``mdata`` (None: already in ``mdata``'s order);
    an error unless every cell is in both modalities."""
    cells = mdata.obs_names
    for name, index in (("mdata", cells), (rna, mdata.mod[rna].obs_names), (protein, mdata.mod[protein].obs_names)):
        if not index.is_unique:
            where = "mdata" if name == "mdata" else f"mdata[{name!r}]"
            msg = f"{where}.obs_names are not unique; run `mdata.obs_names_make_unique()` first."
            raise ValueError(msg)
    rows = []
    for name in (rna, protein):
        own = mdata.mod[name].obs_names
        pos = own.get_indexer(cells)
        lacking, extra = int(np.sum(pos < 0)), len(own) - int(np.sum(pos >= 0))
        if lacking or extra:
            example = list(cells[pos < 0][:3]) if lacking else list(own.difference(cells)[:3])
            msg = (
                f"totalVI needs the RNA and the protein counts of every cell, but {lacking} cells of mdata are not "
                f"in modality {name!r} and {extra} cells of {name!r} are not in mdata.obs_names (e.g. {example}). "
                f"Keep the paired cells first: `mdata = mdata[mdata.obs_names.isin(mdata[{rna!r}].obs_names) & "
                f"mdata.obs_names.isin(mdata[{protein!r}].obs_names)].copy()` (muon: `mu.pp.intersect_obs(mdata)`; "
                "after changing a modality, `mdata.update()`); scvi-tools' setup_mudata refuses unpaired cells too."
            )
            raise ValueError(msg)
        rows.append(None if np.array_equal(pos, np.arange(len(cells))) else pos)
    return rows[0], rows[1]


def _counts(adata: AnnData, layer: str | None, name: str, arg: str):
    if layer is None:
        if adata.X is None:
            msg = f"mdata[{name!r}].X is empty; name the layer of its counts with `{arg}=`."
            raise ValueError(msg)
        return adata.X
    if not isinstance(layer, str):
        msg = f"{arg} must be a layer name (str) or None, got {type(layer).__name__}."
        raise TypeError(msg)
    if layer not in adata.layers:
        msg = f"{arg}={layer!r} not found in mdata[{name!r}].layers (layers: {list(adata.layers)})."
        raise KeyError(msg)
    return adata.layers[layer]


def _rows(matrix, rows: np.ndarray | None):
    if rows is None:
        return matrix
    return matrix.iloc[rows] if isinstance(matrix, pd.DataFrame) else matrix[rows]


def _obs(mdata: MuData, rna: str, rna_rows, protein: str, protein_rows, obs_mod: str | None) -> pd.DataFrame:
    """The global obs and the RNA modality's obs in one table (plus the protein modality's when
    the obs keys are read from it); on a name clash the table the obs keys are read from wins."""
    cells = mdata.obs_names

    def aligned(name: str, rows) -> pd.DataFrame:
        table = mdata.mod[name].obs
        return (table if rows is None else table.iloc[rows]).set_axis(cells)

    tables = {"mdata.obs": mdata.obs, f"mdata[{rna!r}].obs": aligned(rna, rna_rows)}
    if obs_mod == protein:
        tables[f"mdata[{protein!r}].obs"] = aligned(protein, protein_rows)
    winner = "mdata.obs" if obs_mod is None else f"mdata[{obs_mod!r}].obs"
    order = [w for w in tables if w != winner] + [winner]  # ascending precedence: the last one wins
    merged: dict[str, pd.Series] = {}
    source: dict[str, str] = {}
    differ = []
    for where in order:
        for column, values in tables[where].items():
            if column in merged and not _same_values(merged[column], values):
                differ.append(f"{column!r} ({source[column]} and {where})")
            merged[column], source[column] = values, where
    if differ:
        warn(
            f"obs columns in several tables with different values: {', '.join(differ)}; using those of {winner}, "
            "where the obs keys are read from (`modalities={'batch_key': <modality>}` picks a modality)."
        )
    columns = dict.fromkeys(c for t in tables.values() for c in t.columns)  # global columns first
    return pd.DataFrame({c: merged[c] for c in columns}, index=cells)


def _same_values(a: pd.Series, b: pd.Series) -> bool:
    return pd.Series(a.to_numpy(dtype=object)).equals(pd.Series(b.to_numpy(dtype=object)))
