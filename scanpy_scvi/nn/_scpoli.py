"""scPoli (De Donno et al. 2023): trVAE's networks conditioned on learned condition embeddings,
with cell-type prototypes in the latent space.

Pure torch. Each condition key (``batch`` first, then the categorical covariates) has an
embedding table whose rows are limited to ``embedding_max_norm``; the concatenated embeddings
replace trVAE's one-hot columns. Prototypes are buffers: one latent point per known cell type
(``prototypes``) and per cluster of unlabelled cells (``unlabeled_prototypes``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._architecture import SCPOLIArchitecture
from ._trvae import ConditionalVAE


class EmbeddingVAE(ConditionalVAE):
    """scPoli's module: :class:`ConditionalVAE` with condition embeddings and prototypes."""

    architecture_class = SCPOLIArchitecture
    #: parameters without weight decay (scArches trains the embeddings without it)
    no_weight_decay = ("embeddings.",)

    #: parameters with one row per category, which grow by rows for a query's new categories
    category_tables = ("embeddings.",)

    def __init__(
        self,
        n_input: int,
        *,
        n_batch: int = 1,
        n_labels: int = 1,
        n_cats_per_cov: tuple[int, ...] = (),
        n_continuous_cov: int = 0,
        use_size_factor: bool = False,
        architecture: SCPOLIArchitecture | None = None,
        **settings,
    ):
        a = self.architecture_class.given(architecture, settings).for_genes(n_input)
        self._n_tables = (n_batch, *tuple(n_cats_per_cov))
        super().__init__(n_input, n_batch=n_batch, n_labels=n_labels, n_cats_per_cov=n_cats_per_cov,
                         n_continuous_cov=n_continuous_cov, use_size_factor=use_size_factor, architecture=a)  # fmt: skip
        self.embeddings = nn.ModuleList(nn.Embedding(n, a.embedding_dims) for n in self._n_tables)
        self.register_buffer("prototypes", torch.zeros(n_labels, a.n_latent))
        self.register_buffer("unlabeled_prototypes", torch.zeros(a.n_unlabeled_prototypes or 0, a.n_latent))

    def condition_width(self) -> int:
        return self.n_continuous_cov + len(self._n_tables) * self.architecture.embedding_dims

    def injects(self, part: str) -> bool:
        return self.architecture.inject_condition in (part, "both")

    def embedding(self, table: int, codes: torch.Tensor) -> torch.Tensor:
        """Rows ``codes`` of embedding ``table``, scaled down to norm ``embedding_max_norm`` where
        longer. (A function of the weights, not ``nn.Embedding(max_norm=)``'s in-place rescaling,
        so that frozen rows stay bit-identical when a query trains.)"""
        rows = F.embedding(codes, self.embeddings[table].weight)
        norm = rows.norm(dim=-1, keepdim=True)
        return rows * (self.architecture.embedding_max_norm / norm.clamp(min=1e-7)).clamp(max=1.0)

    def conditions(self, tensors: dict[str, torch.Tensor], transform_batch: int | None = None) -> torch.Tensor:
        batch = tensors["batch"]
        if transform_batch is not None:
            batch = torch.full_like(batch, transform_batch)
        codes = [batch] + ([] if tensors.get("cat_covs") is None else list(tensors["cat_covs"].unbind(-1)))
        blocks = [tensors["cont_covs"]] if tensors.get("cont_covs") is not None else []
        blocks += [self.embedding(i, c) for i, c in enumerate(codes)]
        return torch.cat(blocks, dim=-1)

    def condition_embeddings(self) -> list[torch.Tensor]:
        """Every row of every condition table, as the networks see it (norm-limited)."""
        with torch.no_grad():
            return [
                self.embedding(i, torch.arange(n, device=self.prototypes.device)) for i, n in enumerate(self._n_tables)
            ]

    def prototype_distances(self, z: torch.Tensor, unlabeled: bool = False) -> torch.Tensor:
        """Euclidean distances (cells, prototypes) to the cell-type (or unlabelled) prototypes."""
        return torch.cdist(z, self.unlabeled_prototypes if unlabeled else self.prototypes)

    def prototype_loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """scPoli's labelled prototype loss: for each cell type present among the labelled cells
        of the minibatch (``labels < n_labels``), the mean distance of its cells to its prototype;
        summed over cell types."""
        labelled = labels < self.n_labels
        code = torch.where(labelled, labels, 0)
        dist = (z - self.prototypes[code]).norm(dim=-1) * labelled
        counts = torch.zeros(self.n_labels, dtype=z.dtype, device=z.device).index_add_(0, code, labelled.to(z.dtype))
        return (dist / counts[code].clamp(min=1)).sum()
