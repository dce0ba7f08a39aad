"""Tools that work on a fitted model (differential expression, batch-corrected counts, reference
mapping) or on any latent space (integration scores)."""

from ._counts import batch_corrected_counts
from ._de import differential_expression, within_cluster_differential_expression
from ._integration import integration_scores
from ._surgery import map_query

__all__ = [
    "batch_corrected_counts",
    "differential_expression",
    "integration_scores",
    "map_query",
    "within_cluster_differential_expression",
]
