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
    nz_index: torch.Tensor,
    nz_values: torch.Tensor,
    eps: float = EPS,
    theta_table: torch.Tensor | None = None,
    theta_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(x | mu, theta, logits) summed over genes, per cell, from the nonzero counts.

    Equal to summing :func:`log_nb` / :func:`log_zinb` / :func:`log_poisson` over genes (the
    full normalised likelihood), but cheaper on sparse counts: at x = 0 the terms
    ``lgamma(x + theta) - lgamma(theta)`` cancel and ``lgamma(x + 1)`` vanishes, so every
    lgamma (and its digamma gradient) is evaluated only at the ``nnz`` nonzero entries,
    given by their flat (row-major) positions ``nz_index`` in the (cells, genes) count
    matrix and their values ``nz_values`` (> 0).

    ``mu`` and ``zi_logits`` are (cells, genes), ``theta`` is (genes,) or (cells, genes). A
    per-cell theta that is the rows ``theta_rows`` (cells,) of a (groups, genes) table
    ``theta_table`` (a dispersion per gene and batch) may name them: ``lgamma(theta)`` and
    ``digamma(theta)`` are then evaluated once per table entry rather than at every nonzero
    count (gradients still flow through ``theta``).
    When gradients are needed they are formed in the same pass from closed-form
    derivatives: one autograd node instead of some sixty elementwise ones, whose backward
    (mostly scatters through the nonzero gathers) took most of a CPU training step.
    """
    inputs = (mu, theta, zi_logits)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _SummedLogLikelihood.apply(*inputs, likelihood, nz_index, nz_values, eps, theta_table, theta_rows)
    return _log_likelihood_and_derivatives(
        *inputs, likelihood, nz_index, nz_values, eps, False, theta_table, theta_rows
    )[0]


class _SummedLogLikelihood(torch.autograd.Function):
    """Autograd node of :func:`summed_log_likelihood`: backward scales the saved derivatives."""

    @staticmethod
    def forward(ctx, mu, theta, zi_logits, likelihood, nz_index, nz_values, eps, theta_table, theta_rows):
        ll, derivatives = _log_likelihood_and_derivatives(
            mu, theta, zi_logits, likelihood, nz_index, nz_values, eps, True, theta_table, theta_rows
        )
        ctx.theta_per_gene = theta is not None and theta.dim() == 1
        ctx.save_for_backward(*derivatives)
        return ll

    @staticmethod
    def backward(ctx, grad_ll):
        d_mu, d_theta, d_logits = ctx.saved_tensors
        per_cell = grad_ll.unsqueeze(-1)
        grad_theta = None
        if d_theta is not None:  # a per-gene theta was broadcast over the cells
            grad_theta = grad_ll @ d_theta if ctx.theta_per_gene else d_theta * per_cell
        grad_logits = None if d_logits is None else d_logits * per_cell
        return d_mu * per_cell, grad_theta, grad_logits, None, None, None, None, None, None


def _log_likelihood_and_derivatives(
    mu, theta, zi_logits, likelihood, flat, x, eps, with_derivatives, table=None, theta_rows=None
):
    """Per-cell log-likelihood and (optionally) d ll_cell / d (mu, theta, logits) per entry.

    Dense (cells, genes) terms are computed as if every count were zero, then the nonzero
    entries are corrected through flat indices (unique positions, so plain scatters do).
    A derivative is None for an input that is None. Per-gene ``theta`` gets a
    (cells, genes) derivative, summed over cells by the caller. With ``table`` (theta =
    ``table[theta_rows]``) functions of theta alone are evaluated on the table.
    """
    n, g = mu.shape
    if table is not None:  # the nonzeros' positions in the table
        rows, cols = _rows_and_columns(flat, g)
        nz_cols = theta_rows.index_select(0, rows) * g + cols
    else:
        nz_cols = _rows_and_columns(flat, g)[1] if theta is not None and theta.dim() == 1 else None

    def at_nz(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, nz_cols) if t.dim() == 1 else t.reshape(-1).index_select(0, flat)

    def add_at_nz(dense: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # in place on a fresh tensor (a transposed theta can make it non-contiguous: copy once)
        dense = dense.contiguous()
        return dense.view(-1).scatter_add_(0, flat, values).view(n, g)

    mu_nz = at_nz(mu)
    log_x_factorial = torch.lgamma(x + 1)  # parameter-free
    if likelihood == "poisson":
        ll = add_at_nz(mu.neg(), x * torch.log(mu_nz) - log_x_factorial).sum(-1)
        d_mu = add_at_nz(torch.full_like(mu, -1.0), x / mu_nz) if with_derivatives else None
        return ll, (d_mu, None, None)

    theta_nz = at_nz(theta)
    total = mu + (theta + eps)
    log_total = torch.log(total)
    log_theta = torch.log(theta + eps)
    nb_zero = (log_theta - log_total).mul_(theta)  # log NB(0 | mu, theta), needed everywhere
    total_nz = at_nz(total)
    nonzero_terms = (
        x * (torch.log(mu_nz + eps) - at_nz(log_total))
        + torch.lgamma(x + theta_nz)
        - _per_nonzero(torch.lgamma, theta, theta_nz, nz_cols, table)
        - log_x_factorial
    )
    if likelihood == "nb":
        ll = add_at_nz(nb_zero, nonzero_terms).sum(-1)
        d_nb_zero, d_logits = 1.0, None
    else:
        # ZINB, with a = nb_zero - logits: a zero count adds softplus(a) - softplus(-logits), a
        # nonzero one -softplus(-logits) - logits + nb_zero + nonzero_terms, i.e. the zero
        # value plus a - softplus(a) + nonzero_terms = -softplus(-a) + nonzero_terms.
        a = nb_zero - zi_logits
        neg_logits = zi_logits.neg()
        a_nz = at_nz(a)
        per_entry = F.softplus(a).sub_(F.softplus(neg_logits))
        ll = add_at_nz(per_entry, nonzero_terms - F.softplus(-a_nz)).sum(-1)
        if with_derivatives:
            # d/d nb_zero: sigmoid(a) at zeros, 1 at nonzeros; d/d logits: sigmoid(-logits)
            # - sigmoid(a) at zeros, sigmoid(-logits) - 1 at nonzeros. Both differ from the
            # zero value by -+sigmoid(-a) at the nonzeros.
            d_nb_zero = torch.sigmoid(a)
            d_logits = torch.sigmoid(neg_logits).sub_(d_nb_zero)
            jump = torch.sigmoid(-a_nz)
            d_logits = add_at_nz(d_logits, -jump)
            d_nb_zero = add_at_nz(d_nb_zero, jump)
    if not with_derivatives:
        return ll, (None, None, None)

    theta_over_total = theta / total
    d_mu = add_at_nz(theta_over_total.mul(d_nb_zero).neg_(), x * (1.0 / (mu_nz + eps) - 1.0 / total_nz))
    d_theta = add_at_nz(
        (log_theta + theta / (theta + eps) - log_total).sub_(theta_over_total).mul_(d_nb_zero),
        torch.digamma(x + theta_nz) - _per_nonzero(torch.digamma, theta, theta_nz, nz_cols, table) - x / total_nz,
    )
    return ll, (d_mu, d_theta, d_logits)


def _rows_and_columns(flat: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of flat row-major positions in a matrix of ``g`` columns.

    Through float64 division (exact below 2**52 entries): integer division and remainder
    have no vector instructions on CPUs and cost ten times as much.
    """
    rows = flat.to(torch.float64).div_(g).floor_().to(flat.dtype)
    return rows, flat - rows * g


