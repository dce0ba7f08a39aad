"""scArches architecture surgery: a query model that extends a frozen reference model.

The query's new batches (and categorical covariate values) become new one-hot categories.
Every weight that reads the one-hot covariates grows new columns, inserted at the end of the
right block (new batches after the reference's batches, before the covariate blocks), so the
reference columns keep their meaning. A new category starts as the average reference category
of its block (the mean of the reference's columns, embedding rows or per-batch parameters): the
query starts where the reference would put a typical batch. Only the new columns, the library
encoder and, by default, the decoder's batch-norm scale and shift learn; everything else keeps
the reference's values bit for bit (gradient masks, no weight decay on frozen entries,
batch-norm running statistics frozen).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data import categories
from ._scvi import SCVI

if TYPE_CHECKING:
    from anndata import AnnData

# scANVI's label-prior networks stay the reference's (scArches freezes them too)
_LABEL_PRIOR_PREFIXES = ("u_encoder.", "z_decoder.", "classifier.")


def query_model(
    reference: SCVI,
    query: AnnData,
    *,
    batch_key: str | None = None,
    max_missing_genes: float = 0.2,
    freeze_expression: bool = True,
    freeze_batchnorm_decoder: bool = False,
    random_state: int | None = 0,
    **options,
) -> tuple[SCVI, list[str]]:
    """Build the query model for ``query`` (checked, not modified) on top of ``reference``.

    Returns the model, ready for :meth:`SCVI.train`, and the reference categories that are
    new (one list per categorical block, flattened as ``'key=value'``). ``options`` are the
    reference model's own query options (:meth:`~scanpy_scvi.model.BaseModel.query_changes`:
    scPoli's ``labeled_indices``, expiMap's ``n_ext`` and ``new_programs``).
    """
    ref_setup = reference.setup
    if ref_setup.batch_key is None:
        msg = (
            "The reference model was trained without batch_key, so it has no batch-specific weights a "
            "query could learn. Train the reference with a batch_key, or embed the query with the "
            "reference as is: `reference.get_latent_representation(query)`."
        )
        raise ValueError(msg)
    batch_key = ref_setup.batch_key if batch_key is None else batch_key
    new_batches = _new_categories(query, batch_key, ref_setup.batch_categories, "batch_key")
    new_cov = [
        _new_categories(query, key, cats, "categorical_covariate_keys")
        for key, cats in zip(
            ref_setup.categorical_covariate_keys, ref_setup.categorical_covariate_categories, strict=True
        )
    ]
    setup_changes, architecture_changes = reference.query_changes(query, **options)
    setup = dataclasses.replace(
        ref_setup,
        batch_key=batch_key,
        batch_categories=ref_setup.batch_categories + new_batches,
        categorical_covariate_categories=[
            c + n for c, n in zip(ref_setup.categorical_covariate_categories, new_cov, strict=True)
        ],
        max_missing_genes=float(max_missing_genes),
        allow_missing_proteins=bool(ref_setup.protein_names),  # a smaller panel, or RNA only
        **setup_changes,
    )
    model = type(reference)._assembled(
        setup,
        reference.architecture.replace(**architecture_changes),
        adata=query,
        random_state=random_state,
        initialised_from="reference",
    )
    old_sizes = (ref_setup.n_batch, *ref_setup.n_cats_per_cov)
    new_sizes = (setup.n_batch, *setup.n_cats_per_cov)
    masks = _transfer(reference.module, model.module, old_sizes, new_sizes)
    _freeze(model.module, masks, freeze_expression=freeze_expression, freeze_batchnorm_decoder=freeze_batchnorm_decoder)
    model.trainable_masks = masks
    model.adopt_query(query, reference, **options)
    added = [f"{batch_key}={b}" for b in new_batches] + [
        f"{k}={v}" for k, vals in zip(ref_setup.categorical_covariate_keys, new_cov, strict=True) for v in vals
    ]
    return model, added


def _new_categories(query: AnnData, key: str, known: list[str], arg: str) -> list[str]:
    return [c for c in categories(query, key, arg) if c not in known]


def _widths(sizes) -> list[int]:
    """One-hot widths per categorical block (a single-category block has no columns)."""
    return [n if n > 1 else 0 for n in sizes]


def _transfer(ref: nn.Module, new: nn.Module, old_sizes, new_sizes) -> dict[str, torch.Tensor]:
    """Copy the reference weights into ``new``, growing the covariate columns; return the masks.

    The mask of a grown tensor marks its new-category entries (the only ones that learn).
    """
    ref_state, new_state = ref.state_dict(), new.state_dict()
    buffers = {k for k, _ in new.named_buffers()}
    w_old, w_new = _widths(old_sizes), _widths(new_sizes)
    n_batch_old, n_batch_new = old_sizes[0], new_sizes[0]
    masks: dict[str, torch.Tensor] = {}
    out = {}
    tables = getattr(new, "category_tables", ())  # one row per category (embeddings): grow by rows
    for key, fresh in new_state.items():
        if key not in ref_state:  # a part the query adds (expiMap's extension programs): it all learns
            out[key] = fresh.clone()
            masks[key] = torch.ones_like(fresh, dtype=torch.bool)
            continue
        old = ref_state[key]
        per_batch = _batch_axis(key, old, fresh, n_batch_old, n_batch_new)
        grown_rows = old.dim() == fresh.dim() == 2 and old.shape[1] == fresh.shape[1] and len(fresh) > len(old)
        if old.shape == fresh.shape:
            out[key] = old.clone()
        elif grown_rows and key.startswith(tables):  # new categories start at the mean reference row
            out[key] = torch.cat([old, old.mean(dim=0, keepdim=True).expand(len(fresh) - len(old), -1)])
            masks[key] = torch.zeros_like(out[key], dtype=torch.bool)
            masks[key][len(old) :] = True
        elif grown_rows and key in buffers:  # e.g. prototypes of new cell types: set by the model
            out[key] = torch.cat([old, fresh[len(old) :]])
        elif per_batch is not None and key in buffers:
            # data-derived (library prior, measured proteins): the new batches' come from the query
            out[key] = torch.cat([old, fresh.narrow(per_batch, n_batch_old, n_batch_new - n_batch_old)], per_batch)
        elif per_batch is not None:
            # a learned per-batch parameter (dispersion, protein background prior): new batches
            # start at the mean over the reference's batches, and only they learn
            start = old.mean(dim=per_batch, keepdim=True).expand_as(
                fresh.narrow(per_batch, 0, n_batch_new - n_batch_old)
            )
            out[key] = torch.cat([old, start], dim=per_batch)
            masks[key] = torch.zeros_like(out[key], dtype=torch.bool)
            masks[key].narrow(per_batch, n_batch_old, n_batch_new - n_batch_old).fill_(True)
        elif old.dim() == 2 and fresh.shape[1] - old.shape[1] == sum(w_new) - sum(w_old):
            out[key], masks[key] = _grow_covariate_columns(old, fresh, old_sizes, new_sizes)
        else:  # pragma: no cover - a module change without a matching rule here
            msg = f"Cannot map reference weight {key!r} {tuple(old.shape)} to {tuple(fresh.shape)}."
            raise RuntimeError(msg)
    new.load_state_dict(out)
    return masks


def _batch_axis(key: str, old, fresh, n_batch_old: int, n_batch_new: int) -> int | None:
    """The batch axis of a module-level per-batch tensor (``log_theta`` (genes, batches),
    ``protein_mask`` (batches, proteins), ...) that grows with the new batches; None otherwise.
    Layer weights (dotted names) grow by their covariate columns instead."""
    if "." in key or old.dim() != fresh.dim() or n_batch_new == n_batch_old:
        return None
    for axis in (old.dim() - 1, 0):
        if old.shape[axis] == n_batch_old and fresh.shape[axis] == n_batch_new:
            rest_old = old.shape[:axis] + old.shape[axis + 1 :]
            if rest_old == fresh.shape[:axis] + fresh.shape[axis + 1 :]:
                return axis
    return None


def _grow_covariate_columns(old, fresh, old_sizes, new_sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear weight reading [features | one-hot blocks]: reference columns kept, each new
    category's column starting at the mean of its block's reference columns (scArches and
    scvi-tools start from random columns, which made trVAE's query accuracy depend on the seed).

    A block the reference did not have (one category, so no columns) gets zero columns: the
    reference cells' outputs stay unchanged.
    """
    w_old, w_new = _widths(old_sizes), _widths(new_sizes)
    n_feat = old.shape[1] - sum(w_old)
    grown = torch.zeros_like(fresh)
    mask = torch.zeros_like(fresh, dtype=torch.bool)
    grown[:, :n_feat] = old[:, :n_feat]
    o, n = n_feat, n_feat
    for n_old, wo, wn in zip(old_sizes, w_old, w_new, strict=True):
        if wn:
            if wo:
                grown[:, n : n + n_old] = old[:, o : o + n_old]
                grown[:, n + n_old : n + wn] = old[:, o : o + n_old].mean(dim=1, keepdim=True)
            mask[:, n + n_old : n + wn] = True
        o, n = o + wo, n + wn
    return grown, mask


def _freeze(
    module: nn.Module, masks: dict[str, torch.Tensor], *, freeze_expression: bool, freeze_batchnorm_decoder: bool
) -> None:
    """Set which parameters learn; batch-norm running statistics stop updating (momentum 0)."""
    trainable = set(masks)
    expression_inputs = module.expression_inputs
    for name, _ in module.named_parameters():
        if name.startswith("l_encoder."):
            trainable.add(name)  # the library encoder learns the query's depth (scArches)
            masks.pop(name, None)
        if not freeze_expression and name.startswith(expression_inputs):
            trainable.add(name)
            masks.pop(name, None)  # the whole first layer learns
    for name, m in module.named_modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 0.0
            decoder = "decoder" in name.split(".")[0]  # decoder, scale_decoder, rna_decoder, ...
            if decoder and not freeze_batchnorm_decoder:
                trainable.update(f"{name}.{p}" for p in ("weight", "bias"))
    for name, p in module.named_parameters():
        if name.startswith(_LABEL_PRIOR_PREFIXES):
            trainable.discard(name)
            masks.pop(name, None)
        p.requires_grad_(name in trainable)
