"""trVAE (Lotfollahi et al. 2020): a conditional VAE whose conditions are aligned by an MMD penalty.

Pure torch. Minibatches are those of :mod:`._vae` (``batch`` holds the condition codes). The
conditions (with any categorical covariates, one-hot, after the continuous covariates) enter the
first encoder layer and the first decoder layer only, each through its own bias-free weight
(``condition``): the weights scArches' surgery trains for a new condition.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ._architecture import TRVAEArchitecture
from ._layers import Linear
from ._vae import (
    VAR_EPS,
    _kl_normal_std,
    _rsample,
    count_log_likelihood,
    importance_sampled_log_likelihood,
    one_hot_covariates,
)

#: The RBF kernel's bandwidths (scArches / trVAE): k(a, b) = sum_s exp(-|a - b|^2 / (2 s)).
MMD_BANDWIDTHS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, 5, 10, 15, 20, 25, 30, 35, 100, 1e3, 1e4, 1e5, 1e6)


class ConditionalMLP(nn.Module):
    """Hidden layers ``sizes[0] -> sizes[1] -> ...``, each Linear -> norm -> ReLU -> dropout; the
    first also adds ``condition(c)``, a bias-free linear map of the condition columns.

    A sparse CSR input (inference) is multiplied by its nonzero entries only.
    """

    def __init__(self, sizes, n_cond: int, *, bias: bool, dropout_rate: float, use_batch_norm: bool,
                 use_layer_norm: bool):  # fmt: skip
        super().__init__()
        self.first = Linear(sizes[0], sizes[1], bias=bias)
        self.condition = ConditionWeights(n_cond, sizes[1])
        self.layers = nn.ModuleList(Linear(a, b, bias=bias) for a, b in itertools.pairwise(sizes[1:]))
        self.after = nn.ModuleList(
            nn.Sequential(*_activation(b, dropout_rate, use_batch_norm, use_layer_norm)) for b in sizes[1:]
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the last layer's output, the first layer's output)."""
        if x.layout == torch.sparse_csr:
            h = x @ self.first.weight.T
            h = h if self.first.bias is None else h + self.first.bias
        else:
            h = self.first(x)
        first = self.after[0](h + self.condition(cond))
        h = first
        for layer, after in zip(self.layers, self.after[1:], strict=True):
            h = after(layer(h))
        return h, first


class ConditionWeights(nn.Module):
    """A bias-free linear map of the condition columns, initialised as ``nn.Linear``; with no
    condition columns an empty (n_out, 0) weight that adds zeros (and grows in surgery)."""

    def __init__(self, n_cond: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_cond))
        if n_cond:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return F.linear(cond, self.weight)


def _activation(n: int, dropout_rate: float, use_batch_norm: bool, use_layer_norm: bool) -> list[nn.Module]:
    out: list[nn.Module] = []
    if use_batch_norm:  # scArches: batch norm, else layer norm
        out.append(nn.BatchNorm1d(n))
    elif use_layer_norm:
        out.append(nn.LayerNorm(n, elementwise_affine=False))
    out.append(nn.ReLU())
    if dropout_rate > 0:
        out.append(nn.Dropout(dropout_rate))
    return out


