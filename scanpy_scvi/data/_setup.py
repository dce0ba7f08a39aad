"""What a model needs to know about its AnnData, and every input check.

A :class:`DataSetup` is created once from the training AnnData and stored with the model
(it is plain JSON). Training, inference on another AnnData, and loading a saved model all
go through :meth:`DataSetup.bind`, so a mismatch is caught in one place with one message.
Nothing here modifies the AnnData.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._batches import MinibatchSource, row_chunks
from ._proteins import protein_names_of, read_proteins

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anndata import AnnData


@dataclass
class DataSetup:
    """Genes, layer and categorical mappings of a model (JSON-serialisable)."""

    genes: list[str]
    layer: str | None = None
    batch_key: str | None = None
    batch_categories: list[str] = field(default_factory=lambda: ["0"])
    labels_key: str | None = None
    label_categories: list[str] = field(default_factory=lambda: ["0"])
    categorical_covariate_keys: list[str] = field(default_factory=list)
    categorical_covariate_categories: list[list[str]] = field(default_factory=list)
    continuous_covariate_keys: list[str] = field(default_factory=list)
    size_factor_key: str | None = None
    check_counts: bool = True
    # scANVI: this label value (or a missing labels column) marks an unlabelled cell, code n_labels
    unlabeled_category: str | None = None
    # expiMap: the gene programs its latent units stand for (the mask's columns), in order
    program_names: list[str] = field(default_factory=list)
    # scPoli: label values outside label_categories (unknown or novel types) mark unlabelled cells
    unknown_labels_unlabelled: bool = False
    # reference mapping: the fraction of model genes an AnnData may lack (zero-padded)
    max_missing_genes: float = 0.0
    # CITE-seq: protein counts in adata.obsm[protein_expression_obsm_key], in this order
    protein_expression_obsm_key: str | None = None
    protein_names_uns_key: str | None = None
    protein_names: list[str] = field(default_factory=list)
    # reference mapping: proteins an AnnData lacks read as zeros (not measured in its batches)
    allow_missing_proteins: bool = False

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_adata(
        cls,
        adata: AnnData,
        *,
        genes: Sequence[str] | None = None,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        size_factor_key: str | None = None,
        check_counts: bool = True,
        protein_expression_obsm_key: str | None = None,
        protein_names_uns_key: str | None = None,
    ) -> DataSetup:
        """Read the categories (and protein names) of ``adata``, the training data. Raises on bad input."""
        _check_layer(adata, layer)
        genes = list(adata.var_names if genes is None else genes)
        cat_keys = list(categorical_covariate_keys or [])
        for key in [batch_key, labels_key, *cat_keys, *(continuous_covariate_keys or []), size_factor_key]:
            if key is not None:
                _check_obs_key(adata, key)
        return cls(
            genes=[str(g) for g in genes],
            layer=layer,
            batch_key=batch_key,
            batch_categories=categories(adata, batch_key, "batch_key"),
            labels_key=labels_key,
            label_categories=categories(adata, labels_key, "labels_key"),
            categorical_covariate_keys=cat_keys,
            categorical_covariate_categories=[categories(adata, k, "categorical_covariate_keys") for k in cat_keys],
            continuous_covariate_keys=list(continuous_covariate_keys or []),
            size_factor_key=size_factor_key,
            check_counts=check_counts,
            protein_expression_obsm_key=protein_expression_obsm_key,
            protein_names_uns_key=protein_names_uns_key,
            protein_names=(
                []
                if protein_expression_obsm_key is None
                else protein_names_of(adata, protein_expression_obsm_key, protein_names_uns_key)
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSetup:
        return cls(**d)

    def module_sizes(self) -> dict[str, Any]:
        """The data-dependent sizes a torch module is built with (besides ``len(genes)`` inputs)."""
        return {
            "n_batch": self.n_batch,
            "n_labels": self.n_labels,
            "n_cats_per_cov": self.n_cats_per_cov,
            "n_continuous_cov": len(self.continuous_covariate_keys),
            "use_size_factor": self.size_factor_key is not None,
        } | ({"n_proteins": len(self.protein_names)} if self.protein_expression_obsm_key else {})

    @property
    def n_batch(self) -> int:
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        return len(self.label_categories)

    @property
    def n_cats_per_cov(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.categorical_covariate_categories)

    def batch_code(self, value) -> int:
        """Code of a batch given as a category (or, if not a category, as an integer code)."""
        if str(value) in self.batch_categories:
            return self.batch_categories.index(str(value))
        if isinstance(value, (int, np.integer)) and 0 <= value < self.n_batch:
            return int(value)
        msg = (
            f"Unknown batch {value!r} for transform_batch: the model knows the batches "
            f"{self.batch_categories} (from obs[{self.batch_key!r}])."
        )
        raise ValueError(msg)

    # -- binding an AnnData ----------------------------------------------------------------
    def bind(self, adata: AnnData, *, posterior: Mapping[str, np.ndarray] | None = None) -> BoundData:
        """Check ``adata`` against this setup and return its minibatch source.

        Genes are matched by name (any order, extra genes ignored); every categorical value
        must be a known category; counts are checked chunk by chunk (never densified).

        ``posterior``: for an AnnData whose counts were dropped (minified), each cell's cached
        q(z | x), ``qz_m`` and ``qz_v`` (cells, latent), and its total counts ``library``
        (cells,). The counts are then neither read nor checked; these travel in the
        minibatches (as ``qz_m``, ``qz_v``, ``observed_library``) for the module's inference.
        """
        _check_layer(adata, self.layer)
        gene_idx = self._gene_index(adata)
        obs: dict[str, np.ndarray] = {
            "batch": self._codes(adata, self.batch_key, self.batch_categories, "batch_key"),
            "labels": self._label_codes(adata),
        }
        if self.categorical_covariate_keys:
            obs["cat_covs"] = np.stack(
                [
                    self._codes(adata, k, cats, "categorical_covariate_keys")
                    for k, cats in zip(
                        self.categorical_covariate_keys, self.categorical_covariate_categories, strict=True
                    )
                ],
                axis=1,
            )
        if self.continuous_covariate_keys:
            obs["cont_covs"] = np.stack(
                [_numeric_obs(adata, k) for k in self.continuous_covariate_keys], axis=1
            ).astype(np.float32)
        if self.size_factor_key is not None:
            sf = _numeric_obs(adata, self.size_factor_key).astype(np.float32)
            if np.any(sf <= 0):
                msg = f"obs[{self.size_factor_key!r}] (size_factor_key) must be positive; found {np.sum(sf <= 0)} values <= 0."
                raise ValueError(msg)
            obs["size_factor"] = sf[:, None]
        if self.protein_expression_obsm_key is not None:
            obs["Y"] = read_proteins(
                adata, self.protein_expression_obsm_key, self.protein_names, self.protein_names_uns_key,
                check_counts=self.check_counts, allow_missing=self.allow_missing_proteins,
            )  # fmt: skip
        X = adata.layers[self.layer] if self.layer is not None else adata.X
        present = gene_idx >= 0
        positions = None if present.all() else np.flatnonzero(present)  # model columns that exist
        gene_idx = gene_idx[present]
        if sp.issparse(X) and X.format == "csc":
            X = X[:, gene_idx].tocsr()  # row access on CSC is slow; keep only the model genes
            gene_idx = None
        elif np.array_equal(gene_idx, np.arange(X.shape[1])):
            gene_idx = None
        if posterior is None:
            library = _check_counts_and_library(X, gene_idx, self.check_counts, self.layer)
        else:
            library = _add_posterior(obs, posterior, adata.n_obs)
        source = MinibatchSource(X, gene_idx, obs, n_vars=len(self.genes), positions=positions)
        return BoundData(source, library)

    def missing_genes(self, adata: AnnData) -> list[str]:
        """The model genes that ``adata`` lacks."""
        have = set(adata.var_names.astype(str))
        return [g for g in self.genes if g not in have]

    def _gene_index(self, adata: AnnData) -> np.ndarray:
        pos = pd.Index(adata.var_names.astype(str))
        if not pos.is_unique:
            msg = "adata.var_names are not unique; run `adata.var_names_make_unique()` first."
            raise ValueError(msg)
        idx = pos.get_indexer(self.genes)
        missing = [g for g, i in zip(self.genes, idx, strict=True) if i < 0]
        if len(missing) == len(self.genes):
            msg = (
                f"adata shares none of the model's {len(self.genes)} genes (e.g. {self.genes[:3]}; adata has "
                f"{list(adata.var_names[:3])}). Check that both use the same gene identifiers (symbols vs "
                "Ensembl IDs) and the same species."
            )
            raise ValueError(msg)
        if missing and len(missing) <= self.max_missing_genes * len(self.genes):
            return idx  # -1 marks a gene that is read as zero counts
        if missing:
            shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
            msg = (
                f"{len(missing)} of the model's {len(self.genes)} genes are missing from adata.var_names "
                f"({shown}). The AnnData must contain every gene the model was trained on (any order; "
                "extra genes are ignored). For a query with missing genes, zero-pad them explicitly."
            )
            raise ValueError(msg)
        return idx

    def _label_codes(self, adata: AnnData) -> np.ndarray:
        """Label codes; for scANVI the unlabelled category (for scPoli any unknown value, or for
        both a missing column) maps to n_labels."""
        if self.unlabeled_category is None and not self.unknown_labels_unlabelled:
            return self._codes(adata, self.labels_key, self.label_categories, "labels_key")
        if self.labels_key is None or self.labels_key not in adata.obs.columns:
            return np.full(adata.n_obs, self.n_labels, dtype=np.int64)
        if self.unknown_labels_unlabelled:
            values = _categorical_obs(adata, self.labels_key, "labels_key").astype(str)
            codes = pd.Index(self.label_categories).get_indexer(values)
            return np.where(codes < 0, self.n_labels, codes).astype(np.int64)
        return self._codes(adata, self.labels_key, [*self.label_categories, self.unlabeled_category], "labels_key")

    def _codes(self, adata: AnnData, key: str | None, categories: list[str], arg: str) -> np.ndarray:
        if key is None:
            return np.zeros(adata.n_obs, dtype=np.int64)
        values = _categorical_obs(adata, key, arg)
        # map the (few) distinct values, then broadcast through integer codes: no per-cell strings
        value_codes, uniques = pd.factorize(values)
        lookup = pd.Index(categories).get_indexer(np.asarray(uniques).astype(str))
        codes = lookup[value_codes]
        if np.any(lookup < 0):
            unknown = sorted(np.asarray(uniques).astype(str)[lookup < 0])
            msg = (
                f"obs[{key!r}] ({arg}) contains categories the model does not know: {unknown[:10]}. "
                f"Known categories: {categories}. Map these cells to a known category, or map them "
                "as a query (reference mapping) instead."
            )
            raise ValueError(msg)
        return codes.astype(np.int64)


@dataclass
class BoundData:
    """An AnnData checked against a :class:`DataSetup`: minibatch source plus total counts."""

    source: MinibatchSource
    library: np.ndarray  # per-cell total counts over the model genes

    @property
    def n_obs(self) -> int:
        return self.source.n_obs

    def log_library_moments(self, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per batch code, the mean and (population) variance of the cells' log total counts
        (0 and 1 for a batch without cells): the learned-library prior."""
        log_lib = np.log(self.library)
        batch = self.source.obs["batch"]
        means, variances = np.zeros(n_batch), np.ones(n_batch)
        for b in range(n_batch):
            if np.any(batch == b):
                means[b], variances[b] = log_lib[batch == b].mean(), log_lib[batch == b].var()
        return means, variances


