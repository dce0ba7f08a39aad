"""Training curves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

    from ..model import SCVI


def training_history(
    data: AnnData | SCVI,
    *,
    key: str = "scvi",
    metrics: Sequence[str] = ("elbo_train", "elbo_validation"),
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Plot per-epoch training metrics, shading the KL warm-up.

    During warm-up the training *loss* rises (the KL weight grows), so judge convergence by
    the ELBO curves, which use the unweighted KL.

    Parameters
    ----------
    data
        An AnnData processed by :func:`scanpy_scvi.pp.scvi` (reads ``uns[key]['history']``)
        or a trained :class:`~scanpy_scvi.SCVI`.
    key
        ``uns`` key of the run (``key_added`` without ``'X_'``).
    metrics
        History entries to draw; missing ones (e.g. validation without a held-out set) are skipped.
    ax
        Axes to draw on.
    show
        Show the figure (default: when no ``ax`` is given, as scanpy plots do).

    Returns
    -------
    The axes when ``show`` is False, else None.
    """
    import matplotlib.pyplot as plt

    if hasattr(data, "history_"):
        history = data.history_
    else:
        if key not in data.uns or "history" not in data.uns[key]:
            msg = f"adata.uns[{key!r}]['history'] not found; run `scanpy_scvi.pp.scvi` first (key_added sets the key)."
            raise KeyError(msg)
        history = data.uns[key]["history"]
    present = [m for m in metrics if m in history]
    if not present:
        msg = f"None of {list(metrics)} is in the history (available: {sorted(history)})."
        raise KeyError(msg)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
        show = True if show is None else show
    for m in present:
        values = np.asarray(history[m], dtype=float)
        ax.plot(np.arange(len(values)), values, label=m)
    if "kl_weight" in history:
        kl = np.asarray(history["kl_weight"], dtype=float)
        warm = np.flatnonzero(kl < kl.max()) if kl.size else []
        if len(warm):
            ax.axvspan(0, warm[-1] + 1, color="0.9", zorder=0, label="KL warm-up")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per cell (-ELBO)")
    ax.legend(frameon=False)
    if show:
        plt.show()
        return None
    return ax
