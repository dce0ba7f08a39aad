"""expiMap (Lotfollahi et al. 2023): trVAE's encoder with a masked linear decoder whose latent units
are gene programs, sparsified by proximal steps.

Pure torch. The decoder's logits are ``z @ (W * mask).T + condition weights @ conditions``
(no bias; scArches' ``MaskedLinearDecoder``), then softmax. ``W`` is (genes, programs): column
``k`` holds program ``k``'s gene weights; the binary ``mask`` buffer (genes, programs) says
which genes belong to it. A query may add latent units after the programs, in scArches' order:
constrained extension programs (their own mask) then unconstrained ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._architecture import EXPIMAPArchitecture
from ._trvae import VAR_EPS, ConditionalVAE, ConditionWeights


class ProgramDecoder(nn.Module):
    """Masked linear map from the programs (then the constrained extension programs, masked by
    ``ext_mask``, and the unconstrained ones) and the conditions to the gene logits."""

    def __init__(
        self,
        n_programs: int,
        n_genes: int,
        n_cond: int,
        *,
        soft_mask: bool,
        n_ext: int = 0,
        n_ext_masked: int = 0,
        soft_ext_mask: bool = False,
    ):
        super().__init__()
        self.soft_mask, self.soft_ext_mask, self.n_programs = soft_mask, soft_ext_mask, n_programs
        self.programs = _linear_weight(n_genes, n_programs)
        self.register_buffer("mask", torch.ones(n_genes, n_programs))
        self.condition = ConditionWeights(n_cond, n_genes)
        if n_ext_masked:
            self.masked_extension = _linear_weight(n_genes, n_ext_masked)
            self.register_buffer("ext_mask", torch.ones(n_genes, n_ext_masked))
        if n_ext:
            self.extension = _linear_weight(n_genes, n_ext)

    def weight(self) -> torch.Tensor:
        """The program weights as used: out-of-mask entries are zero unless the mask is soft."""
        return self.programs if self.soft_mask else self.programs * self.mask

    def all_weights(self) -> torch.Tensor:
        """(genes, programs + extensions): every latent unit's gene weights."""
        parts = [self.weight()]
        if hasattr(self, "masked_extension"):
            w = self.masked_extension
            parts.append(w if self.soft_ext_mask else w * self.ext_mask)
        if hasattr(self, "extension"):
            parts.append(self.extension)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def masks(self) -> torch.Tensor:
        """(genes, annotated programs): the reference's mask, then the constrained extensions'."""
        return torch.cat([self.mask, self.ext_mask], dim=1) if hasattr(self, "ext_mask") else self.mask

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(z, self.all_weights()) + self.condition(cond)
        return logits, logits


class ProgramVAE(ConditionalVAE):
    """expiMap's module: :class:`ConditionalVAE` with :class:`ProgramDecoder` as its decoder."""

    architecture_class = EXPIMAPArchitecture

    def build_decoder(self, n_cond: int) -> None:
        a = self.architecture
        self.n_programs = a.n_latent
        self.decoder = ProgramDecoder(
            a.n_latent,
            self.n_input,
            n_cond,
            soft_mask=a.soft_mask,
            n_ext=a.n_ext,
            n_ext_masked=a.n_ext_masked,
            soft_ext_mask=a.soft_ext_mask,
        )
        self.scale_head = nn.Identity()
        self.n_annotated = a.n_latent + a.n_ext_masked  # latent units with a mask: the rest are unconstrained
        n_extra = a.n_ext_masked + a.n_ext
        if n_extra:  # the extensions' own encoder heads (scArches' expand_mean/var_encoder)
            hidden = a.hidden_layer_sizes[-1]
            self.ext_mean, self.ext_log_var = nn.Linear(hidden, n_extra), nn.Linear(hidden, n_extra)
            self.n_latent = a.n_latent + n_extra

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, v = super().posterior(h)
        if not hasattr(self, "ext_mean"):
            return m, v
        return torch.cat([m, self.ext_mean(h)], -1), torch.cat([v, torch.exp(self.ext_log_var(h)) + VAR_EPS], -1)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Install the (genes, programs) mask; with a hard mask, out-of-mask weights become zero."""
        self.decoder.mask.copy_(mask)
        if not self.decoder.soft_mask:
            self.decoder.programs.mul_(self.decoder.mask)

    @torch.no_grad()
    def set_ext_mask(self, mask: torch.Tensor) -> None:
        """Install the (genes, constrained extensions) mask, as :meth:`set_mask` does the programs'."""
        self.decoder.ext_mask.copy_(mask)
        if not self.decoder.soft_ext_mask:
            self.decoder.masked_extension.mul_(self.decoder.ext_mask)

    @torch.no_grad()
    def proximal_step(self, group_threshold: float, l1_threshold: float = 0.0, ext_threshold: float = 0.0) -> None:
        """After an optimiser step (thresholds = coefficient x learning rate): soft-threshold the
        out-of-mask weights by ``l1_threshold`` (soft mask), then shrink every program's column
        of weights by ``group_threshold`` in Euclidean norm, zeroing columns shorter than that
        (group lasso), and soft-threshold the extension weights by ``ext_threshold`` (scArches'
        ``ProxL1`` and ``ProxGroupLasso``); constrained extensions with a soft mask get the same L1
        step out of their mask. Frozen weights (a query model's) are left alone."""
        d = self.decoder
        w = d.programs
        if w.requires_grad and d.soft_mask and l1_threshold > 0:
            w.copy_(torch.where(d.mask == 0, _soft_threshold(w, l1_threshold), w))
        masked = getattr(d, "masked_extension", None)
        if masked is not None and masked.requires_grad and d.soft_ext_mask and l1_threshold > 0:
            masked.copy_(torch.where(d.ext_mask == 0, _soft_threshold(masked, l1_threshold), masked))
        if w.requires_grad and group_threshold > 0:
            norms = w.norm(dim=0)
            w.mul_((1 - group_threshold / norms.clamp(min=1e-30)).clamp(min=0))
        ext = getattr(self.decoder, "extension", None)
        if ext is not None and ext.requires_grad and ext_threshold > 0:
            ext.copy_(_soft_threshold(ext, ext_threshold))

    def active_programs(self) -> torch.Tensor:
        """Boolean (programs + extensions,): columns with a nonzero weight."""
        return self.decoder.all_weights().abs().sum(0) > 0


def _linear_weight(n_out: int, n_in: int) -> nn.Parameter:
    w = nn.Parameter(torch.empty(n_out, n_in))
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # as nn.Linear(n_in, n_out)
    return w


def _soft_threshold(w: torch.Tensor, threshold: float) -> torch.Tensor:
    return w.sign() * (w.abs() - threshold).clamp(min=0)


def hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hilbert-Schmidt independence criterion between the rows of ``a`` and of ``b`` (cells x
    dims), RBF kernels with the median-heuristic bandwidth of a d-dimensional Gaussian (scArches,
    after Lopez et al. 2018's HCV); the square root of the biased estimate."""
    ka, kb = _rbf(a), _rbf(b)
    h = (ka * kb).mean() + ka.mean() * kb.mean() - 2 * (ka.mean(1) * kb.mean(1)).mean()
    return h.clamp(min=0).sqrt()


def _rbf(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    scale = 2 * math.exp(math.lgamma(0.5 * (d + 1)) - math.lgamma(0.5 * d))
    return torch.exp(-((x.unsqueeze(0) - x.unsqueeze(1)) ** 2).sum(-1) / (2 * scale**2))
