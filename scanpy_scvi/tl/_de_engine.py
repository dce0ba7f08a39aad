"""The sampling and statistics engine behind :mod:`scanpy_scvi.tl._de`.

:func:`run` takes :class:`Comparison` s (two groups of cells each) and returns one DataFrame
of per-gene posterior statistics per comparison, sorted by ``proba_de`` (change mode) or
``bayes_factor`` (vanilla). The engine is tuned; everything below relies on these invariants:

* **Every cell is encoded once**: q(z | x) is deterministic in eval mode. A draw takes a fresh
  z from its cell's posterior and decodes it (the distribution of encoding and decoding the
  cell anew), so drawing a cell again costs only the decoder.
* **Draws are gene-major**, (genes, draws) float32, so every per-gene statistic reduces over
  contiguous memory, and are **decoded in chunks of** ``DRAW_BATCH`` = 256 (``batch_size``
  overrides): a chunk's transposed write stays in cache (1024 is ~25 % slower).
* A group's ``n_samples`` draws are its cells drawn uniformly with replacement, split evenly
  over the batch codes (``[None]``: each cell's own batch), in batch order. Draw i of each
  group forms pair i: the paired statistics take the first ``min(n1, n2)`` draws, means all.
* **One rest pool, shared across comparisons**: with 3 or more one-vs-rest comparisons, one
  pool of draws over all cells (at most 4 times one comparison's draws), ordered by group, is
  decoded once per batch code. The rest of group g is a uniformly random subset of the pool's
  draws outside g (multivariate hypergeometric counts per group block, the first draws of
  each block), read in place; the pool's draws inside g are the first draws of g itself. So
  every comparison sees ``n_samples`` independent uniform draws per side while the decoder
  runs about ``n_samples`` times per group, pool included. A repeated reference group is
  decoded once.
* **Per-32-column chunk maxima for the pseudocount**: its estimate needs per-gene maxima over
  every comparison's paired draws. A pool keeps maxima over chunks of ``MAX_CHUNK`` = 32
  columns, taken on first use (never with a given pseudocount), so a column range's maximum
  reads at most 64 columns; group 1's maxima are taken while decoding when all its draws are
  paired.
* **Memory is reused**: first-touching fresh memory costs more than the arithmetic done in it,
  so each group has two alternating (genes, draws) slots (the comparison being drawn and the
  one being tested), and each thread scratch arrays of one block of ``GENE_BLOCK`` = 128
  genes; a block runs single-threaded, on one of ``torch.get_num_threads()`` threads.
* **The pipeline thread split**: on a CPU with 2 or more torch threads and 2 or more
  comparisons, a worker thread draws comparison k + 1 with half of the threads while the
  caller tests comparison k with the rest (the last one with all), so that neither stage waits
  on the other's spinning OpenMP threads. The caller's thread count is restored, also on error.
* **Results equal the sequential one-thread loop's**: only the drawing stage consumes random
  numbers (numpy's generator for cells, torch's for z), one comparison after the other, so the
  pipeline moves work, not draws: bit-identical where float summation does not depend on the
  thread count.
* **The same seed gives the same draws**: ``random_state`` seeds both generators (torch's
  through ``model.seeded``, restored after).

The model is reached through its public API only (``bind``, ``seeded``, ``inference_mode``,
``minibatches``, ``module``, ``setup``, ``device``, ``feature_names``, ``decode_features``).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..nn import to_numpy

if TYPE_CHECKING:
    from ..data import BoundData
    from ..model import SCVI

EPS = 1e-8
REST = "rest"


@dataclass
class Comparison:
    """Two groups of cells (positions in the AnnData) and their labels; ``label2`` is ``REST``
    when group 2 is all the other cells."""

    label1: str
    label2: str
    cells1: np.ndarray
    cells2: np.ndarray


def run(
    adata, model, comparisons, *, mode, delta, fdr_target, pseudocounts, codes1, codes2, n_samples, random_state,
    progress_bar, batch_size, decode_options=None,
) -> pd.DataFrame:  # fmt: skip
    """Sample both groups of every comparison and test; one DataFrame for all comparisons.

    ``codes1`` / ``codes2``: batch codes to decode each group in (``[None]``: each cell's own).
    Drawing and testing run as the two-stage pipeline of the module docstring: both stages
    take about as long, and neither waits on the other's OpenMP threads, which otherwise keep
    spinning for milliseconds after every parallel operation. The features are the model's
    ``feature_names`` (genes; for totalVI genes then proteins), decoded by
    ``model.decode_features(z, tensors, code, **decode_options)``.
    """
    bound = model.bind(adata)  # checks genes and batches of adata against the model
    stats = _RawStats(bound)
    rng = np.random.default_rng(random_state)
    with model.seeded(random_state):
        cells = np.unique(np.concatenate([c for comp in comparisons for c in (comp.cells1, comp.cells2)]))
        sampler = _PosteriorSampler(model, bound, cells, batch_size, decode_options or {})
        group1 = _Draws(sampler, codes1, n_samples, rng)
        group2 = _Group2Draws(sampler, comparisons, codes2, n_samples, rng)
        work = _WorkBuffers()
        width1, width2 = (d.per_code * len(d.codes) for d in (group1, group2.draws))

        def draw(k: int) -> tuple:
            comp, slot = comparisons[k], k % 2
            # one-vs-rest: group 1's draws in the rest pool are reused, so the pool costs no decoding
            decoded = group2.own_draws(comp) if codes1 == codes2 else None
            # the maxima behind the pseudocount are taken while decoding, if all draws are paired
            max1 = None
            if pseudocounts is None and width1 <= width2:
                max1 = torch.full((sampler.n_genes,), -torch.inf, device=model.device)
            s1 = group1.of(comp.cells1, out=work.slot("s1", slot, group1), decoded=decoded, maxima=max1)
            s2 = group2.of(comp, out=work.slot("s2", slot, group2.draws))
            raw1, raw2 = stats.pair(comp)
            return comp, s1, s2, raw1, raw2, _pseudocount(s1, s2, raw1, raw2, pseudocounts, max1)

        def test(comp, s1, s2, raw1, raw2, pc) -> pd.DataFrame:
            return _compare(s1, s2, raw1, raw2, pc, model.feature_names, mode, delta, fdr_target, comp, work)

        n_threads = torch.get_num_threads()
        steps = tqdm(range(len(comparisons)), desc="DE", unit="comparison", disable=not progress_bar)
        if model.device.type != "cpu" or n_threads < 2 or len(comparisons) < 2:
            return pd.concat([test(*draw(k)) for k in steps])
        frames, inputs = [], draw(0)  # nothing to overlap with yet: all threads
        drawing_threads = n_threads // 2
        try:
            with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(drawing_threads,)) as drawer:
                for k in steps:
                    last = k + 1 == len(comparisons)
                    if not last:
                        pending = drawer.submit(draw, k + 1)  # slot (k + 1) % 2: not the one tested now
                    # torch's thread count is per thread; the last test runs alone, on all of them
                    torch.set_num_threads(n_threads if last else n_threads - drawing_threads)
                    frames.append(test(*inputs))
                    if not last:
                        inputs = pending.result()
        finally:
            torch.set_num_threads(n_threads)
        return pd.concat(frames)


# -- sampling -------------------------------------------------------------------------------------------
DRAW_BATCH = 256  # draws decoded at a time (default of ``batch_size``)


class _PosteriorSampler:
    """Normalised expression of posterior draws of chosen cells, each encoded once here."""

    def __init__(self, model: SCVI, bound: BoundData, cells: np.ndarray, batch_size: int | None, options: dict):
        self.model, self.bound, self.options = model, bound, options
        self.n_genes = len(model.feature_names)  # genes (and, for totalVI, proteins)
        self.batch_size = batch_size or DRAW_BATCH
        self.row = np.full(bound.n_obs, -1, dtype=np.int64)
        self.row[cells] = np.arange(len(cells))
        k = model.module.n_latent
        self.qz_m = torch.empty((len(cells), k), device=model.device)
        self.qz_v = torch.empty((len(cells), k), device=model.device)
        with model.inference_mode():
            for rows, t in model.minibatches(bound, cells, batch_size, encoder_only=True):
                inf = model.module.inference(t)
                self.qz_m[rows], self.qz_v[rows] = inf["qz_m"], inf["qz_v"]

    def empty(self, n_draws: int) -> torch.Tensor:
        return _empty((self.n_genes, n_draws), self.model.device)

    def draw(
        self, cells: np.ndarray, code: int | None, out: torch.Tensor, maxima: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One draw per entry of ``cells`` (repeats allowed), decoded in batch ``code`` (``None``:
        the cell's own), written into the columns of ``out``; ``maxima`` (genes,), if given,
        is raised to the per-gene maximum of the draws while they are in cache."""
        model, obs, device = self.model, self.bound.source.obs, self.model.device
        with self.model.inference_mode():
            for start in range(0, len(cells), self.batch_size):
                chunk = cells[start : start + self.batch_size]
                rows = torch.as_tensor(self.row[chunk], device=device)
                covariates = {key: torch.as_tensor(v[chunk], device=device) for key, v in obs.items()}
                z = model.module.sample_z(self.qz_m[rows], self.qz_v[rows])
                freq = model.decode_features(z, covariates, code, **self.options)
                out[:, start : start + len(chunk)] = freq.T
                if maxima is not None:
                    torch.maximum(maxima, freq.amax(0), out=maxima)
        return out


class _Draws:
    """``n_samples`` draws of a group's cells (uniform, with replacement), split evenly over the
    batches ``codes`` (``[None]``: each cell's own batch), in batch order."""

    def __init__(self, sampler: _PosteriorSampler, codes: list[int | None], n_samples: int, rng):
        self.sampler, self.codes, self.rng = sampler, codes, rng
        self.per_code = max(n_samples // len(codes), 2)

    def empty(self) -> torch.Tensor:
        return self.sampler.empty(self.per_code * len(self.codes))

    def columns(self, i: int) -> slice:
        return slice(i * self.per_code, (i + 1) * self.per_code)

    def of(
        self,
        cells: np.ndarray,
        out: torch.Tensor,
        decoded: list[_Columns] | None = None,
        maxima: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draws of ``cells`` written into ``out``; ``decoded``: per batch code, uniform draws of
        these cells decoded before, used as the first columns (only the rest is decoded);
        ``maxima`` (genes,), if given, is raised to the per-gene maximum over all the draws."""
        for i, code in enumerate(self.codes):
            target = out[:, self.columns(i)]
            k = 0 if decoded is None else min(decoded[i].shape[1], self.per_code)
            if k:
                known = decoded[i].first(k)
                torch.cat(known.views(), dim=1, out=target[:, :k])
                if maxima is not None:
                    torch.maximum(maxima, known.amax(k), out=maxima)
            if k < self.per_code:
                self.sampler.draw(self.rng.choice(cells, self.per_code - k), code, target[:, k:], maxima)
        return out


class _Group2Draws:
    """Draws of the second group of each comparison: from the shared rest pool (one-vs-rest,
    3 or more comparisons), else decoded, a reference group repeated across comparisons
    (``group2='ctrl'``) once. The pool's draws of group g itself: :meth:`own_draws`."""

    POOL_MAX_FACTOR = 4  # pool size at most this many times one comparison's draws (memory bound)

    def __init__(self, sampler, comparisons: list[Comparison], codes, n_samples: int, rng):
        self.draws = _Draws(sampler, codes, n_samples, rng)
        self._last: tuple[np.ndarray, _Columns] | None = None
        rest = [c for c in comparisons if c.label2 == REST]
        self._block_of = {id(c): i for i, c in enumerate(rest)}
        self._pools = self._decode_pools(rest) if len(rest) >= 3 else None

    def _decode_pools(self, rest: list[Comparison]) -> list[tuple[_Pool, np.ndarray]]:
        """Per batch code: (genes, pool) draws over all cells, grouped by block, and block sizes."""
        d, n_obs = self.draws, self.draws.sampler.bound.n_obs
        block = np.full(n_obs, len(rest), dtype=np.int64)  # last block: cells of no tested group
        for i, comp in enumerate(rest):
            block[comp.cells1] = i
        largest = max(len(c.cells1) for c in rest) / n_obs
        size = min(int(np.ceil(1.1 * d.per_code / max(1 - largest, 1e-12))), self.POOL_MAX_FACTOR * d.per_code)
        pools = []
        for code in d.codes:
            cells = d.rng.integers(0, n_obs, size)
            cells = cells[np.argsort(block[cells], kind="stable")]
            freq = d.sampler.draw(cells, code, d.sampler.empty(size))
            pools.append((_Pool(freq), np.bincount(block[cells], minlength=len(rest) + 1)))
        return pools

    def of(self, comp: Comparison, out: torch.Tensor) -> _Columns:
        """The second group's draws: columns of the pool (``out`` holds any topping-up draws),
        or decoded (or kept from the previous comparison) in their own buffer."""
        if self._pools is not None and id(comp) in self._block_of:
            return self._from_pools(comp, self._block_of[id(comp)], out)
        if self._last is None or not np.array_equal(self._last[0], comp.cells2):
            decoded = self.draws.of(comp.cells2, self.draws.empty())  # kept: own buffer
            self._last = (comp.cells2, _Columns.whole(decoded))
        return self._last[1]

    def own_draws(self, comp: Comparison) -> list[_Columns] | None:
        """Per batch code, the pool's draws from the cells of ``comp``'s first group (uniform over
        them, independent of the rest draws of ``comp``), or None."""
        if self._pools is None or id(comp) not in self._block_of:
            return None
        g = self._block_of[id(comp)]
        return [_Columns([(pool, sizes[:g].sum(), sizes[: g + 1].sum())]) for pool, sizes in self._pools]

    def _from_pools(self, comp: Comparison, g: int, out: torch.Tensor) -> _Columns:
        d, parts = self.draws, []
        for i, (code, (pool, sizes)) in enumerate(zip(d.codes, self._pools, strict=True)):
            available = sizes.copy()
            available[g] = 0
            take = d.rng.multivariate_hypergeometric(available, min(d.per_code, int(available.sum())))
            parts += [(pool, start, start + n) for start, n in zip(np.cumsum(sizes) - sizes, take, strict=True)]
            if take.sum() < d.per_code:  # too few pool draws outside a very large group: decode the rest
                rest = out[:, d.columns(i)][:, : d.per_code - take.sum()]
                d.sampler.draw(d.rng.choice(comp.cells2, rest.shape[1]), code, rest)
                parts.append((_Pool(rest), 0, rest.shape[1]))
        return _Columns(parts)


MAX_CHUNK = 32  # columns per stored maximum of a pool


class _Pool:
    """Decoded (genes, draws) with per-gene maxima over chunks of ``MAX_CHUNK`` columns, taken
    on first use."""

    def __init__(self, freq: torch.Tensor):
        self.freq = freq

    @cached_property
    def chunk_max(self) -> torch.Tensor:
        genes, n = self.freq.shape
        whole = n - n % MAX_CHUNK
        return self.freq[:, :whole].reshape(genes, whole // MAX_CHUNK, MAX_CHUNK).amax(2)

    def range_max(self, start: int, stop: int) -> torch.Tensor:
        """Per-gene maximum over the columns ``start:stop`` (not empty)."""
        first, last = -(-start // MAX_CHUNK), stop // MAX_CHUNK  # chunks wholly inside: first:last
        if first >= last:
            return self.freq[:, start:stop].amax(1)
        pieces = [self.freq[:, a:b] for a, b in ((start, first * MAX_CHUNK), (last * MAX_CHUNK, stop)) if a < b]
        return torch.cat([self.chunk_max[:, first:last], *pieces], dim=1).amax(1)


class _Columns:
    """(genes, draws) draws held as an ordered list of column ranges ``(pool, start, stop)``,
    read in place a gene block at a time; their maxima come from the pools' chunk maxima."""

    def __init__(self, parts: list[tuple[_Pool, int, int]]):
        self.parts = [(pool, int(a), int(b)) for pool, a, b in parts if b > a] or [parts[0]]
        self.shape = (parts[0][0].freq.shape[0], sum(b - a for _, a, b in self.parts))
        self.device = parts[0][0].freq.device

    @classmethod
    def whole(cls, freq: torch.Tensor) -> _Columns:
        return cls([(_Pool(freq), 0, freq.shape[1])])

    def views(self) -> list[torch.Tensor]:
        return [pool.freq[:, a:b] for pool, a, b in self.parts]

    def first(self, n: int) -> _Columns:
        parts, start = [], 0
        for pool, a, b in self.parts:
            parts.append((pool, a, min(b, a + max(n - start, 0))))
            start += b - a
        return _Columns(parts)

    def rows(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """All draws of the genes ``rows``: a view when one array holds them, else gathered into
        ``out`` (shaped (rows, draws))."""
        views = self.views()
        if len(views) == 1:
            return views[0][rows]
        return torch.cat([v[rows] for v in views], dim=1, out=out)

    def amax(self, n: int) -> torch.Tensor:
        """Per-gene maximum over the first ``n`` draws."""
        return torch.stack([pool.range_max(a, b) for pool, a, b in self.first(n).parts if b > a]).amax(0)


# -- raw statistics -------------------------------------------------------------------------------------------
class _RawStats:
    """Raw count summaries over the model genes for the groups of a comparison; a 'rest' group
    is derived from the all-cell totals, so one-vs-rest does not re-read the other cells."""

    def __init__(self, bound: BoundData):
        self.bound = bound
        self._all: np.ndarray | None = None

    def _sums(self, cells: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """(3, features): summed counts, nonzero indicators and counts scaled to 1e4 per cell
        (proteins, for totalVI, after the genes: scaled by the cell's protein total).

        CSR counts are summed over their stored entries (no dense block is built)."""
        n_genes = self.bound.source.n_vars
        sums = np.zeros((3, n_genes))
        proteins = self.bound.source.obs.get("Y")
        if proteins is not None:
            Y = proteins[cells].astype(np.float64)
            scaled = Y * (1e4 / np.maximum(Y.sum(1, keepdims=True), 1.0))
            protein_sums = np.stack([Y.sum(0), (Y > 0).sum(0), scaled.sum(0)])
        for start in range(0, len(cells), chunk):
            rows = cells[start : start + chunk]
            X = self.bound.source.get(rows, sparse=True)["X"]
            scale = 1e4 / self.bound.library[rows]
            if X.layout == torch.sparse_csr:
                values, genes = X.values().numpy().astype(np.float64), X.col_indices().numpy()
                scale = np.repeat(scale, np.diff(X.crow_indices().numpy()))
                sums[0] += np.bincount(genes, weights=values, minlength=n_genes)
                sums[1] += np.bincount(genes, weights=values > 0, minlength=n_genes)
                sums[2] += np.bincount(genes, weights=values * scale, minlength=n_genes)
            else:
                X = X.numpy().astype(np.float64)
                sums += (X.sum(0), (X > 0).sum(0), (X * scale[:, None]).sum(0))
        return sums if proteins is None else np.concatenate([sums, protein_sums], axis=1)

    def total(self) -> np.ndarray:
        if self._all is None:
            self._all = self._sums(np.arange(self.bound.n_obs))
        return self._all

    def pair(self, comp: Comparison) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Means for both groups of a comparison."""
        sums1 = self._sums(comp.cells1)
        is_rest = comp.label2 == REST and len(comp.cells1) + len(comp.cells2) == self.bound.n_obs
        sums2 = self.total() - sums1 if is_rest else self._sums(comp.cells2)
        return _means(sums1, len(comp.cells1)), _means(sums2, len(comp.cells2))


def _means(sums: np.ndarray, n: int) -> dict[str, np.ndarray]:
    return {"raw_mean": sums[0] / n, "non_zeros_proportion": sums[1] / n, "raw_normalized_mean": sums[2] / n}


# -- tests --------------------------------------------------------------------------------------------------
def _offset_from_maxima(max1: np.ndarray, max2: np.ndarray, raw1, raw2, threshold: float = 0.01) -> float:
    """scvi-tools' offset: 0.9 quantile of the per-gene maximum sampled frequency over the genes
    not expressed in a group (mean raw count < ``threshold``), divided by the number of genes."""
    offsets = [
        np.quantile(maxima[silent], 0.9) if (silent := raw["raw_mean"] < threshold).any() else 1e-10
        for maxima, raw in ((max1, raw1), (max2, raw2))
    ]
    return float(max(1e-10, max(offsets) / len(max1)))


GENE_BLOCK = 128  # genes per pass: a block's (genes, pairs) scratch stays in cache across the steps


def _by_gene_blocks(function, n_genes: int, device: torch.device) -> dict[str, np.ndarray]:
    """``function(rows)`` for blocks of ``GENE_BLOCK`` genes, its arrays concatenated per key; on
    the CPU whole blocks per worker thread, as numpy's partition (the median) and logarithm have
    no parallel version and a block's rows stay in its core's cache between the steps."""
    blocks = [slice(g, g + GENE_BLOCK) for g in range(0, n_genes, GENE_BLOCK)]
    n_threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or n_threads < 2 or len(blocks) < 2:
        parts = [function(rows) for rows in blocks]
    else:
        with ThreadPoolExecutor(n_threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            parts = list(pool.map(function, blocks))
        torch.set_num_threads(n_threads)  # for torch builds where the setting is shared by all threads
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _fraction(mask: torch.Tensor) -> np.ndarray:
    """Row means of a float 0/1 mask (float masks sum far faster than booleans; exact below 2**24)."""
    return to_numpy(mask.sum(1)).astype(np.float64) / mask.shape[1]


def _block_statistics(s1, s2, pc, mode, delta, buf, tmp) -> dict[str, np.ndarray]:
    n = s1.shape[1]
    out = {}
    if mode == "change":
        # LFC >= delta  <=>  (s1 + pc) / (s2 + pc) >= c = 2**delta  <=>  s1 - c s2 >= (c - 1) pc:
        # one fused pass per side, no logarithm and no division
        c = 2.0**delta
        out["up"] = _fraction(torch.ge(torch.sub(s1, s2, alpha=c, out=tmp), (c - 1) * pc, out=tmp))
        out["down"] = _fraction(torch.lt(torch.sub(s1, s2, alpha=1 / c, out=tmp), (1 / c - 1) * pc, out=tmp))
    else:
        out["greater"] = _fraction(torch.gt(s1, s2, out=buf))
    # LFC summaries use a 1000x smaller offset, as scvi-tools
    lfc = _log2_(torch.add(s1, 1e-3 * pc, out=buf).div_(torch.add(s2, 1e-3 * pc, out=tmp)))
    mean = lfc.sum(1) / n
    std = torch.linalg.vector_norm(torch.sub(lfc, mean[:, None], out=tmp), dim=1) / n**0.5
    median, low, high = _order_statistics(lfc, by_sort=lfc.device.type != "cpu")  # reorders lfc in place
    out.update(lfc_mean=to_numpy(mean), lfc_median=median, lfc_std=to_numpy(std), lfc_min=low, lfc_max=high)
    return out


def _log2_(x: torch.Tensor) -> torch.Tensor:
    """In-place log2; on the CPU by numpy, whose vectorised float32 log2 is ~3x torch's here."""
    if x.device.type == "cpu":
        np.log2(x.numpy(), out=x.numpy())
        return x
    return x.log2_()


def _order_statistics(x: torch.Tensor, by_sort: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: median (mean of the two middle values when even), min and max; ``x`` is scratch.

    On the CPU numpy's in-place partition finds the middle far faster than a sort; on a GPU a
    sort is fast and partition is not available.
    """
    n = x.shape[1]
    if by_sort:
        ordered = x.sort(dim=1).values
        lower, upper = to_numpy(ordered[:, (n - 1) // 2]), to_numpy(ordered[:, n // 2])
        median = upper if n % 2 else (lower.astype(np.float64) + upper) / 2  # as the partition path
        return median, to_numpy(ordered[:, 0]), to_numpy(ordered[:, -1])
    part = x.numpy()
    part.partition(n // 2, axis=1)
    low, middle, high = part[:, : n // 2], part[:, n // 2], part[:, n // 2 :]
    median = middle if n % 2 else (middle.astype(np.float64) + low.max(1)) / 2
    return median, (low.min(1) if n > 1 else middle), high.max(1)


class _WorkBuffers:
    """Buffers kept across comparisons: two alternating (genes, draws) slots per group and per
    thread (gene block, draws) scratch arrays, which stay in that core's cache within a block."""

    def __init__(self):
        self._slots: dict[tuple[str, int], torch.Tensor] = {}
        self._local = threading.local()

    def slot(self, group: str, slot: int, draws: _Draws) -> torch.Tensor:
        if (group, slot) not in self._slots:
            self._slots[group, slot] = draws.empty()
        return self._slots[group, slot]

    def scratch(self, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """This thread's array ``name`` of ``shape`` (at most GENE_BLOCK rows)."""
        rows, cols = shape
        buffers = self._local.__dict__
        if name not in buffers or buffers[name].shape[1] != cols or buffers[name].device != device:
            buffers[name] = _empty((max(rows, GENE_BLOCK), cols), device)
        return buffers[name][:rows]


def _empty(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An uninitialised float32 tensor; on the CPU allocated by numpy, which asks the kernel for
    transparent huge pages for large arrays: first-touching tens of megabytes then takes ~500
    page faults instead of ~10,000."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.empty(shape, dtype=np.float32))
    return torch.empty(shape, device=device)


def _pseudocount(s1, s2, raw1, raw2, given: float | None, max1: torch.Tensor | None = None) -> float:
    """``given``, or scvi-tools' estimate from the per-gene maxima over the row-aligned pairs
    (``max1``: those of ``s1``, when known from drawing)."""
    if given is not None:
        return float(given)
    s2 = s2 if isinstance(s2, _Columns) else _Columns.whole(s2)
    n = min(s1.shape[1], s2.shape[1])
    max1 = s1[:, :n].amax(1) if max1 is None else max1
    return _offset_from_maxima(to_numpy(max1), to_numpy(s2.amax(n)), raw1, raw2)


def _compare(s1, s2, raw1, raw2, pc, genes, mode, delta, fdr_target, comp, work) -> pd.DataFrame:
    """The result table of one comparison: ``s1`` a (genes, draws) tensor, ``s2`` one or
    :class:`_Columns`; draw i of each group forms pair i."""
    s2 = s2 if isinstance(s2, _Columns) else _Columns.whole(s2)
    n = min(s1.shape[1], s2.shape[1])  # row-aligned pairs; within a batch when both used the same batches

    def block(rows: slice) -> dict[str, np.ndarray]:
        a = s1[rows]
        b = s2.rows(rows, work.scratch("gather", (a.shape[0], s2.shape[1]), a.device))
        # the means take all draws; the block's rows are then in cache for the paired statistics
        means = {"scale1": to_numpy(a.mean(1)), "scale2": to_numpy(b.mean(1))}
        a, b = a[:, :n], b[:, :n]
        buf, tmp = (work.scratch(name, a.shape, a.device) for name in ("buf", "tmp"))
        return means | _block_statistics(a, b, pc, mode, delta, buf, tmp)

    stats = _by_gene_blocks(block, s1.shape[0], s1.device)
    cols: dict[str, np.ndarray | float] = {}
    if mode == "change":
        up, down = stats.pop("up"), stats.pop("down")
        proba = np.maximum(up, down)
        cols.update(proba_de=proba, proba_not_de=1 - proba, proba_up=up, proba_down=down)
    else:
        proba = stats.pop("greater")
        cols.update(proba_m1=proba, proba_m2=1 - proba)
    cols["bayes_factor"] = np.log(proba + EPS) - np.log(1 - proba + EPS)
    cols.update(scale1=stats.pop("scale1"), scale2=stats.pop("scale2"), pseudocounts=pc, delta=float(delta))
    cols.update(stats)
    for k in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean"):
        cols[f"{k}1"], cols[f"{k}2"] = raw1[k], raw2[k]
    df = pd.DataFrame(cols, index=pd.Index(genes, name="gene"))
    df = df.sort_values("proba_de" if mode == "change" else "bayes_factor", ascending=False, kind="stable")
    if mode == "change":
        df[f"is_de_fdr_{fdr_target}"] = _fdr_flags(df["proba_de"].to_numpy(), fdr_target)
    df["comparison"] = f"{comp.label1} vs {comp.label2}"
    df["group1"], df["group2"] = comp.label1, comp.label2
    return df


def _fdr_flags(proba_sorted_desc: np.ndarray, target: float) -> np.ndarray:
    """Top genes whose posterior expected FDR, mean(1 - proba_de) over the top d, stays <= target."""
    fdr = np.cumsum(1 - proba_sorted_desc) / np.arange(1, len(proba_sorted_desc) + 1)
    ok = np.flatnonzero(fdr <= target)
    flags = np.zeros(len(proba_sorted_desc), dtype=bool)
    if ok.size:
        flags[: ok[-1] + 1] = True
    return flags
