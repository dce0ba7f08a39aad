"""Preprocessing: fit a model and write its representation (``pp.scvi``, ``pp.scanvi``)."""

from ._scanvi import scanvi
from ._scvi import REFERENCE_MAPPING, scvi

__all__ = ["REFERENCE_MAPPING", "scanvi", "scvi"]
