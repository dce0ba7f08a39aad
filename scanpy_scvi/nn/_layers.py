"""Fully connected blocks with covariate injection (the scVI ``FCLayers``)."""

from __future__ import annotations

import itertools
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` whose no-grad CPU float32 products go through oneDNN when the build has it.

    torch's default CPU matmul (MKL) runs its AVX2 kernels on AMD processors; oneDNN picks
    kernels by instruction set, and on an AVX-512 CPU multiplies 2.2x faster at the same
    float32 accuracy. Small products (below ~2M multiply-adds, where oneDNN's call overhead
    dominates) and training keep ``F.linear`` (oneDNN for the forward and both gradients
    measured no faster per training step). Same parameters and state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


ONEDNN_MIN_MACS = 1 << 21  # 128 x 128 x 128 breaks even on an AVX-512 CPU; 2000-gene heads gain 2.2x


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for inference, by oneDNN on the CPU where available (see :class:`Linear`)."""
    if (
        x.dim() >= 2
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() // x.shape[-1] * weight.numel() >= ONEDNN_MIN_MACS
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and _onednn_linear_works()
    ):
        rows = x.reshape(-1, x.shape[-1])  # (samples, cells, features): one product
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


@cache
def _onednn_linear_works() -> bool:
    """Whether this torch build has oneDNN's linear op and it agrees with ``F.linear``."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            # fixed values: drawing random ones here would shift the user's torch RNG stream
            x = torch.linspace(-1.0, 1.0, 120).reshape(3, 40)
            w, b = torch.linspace(-2.0, 2.0, 800).reshape(20, 40).cos(), torch.linspace(0.0, 1.0, 20)
            fast = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            return fast.shape == (3, 20) and bool(torch.allclose(fast, F.linear(x, w, b), rtol=1e-4, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


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
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            block = [Linear(a + n_cov * self.inject[i], b)]
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
        for i, (inject, layer) in enumerate(zip(self.inject, self.layers, strict=True)):
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
