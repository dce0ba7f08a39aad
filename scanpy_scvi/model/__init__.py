"""Model objects."""

from ._scvi import SCVI

__all__ = ["SCVI"]
