"""Preprocessing: fit a model and write its representation (``pp.scvi``, ``pp.scanvi``, ``pp.totalvi``)."""

from ._scanvi import scanvi
from ._scvi import REFERENCE_MAPPING, scvi
from ._totalvi import totalvi

__all__ = ["REFERENCE_MAPPING", "scanvi", "scvi", "totalvi"]