class ConditionalVAE(nn.Module):
    """trVAE: encoder q(z | x, c), decoder p(x | z, c) with a softmax x observed-library mean and an
    NB / ZINB likelihood (dispersion per gene and condition), or a squared-error reconstruction of
    log-normalised values (``'mse'``); the loss adds ``beta`` x MMD between conditions.

    Same inference / generative interface as :class:`~scanpy_scvi.nn.VAE` (observed library).
    """

    architecture_class = TRVAEArchitecture
    #: parameters reading expression (not conditions) in the first layers: scArches'
    #: ``freeze_expression=False`` lets a query train them too
    expression_inputs = ("encoder.first.", "decoder.first.", "encoder.after.0.", "decoder.after.0.")
    use_observed_lib_size = True
    linear_decoder = False
    latent_distribution = "normal"

    def __init__(
        self,
        n_input: int,
        *,
        n_batch: int = 1,
        n_labels: int = 1,
        n_cats_per_cov: tuple[int, ...] = (),
        n_continuous_cov: int = 0,
        use_size_factor: bool = False,
        architecture: TRVAEArchitecture | None = None,
        **settings,
    ):
        super().__init__()
        architecture = self.architecture_class.given(architecture, settings)
        self.architecture = a = architecture
        self.n_input, self.n_batch, self.n_labels, self.n_latent = n_input, n_batch, n_labels, a.n_latent
        self.n_cats_per_cov = tuple(n_cats_per_cov)
        self.use_size_factor = use_size_factor
        self.gene_likelihood = a.gene_likelihood
        self.counts = a.gene_likelihood != "mse"
        self.n_continuous_cov = n_continuous_cov
        n_cond = self.condition_width()
        hidden = list(a.hidden_layer_sizes)
        common = {"dropout_rate": a.dropout_rate}
        n_enc, n_dec = (n_cond if self.injects(part) else 0 for part in ("encoder", "decoder"))
        self.encoder = ConditionalMLP([n_input, *hidden], n_enc, bias=True, **common, **a.normalised("encoder"))
        self.mean = Linear(hidden[-1], a.n_latent)
        self.log_var = Linear(hidden[-1], a.n_latent)
        self.build_decoder(n_dec)
        if self.counts:
            self.log_theta = nn.Parameter(torch.randn(n_input, n_batch))

    def build_decoder(self, n_cond: int) -> None:
        """``decoder`` (z, conditions -> hidden, first layer's output) and the output heads:
        trVAE's mirrored MLP; ``scale_head`` maps its output to the gene logits."""
        a = self.architecture
        hidden = list(a.hidden_layer_sizes)
        self.decoder = ConditionalMLP([a.n_latent, *reversed(hidden)], n_cond, bias=False, dropout_rate=a.dropout_rate,
                                      **a.normalised("decoder"))  # fmt: skip
        self.scale_head = Linear(hidden[0], self.n_input)
        if a.gene_likelihood == "zinb":
            self.dropout_head = Linear(hidden[0], self.n_input)

    # -- conditions ------------------------------------------------------------------------------
    def condition_width(self) -> int:
        """Columns of :meth:`conditions`."""
        return self.n_continuous_cov + sum(n for n in (self.n_batch, *self.n_cats_per_cov) if n > 1)

    def injects(self, part: str) -> bool:
        """Whether the conditions enter the ``'encoder'`` / ``'decoder'`` (trVAE: both)."""
        return True

    def conditions(self, tensors: dict[str, torch.Tensor], transform_batch: int | None = None) -> torch.Tensor:
        """The condition columns: continuous covariates, then the one-hot condition and categories."""
        batch = tensors["batch"]
        if transform_batch is not None:
            batch = torch.full_like(batch, transform_batch)
        blocks = [tensors["cont_covs"]] if tensors.get("cont_covs") is not None else []
        one_hot = one_hot_covariates(batch, tensors.get("cat_covs"), (self.n_batch, *self.n_cats_per_cov))
        blocks += [] if one_hot is None else [one_hot]
        if not blocks:
            return batch.new_zeros((batch.shape[0], 0), dtype=torch.float32)
        return torch.cat(blocks, dim=-1)

    # -- q(z | x, c) -----------------------------------------------------------------------------
    def inference(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> dict[str, torch.Tensor]:
        """q(z | x, c), ``n_samples`` draws and the observed log library. ``X`` may be sparse CSR."""
        x = tensors["X"]
        h, _ = self.encoder(torch.log1p(x) if self.counts else x, self.part_conditions("encoder", tensors))
        qz_m, qz_v = self.posterior(h)
        z = _rsample(qz_m, qz_v, n_samples)
        total = x.sum(dim=-1, keepdim=True)
        total = total.to_dense() if total.layout == torch.sparse_csr else total
        library = torch.log(tensors["size_factor"]) if self.use_size_factor else torch.log(total)
        if n_samples > 1:
            library = library.expand(n_samples, *library.shape)
        return {"qz_m": qz_m, "qz_v": qz_v, "z_untransformed": z, "z": z, "library": library}

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(z | x, c) from the encoder's last hidden layer."""
        return self.mean(h), torch.exp(self.log_var(h)) + VAR_EPS

    def sample_z(self, qz_m: torch.Tensor, qz_v: torch.Tensor) -> torch.Tensor:
        """One draw of z from q(z | x) = N(qz_m, qz_v)."""
        return _rsample(qz_m, qz_v, 1)

    # -- p(x | z, c) -----------------------------------------------------------------------------
    def part_conditions(self, part: str, tensors: dict[str, torch.Tensor], transform_batch: int | None = None):
        """:meth:`conditions` where ``part`` takes them, else no columns."""
        if self.injects(part):
            return self.conditions(tensors, transform_batch)
        return tensors["batch"].new_zeros((tensors["batch"].shape[0], 0), dtype=torch.float32)

    def _decode(self, z: torch.Tensor, tensors: dict[str, torch.Tensor], transform_batch: int | None):
        cond = self.part_conditions("decoder", tensors, transform_batch)
        if z.dim() == 3:  # (samples, cells, latent): one pass over samples x cells
            s, n, k = z.shape
            h, y = self.decoder(z.reshape(s * n, k), cond.repeat(s, 1))
            return h.reshape(s, n, -1), y.reshape(s, n, -1)
        return self.decoder(z, cond)

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        transform_batch: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decoder outputs; ``y`` is the first decoder layer's output (scArches' ``get_y``)."""
        h, y = self._decode(z, tensors, transform_batch)
        logits = self.scale_head(h)
        if not self.counts:
            return {"px_scale": F.relu(logits), "y": y}
        px_scale = torch.softmax(logits, dim=-1)
        batch = tensors["batch"] if transform_batch is None else torch.full_like(tensors["batch"], transform_batch)
        theta_table = torch.exp(self.log_theta).T.contiguous()  # (conditions, genes)
        return {
            "px_scale": px_scale,
            "px_rate": torch.exp(library) * px_scale,
            "theta": theta_table.index_select(0, batch),
            "theta_table": theta_table,
            "theta_rows": batch,
            "zi_logits": self.dropout_head(h) if self.gene_likelihood == "zinb" else None,
            "y": y,
        }

    def expression(
        self,
        z: torch.Tensor,
        library: torch.Tensor | None,
        tensors: dict[str, torch.Tensor],
        transform_batch: int | None = None,
        scaled_by_library: bool = False,
    ) -> torch.Tensor:
        """The decoder's frequencies (or, ``scaled_by_library``, the likelihood means); for
        ``'mse'`` the reconstructed values."""
        h, _ = self._decode(z, tensors, transform_batch)
        logits = self.scale_head(h)
        if not self.counts:
            return F.relu(logits)
        px_scale = torch.softmax(logits, dim=-1)
        return px_scale * torch.exp(library) if scaled_by_library else px_scale

    def log_library(self, library: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return library

    def log_likelihood(self, x: torch.Tensor, gen: dict[str, torch.Tensor], nz_index=None) -> torch.Tensor:
        """log p(x | z, c) summed over genes (for ``'mse'``: minus the squared error)."""
        if not self.counts:
            return -((gen["px_scale"] - x) ** 2).sum(-1)
        return count_log_likelihood(self.gene_likelihood, x, gen, nz_index)

    def forward(self, tensors: dict[str, torch.Tensor], n_samples: int = 1, transform_batch: int | None = None):
        inf = self.inference(tensors, n_samples=n_samples)
        return inf, self.generative(inf["z"], inf["library"], tensors, transform_batch=transform_batch)

    # -- objective -------------------------------------------------------------------------------
    def loss(
        self, tensors: dict[str, torch.Tensor], kl_weight: float = 1.0, with_mmd: bool = True
    ) -> dict[str, torch.Tensor]:
        """mean over cells of [recon + kl_weight * kl_z] + beta * MMD (scArches' trVAE loss).

        ``with_mmd=False`` skips the MMD (zero when the cells come from one condition)."""
        inf, gen = self(tensors)
        recon = -self.log_likelihood(tensors["X"], gen, tensors.get("nz_index"))
        kl_z = _kl_normal_std(inf["qz_m"], inf["qz_v"]).sum(-1)
        a = self.architecture
        mmd = recon.new_zeros(())
        if with_mmd and a.use_mmd and self.n_batch > 1:
            where = inf["z"] if a.mmd_on == "z" else gen["y"]
            mmd = a.beta * mmd_between_conditions(where, tensors["batch"], self.n_batch, a.mmd_boundary)
        loss = torch.mean(recon + kl_weight * kl_z) + mmd
        return {
            "loss": loss, "reconstruction_loss": recon, "kl_z": kl_z, "kl_l": torch.zeros_like(kl_z), "mmd": mmd,
            "z": inf["z"],
        }  # fmt: skip

    @torch.no_grad()
    def marginal_ll(self, tensors: dict[str, torch.Tensor], n_mc_samples: int, max_elements: int = 2**22):
        """Importance-sampled log p(x) per cell (count likelihoods only)."""
        return importance_sampled_log_likelihood(self, tensors, n_mc_samples, max_elements)


#: Exponents below this are clamped: exp(-80) ~ 2e-35 is 0 for the kernel, and exponentials that
#: underflow to subnormal floats take a slow path on x86 CPUs.
MIN_EXPONENT = -80.0


def rbf_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The multi-scale RBF kernel matrix (rows of ``a`` x rows of ``b``) over :data:`MMD_BANDWIDTHS`."""
    sq = (a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1) - 2 * a @ b.T).clamp(min=0)  # squared distances
    inv = 1.0 / (2.0 * torch.tensor(MMD_BANDWIDTHS, dtype=a.dtype, device=a.device))
    return torch.exp((-sq.unsqueeze(-1) * inv).clamp(min=MIN_EXPONENT)).sum(-1)


