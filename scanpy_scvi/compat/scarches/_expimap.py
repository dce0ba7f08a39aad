"""scArches' ``EXPIMAP`` over our :class:`~scanpy_scvi.EXPIMAP`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ... import model as _ours
from ..._compat import logg
from . import _common as common
from ._trvae import CVAEMethods, condition_order, reject_init_kwargs

if TYPE_CHECKING:
    from anndata import AnnData

#: scArches' expiMap trainer keywords (``trainers/expimap/regularized.py``) and their defaults
EXPIMAP_TRAINER = {
    "alpha_l1": None, "alpha_l1_epoch_anneal": None, "alpha_l1_anneal_each": 5, "gamma_ext": None,
    "gamma_epoch_anneal": None, "gamma_anneal_each": 5, "beta": 1.0, "print_stats": False,
}  # fmt: skip


class EXPIMAP(CVAEMethods, _ours.EXPIMAP, register=False):
    """scArches' ``EXPIMAP``: our :class:`~scanpy_scvi.EXPIMAP` under scArches' names and defaults.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (``recon_loss='mse'``: log-normalised values), the mask in
        ``varm[mask_key]`` and the program names in ``uns['terms']``
        (:func:`~scanpy_scvi.compat.scarches.utils.add_annotations` writes both).
    condition_key, conditions
        As :class:`~scanpy_scvi.compat.scarches.models.TRVAE`'s.
    hidden_layer_sizes, dr_rate
        Our ``hidden_layer_sizes``, ``dropout_rate`` (defaults ``[256, 256]``, 0.05).
    recon_loss
        ``'nb'`` (default) or ``'mse'``.
    use_l_encoder
        ``False`` only: the library is the observed total count.
    use_bn, use_ln
        Batch norm (else, with ``use_ln``, layer norm) in the encoder's hidden layers.
    mask
        (programs, genes) 0/1 array used instead of ``varm[mask_key]``.
    mask_key
        The ``varm`` key of the (genes, programs) mask.
    decoder_last_layer
        ``None``: softmax for ``'nb'``, ReLU for ``'mse'`` (scArches: identity); only these.
    soft_mask, n_ext, use_hsic
        As ours (``use_hsic`` acts with ``n_ext > 0`` only, as in scArches).
    n_ext_m, hsic_one_vs_all, ext_mask, soft_ext_mask
        Defaults only: constrained extension programs come with
        :meth:`load_query_data` (``new_n_ext_m``, ``new_ext_mask``, ``new_soft_ext_mask``); the
        HSIC is between all extension programs together and the annotated ones.
    """

    def __init__(
        self,
        adata: AnnData,
        condition_key: str | None = None,
        conditions: Sequence | None = None,
        *,
        hidden_layer_sizes: Sequence[int] = (256, 256),
        dr_rate: float = 0.05,
        recon_loss: str = "nb",
        use_l_encoder: bool = False,
        use_bn: bool = False,
        use_ln: bool = True,
        mask=None,
        mask_key: str = "I",
        decoder_last_layer: str | None = None,
        soft_mask: bool = False,
        n_ext: int = 0,
        n_ext_m: int = 0,
        use_hsic: bool = False,
        hsic_one_vs_all: bool = False,
        ext_mask=None,
        soft_ext_mask: bool = False,
    ):
        likelihood = common.recon_likelihood(recon_loss, ("nb", "mse"), "expiMap")
        common.must_be("use_l_encoder", use_l_encoder, False, "the library here is the observed total count.")
        last = {"nb": "softmax", "mse": "relu"}[likelihood]
        if decoder_last_layer not in (None, last):
            msg = (
                f"decoder_last_layer={decoder_last_layer!r}: with recon_loss={recon_loss!r} the decoder ends in {last}."
            )
            raise ValueError(msg)
        common.must_be("hsic_one_vs_all", hsic_one_vs_all, False, "the HSIC here is between all extension programs "
                       "together and the annotated ones (scArches' hsic_one_vs_all=False).")  # fmt: skip
        if n_ext_m or ext_mask is not None or soft_ext_mask:
            msg = (
                "n_ext_m / ext_mask / soft_ext_mask: constrained extension programs are added to a trained reference "
                "by EXPIMAP.load_query_data(adata, reference, new_n_ext_m=, new_ext_mask=, new_soft_ext_mask=)."
            )
            raise ValueError(msg)
        settings = {
            "hidden_layer_sizes": tuple(hidden_layer_sizes), "dropout_rate": dr_rate, "gene_likelihood": likelihood,
            "soft_mask": soft_mask, "n_ext": n_ext, "use_hsic": bool(use_hsic and n_ext > 0),
            **common.norm_settings(use_bn, use_ln),
        }  # fmt: skip
        order = condition_order(adata, condition_key, conditions, None)
        source = common.with_categories(adata, {condition_key: order}, varm=mask_varm(adata, mask, mask_key))
        super().__init__(source, condition_key=condition_key, mask_key=mask_key, **settings)
        if source is not adata:
            self.attach(adata, bound=self._bound)

    # -- training ------------------------------------------------------------------------------
    def train(
        self,
        n_epochs: int | None = 400,
        lr: float = 1e-3,
        eps: float = 0.01,
        alpha: float | None = None,
        omega=None,
        **kwargs,
    ) -> None:
        """Train with scArches' expiMap trainer names and defaults: ``alpha`` (group lasso; default
        none), ``alpha_kl`` (0.35), ``alpha_epoch_anneal`` (``min(130, n_epochs)``), ``alpha_l1``,
        ``gamma_ext``, ``beta`` (HSIC weight, 1) and the ``Trainer`` keywords of
        :meth:`TRVAE.train <scanpy_scvi.compat.scarches.models.TRVAE.train>`; see
        :doc:`/compat-scarches`. Our own :meth:`~scanpy_scvi.EXPIMAP.train` names are taken too."""
        common.must_be("omega", omega, None, "per-program group-lasso coefficients are not implemented here; "
                       "alpha applies to every program.")  # fmt: skip
        extra = {**EXPIMAP_TRAINER, **{k: kwargs.pop(k) for k in list(kwargs) if k in EXPIMAP_TRAINER}}
        for name, why in (
            (
                "alpha_l1_epoch_anneal",
                "alpha_l1 applies fully from the first epoch (scArches 0.6.1 fails annealing it).",
            ),
            ("gamma_epoch_anneal", "gamma_ext applies fully from the first epoch (its annealing is not implemented)."),
        ):
            common.must_be(name, extra[name], None, why)
        if "hsic_weight" in kwargs and "beta" in extra and extra["beta"] != EXPIMAP_TRAINER["beta"]:
            msg = "beta (scArches) and hsic_weight (scanpy-scvi) are the same setting; pass one."
            raise TypeError(msg)
        epochs = n_epochs if n_epochs is not None else self.default_max_epochs(self.bind().n_obs)
        defaults = {"alpha_kl": 0.35, "alpha_epoch_anneal": min(130, epochs)}
        args = common.train_arguments(self, epochs, lr, eps, kwargs, defaults)
        args = {"alpha": alpha, "alpha_l1": extra["alpha_l1"], "gamma_ext": extra["gamma_ext"],
                "hsic_weight": extra["beta"], **args}  # fmt: skip
        super().train(**args)
        if extra["print_stats"]:
            active = self.programs()["active"]
            logg.info(f"    {int((~active).sum())} of {len(active)} programs deactivated by the group lasso")

    # -- programs ------------------------------------------------------------------------------
    def nonzero_terms(self) -> np.ndarray:
        """Boolean, one per latent unit: the programs the group lasso left active, and every
        extension program (scArches' ``nonzero_terms``, which returns this mask)."""
        active = self.programs()["active"].to_numpy().copy()
        active[self.architecture.n_latent :] = True
        return active

    def get_latent(self, x=None, c=None, only_active: bool = False, mean: bool = False, mean_var: bool = False):
        """scArches' ``get_latent`` (see :meth:`TRVAE.get_latent
        <scanpy_scvi.compat.scarches.models.TRVAE.get_latent>`); ``only_active``: the units of
        :meth:`nonzero_terms` only."""
        result = common.latent(self, self._cells(x, c), mean=mean, mean_var=mean_var)
        if not only_active:
            return result
        keep = self.nonzero_terms()
        return tuple(r[:, keep] for r in result) if isinstance(result, tuple) else result[:, keep]

    def _unit_names(self, terms, adata: AnnData | None = None) -> list[str]:
        """One name per latent unit, as scArches' ``update_terms``: ``terms`` (a list, or an
        ``uns`` key; default the model's programs) followed, when it names the reference's
        programs only, by ``constrained_<i>`` and ``unconstrained_<i>``."""
        a = self.architecture
        if isinstance(terms, str):
            source = self.adata if adata is None else adata
            names = list(source.uns[terms]) if source is not None and terms in source.uns else None
            names = list(self.setup.program_names[: a.n_latent]) if names is None else names
        else:
            names = list(terms)
        names = [str(n) for n in names]
        if len(names) == a.n_latent:
            names += [f"constrained_{i}" for i in range(a.n_ext_masked)]
            names += [f"unconstrained_{i}" for i in range(a.n_ext)]
        if len(names) != a.n_latent + a.n_ext_masked + a.n_ext:
            msg = (
                f"terms must name the {a.n_latent} programs of the mask (or all {self.module.n_latent} latent units); "
                f"got {len(names)}."
            )
            raise ValueError(msg)
        return names

    def update_terms(self, terms: str | Sequence[str] = "terms", adata: AnnData | None = None):
        """Extend the program names by the extension programs' (``constrained_<i>``,
        ``unconstrained_<i>``): in ``adata.uns[terms]`` (default the model's AnnData) when
        ``terms`` is a key, else returned."""
        if not isinstance(terms, str):
            return self._unit_names(terms)
        target = self.adata if adata is None else adata
        if target is None or terms not in target.uns:
            msg = f"adata.uns[{terms!r}] not found; pass the program names as a list."
            raise KeyError(msg)
        target.uns[terms] = self._unit_names(terms, target)
        return None

    def term_genes(self, term: str | int, terms: str | Sequence[str] = "terms") -> pd.DataFrame:
        """A program's genes by decreasing absolute decoder weight: ``genes``, ``weights``,
        ``in_mask`` (:meth:`~scanpy_scvi.EXPIMAP.term_genes`); ``term`` is a name of ``terms``
        (see :meth:`update_terms`), one of :meth:`~scanpy_scvi.EXPIMAP.program_names` or a position."""
        if isinstance(term, str):
            names = self._unit_names(terms)
            if term not in names:
                return super().term_genes(term)  # our names (e.g. 'extension_0')
            term = names.index(term)
        return super().term_genes(int(term))

    def mask_genes(self, terms: str | Sequence[str] = "terms") -> dict[str, list[str]]:
        """The genes of each program's mask (the reference's programs, then the constrained
        extension programs), by program name."""
        mask = self.program_mask()
        names = self._unit_names(terms)[: mask.shape[1]]
        return {name: list(mask.index[mask.iloc[:, k].to_numpy()]) for k, name in enumerate(names)}

    def latent_directions(
        self,
        method: str = "sum",
        get_confidence: bool = False,
        adata: AnnData | None = None,
        key_added: str = "directions",
    ) -> None:
        """The sign per latent unit that makes a higher value mean higher expression, written to
        ``adata.uns[key_added]`` (default the model's AnnData).

        ``method='sum'``: the sign of the sum of the unit's gene weights
        (:meth:`~scanpy_scvi.EXPIMAP.programs`' ``direction``). ``'counts'``: +1 when more of its
        nonzero weights are positive than negative, -1 when fewer, 0 when as many or none; with
        ``get_confidence``, ``|share positive - 0.5| / 0.5`` goes to
        ``uns[key_added + '_confidence']`` and, under scArches' misspelling, ``'_confindence'``.
        """
        target = self.adata if adata is None else adata
        if target is None:
            msg = "This model holds no AnnData; pass adata=."
            raise ValueError(msg)
        confidence = None
        if method == "sum":
            signs = self.programs()["direction"].to_numpy(dtype=np.float32)
        elif method == "counts":
            weights = [self.term_genes(k)["weights"].to_numpy() for k in range(self.module.n_latent)]
            nonzero = np.array([len(w) for w in weights])
            share = np.array([(w > 0).sum() for w in weights]) / np.maximum(nonzero, 1)
            signs = np.where(share > 0.5, 1.0, np.where(share < 0.5, -1.0, 0.0)).astype(np.float32)
            signs[nonzero == 0] = 0.0
            confidence = np.where(nonzero > 0, np.abs(share - 0.5) / 0.5, 0.0).astype(np.float32)
        else:
            msg = f"method={method!r}: 'sum' or 'counts'."
            raise ValueError(msg)
        target.uns[key_added] = signs
        if get_confidence and confidence is not None:
            target.uns[key_added + "_confidence"] = confidence
            target.uns[key_added + "_confindence"] = confidence  # the key scArches writes

    def latent_enrich(
        self,
        groups: str | Mapping[str, Sequence[str]],
        comparison: str | Sequence[str] = "rest",
        n_sample: int = 5000,
        use_directions: bool = False,
        directions_key: str = "directions",
        select_terms=None,
        adata: AnnData | None = None,
        exact: bool = True,
        key_added: str = "bf_scores",
        *,
        random_state: int | None = 0,
    ) -> None:
        """Bayes factors of program activity between groups of cells
        (:func:`~scanpy_scvi.tl.gene_program_enrichment`), written as scArches writes them:
        ``adata.uns[key_added][group] = {'p_h0', 'p_h1', 'bf'}``, arrays over the latent units
        (``select_terms``: those units), for every group but the ``comparison`` ones.

        Parameters
        ----------
        groups
            An ``obs`` column, or a dict of group -> cell names (scArches 0.6.1 then writes the
            results into a copy of the cells, not ``adata``: here they go to ``adata``).
        comparison
            ``'rest'`` or the group(s) to compare against.
        n_sample
            Random cell pairs per group.
        use_directions, directions_key
            Multiply the latent values by ``adata.uns[directions_key]`` (:meth:`latent_directions`)
            first; units with direction 0 get zeros, as in scArches.
        select_terms
            Positions (or a boolean mask) of the units to report.
        adata
            Default the model's AnnData.
        exact
            ``True`` only: the Gaussian probabilities of each pair (scArches' default).
        random_state
            Seed of the pair draws (scArches draws from numpy's global generator).
        """
        from ... import tl

        common.must_be("exact", exact, True, "only the exact Gaussian probabilities are computed here (scArches' "
                       "default); the sampled comparison is not implemented.")  # fmt: skip
        target = self.adata if adata is None else adata
        if target is None:
            msg = "This model holds no AnnData; pass adata=."
            raise ValueError(msg)
        data, groupby = group_cells(target, groups)
        directions = None
        if use_directions:
            if directions_key not in target.uns:
                msg = f"adata.uns[{directions_key!r}] not found; call latent_directions(adata=...) first."
                raise KeyError(msg)
            directions = np.asarray(target.uns[directions_key], dtype=np.float32)
        result = tl.gene_program_enrichment(
            data, groupby, comparison=comparison, model=self, n_samples=n_sample, use_directions=use_directions,
            directions=directions, only_active=False, key_added=key_added, random_state=random_state,
        )  # fmt: skip
        names = self.program_names()
        units = np.arange(len(names)) if select_terms is None else np.arange(len(names))[np.asarray(select_terms)]
        scores = {}
        for group in pd.unique(result["group"]):
            table = result[result["group"] == group].set_index("program").reindex(names)
            values = {k: table[k].to_numpy(dtype=np.float64) for k in ("p_h0", "p_h1", "bf")}
            if directions is not None:  # scArches zeroes units whose signed latent values are all zero
                for v in values.values():
                    v[directions == 0] = 0.0
            scores[group] = {k: v[units] for k, v in values.items()}
        target.uns[key_added] = scores

    # -- surgery -------------------------------------------------------------------------------
    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model,
        freeze: bool = True,
        freeze_expression: bool = True,
        unfreeze_ext: bool = True,
        remove_dropout: bool = True,
        new_n_ext: int | None = None,
        new_n_ext_m: int | None = None,
        new_ext_mask=None,
        new_soft_ext_mask: bool = False,
        map_location=None,
        **kwargs,
    ) -> EXPIMAP:
        """scArches' surgery (see :meth:`TRVAE.load_query_data
        <scanpy_scvi.compat.scarches.models.TRVAE.load_query_data>`), adding ``new_n_ext``
        unconstrained programs and ``new_n_ext_m`` constrained ones whose genes are the rows of
        ``new_ext_mask`` ((programs, query genes) 0/1; ``new_soft_ext_mask``: soft), named
        ``constrained_<i>``; they learn (``unfreeze_ext=True`` only). ``use_hsic`` may be passed
        (default the reference's); other constructor settings are the reference's."""
        use_hsic = kwargs.pop("use_hsic", None)
        common.must_be("hsic_one_vs_all", kwargs.pop("hsic_one_vs_all", False), False,
                       "the HSIC here is between all extension programs together and the annotated ones.")  # fmt: skip
        reject_init_kwargs(kwargs)
        options: dict = {} if use_hsic is None else {"use_hsic": bool(use_hsic)}
        if new_n_ext:
            options["n_ext"] = int(new_n_ext)
        if new_n_ext_m:
            options["new_programs"] = ext_programs(adata, new_n_ext_m, new_ext_mask)
            if new_soft_ext_mask:
                options["new_programs_soft_mask"] = True
        elif new_ext_mask is not None or new_soft_ext_mask:
            msg = "new_ext_mask / new_soft_ext_mask describe new_n_ext_m constrained programs; pass new_n_ext_m."
            raise ValueError(msg)
        if freeze and not unfreeze_ext and (new_n_ext or new_n_ext_m):
            msg = "unfreeze_ext=False would leave the new extension programs at their random start; they learn here."
            raise ValueError(msg)
        reference = common.reference_of(cls, reference_model, map_location)
        return common.surgery(
            cls, adata, reference, freeze=freeze, freeze_expression=freeze_expression, remove_dropout=remove_dropout,
            orders={reference.setup.batch_key: None}, **options,
        )  # fmt: skip


