"""scArches' ``scarches.dataset.trvae.data_handling``, where its trVAE tutorial finds ``remove_sparsity``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData


def remove_sparsity(adata: AnnData) -> AnnData:
    """A copy of ``adata`` with a dense ``X`` (obs and var copied), or ``adata`` itself when ``X``
    is dense, as in scArches.

    scArches' models need a dense ``X``; ours read sparse counts as well, so the call is only
    needed for code that relies on the dense matrix afterwards. As in scArches, the copy keeps
    ``obs`` and ``var`` only (not layers, obsm or uns).
    """
    import anndata as ad

    if not sp.issparse(adata.X):
        return adata
    return ad.AnnData(adata.X.toarray(), obs=adata.obs.copy(deep=True), var=adata.var.copy(deep=True))
