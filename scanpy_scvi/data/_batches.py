"""Minibatches straight from an AnnData matrix (dense, CSR, CSC or backed) into tensors."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from ._order import BLOCK_ROWS, BUFFER_BLOCKS


def dense_rows(X, rows: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
    """``X[rows][:, cols]`` as a dense float32 array, without densifying anything else.

    ``rows`` must be sorted when ``X`` is backed on disk (h5py needs increasing indices).
    """
    consecutive = len(rows) > 1 and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1)
    block = X[int(rows[0]) : int(rows[-1]) + 1] if consecutive else X[rows]  # a slice: one read on disk
    if cols is not None:
        block = block[:, cols]
    if sp.issparse(block) or hasattr(block, "toarray"):
        block = block.toarray()
    return np.asarray(block, dtype=np.float32)


def row_chunks(n_obs: int, n_cols: int, max_elements: int = 16_000_000):
    """Contiguous row slices whose dense size stays below ``max_elements`` (64 MB of float32)."""
    step = max(1, max_elements // max(n_cols, 1))
    for start in range(0, n_obs, step):
        yield slice(start, min(start + step, n_obs))


class MinibatchSource:
    """Gathers the rows of one AnnData (already validated) as a dict of tensors.

    Parameters
    ----------
    X
        The count matrix: numpy array, scipy sparse matrix, or a backed dataset.
    gene_idx
        Columns of ``X`` that the model uses, in model order, or None for all of them.
    obs
        Per-cell arrays (``batch``, ``labels``, and optionally ``cat_covs``, ``cont_covs``,
        ``size_factor``), aligned with the rows of ``X``.
    n_vars
        Number of model genes (default: the number of columns read).
    positions
        Model columns that the read columns fill, when some model genes are absent from
        ``X`` (a mapped query); the absent genes read as zero counts.
    """

    #: On-disk reading geometry (see ``_order.py``): rows per block, blocks shuffled together.
    block_rows = BLOCK_ROWS
    buffer_blocks = BUFFER_BLOCKS

    def __init__(
        self,
        X,
        gene_idx: np.ndarray | None,
        obs: dict[str, np.ndarray],
        *,
        n_vars: int | None = None,
        positions: np.ndarray | None = None,
    ):
        self.X = X
        self.gene_idx = gene_idx
        self.obs = obs
        self.n_obs = X.shape[0]
        self.positions = positions
        n_read = X.shape[1] if gene_idx is None else len(gene_idx)
        self.n_vars = n_read if n_vars is None else n_vars
        self.backed = not isinstance(X, np.ndarray) and not sp.issparse(X)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        block = dense_rows(self.X, rows, self.gene_idx)
        if self.positions is None:
            return block
        padded = np.zeros((len(rows), self.n_vars), dtype=np.float32)
        padded[:, self.positions] = block
        return padded

    def csr_rows(self, rows: slice, copy: bool = False) -> sp.csr_matrix:
        """The model columns of the rows ``rows`` as float32 CSR (absent model genes: empty
        columns); ``copy`` guarantees the result shares no memory with ``X``."""
        block = self.X[rows]
        if self.gene_idx is not None:
            block = block[:, self.gene_idx]
        block = sp.csr_matrix(block, dtype=np.float32, copy=copy)
        if self.positions is not None:
            block = sp.csr_matrix(
                (block.data, self.positions[block.indices], block.indptr), shape=(block.shape[0], self.n_vars)
            )
        return block

    def _read_any_order(self, idx: np.ndarray) -> np.ndarray:
        if not (self.backed and np.any(np.diff(idx) < 0)):
            return self._read(idx)
        order = np.argsort(idx, kind="stable")  # h5py reads increasing rows only
        X = np.empty((len(idx), self.n_vars), dtype=np.float32)
        X[order] = self._read(idx[order])
        return X

    def get(
        self, idx: np.ndarray, device: torch.device | str = "cpu", sparse: bool = False, nonzero: bool = False
    ) -> dict[str, torch.Tensor]:
        """Tensors of the cells ``idx``.

        ``sparse=True`` gives ``X`` as a torch CSR tensor when the counts are an in-memory CSR
        matrix with every model gene present (else dense). ``nonzero=True`` adds, for a dense
        ``X`` read from an in-memory CSR matrix, ``nz_index``: the flat positions of its
        nonzero entries, taken from the CSR structure (cheaper than searching the block).
        """
        idx = np.asarray(idx)
        csr = sp.issparse(self.X) and self.X.format == "csr"
        out = {}
        if csr and (sparse or nonzero) and self.positions is None:
            block = self.X[idx] if self.gene_idx is None else self.X[idx][:, self.gene_idx]
            if sparse:
                out["X"] = _torch_csr(block)
            else:
                dense = block.toarray().astype(np.float32, copy=False)
                out["X"] = torch.from_numpy(dense)
                out["nz_index"] = torch.from_numpy(flat_nonzero(block, dense))
        else:
            out["X"] = torch.from_numpy(self._read_any_order(idx))
        for key, values in self.obs.items():
            out[key] = torch.from_numpy(np.ascontiguousarray(values[idx]))
        return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def flat_nonzero(block: sp.csr_matrix, dense: np.ndarray) -> np.ndarray:
    """Row-major flat positions of the nonzero entries of ``dense``, read from its CSR ``block``.

    Falls back to searching ``dense`` when the structure is not one entry per nonzero
    (explicit zeros or duplicate entries, which ``toarray`` sums).
    """
    n, g = block.shape
    flat = np.repeat(np.arange(n, dtype=np.int64) * g, np.diff(block.indptr)) + block.indices
    if np.count_nonzero(dense) != len(flat):
        flat = np.flatnonzero(dense)
    return flat


def _torch_csr(block: sp.csr_matrix) -> torch.Tensor:
    """A scipy CSR block as a float32 torch CSR tensor (indices are trusted: scipy built them)."""
    block = block.astype(np.float32, copy=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        warnings.filterwarnings(
            "ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning
        )
        return torch.sparse_csr_tensor(
            torch.from_numpy(block.indptr.astype(np.int64)),
            torch.from_numpy(block.indices.astype(np.int64)),
            torch.from_numpy(block.data),
            size=block.shape,
            check_invariants=False,
        )
