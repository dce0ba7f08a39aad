"""expiMap (Lotfollahi et al. 2023): trVAE's encoder with a masked linear decoder whose latent units
are gene programs, sparsified by proximal steps.

Pure torch. The decoder's logits are ``z @ (W * mask).T + condition weights @ conditions``
(no bias; scArches' ``MaskedLinearDecoder``), then softmax. ``W`` is (genes, programs): column
``k`` holds program ``k``'s gene weights; the binary ``mask`` buffer (genes, programs) says
which genes belong to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._architecture import EXPIMAPArchitecture
from ._trvae import ConditionalVAE, ConditionWeights


class ProgramDecoder(nn.Module):
    """Masked linear map from the programs (and the conditions) to the gene logits."""

    def __init__(self, n_programs: int, n_genes: int, n_cond: int, *, soft_mask: bool):
        super().__init__()
        self.soft_mask = soft_mask
        self.programs = nn.Parameter(torch.empty(n_genes, n_programs))
        nn.init.kaiming_uniform_(self.programs, a=math.sqrt(5))  # as nn.Linear(n_programs, n_genes)
        self.register_buffer("mask", torch.ones(n_genes, n_programs))
        self.condition = ConditionWeights(n_cond, n_genes)

    def weight(self) -> torch.Tensor:
        """The program weights as used: out-of-mask entries are zero unless the mask is soft."""
        return self.programs if self.soft_mask else self.programs * self.mask

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(z, self.weight()) + self.condition(cond)
        return logits, logits


class ProgramVAE(ConditionalVAE):
    """expiMap's module: :class:`ConditionalVAE` with :class:`ProgramDecoder` as its decoder."""

    architecture_class = EXPIMAPArchitecture

    def build_decoder(self, n_cond: int) -> None:
        a = self.architecture
        self.decoder = ProgramDecoder(a.n_latent, self.n_input, n_cond, soft_mask=a.soft_mask)
        self.scale_head = nn.Identity()

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Install the (genes, programs) mask; with a hard mask, out-of-mask weights become zero."""
        self.decoder.mask.copy_(mask)
        if not self.decoder.soft_mask:
            self.decoder.programs.mul_(self.decoder.mask)

    @torch.no_grad()
    def proximal_step(self, group_threshold: float, l1_threshold: float = 0.0) -> None:
        """After an optimiser step (thresholds = coefficient x learning rate): soft-threshold the
        out-of-mask weights by ``l1_threshold`` (soft mask), then shrink every program's column
        of weights by ``group_threshold`` in Euclidean norm, zeroing columns shorter than that
        (group lasso; scArches' ``ProxL1`` and ``ProxGroupLasso``)."""
        w = self.decoder.programs
        if not w.requires_grad:  # frozen (a query model): the reference's programs stay as they are
            return
        if self.decoder.soft_mask and l1_threshold > 0:
            outside = self.decoder.mask == 0
            shrunk = w.sign() * (w.abs() - l1_threshold).clamp(min=0)
            w.copy_(torch.where(outside, shrunk, w))
        if group_threshold > 0:
            norms = w.norm(dim=0)
            w.mul_((1 - group_threshold / norms.clamp(min=1e-30)).clamp(min=0))

    def active_programs(self) -> torch.Tensor:
        """Boolean (programs,): columns with a nonzero weight."""
        return self.decoder.weight().abs().sum(0) > 0