# -- checks ------------------------------------------------------------------------------
def _check_layer(adata: AnnData, layer: str | None) -> None:
    if layer is not None and layer not in adata.layers:
        msg = f"layer={layer!r} not found in adata.layers (available: {list(adata.layers.keys())})."
        raise KeyError(msg)


def _check_obs_key(adata: AnnData, key: str, arg: str = "key") -> None:
    if not isinstance(key, str):
        msg = f"{arg} must be a column name (str), got {type(key).__name__}."
        raise TypeError(msg)
    if key not in adata.obs.columns:
        msg = f"{key!r} not found in adata.obs (columns: {list(adata.obs.columns)[:20]})."
        raise KeyError(msg)


def _categorical_obs(adata: AnnData, key: str, arg: str = "key") -> pd.Series:
    """``adata.obs[key]``, checked to exist and to have no missing values."""
    _check_obs_key(adata, key, arg)
    values = adata.obs[key]
    if values.isna().any():
        msg = (
            f"obs[{key!r}] ({arg}) has {int(values.isna().sum())} missing values (NaN). "
            "Fill them with a category (e.g. 'unknown') or drop those cells."
        )
        raise ValueError(msg)
    return values


def categories(adata: AnnData, key: str | None, arg: str) -> list[str]:
    if key is None:
        return ["0"]
    values = _categorical_obs(adata, key, arg)
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in values.cat.categories]
    else:
        cats = sorted({str(v) for v in values})
    if len(set(cats)) != len(cats):
        msg = f"obs[{key!r}] has categories that are equal as strings: {cats}."
        raise ValueError(msg)
    return cats


