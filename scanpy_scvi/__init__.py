"""scanpy-scvi: scVI-family models as one-line calls in a scanpy workflow."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import datasets, pl, pp, tl
from .model import EXPIMAP, SCANVI, SCPOLI, SCVI, TOTALVI, TRVAE

try:
    __version__ = version("scanpy-scvi")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["EXPIMAP", "SCANVI", "SCPOLI", "SCVI", "TOTALVI", "TRVAE", "__version__", "datasets", "pl", "pp", "tl"]
