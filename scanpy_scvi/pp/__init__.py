"""Preprocessing: fit a model and write its representation (``pp.scvi``, ``pp.scanvi``, ``pp.totalvi``, ``pp.trvae``, ``pp.scpoli``, ``pp.expimap``)."""

from ._expimap import expimap
from ._scanvi import scanvi
from ._scpoli import scpoli
from ._scvi import REFERENCE_MAPPING, scvi
from ._totalvi import totalvi
from ._trvae import trvae

__all__ = ["REFERENCE_MAPPING", "expimap", "scanvi", "scpoli", "scvi", "totalvi", "trvae"]