def _numeric_obs(adata: AnnData, key: str) -> np.ndarray:
    _check_obs_key(adata, key)
    values = adata.obs[key]
    if not pd.api.types.is_numeric_dtype(values):
        msg = f"obs[{key!r}] must be numeric (continuous covariate or size factor), got {values.dtype}."
        raise TypeError(msg)
    arr = values.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        msg = f"obs[{key!r}] has {int(np.sum(~np.isfinite(arr)))} NaN or infinite values."
        raise ValueError(msg)
    return arr


def _add_posterior(obs: dict[str, np.ndarray], posterior: Mapping[str, np.ndarray], n_obs: int) -> np.ndarray:
    """Check a cached posterior (see :meth:`DataSetup.bind`), add it to ``obs``; the library."""
    qz_m, qz_v = (np.asarray(posterior[k], dtype=np.float32) for k in ("qz_m", "qz_v"))
    library = np.asarray(posterior["library"], dtype=np.float64).reshape(-1)
    if qz_m.ndim != 2 or qz_m.shape[0] != n_obs or qz_v.shape != qz_m.shape or len(library) != n_obs:
        msg = (
            f"The cached posterior must have one row per cell ({n_obs}): qz_m {qz_m.shape}, qz_v {qz_v.shape}, "
            f"library {library.shape}."
        )
        raise ValueError(msg)
    if not (np.isfinite(qz_m).all() and np.isfinite(qz_v).all() and (qz_v > 0).all()):
        msg = "The cached posterior has non-finite means or non-positive variances."
        raise ValueError(msg)
    if not (np.isfinite(library).all() and (library > 0).all()):
        msg = f"The cached library sizes must be positive and finite ({int(np.sum(~(library > 0)))} are not)."
        raise ValueError(msg)
    obs.update(qz_m=qz_m, qz_v=qz_v, observed_library=library.astype(np.float32)[:, None])
    return library


