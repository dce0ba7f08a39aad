"""scArches' ``scarches.models``: its trVAE, expiMap and scPoli over our model classes, and the
scvi-tools models it re-exports (the doors of :mod:`scanpy_scvi.compat.scvi_tools`)."""

from ..scvi_tools import SCANVI, SCVI, TOTALVI  # scArches re-exports scvi-tools' models
from ._expimap import EXPIMAP
from ._scpoli import SCPOLI
from ._trvae import TRVAE

scPoli = SCPOLI  # scArches' spelling; the class keeps ours, which its model files record

__all__ = ["EXPIMAP", "SCANVI", "SCPOLI", "SCVI", "TOTALVI", "TRVAE", "scPoli"]