def _per_nonzero(fn, theta, theta_nz, nz_cols, table=None) -> torch.Tensor:
    """``fn(theta)`` at the nonzero entries; a per-gene theta or a table is evaluated once per
    entry (``nz_cols``: the nonzeros' positions in it)."""
    if table is not None:
        return fn(table).reshape(-1).index_select(0, nz_cols)
    return fn(theta).index_select(0, nz_cols) if theta.dim() == 1 else fn(theta_nz)


# -- totalVI's protein likelihood ----------------------------------------------------------


def log_nb_mixture(
    y: torch.Tensor,
    mu1: torch.Tensor,
    mu2: torch.Tensor,
    theta: torch.Tensor,
    mixture_logits: torch.Tensor,
    eps: float = EPS,
) -> torch.Tensor:
    """Elementwise log of a two-component negative binomial mixture with a shared ``theta``.

    ``log(sigmoid(l) NB(y; mu1, theta) + sigmoid(-l) NB(y; mu2, theta))`` with ``l`` the
    ``mixture_logits``: ``sigmoid(l)`` is the weight of the *first* component. In totalVI the
    first component is the protein background (``mu1 = rate_back``) and the second the
    foreground (``mu2 = rate_fore``), as in the reference ``NegativeBinomialMixture``.

    The terms shared by both components (``lgamma(y + theta) - lgamma(theta) - lgamma(y + 1)
    + theta log theta``) are computed once; the mixture is a ``logaddexp`` of the weighted
    component terms, with the log weights as ``logsigmoid(+-l)``, so that extreme logits
    neither overflow nor lose the smaller component. Same ``eps`` placements as :func:`log_nb`.
    """
    log_theta = torch.log(theta + eps)
    log_total_1 = torch.log(theta + mu1 + eps)
    log_total_2 = torch.log(theta + mu2 + eps)
    own_1 = theta * (log_theta - log_total_1) + y * (torch.log(mu1 + eps) - log_total_1)
    own_2 = theta * (log_theta - log_total_2) + y * (torch.log(mu2 + eps) - log_total_2)
    shared = torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1)
    return torch.logaddexp(F.logsigmoid(mixture_logits) + own_1, F.logsigmoid(-mixture_logits) + own_2) + shared


def sample_nb_mixture(
    mu1: torch.Tensor, mu2: torch.Tensor, theta: torch.Tensor, mixture_logits: torch.Tensor
) -> torch.Tensor:
    """Draw counts from :func:`log_nb_mixture`'s distribution, using torch's global RNG.

    Each entry comes from the first component (mean ``mu1``) with probability
    ``sigmoid(mixture_logits)``, else from the second (``mu2``); then Gamma-Poisson as in
    :func:`sample_counts`.
    """
    first = torch.rand_like(mu1) < torch.sigmoid(mixture_logits)
    return sample_counts(torch.where(first, mu1, mu2), theta, None, "nb")
