"""Tools that work on a fitted model: differential expression and batch-corrected counts."""

from ._counts import batch_corrected_counts
from ._de import differential_expression, within_cluster_differential_expression

__all__ = ["batch_corrected_counts", "differential_expression", "within_cluster_differential_expression"]
