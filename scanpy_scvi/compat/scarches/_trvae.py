"""scArches' ``TRVAE`` over our :class:`~scanpy_scvi.TRVAE`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ... import model as _ours
from . import _common as common

if TYPE_CHECKING:
    import numpy as np
    from anndata import AnnData


class CVAEMethods(common.DoorMethods):
    """The methods trVAE and expiMap share in scArches (``CVAELatentsMixin``), over our model API."""

    @property
    def condition_key_(self) -> str | None:
        return self.setup.batch_key

    @property
    def conditions_(self) -> list[str]:
        """The conditions in the order of the model's codes (scArches' ``conditions_``)."""
        return list(self.setup.batch_categories) if self.setup.batch_key is not None else []

    def _cells(self, x, c) -> AnnData | None:
        return common.cells(self, x, c, [self.setup.batch_key] if self.setup.batch_key is not None else [])

    def get_y(self, x=None, c=None) -> np.ndarray:
        """The first decoder layer's output for one draw of z per cell (scArches' ``get_y``;
        :meth:`~scanpy_scvi.TRVAE.get_y` with ``give_mean=False``).

        Parameters
        ----------
        x, c
            Counts (cells x model genes, in the model's order) and the cells' conditions;
            default the model's AnnData. ``x`` may also be an AnnData.
        """
        return super().get_y(self._cells(x, c), give_mean=False)


class TRVAE(CVAEMethods, _ours.TRVAE, register=False):
    """scArches' ``TRVAE``: our :class:`~scanpy_scvi.TRVAE` under scArches' names and defaults.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (``recon_loss='mse'``: log-normalised values), dense or sparse.
    condition_key
        ``obs`` column of the conditions (our ``batch_key``).
    conditions
        The conditions in the order of their codes (may include conditions not in ``adata``).
        Default: the values in ``adata`` (categories without cells are not conditions); in
        our order (categories, else sorted), or in order of appearance, as scArches, with
        ``mmd_boundary`` (the boundary counts conditions in this order).
    hidden_layer_sizes, latent_dim, dr_rate
        Our ``hidden_layer_sizes``, ``n_latent``, ``dropout_rate`` (defaults ``[256, 64]``, 10, 0.05).
    use_mmd, mmd_on, mmd_boundary, beta
        The MMD penalty, as ours.
    recon_loss
        Our ``gene_likelihood``: ``'nb'`` (default), ``'zinb'`` or ``'mse'``.
    use_bn, use_ln
        Batch norm (else, with ``use_ln``, layer norm) in every hidden layer (default layer norm).
    """

    def __init__(
        self,
        adata: AnnData,
        condition_key: str | None = None,
        conditions: Sequence | None = None,
        *,
        hidden_layer_sizes: Sequence[int] = (256, 64),
        latent_dim: int = 10,
        dr_rate: float = 0.05,
        use_mmd: bool = True,
        mmd_on: str = "z",
        mmd_boundary: int | None = None,
        recon_loss: str = "nb",
        beta: float = 1,
        use_bn: bool = False,
        use_ln: bool = True,
    ):
        settings = {
            "hidden_layer_sizes": tuple(hidden_layer_sizes), "n_latent": latent_dim, "dropout_rate": dr_rate,
            "use_mmd": use_mmd, "mmd_on": mmd_on, "mmd_boundary": mmd_boundary, "beta": beta,
            "gene_likelihood": common.recon_likelihood(recon_loss, ("nb", "zinb", "mse"), "trVAE"),
            **common.norm_settings(use_bn, use_ln),
        }  # fmt: skip
        source = common.with_categories(adata, {condition_key: condition_order(adata, condition_key, conditions,
                                                                                mmd_boundary)})  # fmt: skip
        super().__init__(source, condition_key=condition_key, **settings)
        if source is not adata:
            self.attach(adata, bound=self._bound)

    def train(self, n_epochs: int | None = 400, lr: float = 1e-3, eps: float = 0.01, **kwargs) -> None:
        """Train with scArches' trainer names and defaults (``Trainer`` keywords: ``batch_size``,
        ``alpha_epoch_anneal``, ``alpha_kl``, ``alpha_iter_anneal``, ``use_early_stopping``,
        ``reload_best``, ``early_stopping_kwargs``, ``train_frac``, ``use_stratified_sampling``,
        ``weight_decay``, ``seed`` (2020), ``monitor``, ...); see :doc:`/compat-scarches` for
        what each becomes. Our own :meth:`~scanpy_scvi.TRVAE.train` names are taken too."""
        super().train(**common.train_arguments(self, n_epochs, lr, eps, kwargs, {}))

    def get_latent(self, x=None, c=None, mean: bool = False, mean_var: bool = False):
        """scArches' ``get_latent``: one draw of z per cell (default, as scArches), the posterior
        mean (``mean=True``: :meth:`get_latent_representation`) or (mean, variance)
        (``mean_var=True``).

        Parameters
        ----------
        x, c
            Counts (cells x model genes, in the model's order) and the cells' conditions;
            default the model's AnnData. ``x`` may also be an AnnData.
        """
        return common.latent(self, self._cells(x, c), mean=mean, mean_var=mean_var)

    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model,
        freeze: bool = True,
        freeze_expression: bool = True,
        remove_dropout: bool = True,
        map_location=None,
        **kwargs,
    ) -> TRVAE:
        """scArches' surgery (:func:`~scanpy_scvi.model.query_model`): the query's new conditions
        become new codes after the reference's; only their weights (and dispersions) learn.

        Parameters
        ----------
        adata
            The query: raw counts and the reference's ``condition_key``.
        reference_model
            A trained model (this class or ours) or its directory.
        freeze
            ``False``: every weight learns, starting from the reference's.
        freeze_expression
            ``False``: the first layers' expression weights learn too.
        remove_dropout
            Drop the reference's dropout in the query model.
        map_location
            Device for a reference read from a directory.
        """
        reject_init_kwargs(kwargs)
        reference = common.reference_of(cls, reference_model, map_location)
        return common.surgery(
            cls, adata, reference, freeze=freeze, freeze_expression=freeze_expression, remove_dropout=remove_dropout,
            orders={reference.setup.batch_key: None},
        )  # fmt: skip


def condition_order(adata: AnnData, key: str | None, conditions, mmd_boundary) -> list[str] | None:
    """The order of ``key``'s conditions: ``conditions``; with ``mmd_boundary``, scArches' order
    of appearance; else None (ours)."""
    if key is None:
        if conditions is not None:
            msg = "conditions were given without condition_key."
            raise ValueError(msg)
        return None
    if conditions is not None:
        return common.checked_order(adata, key, conditions)
    return common.present_values(adata, key) if mmd_boundary is not None else None


def reject_init_kwargs(kwargs: dict) -> None:
    """scArches' ``load_query_data(**kwargs)`` overrides constructor settings of the query model;
    here a query model keeps the reference's architecture."""
    if kwargs:
        msg = (
            f"load_query_data({', '.join(sorted(kwargs))}=...): a query model keeps its reference's settings here "
            "(the query's own options are freeze, freeze_expression and remove_dropout)."
        )
        raise TypeError(msg)
