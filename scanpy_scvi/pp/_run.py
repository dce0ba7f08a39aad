"""The argument vocabulary every ``pp.*`` model function shares, declared once.

Historical names (``n_epochs``, ``use_cuda``, ``return_posterior``) and modern ones
(``max_epochs``, ``device``, ``return_model``) are accepted everywhere with the same meaning;
:class:`Run` resolves them and returns what the call promised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._compat import warn
from .._settings import Settings, setting

if TYPE_CHECKING:
    from anndata import AnnData


@dataclass(frozen=True)
class RunArguments(Settings):
    """How a ``pp`` model function runs: epochs, device, randomness, genes, what it returns."""

    n_epochs: int | None = setting(
        None, "Training epochs (historical name of ``max_epochs``). Default: the model's (see ``max_epochs``)."
    )
    max_epochs: int | None = setting(
        None,
        "Training epochs (scvi-tools' name; pass it or ``n_epochs``). Default: the model's heuristic, "
        "``min(400, round(20000 / n_cells * 400))`` (``pp.scvi``: 400, as the historical function).",
    )
    use_cuda: bool = setting(True, "``False`` forces the CPU; ``True`` uses CUDA when available (see ``device``).")
    device: str = setting("auto", "``'auto'`` (CUDA if available, else CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.")
    strategy: str | None = setting(
        None,
        "``'ddp'``: train across the processes of a ``torchrun`` launch (gloo on CPU, NCCL on CUDA); every "
        "process gets the same model and outputs (write files from rank 0: ``scanpy_scvi.train.rank() == 0``).",
        choices=(None, "ddp"),
    )
    random_state: int | None = setting(
        0,
        "Seed of initialisation, split, shuffling and sampling; ``0`` gives identical results on CPU run after "
        "run. GPU kernels are not bit-reproducible.",
    )
    use_highly_variable_genes: bool = setting(
        True,
        "Train on ``adata.var['highly_variable']`` (run :func:`scanpy.pp.highly_variable_genes` first; without "
        "that column, all genes with a warning, as ``scanpy.external.pp.scvi``). ``False``: all genes.",
    )
    subset_genes: Sequence[str] | Sequence[int] | np.ndarray | None = setting(
        None, "Gene names, integer positions or a boolean mask of the genes to train on; overrides the HVG choice."
    )
    store_model: bool = setting(
        True,
        "Store the trained model (weights and configuration, a few MB) in ``adata.uns[<key>]['model']``, so that "
        "``tl`` functions find it, also after ``write_h5ad`` / ``read_h5ad`` in a new process. ``False`` keeps "
        "the AnnData free of it.",
    )
    copy: bool = setting(False, "Work on (and return) a copy of ``adata``.")
    return_model: bool | None = setting(None, "Return the trained model. Default: the function's (see Returns).")
    return_posterior: bool | None = setting(None, "Historical name of ``return_model``.")
    progress_bar: bool = setting(True, "Show a per-epoch progress bar.")


class Run:
    """The resolved :class:`RunArguments` of one call."""

    def __init__(self, args: dict[str, Any], *, default_epochs: int | None, default_return_model: bool):
        a = RunArguments(**args)
        if a.n_epochs is not None and a.max_epochs is not None and a.n_epochs != a.max_epochs:
            msg = f"n_epochs={a.n_epochs} and max_epochs={a.max_epochs} disagree; pass only one."
            raise ValueError(msg)
        self.max_epochs = a.max_epochs if a.max_epochs is not None else a.n_epochs
        if self.max_epochs is None:
            self.max_epochs = default_epochs
        self.device = a.device
        if not a.use_cuda:
            if a.device not in ("auto", "cpu"):
                msg = f"use_cuda=False contradicts device={a.device!r}."
                raise ValueError(msg)
            self.device = "cpu"
        flags = {v for v in (a.return_model, a.return_posterior) if v is not None}
        if len(flags) > 1:
            msg = "return_model and return_posterior (its historical name) disagree; pass only one."
            raise ValueError(msg)
        self.return_model = flags.pop() if flags else default_return_model
        self.args = a

    def __getattr__(self, name: str) -> Any:
        return getattr(self.args, name)

    def genes(self, adata: AnnData) -> list[str]:
        return select_genes(adata, self.args.use_highly_variable_genes, self.args.subset_genes)

    def target(self, adata: AnnData, model) -> AnnData:
        """The AnnData that receives the outputs: ``adata``, or its copy (then also the model's data)."""
        if not self.args.copy:
            return adata
        copy = adata.copy()
        model.attach(copy, bound=model.bind(adata))  # the same cells and counts: checked once
        return copy

    def params(self, model, key_added: str, *, genes_from: str | None = None) -> dict[str, Any]:
        """The entries of ``uns[key]['params']`` every ``pp`` function records alike: the epochs
        the model was configured with, the gene choice, the seed and ``key_added``."""
        a = self.args
        if genes_from is None:
            chosen = a.subset_genes is not None
            genes_from = "subset_genes" if chosen else "highly_variable" if a.use_highly_variable_genes else "all"
        return {
            "max_epochs": model.train_config["max_epochs"],
            "use_highly_variable_genes": a.use_highly_variable_genes,
            "genes_from": genes_from,
            "random_state": a.random_state,
            "key_added": key_added,
        }

    def result(self, adata: AnnData, model):
        """What the call returns: the model and/or the copy, or None."""
        if self.args.copy and self.return_model:
            return adata, model
        if self.args.copy:
            return adata
        return model if self.return_model else None


def setup_params(setup_args: dict[str, Any], model, resolved: Sequence[str] = ("batch_key", "check_counts")) -> dict:
    """The data arguments for ``uns[key]['params']``: as given, except those the model resolved
    itself (``condition_key`` -> ``batch_key``, no integer check for ``'mse'``, ...), as resolved."""
    from ..data import SetupArguments

    return {**SetupArguments(**setup_args).to_dict(), **{k: getattr(model.setup, k) for k in resolved}}


def check_key_added(key_added: Any) -> str:
    """``key_added`` checked; returns the ``uns`` key (``key_added`` without ``'X_'``)."""
    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added must be a non-empty string, got {key_added!r}."
        raise TypeError(msg)
    return key_added.removeprefix("X_")


def select_genes(adata: AnnData, use_highly_variable_genes: bool, subset_genes) -> list[str]:
    """The genes to train on: ``subset_genes``, else the HVGs, else all genes."""
    names = adata.var_names
    if subset_genes is not None:
        sel = np.asarray(subset_genes)
        if sel.dtype == bool:
            if sel.shape != (adata.n_vars,):
                msg = f"A boolean subset_genes mask must have length n_vars={adata.n_vars}, got {sel.shape}."
                raise ValueError(msg)
            sel = np.flatnonzero(sel)
        if sel.size == 0:
            msg = "subset_genes is empty."
            raise ValueError(msg)
        if np.issubdtype(sel.dtype, np.integer):
            if sel.min() < 0 or sel.max() >= adata.n_vars:
                msg = f"subset_genes positions must be in [0, {adata.n_vars})."
                raise ValueError(msg)
            genes = list(names[sel])
        else:
            genes = [str(g) for g in sel]
            missing = [g for g in genes if g not in names]
            if missing:
                msg = f"{len(missing)} subset_genes are not in adata.var_names: {missing[:10]}."
                raise KeyError(msg)
        if len(set(genes)) != len(genes):
            msg = "subset_genes contains duplicates."
            raise ValueError(msg)
        return genes
    if not use_highly_variable_genes:
        return list(names)
    if "highly_variable" not in adata.var.columns:
        # scanpy.external.pp.scvi's documented behaviour, which its users' code relies on
        warn(
            f"adata.var has no 'highly_variable' column: training on all {adata.n_vars} genes, as "
            "scanpy.external.pp.scvi did. Run `sc.pp.highly_variable_genes(adata, ...)` first to train on the "
            "highly variable genes (on counts: flavor='seurat_v3', layer='counts'), or pass "
            "`use_highly_variable_genes=False` to train on all genes without this warning."
        )
        return list(names)
    hv = adata.var["highly_variable"]
    if hv.isna().any() or not pd.api.types.is_bool_dtype(hv):
        msg = "adata.var['highly_variable'] must be a boolean column without missing values."
        raise ValueError(msg)
    if not hv.any():
        msg = "adata.var['highly_variable'] marks no gene as highly variable."
        raise ValueError(msg)
    return list(names[hv.to_numpy()])
