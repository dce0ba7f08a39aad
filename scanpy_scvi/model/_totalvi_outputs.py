"""TOTALVI's outputs drawn from its generative model: likelihood parameters, posterior predictive
counts, gene-and-protein correlations and the reconstruction error by modality.

Plain functions of a :class:`~scanpy_scvi.model.TOTALVI` and its bound cells, called by the
class's methods (which check the arguments and document them); they use only the model's
internal API (``minibatches``, ``inference_mode``, ``module``) and its decoder cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from ..nn import sample_counts, sample_nb_mixture, to_numpy
from ._correlation import sample_correlation

if TYPE_CHECKING:
    from ..data import BoundData
    from ._totalvi import TOTALVI

RNA_PARAMETERS = ("mean", "dispersions", "dropout")
PROTEIN_PARAMETERS = ("background_mean", "foreground_mean", "protein_dispersions", "mixing")


def likelihood_parameters(
    model: TOTALVI, bound: BoundData, idx: np.ndarray, n_samples: int, give_mean: bool, batch_size: int | None
) -> dict[str, np.ndarray]:
    """Parameters of p(x, y | z, l, beta) in each cell's own batch, (cells, features) or
    (samples, cells, features); see :meth:`TOTALVI.get_likelihood_parameters`."""
    module = model.module
    keys = [k for k in RNA_PARAMETERS if k != "dropout" or module.gene_likelihood == "zinb"]
    keys += PROTEIN_PARAMETERS
    widths = {k: module.n_input if k in RNA_PARAMETERS else module.n_proteins for k in keys}
    stacked = n_samples > 1 and not give_mean
    n = len(idx)
    out = {k: np.empty((n_samples, n, w) if stacked else (n, w), dtype=np.float32) for k, w in widths.items()}
    with model.inference_mode():
        for rows, t in model.minibatches(bound, idx, batch_size, encoder_only=True):
            gen = model._decoder(t, n_samples)(None)
            values = {
                "mean": gen["px_rate"],
                "dispersions": gen["theta"],
                "dropout": None if gen["zi_logits"] is None else torch.sigmoid(gen["zi_logits"]),
                "background_mean": gen["rate_back"],
                "foreground_mean": gen["rate_fore"],
                "protein_dispersions": gen["py_theta"],
                "mixing": torch.sigmoid(gen["mixing"]),  # P(background)
            }
            for k in keys:
                v = values[k].expand_as(gen["px_rate"] if k in RNA_PARAMETERS else gen["rate_back"])
                if n_samples > 1 and give_mean:
                    v = v.mean(0)
                if stacked:
                    out[k][:, rows] = to_numpy(v)
                else:
                    out[k][rows] = to_numpy(v)
    return out


def posterior_predictive_sample(
    model: TOTALVI,
    bound: BoundData,
    idx: np.ndarray,
    n_samples: int,
    genes: np.ndarray,
    proteins: np.ndarray,
    batch_size: int | None,
) -> sp.csr_matrix | np.ndarray:
    """RNA (NB / ZINB) and protein (NB mixture) counts of one posterior draw per sample, genes
    then proteins: CSR (cells, features) for one sample, else (cells, features, samples)."""
    module = model.module
    gene_mask = torch.as_tensor(genes, device=model.device)
    protein_mask = torch.as_tensor(proteins, device=model.device)
    blocks = []
    with model.inference_mode():
        for _, t in model.minibatches(bound, idx, batch_size, encoder_only=True):
            gen = model._decoder(t, n_samples)(None)
            rna = sample_counts(gen["px_rate"], gen["theta"], gen["zi_logits"], module.gene_likelihood)
            protein = sample_nb_mixture(gen["rate_back"], gen["rate_fore"], gen["py_theta"], gen["mixing"])
            counts = to_numpy(torch.cat([rna[..., gene_mask], protein[..., protein_mask]], dim=-1))
            # one sample: keep only the sparse block, so memory follows the nonzeros
            blocks.append(sp.csr_matrix(counts) if n_samples == 1 else np.moveaxis(counts, 0, -1))
    width = int(genes.sum() + proteins.sum())
    if n_samples == 1:
        return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, width), dtype=np.float32)
    return np.concatenate(blocks, axis=0) if blocks else np.zeros((0, width, n_samples), dtype=np.float32)


def feature_correlation(
    model: TOTALVI,
    bound: BoundData,
    idx: np.ndarray,
    codes: list[int | None],
    n_samples: int,
    batch_size: int,
    rna_size_factor: float,
    correlation_type: str,
    log_transform: bool,
) -> np.ndarray:
    """(genes + proteins) square correlation matrix of denoised samples, averaged over ``codes``;
    see :meth:`TOTALVI.get_feature_correlation_matrix`."""
    n_genes = model.module.n_input
    width = n_genes + model.module.n_proteins

    def draws_in(code):
        with model.inference_mode():
            for _, t in model.minibatches(bound, idx, batch_size, encoder_only=True):
                draws = to_numpy(_denoised_draws(model._decoder(t, n_samples)(code), rna_size_factor))
                draws = draws.reshape(-1, width).astype(np.float64)
                if log_transform:
                    draws[:, :n_genes] = np.log(draws[:, :n_genes] + 1e-8)
                    draws[:, n_genes:] = np.log1p(draws[:, n_genes:])
                yield draws

    return np.mean([sample_correlation(draws_in(code), width, correlation_type) for code in codes], axis=0)


def _denoised_draws(gen: dict[str, torch.Tensor], rna_size_factor: float) -> torch.Tensor:
    """The reference's denoised samples: Gamma(theta, theta / mean) with mean ``rna_size_factor``
    x frequencies for RNA and the foreground rate for proteins, the protein draw set to 0 where a
    Bernoulli(P(background)) draw says background."""
    mean = torch.cat([rna_size_factor * gen["px_scale"], gen["rate_fore"]], dim=-1)
    theta = torch.cat([gen["theta"].expand_as(gen["px_scale"]), gen["py_theta"].expand_as(gen["rate_fore"])], dim=-1)
    draws = torch.distributions.Gamma(theta, theta / mean).sample()
    background = torch.bernoulli(torch.sigmoid(gen["mixing"]))
    n_genes = gen["px_scale"].shape[-1]
    return torch.cat([draws[..., :n_genes], draws[..., n_genes:] * (1 - background)], dim=-1)


def reconstruction_error(model: TOTALVI, bound: BoundData, idx: np.ndarray, batch_size: int | None) -> dict[str, float]:
    """Mean per-cell negative log-likelihood of RNA, of proteins and their sum (one posterior draw)."""
    gene = protein = 0.0
    with model.inference_mode():
        for _, t in model.minibatches(bound, idx, batch_size):
            terms = model.module.loss(t)
            gene += terms["reconstruction_loss_gene"].sum().item()
            protein += terms["reconstruction_loss_protein"].sum().item()
    n = len(idx)
    return {
        "reconstruction_loss": (gene + protein) / n,
        "reconst_loss_gene": gene / n,
        "reconst_loss_protein": protein / n,
    }
