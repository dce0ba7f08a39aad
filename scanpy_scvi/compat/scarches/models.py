"""scArches' ``scarches.models``: its trVAE, expiMap and scPoli over our model classes."""

from ._expimap import EXPIMAP
from ._scpoli import SCPOLI
from ._trvae import TRVAE

scPoli = SCPOLI  # scArches' spelling; the class keeps ours, which its model files record

__all__ = ["EXPIMAP", "SCPOLI", "TRVAE", "scPoli"]