def _check_counts_and_library(X, gene_idx: np.ndarray | None, check_counts: bool, layer: str | None) -> np.ndarray:
    """One chunked pass over the model genes: finite, non-negative, integer; per-cell totals."""
    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    n_obs = X.shape[0]
    n_vars = X.shape[1] if gene_idx is None else len(gene_idx)
    library = np.empty(n_obs, dtype=np.float64)
    for rows in row_chunks(n_obs, n_vars):
        block = X[rows]
        if gene_idx is not None:
            block = block[:, gene_idx]
        if hasattr(block, "toarray") and not sp.issparse(block):
            block = block.toarray()
        values = block.data if sp.issparse(block) else np.asarray(block)
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
            msg = f"{where} has dtype {values.dtype}; the model needs numeric raw counts."
            raise TypeError(msg)
        if values.size:
            if not np.all(np.isfinite(values)):
                msg = (
                    f"{where} contains NaN or infinite values in the model's genes. "
                    "The model needs raw counts; fix or remove those entries."
                )
                raise ValueError(msg)
            if values.min() < 0:
                msg = (
                    f"{where} contains negative values (min {values.min():.3g}): it is not count data "
                    "(scaled or regressed?). Pass raw counts, e.g. `layer='counts'`."
                )
                raise ValueError(msg)
            if check_counts:
                frac = values[values != np.round(values)]
                if frac.size:
                    msg = (
                        f"{where} contains non-integer values (e.g. {frac[0]:.4g}): it looks normalised or "
                        "log-transformed. The model needs raw counts: pass the layer holding them "
                        "(e.g. `layer='counts'`), or `check_counts=False` if your counts are legitimately "
                        "non-integer (e.g. SoupX-corrected)."
                    )
                    raise ValueError(msg)
        library[rows] = np.asarray(block.sum(axis=1)).ravel()
    empty = int(np.sum(library <= 0))
    if empty:
        msg = (
            f"{empty} of {n_obs} cells have zero total counts in the model's genes; the library "
            "size log(total) is undefined for them. Filter them first, e.g. "
            "`adata = adata[np.asarray(adata[:, genes].X.sum(1)).ravel() > 0].copy()` with the model's "
            "genes (or `sc.pp.filter_cells(adata, min_counts=1)` when all genes are used)."
        )
        raise ValueError(msg)
    return library
