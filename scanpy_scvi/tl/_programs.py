"""Gene programs: the mask expiMap decodes through (``add_gene_programs``) and the Bayes-factor
enrichment of programs between groups of cells (``gene_program_enrichment``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._compat import logg, warn
from ..data import Programs, gene_sets, program_rows
from ._model import resolve_model

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import EXPIMAP


def add_gene_programs(
    adata: AnnData,
    programs: Programs,
    *,
    min_genes: int = 12,
    max_genes: int | None = None,
    clean: bool = False,
    genes_use_upper: bool = True,
    varm_key: str = "I",
    uns_key: str = "terms",
    copy: bool = False,
) -> AnnData | None:
    """Build the gene-program mask expiMap decodes through, from GMT files (scArches' ``add_annotations``).

    Parameters
    ----------
    adata
        The AnnData whose genes (``var_names``, gene symbols) the programs are matched to.
    programs
        A GMT file, several, or a dict of program name -> genes. Nothing is downloaded.
    min_genes, max_genes
        Keep programs with more than ``min_genes`` (and fewer than ``max_genes``) of adata's genes
        (scArches' rule).
    clean
        Drop the prefix up to the first underscore (``REACTOME_``, ``HALLMARK_``) and cut names
        to 30 characters (scArches' ``clean``).
    genes_use_upper
        Match gene symbols case-insensitively.
    varm_key, uns_key
        Where the mask and the program names go.
    copy
        Work on (and return) a copy.

    Returns
    -------
    ``None`` (or the copy). Writes ``adata.varm['I']`` (genes x programs, int32 0/1) and
    ``adata.uns['terms']`` (program names), and logs how many programs and genes were kept.
    """
    sets = gene_sets(programs)
    adata = adata.copy() if copy else adata
    kept, columns = [], []
    for name, rows in program_rows(adata.var_names, sets, genes_use_upper=genes_use_upper).items():
        if len(rows) > min_genes and (max_genes is None or len(rows) < max_genes):
            kept.append(name.split("_", 1)[-1][:30] if clean else name)
            columns.append(rows)
    if not kept:
        msg = (
            f"None of the {len(sets)} programs has more than min_genes={min_genes} of adata's genes. Check that "
            "var_names are gene symbols of the same species as the GMT file."
        )
        raise ValueError(msg)
    mask = np.zeros((adata.n_vars, len(kept)), dtype=np.int32)
    for k, rows in enumerate(columns):
        mask[rows, k] = 1
    adata.varm[varm_key] = mask
    adata.uns[uns_key] = np.asarray(kept, dtype=object)
    covered = int((mask.sum(1) > 0).sum())
    logg.info(
        f"kept {len(kept)} of {len(sets)} gene programs (more than {min_genes} genes"
        + (f", fewer than {max_genes}" if max_genes else "")
        + f"); they cover {covered} of {adata.n_vars} genes"
    )
    return adata if copy else None


def gene_program_enrichment(
    adata: AnnData,
    groupby: str,
    *,
    comparison: str | Sequence[str] = "rest",
    groups: Sequence[str] | None = None,
    model: EXPIMAP | None = None,
    model_key: str = "expimap",
    n_samples: int = 5000,
    use_directions: bool = True,
    directions: Sequence[float] | None = None,
    only_active: bool = True,
    key_added: str = "expimap_enrichment",
    random_state: int | None = 0,
) -> pd.DataFrame:
    """Bayes factors of program activity between groups of cells (expiMap's ``latent_enrich``).

    For a group and its comparison cells, ``n_samples`` random pairs of cells are drawn; for each
    program, p = mean over pairs of P(z_group > z_other) under the two cells' Gaussian posteriors
    (``0.5 erfc((m_other - m_group) / sqrt(2 (v_group + v_other)))``); the Bayes factor is
    ``log p - log(1 - p)``: large and positive when the program is more active in the group.

    Parameters
    ----------
    adata
        AnnData with the model's genes and conditions (the model's own, or a mapped query).
    groupby
        ``obs`` column of groups (e.g. ``'condition'``).
    comparison
        ``'rest'`` (each group against all other cells) or the group(s) to compare against
        (e.g. ``'CTRL'``).
    groups
        The groups to test (default: every group not in ``comparison``).
    model, model_key
        The :class:`~scanpy_scvi.EXPIMAP` model, or the ``uns`` key where ``pp.expimap`` stored it.
    n_samples
        Random cell pairs per group.
    use_directions
        Multiply the latent values by the programs' directions first, so that a positive Bayes
        factor means up-regulated genes (scArches' ``use_directions``).
    directions
        With ``use_directions``: the per-program signs to use instead of the model's, one per
        program in :meth:`~scanpy_scvi.EXPIMAP.programs` order (e.g. scArches'
        ``latent_directions(method='counts')``).
    only_active
        Test only active programs (inactive ones carry no signal).
    key_added
        ``adata.uns`` key of the results, in ``rank_genes_groups`` layout (``names`` = programs by
        decreasing Bayes factor, ``scores`` = Bayes factors), so that
        ``sc.get.rank_genes_groups_df(adata, group, key=key_added)`` and
        ``sc.pl.rank_genes_groups(adata, key=key_added)`` show programs.
    random_state
        Seed of the pair draws.

    Returns
    -------
    DataFrame: one row per group and program, ``group``, ``program``, ``p_h0`` (P(group >
    comparison)), ``p_h1``, ``bf``, the program's ``direction`` and ``direction_confidence``
    (see :meth:`~scanpy_scvi.EXPIMAP.programs`), sorted by group and decreasing ``bf``. With
    ``use_directions``, a warning names the programs whose Bayes factor is strong
    (``abs(bf) > log(10)``) but whose direction is a coin flip (``direction_confidence < 0.1``).
    """
    from scipy.special import erfc

    from ..model import EXPIMAP

    model = resolve_model(adata, model, model_key, (EXPIMAP,))
    if groupby not in adata.obs.columns:
        msg = f"{groupby!r} not found in adata.obs (columns: {list(adata.obs.columns)[:20]})."
        raise KeyError(msg)
    labels = adata.obs[groupby].astype(str).to_numpy()
    present = list(pd.unique(labels))
    against = None if comparison == "rest" else ([comparison] if isinstance(comparison, str) else list(comparison))
    unknown = [g for g in (against or []) + list(groups or []) if g not in present]
    if unknown:
        msg = f"{unknown} not found in adata.obs[{groupby!r}] (groups: {present[:20]})."
        raise ValueError(msg)
    tested = list(groups) if groups is not None else [g for g in present if against is None or g not in against]
    table = model.programs()
    keep = table["active"].to_numpy() if only_active else np.ones(len(table), dtype=bool)
    signs = table["direction"].to_numpy() if use_directions else np.ones(len(table), dtype=np.float32)
    if directions is not None:
        if not use_directions:
            msg = "directions are only used with use_directions=True."
            raise ValueError(msg)
        signs = np.asarray(directions, dtype=np.float32).ravel()
        if signs.shape != (len(table),):
            msg = f"directions must have one value per program ({len(table)}), got {signs.shape[0]}."
            raise ValueError(msg)
    bound, idx = model.select(adata, None)
    with model.seeded(random_state):
        means, variances = model.latent(bound, idx, return_dist=True)
    means = means * signs
    rng = np.random.default_rng(random_state)
    rows = []
    for group in tested:
        mine = np.flatnonzero(labels == group)
        others = np.flatnonzero(labels != group if against is None else np.isin(labels, against))
        if len(mine) == 0 or len(others) == 0:
            continue
        a, b = rng.choice(mine, n_samples), rng.choice(others, n_samples)
        p = 0.5 * erfc((means[b] - means[a]) / np.sqrt(2 * (variances[a] + variances[b])))
        p_h0 = p.mean(0)
        bf = np.log(p_h0 + 1e-12) - np.log(1 - p_h0 + 1e-12)
        rows.extend(
            (group, table.index[k], float(p_h0[k]), float(1 - p_h0[k]), float(bf[k])) for k in np.flatnonzero(keep)
        )
    result = pd.DataFrame(rows, columns=["group", "program", "p_h0", "p_h1", "bf"])
    result = result.sort_values(["group", "bf"], ascending=[True, False], kind="stable").reset_index(drop=True)
    for column in ("direction", "direction_confidence"):
        result[column] = table[column].reindex(result["program"]).to_numpy()
    if use_directions:
        _warn_uncertain_directions(result)
    adata.uns[key_added] = _rank_layout(result, groupby, comparison)
    logg.info(
        f"    added '{key_added}': Bayes factors of {int(keep.sum())} programs, {len(tested)} group(s) (adata.uns)"
    )
    return result


# A Bayes factor beyond log(10) is strong evidence (odds 10:1); a direction confidence under 0.1
# means the program's up and down weights nearly cancel, so the sign of its factor is arbitrary.
STRONG_BF, WEAK_DIRECTION = np.log(10), 0.1


def _warn_uncertain_directions(result: pd.DataFrame) -> None:
    """Name the programs whose strong Bayes factor has a coin-flip sign."""
    doubtful = result[(result["bf"].abs() > STRONG_BF) & (result["direction_confidence"] < WEAK_DIRECTION)]
    if len(doubtful):
        names = sorted(set(doubtful["program"]))
        warn(
            f"The direction of {len(names)} strongly changed program(s) is uncertain (up and down gene weights "
            f"nearly cancel, direction_confidence < {WEAK_DIRECTION}): {names[:5]}; the sign of their Bayes factor "
            "may be flipped. Check with use_directions=False and model.term_genes(program)."
        )


def _rank_layout(result: pd.DataFrame, groupby: str, comparison) -> dict:
    """``rank_genes_groups``-style record arrays (one field per group, programs by decreasing bf)."""
    groups = list(pd.unique(result["group"]))
    per = {g: result[result["group"] == g] for g in groups}
    n = min(len(v) for v in per.values()) if per else 0

    def records(column: str, dtype) -> np.recarray:
        return np.rec.fromarrays([per[g][column].to_numpy()[:n].astype(dtype) for g in groups], names=groups)

    return {
        "params": {
            "groupby": groupby,
            "reference": comparison if isinstance(comparison, str) else ",".join(comparison),
            "method": "expimap_bayes_factor",
        },
        "names": records("program", object),
        "scores": records("bf", np.float32),
    }
