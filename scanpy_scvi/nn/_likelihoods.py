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
