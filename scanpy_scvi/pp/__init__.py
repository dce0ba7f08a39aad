"""Preprocessing: fit a model and write its representation (``pp.scvi``)."""

from ._scvi import scvi

__all__ = ["scvi"]
