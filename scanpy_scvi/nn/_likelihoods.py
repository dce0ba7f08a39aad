"""Count likelihoods of scVI: log-probabilities and samplers.

All functions take the mean ``mu`` (the decoder's rate), the inverse dispersion ``theta``
and, for ZINB, the zero-inflation *logits*. Log-probabilities are fully normalised
(they include ``-lgamma(x + 1)``), so ELBOs are comparable with scvi-tools, and use the
same ``eps = 1e-8`` placements as the reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Elementwise log NB(x; mean ``mu``, inverse dispersion ``theta``)."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_zinb(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """Elementwise log ZINB: mixture of a point mass at 0 (weight sigmoid(logits)) and NB."""
    log_theta_mu = torch.log(theta + mu + eps)
    nb_zero = theta * (torch.log(theta + eps) - log_theta_mu)  # log NB(0)
    log_norm = F.softplus(-zi_logits)  # -log sigmoid(logits)
    # x = 0: log(pi + (1 - pi) NB(0)) = softplus(nb_zero - logits) - softplus(-logits)
    case_zero = F.softplus(nb_zero - zi_logits) - log_norm
    # x > 0: log((1 - pi) NB(x)), with log(1 - pi) = -logits - softplus(-logits)
    case_nonzero = (
        -log_norm
        - zi_logits
        + nb_zero
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    return torch.where(x < eps, case_zero, case_nonzero)


def log_poisson(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Elementwise log Poisson(x; rate ``mu``)."""
    return torch.xlogy(x, mu) - mu - torch.lgamma(x + 1)


def sample_counts(
    mu: torch.Tensor, theta: torch.Tensor | None, zi_logits: torch.Tensor | None, likelihood: str
) -> torch.Tensor:
    """Draw counts from the model's likelihood, using torch's global RNG.

    NB is drawn as a Gamma-Poisson mixture (Gamma(shape=theta, rate=theta/mu) has mean mu);
    ZINB then zeroes each entry with probability sigmoid(logits). Rates are clamped at 1e8
    as in the reference.
    """
    if likelihood == "poisson":
        rate = mu
    else:
        theta = theta.expand_as(mu)
        rate = torch.distributions.Gamma(concentration=theta, rate=theta / (mu + EPS)).sample()
    counts = torch.poisson(rate.clamp(max=1e8))
    if likelihood == "zinb":
        inflated = torch.rand_like(mu) < torch.sigmoid(zi_logits)
        counts = counts.masked_fill(inflated, 0.0)
    return counts


def summed_log_likelihood(
    mu: torch.Tensor,
    theta: torch.Tensor | None,
    zi_logits: torch.Tensor | None,
    likelihood: str,
    nz_rows: torch.Tensor,
    nz_cols: torch.Tensor,
    nz_values: torch.Tensor,
    eps: float = EPS,
) -> torch.Tensor:
    """log p(x | mu, theta, logits) summed over genes, per cell, from the nonzero counts.

    Equal to summing :func:`log_nb` / :func:`log_zinb` / :func:`log_poisson` over genes (the
    full normalised likelihood), but cheaper on sparse counts: at x = 0 the terms
    ``lgamma(x + theta) - lgamma(theta)`` cancel and ``lgamma(x + 1)`` vanishes, so every
    lgamma (and its digamma gradient) is evaluated only at the ``nnz`` nonzero entries,
    given as COO triplets (row, column, value > 0) of the (cells, genes) count matrix.
    Only terms that do not vanish at zero counts are evaluated densely.
    """
    n = mu.shape[0]

    def per_cell(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, nz_rows, values)

    def at_nz(t: torch.Tensor) -> torch.Tensor:
        return t[nz_cols] if t.dim() == 1 else t[nz_rows, nz_cols]

    log_x_factorial = per_cell(torch.lgamma(nz_values + 1))  # parameter-free
    if likelihood == "poisson":
        return per_cell(nz_values * torch.log(at_nz(mu))) - mu.sum(-1) - log_x_factorial

    log_theta_mu = torch.log(theta + mu + eps)
    nb_zero = theta * (torch.log(theta + eps) - log_theta_mu)  # log NB(0), needed at every entry
    theta_nz = at_nz(theta)
    nonzero_terms = (
        nz_values * (torch.log(at_nz(mu) + eps) - at_nz(log_theta_mu))
        + torch.lgamma(nz_values + theta_nz)
        - torch.lgamma(theta_nz)
    )
    if likelihood == "nb":
        return nb_zero.sum(-1) + per_cell(nonzero_terms) - log_x_factorial

    # ZINB. Every entry: -softplus(-logits); zeros add softplus(nb_zero - logits); nonzeros add
    # nb_zero - logits + nonzero_terms. The zero sum is taken densely and corrected at nonzeros.
    mix_zero = F.softplus(nb_zero - zi_logits)
    dense = (mix_zero - F.softplus(-zi_logits)).sum(-1)
    at_nonzeros = at_nz(nb_zero) - at_nz(zi_logits) - at_nz(mix_zero) + nonzero_terms
    return dense + per_cell(at_nonzeros) - log_x_factorial
