"""Finding the model a ``tl`` function works with."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import BaseModel


def resolve_model(adata: AnnData, model: BaseModel | None, model_key: str, kinds: tuple[type, ...]) -> BaseModel:
    """``model`` if given, else the one a ``pp`` function stored in ``adata.uns[model_key]``;
    it must be one of ``kinds``."""
    from ..model import BaseModel

    if model is None:
        model = BaseModel.from_anndata(adata, key=model_key)
    if not isinstance(model, kinds):
        names = " or ".join(f"scanpy_scvi.{k.__name__}" for k in kinds)
        msg = f"This function needs a {names} model, got {type(model).__name__}."
        raise TypeError(msg)
    return model
