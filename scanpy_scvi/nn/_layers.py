"""Fully connected blocks with covariate injection (the scVI ``FCLayers``)."""

from __future__ import annotations

import torch
from torch import nn


def batch_norm(n_features: int) -> nn.BatchNorm1d:
    """BatchNorm with the reference's (TensorFlow-era) momentum and eps."""
    return nn.BatchNorm1d(n_features, momentum=0.01, eps=1e-3)


class FCLayers(nn.Module):
    """Linear -> BatchNorm -> LayerNorm -> ReLU -> Dropout, repeated ``n_layers`` times.

    Covariates (already one-hot encoded and concatenated, shape ``(cells, n_cov)``) are
    appended as the last input columns of the first layer, and of every later layer when
    ``inject_covariates``.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        n_cov: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
    ):
        super().__init__()
        sizes = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.n_cov = n_cov
        self.inject = [n_cov > 0 and (i == 0 or inject_covariates) for i in range(n_layers)]
        self.layers = nn.ModuleList()
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            block = [nn.Linear(a + n_cov * self.inject[i], b)]
            if use_batch_norm:
                block.append(batch_norm(b))
            if use_layer_norm:
                block.append(nn.LayerNorm(b, elementwise_affine=False))
            block.append(nn.ReLU())
            if dropout_rate > 0:
                block.append(nn.Dropout(dropout_rate))
            self.layers.append(nn.Sequential(*block))

    def forward(self, x: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (cells, n_in) or (samples, cells, n_in); or a sparse CSR (cells, n_in) input."""
        for i, (inject, layer) in enumerate(zip(self.inject, self.layers)):
            if i == 0 and x.layout == torch.sparse_csr:
                x = layer[1:](_sparse_linear(layer[0], x, cov if inject else None))
                continue
            if inject:
                x = torch.cat([x, _broadcast_like(cov, x)], dim=-1)
            x = _apply_2d(layer, x)
        return x


def _sparse_linear(linear: nn.Linear, x: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """``linear(cat([x, cov]))`` for a sparse CSR ``x``: only its nonzero entries are multiplied."""
    n = x.shape[-1]
    out = torch.addmm(linear.bias, x, linear.weight[:, :n].T)
    return out if cov is None else out.addmm_(cov, linear.weight[:, n:].T)


def _broadcast_like(cov: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast (cells, k) covariates over a leading sample axis of ``x``."""
    if x.dim() == 3 and cov.dim() == 2:
        return cov.expand(x.shape[0], *cov.shape)
    return cov


def _apply_2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a module expecting (N, features) to (samples, cells, features) by flattening.

    BatchNorm then sees all samples together, which only matters in training mode, where
    inputs are always 2-D.
    """
    if x.dim() == 3:
        s, n, f = x.shape
        return module(x.reshape(s * n, f)).reshape(s, n, -1)
    return module(x)
