"""Finding the model a ``tl`` function works with."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import SCVI


def resolve_model(adata: AnnData, model: SCVI | None, model_key: str) -> SCVI:
    """``model`` if given, checked against ``adata``; else the one ``pp.scvi`` stored in ``adata``."""
    from ..model import SCVI

    if model is None:
        return SCVI.from_anndata(adata, key=model_key)
    if not isinstance(model, SCVI):
        msg = f"model must be a scanpy_scvi.SCVI, got {type(model).__name__}."
        raise TypeError(msg)
    return model
