"""Correlations between features over posterior samples (``get_feature_correlation_matrix``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterable


def sample_correlation(blocks: Iterable[np.ndarray], width: int, correlation_type: str) -> np.ndarray:
    """(width, width) correlation between the columns of the float64 sample blocks (rows are
    samples): Spearman over all rows held in memory, or Pearson accumulated block by block."""
    if correlation_type == "spearman":
        from scipy.stats import spearmanr

        return spearmanr(np.concatenate(list(blocks))).statistic
    sums, cross, n = np.zeros(width), np.zeros((width, width)), 0
    for draws in blocks:
        sums += draws.sum(0)
        cross += draws.T @ draws
        n += len(draws)
    cov = cross / n - np.outer(sums / n, sums / n)
    sd = np.sqrt(np.diag(cov))
    return cov / np.outer(sd, sd)
