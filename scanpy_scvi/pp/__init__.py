"""Preprocessing: fit a model and write its representation (``pp.scvi``, ``pp.scanvi``, ``pp.totalvi``, ``pp.trvae``)."""

from ._scanvi import scanvi
from ._scvi import REFERENCE_MAPPING, scvi
from ._totalvi import totalvi
from ._trvae import trvae

__all__ = ["REFERENCE_MAPPING", "scanvi", "scvi", "totalvi", "trvae"]
