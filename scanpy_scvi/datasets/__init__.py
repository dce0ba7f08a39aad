"""Example datasets: a small real batch-integration dataset and a simulator."""

from __future__ import annotations

from ._cellbench import cellbench_lung, synthetic_counts

__all__ = ["cellbench_lung", "synthetic_counts"]