def mmd_between_conditions(
    h: torch.Tensor, condition: torch.Tensor, n_conditions: int, boundary: int | None = None
) -> torch.Tensor:
    """Sum over pairs of conditions (i, j) present in the minibatch of the (biased) MMD^2 between
    their cells' rows of ``h``; with ``boundary``, only pairs i < boundary <= j, each with at
    least 2 cells (scArches' ``mmd``).

    One kernel matrix over all cells, summed per pair of conditions through their one-hot
    codes: no per-condition indexing, so no host synchronisation and fixed shapes.
    """
    one_hot = F.one_hot(condition, n_conditions).to(h.dtype)  # (cells, K)
    sums = one_hot.T @ rbf_kernel(h, h) @ one_hot  # (K, K) kernel sums between conditions
    n = one_hot.sum(0)
    means = sums / (n.unsqueeze(1) * n.unsqueeze(0)).clamp(min=1)
    within = means.diagonal()
    mmd = within.unsqueeze(1) + within.unsqueeze(0) - 2 * means
    codes = torch.arange(n_conditions, device=h.device)
    if boundary is None:
        pairs = (codes.unsqueeze(1) > codes.unsqueeze(0)) & (n.unsqueeze(1) >= 1) & (n.unsqueeze(0) >= 1)
    else:
        pairs = (codes.unsqueeze(1) < boundary) & (codes.unsqueeze(0) >= boundary)
        pairs &= (n.unsqueeze(1) >= 2) & (n.unsqueeze(0) >= 2)
    return (mmd * pairs).sum()