def mask_varm(adata: AnnData, mask, mask_key: str) -> dict | None:
    """scArches' ``mask`` ((programs, genes)) as the ``varm[mask_key]`` our class reads."""
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim != 2 or mask.shape[1] != adata.n_vars:
        msg = f"mask must be (programs, {adata.n_vars} genes) 0/1, got shape {mask.shape}."
        raise ValueError(msg)
    return {mask_key: mask.T}


def ext_programs(adata: AnnData, n: int, mask) -> dict[str, list[str]]:
    """scArches' ``new_ext_mask`` ((programs, genes of ``adata``)) as our ``new_programs``."""
    if mask is None:
        msg = "new_n_ext_m needs new_ext_mask: the (programs, genes) 0/1 mask of the new programs."
        raise ValueError(msg)
    mask = np.asarray(mask)
    if mask.shape != (int(n), adata.n_vars):
        msg = f"new_ext_mask must be (new_n_ext_m={n}, {adata.n_vars} query genes), got shape {mask.shape}."
        raise ValueError(msg)
    return {f"constrained_{i}": [str(g) for g in adata.var_names[mask[i] > 0]] for i in range(int(n))}


def group_cells(adata: AnnData, groups) -> tuple[AnnData, str]:
    """scArches' ``groups``: an ``obs`` column, or a dict of group -> cell names (the cells, with
    their group in a new column, as a copy)."""
    if isinstance(groups, str):
        return adata, groups
    if not isinstance(groups, Mapping):
        msg = "groups should be a string (an obs column) or a dict of group -> cell names."
        raise ValueError(msg)
    names = [str(c) for cells in groups.values() for c in cells]
    if len(set(names)) != len(names):
        msg = "groups name some cells more than once."
        raise ValueError(msg)
    data = adata[names].copy()
    data.obs["groups"] = pd.Categorical(
        [str(g) for g, cells in groups.items() for _ in cells], categories=[str(g) for g in groups]
    )
    return data, "groups"
