"""The data-setup arguments every model function takes, declared once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .._settings import Settings, setting


@dataclass(frozen=True)
class SetupArguments(Settings):
    """Where the counts and the covariates are in an AnnData (the arguments of
    :meth:`DataSetup.from_adata` that every model shares)."""

    layer: str | None = setting(None, "Layer holding the raw counts; default ``X``.")
    batch_key: str | None = setting(
        None, "``obs`` column of batches to correct for: the decoder (and gene-batch dispersion) is conditioned on it."
    )
    categorical_covariate_keys: Sequence[str] | None = setting(
        None, "Further categorical ``obs`` columns the decoder is conditioned on."
    )
    continuous_covariate_keys: Sequence[str] | None = setting(
        None, "Further numeric ``obs`` columns the decoder is conditioned on."
    )
    size_factor_key: str | None = setting(
        None,
        "``obs`` column of positive size factors replacing the library size (the decoder then uses softplus "
        "instead of softmax, as in scvi-tools).",
    )
    check_counts: bool = setting(
        True,
        "Raise on non-integer values. ``False`` lets non-negative non-integer values through (e.g. "
        "SoupX-corrected counts); NaN and negative values are always errors.",
    )
