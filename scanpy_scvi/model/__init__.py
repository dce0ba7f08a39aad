"""Model objects."""

from ._scanvi import SCANVI
from ._scvi import SCVI

__all__ = ["SCANVI", "SCVI"]
