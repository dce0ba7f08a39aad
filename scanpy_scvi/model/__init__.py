"""Model objects: one base (assembly, training, the internal API, files) and the models on it."""

from ._base import BaseModel
from ._device import resolve_device
from ._expimap import EXPIMAP
from ._scanvi import SCANVI
from ._scpoli import SCPOLI
from ._scvi import SCVI
from ._selection import cell_positions
from ._surgery import query_model
from ._totalvi import TOTALVI
from ._trvae import TRVAE

__all__ = [
    "EXPIMAP",
    "SCANVI",
    "SCPOLI",
    "SCVI",
    "TOTALVI",
    "TRVAE",
    "BaseModel",
    "cell_positions",
    "query_model",
    "resolve_device",
]
