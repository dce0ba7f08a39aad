"""The counts held on the compute device, minibatches gathered there by index.

On a GPU, building every minibatch on the host (row slicing, densifying, a copy over the bus)
costs more than the model's step. When the model columns of the counts fit in the device's
memory as CSR, :func:`resident_source` uploads them once, in row chunks; each minibatch is then
a gather and a scatter on the device, with no synchronisation with the host.
"""

from __future__ import annotations

import numpy as np
import torch

from ._batches import MinibatchSource, row_chunks

#: Share of the device's free memory that the uploaded counts may take (the upload briefly
#: needs twice their size).
MAX_FREE_SHARE = 0.4
_BYTES_PER_NONZERO = 8  # float32 value + int32 column


class ResidentSource:
    """A :class:`MinibatchSource` whose model columns live on ``device`` as CSR tensors.

    Gives the tensors the host source gives: ``X`` dense float32 (cells x model genes), the
    per-cell arrays, and with ``nonzero=True`` ``nz_index``, the flat row-major positions of
    the nonzero entries of ``X`` in increasing order. ``obs`` keeps the host arrays.
    """

    backed = False

    def __init__(self, source: MinibatchSource, device: torch.device | str):
        self.device = torch.device(device)
        self.n_obs, self.n_vars = source.n_obs, source.n_vars
        self.obs = source.obs
        counts, cols, vals = [], [], []
        for block in canonical_blocks(source):
            counts.append(np.diff(block.indptr))
            cols.append(torch.from_numpy(block.indices.astype(np.int32)).to(self.device))
            vals.append(torch.from_numpy(block.data).to(self.device))
        self._indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
        self._crow = torch.from_numpy(self._indptr).to(self.device)
        self._col, self._val = torch.cat(cols), torch.cat(vals)
        self._obs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in source.obs.items()}

    def get(
        self, idx: np.ndarray, device: torch.device | str | None = None, sparse: bool = False, nonzero: bool = False
    ) -> dict[str, torch.Tensor]:
        """Tensors of the cells ``idx`` on this source's device (``X`` is always dense)."""
        idx = np.asarray(idx, dtype=np.int64)
        total = int((self._indptr[idx + 1] - self._indptr[idx]).sum())  # on the host: no device synchronisation
        dev = self.device
        rows = torch.from_numpy(idx)
        if dev.type == "cuda":  # pinned, so that the copy does not wait for the device
            rows = rows.pin_memory()
        rows = rows.to(dev, non_blocking=True)
        starts = self._crow[rows]
        n_row = self._crow[rows + 1] - starts
        row_of_entry = torch.repeat_interleave(torch.arange(len(idx), device=dev), n_row, output_size=total)
        first_of_row = torch.cumsum(n_row, 0) - n_row
        entry = starts[row_of_entry] + torch.arange(total, device=dev) - first_of_row[row_of_entry]
        flat = row_of_entry * self.n_vars + self._col[entry]
        X = torch.zeros(len(idx) * self.n_vars, device=dev)
        X[flat] = self._val[entry]
        out = {"X": X.view(len(idx), self.n_vars)}
        if nonzero:
            out["nz_index"] = flat
        for key, values in self._obs.items():
            out[key] = values[rows]
        return out


def canonical_blocks(source: MinibatchSource):
    """The model columns of ``source`` in row chunks, each a canonical float32 CSR matrix
    (sorted indices, no duplicates, no stored zeros; absent model genes as empty columns)."""
    n_read = source.X.shape[1] if source.gene_idx is None else len(source.gene_idx)
    for rows in row_chunks(source.n_obs, n_read):
        block = source.csr_rows(rows, copy=True)  # canonicalised in place below
        block.sum_duplicates()  # also sorts the indices
        block.eliminate_zeros()
        yield block


def resident_source(source, device: torch.device | str, *, required: bool = False):
    """``source`` held on ``device`` (a :class:`ResidentSource`), or ``source`` itself.

    By default only on a GPU, and only when the counts take at most ``MAX_FREE_SHARE`` of its
    free memory; ``required=True`` holds them on any device, or raises when they cannot fit.
    """
    device = torch.device(device)
    if isinstance(source, ResidentSource) or not isinstance(source, MinibatchSource):
        return source
    if device.type != "cuda":
        return ResidentSource(source, device) if required else source
    nnz = _stored_entries(source.X)
    free, _ = torch.cuda.mem_get_info(device)
    needed = None if nnz is None else nnz * _BYTES_PER_NONZERO + (source.n_obs + 1) * 8
    if (needed is None and required) or (needed is not None and needed <= MAX_FREE_SHARE * free):
        return ResidentSource(source, device)
    if required:
        need = "an unknown amount" if needed is None else f"{needed / 2**30:.1f} GiB"
        msg = (
            f"counts_on_device=True: the counts need {need} on {device}, which has {free / 2**30:.1f} GiB "
            f"free (at most {MAX_FREE_SHARE:.0%} of it is used). Pass counts_on_device=None or False."
        )
        raise ValueError(msg)
    return source


def _stored_entries(X) -> int | None:
    """Stored entries of ``X`` (an upper bound of the model columns' nonzeros), None if unknown."""
    if isinstance(X, np.ndarray):
        return int(np.count_nonzero(X))
    nnz = getattr(X, "nnz", None)
    return None if nnz is None else int(nnz)
