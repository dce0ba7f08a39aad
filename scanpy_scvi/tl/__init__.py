"""Tools that work on a fitted model: differential expression."""

from ._de import differential_expression, within_cluster_differential_expression

__all__ = ["differential_expression", "within_cluster_differential_expression"]
