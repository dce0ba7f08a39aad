"""Tools that work on a fitted model (differential expression, batch-corrected counts, reference
mapping, gene-program enrichment) or on any latent space (integration scores); the gene-program
mask expiMap uses."""

from ..data import read_gmt
from ._counts import batch_corrected_counts
from ._de import differential_expression, within_cluster_differential_expression
from ._integration import integration_scores
from ._programs import add_gene_programs, gene_program_enrichment
from ._surgery import map_query

__all__ = [
    "add_gene_programs",
    "batch_corrected_counts",
    "differential_expression",
    "gene_program_enrichment",
    "integration_scores",
    "map_query",
    "read_gmt",
    "within_cluster_differential_expression",
]
