"""scArches' ``scarches.utils``: the gene-program mask of expiMap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ... import tl

if TYPE_CHECKING:
    import os

    from anndata import AnnData

__all__ = ["add_annotations"]


def add_annotations(
    adata: AnnData,
    files: str | os.PathLike | Sequence[str | os.PathLike],
    min_genes: int = 0,
    max_genes: int | None = None,
    varm_key: str = "I",
    uns_key: str = "terms",
    clean: bool = True,
    genes_use_upper: bool = True,
) -> None:
    """scArches' ``add_annotations`` (:func:`~scanpy_scvi.tl.add_gene_programs` with scArches'
    defaults ``min_genes=0``, ``clean=True``): ``adata.varm[varm_key]`` (genes x programs, 0/1)
    and ``adata.uns[uns_key]`` (the program names, a list as scArches writes it) of the gene
    sets in the GMT ``files`` with more than ``min_genes`` (and fewer than ``max_genes``) of
    adata's genes.

    GMT lines are read as ``name <tab> description <tab> genes``: scArches splits them on any
    whitespace, so a name with spaces (Reactome's) became several "genes" and the description a
    gene; names keep their case (scArches upper-cases them with ``genes_use_upper``). No gene set
    left is an error here (scArches writes an empty mask).
    """
    tl.add_gene_programs(
        adata, files, min_genes=min_genes, max_genes=max_genes, clean=clean, genes_use_upper=genes_use_upper,
        varm_key=varm_key, uns_key=uns_key,
    )  # fmt: skip
    adata.uns[uns_key] = [str(t) for t in adata.uns[uns_key]]
