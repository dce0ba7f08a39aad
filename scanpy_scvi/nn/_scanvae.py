"""scANVI (Xu et al. 2021): scVI with a label-dependent hierarchical prior and a classifier.

The generative model adds a cell type y and a second latent u ("z2") under the scVI latent
z ("z1"): y ~ Cat(1/K), u ~ N(0, I), z | u, y ~ N(f(u, y)). The variational posterior
factorises as q(z | x) q(y | z) q(u | z, y), where q(y | z) is the classifier. As in the
reference, every cell is treated as unlabelled in the ELBO (y is summed out with the
classifier's probabilities); labelled cells add a cross-entropy term at the posterior mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._architecture import SCANVIArchitecture
from ._layers import FCLayers, Linear
from ._vae import VAE, GaussianEncoder, _kl_normal, _kl_normal_std, _log_normal, _rsample


class Classifier(nn.Module):
    """q(y | z): an ``FCLayers`` trunk and a linear layer to label logits (or just the linear layer)."""

    def __init__(self, n_in: int, n_labels: int, *, n_hidden: int, n_layers: int, linear: bool, **trunk_kwargs):
        super().__init__()
        self.trunk = None if linear else FCLayers(n_in, n_hidden, n_layers=n_layers, n_hidden=n_hidden, **trunk_kwargs)
        self.logits = Linear(n_in if linear else n_hidden, n_labels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.logits(z if self.trunk is None else self.trunk(z))


class GaussianDecoder(nn.Module):
    """p(z | u, y): an ``FCLayers`` trunk (labels injected) with mean and exp-variance heads, no eps."""

    def __init__(self, n_in: int, n_out: int, *, n_hidden: int, **trunk_kwargs):
        super().__init__()
        self.trunk = FCLayers(n_in, n_hidden, n_hidden=n_hidden, dropout_rate=0.0, **trunk_kwargs)
        self.mean = Linear(n_hidden, n_out)
        self.log_var = Linear(n_hidden, n_out)

    def forward(self, u: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(u, y)
        return self.mean(h), torch.exp(self.log_var(h))


class SCANVAE(VAE):
    """The scANVI module. ``n_labels`` counts the known labels; code ``n_labels`` means unlabelled.

    Takes every :class:`VAE` argument; its architecture is a :class:`SCANVIArchitecture`.
    """

    architecture_class = SCANVIArchitecture

    def __init__(self, n_input: int, *, n_labels: int, **kwargs):
        if n_labels < 2:
            msg = f"scANVI needs at least 2 known labels, got {n_labels}."
            raise ValueError(msg)
        super().__init__(n_input, n_labels=n_labels, **kwargs)
        k, trunk = self.n_latent, {"n_hidden": self.n_hidden, "n_layers": self.n_layers}
        self.classifier = Classifier(
            k,
            n_labels,
            linear=self.architecture.linear_classifier,
            dropout_rate=self.dropout_rate,
            **trunk,
            **self.encoder_norm,
        )
        self.u_encoder = GaussianEncoder(
            k, k, n_cov=n_labels, dropout_rate=self.dropout_rate, **trunk, **self.encoder_norm
        )
        self.z_decoder = GaussianDecoder(k, k, n_cov=n_labels, **trunk, **self.decoder_norm)

    def classify(self, tensors: dict[str, torch.Tensor], use_posterior_mean: bool = True) -> torch.Tensor:
        """Label logits at the posterior mean of z (the reference's default), or at one draw of z."""
        inf = self.inference(tensors)
        if not use_posterior_mean:
            return self.classifier(inf["z"])  # as the decoder takes it (softmax for 'ln')
        qz_m = inf["qz_m"]
        if self.latent_distribution == "ln":
            qz_m = torch.softmax(qz_m, dim=-1)
        return self.classifier(qz_m)

    def loss(self, tensors: dict[str, torch.Tensor], kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-cell ELBO terms, y summed out with the classifier's probabilities.

        ``reconstruction_loss`` holds -log p(x | z, l) + log q(z | x) - E_y[log p(z | u, y)]
        and ``kl_z`` holds E_y[KL(q(u | z, y) || N(0, I))] + KL(q(y | z) || uniform), so that
        their sum is the negative ELBO, as in the reference. The labelled cells' cross-entropy
        is :meth:`classification` (the training objective adds it).
        """
        inf, gen = self(tensors)
        recon_x = -self.log_likelihood(tensors["X"], gen, tensors.get("nz_index"))
        z = inf["z_untransformed"]
        n_cells, n_lab = z.shape[0], self.n_labels
        probs = torch.softmax(self.classifier(inf["z"]), dim=-1)  # q(y | z), (cells, K)

        # one copy of z per label: rows [k * cells, (k + 1) * cells) carry label k
        z_rep = z.repeat(n_lab, 1)
        y_rep = torch.eye(n_lab, device=z.device, dtype=z.dtype).repeat_interleave(n_cells, dim=0)
        qu_m, qu_v = self.u_encoder(z_rep, y_rep)
        u = _rsample(qu_m, qu_v, 1)
        pz_m, pz_v = self.z_decoder(u, y_rep)
        log_pz = _log_normal(z_rep, pz_m, pz_v).sum(-1).view(n_lab, n_cells).T
        kl_u = _kl_normal_std(qu_m, qu_v).sum(-1).view(n_lab, n_cells).T

        log_qz = _log_normal(z, inf["qz_m"], inf["qz_v"]).sum(-1)
        recon = recon_x + log_qz - (probs * log_pz).sum(-1)
        kl_y = torch.xlogy(probs, probs).sum(-1) + math.log(n_lab)
        kl_z = (probs * kl_u).sum(-1) + kl_y
        kl_l = torch.zeros_like(kl_z)
        if not self.use_observed_lib_size:
            prior_m, prior_v = self.library_prior(tensors["batch"])
            kl_l = _kl_normal(inf["ql_m"], inf["ql_v"], prior_m, prior_v).sum(-1)
        # unlike scVI, the reference's warm-up also scales the library and label KL terms
        loss = torch.mean(recon + kl_weight * (kl_z + kl_l))
        return {"loss": loss, "reconstruction_loss": recon, "kl_z": kl_z, "kl_l": kl_l}

    def classification(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        """Cross-entropy of the cells with a known label (at the posterior mean of z), their
        number and how many the classifier gets right."""
        known = tensors["labels"] < self.n_labels
        n = int(known.sum())
        if n == 0 or (self.training and n < 2):  # batch norm cannot train on one cell
            zero = torch.zeros((), device=known.device)
            return {"classification_loss": zero, "n_labelled": 0, "n_correct": 0}
        sub = {k: v[known] for k, v in tensors.items() if k != "nz_index"}
        logits = self.classify(sub)
        return {
            "classification_loss": F.cross_entropy(logits, sub["labels"]),
            "n_labelled": n,
            "n_correct": int((logits.argmax(-1) == sub["labels"]).sum()),
        }
