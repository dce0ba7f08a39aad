"""The scVI variational autoencoder (and its linearly decoded variant, LDVAE).

Pure torch: a module sees dense count tensors and integer codes, never an AnnData. A
minibatch is a dict with

``X``          (cells, genes) float counts
``batch``      (cells,) int64 batch codes
``labels``     (cells,) int64 label codes
``cat_covs``   (cells, k) int64 codes of extra categorical covariates, or absent
``cont_covs``  (cells, c) float continuous covariates, or absent
``size_factor`` (cells, 1) float, or absent
``nz_index``   (nnz,) int64 flat row-major positions of the nonzero entries of ``X``, or
               absent (then found from ``X``); not per cell: dropped when cells are subset
``qz_m``, ``qz_v`` (cells, latent) float: a cached q(z | x) per cell (a minified AnnData, whose
               counts were dropped), or absent; with ``observed_library`` (cells, 1), the cells'
               total counts. When present, ``VAE.inference`` draws from them and reads no ``X``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._architecture import VAEArchitecture
from ._layers import FCLayers, Linear, _apply_2d, batch_norm
from ._likelihoods import log_nb, log_poisson, log_zinb, summed_log_likelihood

VAR_EPS = 1e-4  # added to the encoder variance, as in the reference


class GaussianEncoder(nn.Module):
    """An ``FCLayers`` trunk with mean and log-variance heads: q(. | x) = N(mu, var + 1e-4)."""

    def __init__(self, n_in: int, n_out: int, *, n_hidden: int, **trunk_kwargs):
        super().__init__()
        self.trunk = FCLayers(n_in, n_hidden, n_hidden=n_hidden, **trunk_kwargs)
        self.mean = Linear(n_hidden, n_out)
        self.log_var = Linear(n_hidden, n_out)

    def forward(self, x: torch.Tensor, cov: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x, cov)
        return self.mean(h), torch.exp(self.log_var(h)) + VAR_EPS


class VAE(nn.Module):
    """scVI: q(z | x) and (optionally) q(l | x) encoders, a softmax decoder and a count likelihood.

    See ``docs/model.rst`` for the generative model. ``linear_decoder=True`` gives LDVAE
    (Svensson et al. 2020): a single linear map from z to the gene logits, batch-normalised,
    without bias, so that its (folded) weights are interpretable loadings.
    """

    architecture_class = VAEArchitecture
    #: parameters of the first encoder layer (expression inputs): what a query trains with
    #: ``freeze_expression=False``
    expression_inputs = ("z_encoder.trunk.layers.0.0.",)

    def __init__(
        self,
        n_input: int,
        *,
        n_batch: int = 1,
        n_labels: int = 1,
        n_cats_per_cov: tuple[int, ...] = (),
        n_continuous_cov: int = 0,
        use_size_factor: bool = False,
        architecture: VAEArchitecture | None = None,
        **settings,
    ):
        """``n_input`` genes and the data's category counts; the architecture as a
        :class:`VAEArchitecture`, or its fields as keywords."""
        super().__init__()
        architecture = self.architecture_class.given(architecture, settings)
        self.architecture = a = architecture
        self.n_input, self.n_batch, self.n_labels, self.n_latent = n_input, n_batch, n_labels, a.n_latent
        self.n_hidden, self.n_layers, self.dropout_rate = a.n_hidden, a.n_layers, a.dropout_rate
        # which hidden layers are normalised, as FCLayers flags (subclasses build more networks)
        self.encoder_norm = a.normalised("encoder")
        self.decoder_norm = a.normalised("decoder")
        self.n_cats_per_cov = tuple(n_cats_per_cov)
        self.n_continuous_cov = n_continuous_cov
        self.dispersion = dispersion = a.dispersion
        self.gene_likelihood = a.gene_likelihood
        self.latent_distribution = a.latent_distribution
        self.use_observed_lib_size = use_observed_lib_size = a.use_observed_lib_size
        self.use_size_factor = use_size_factor
        self.linear_decoder = linear_decoder = a.linear_decoder
        self.encode_covariates = encode_covariates = a.encode_covariates
        n_hidden, n_latent, n_layers, dropout_rate = a.n_hidden, a.n_latent, a.n_layers, a.dropout_rate
        deeply_inject_covariates = a.deeply_inject_covariates

        # One-hot widths of the categorical covariates (batch first); 1-category ones are dropped.
        self.cat_sizes = [n for n in (n_batch, *self.n_cats_per_cov) if n > 1]
        n_cat = sum(self.cat_sizes)
        enc_cov = n_cat if encode_covariates else 0
        enc_in = n_input + (n_continuous_cov if encode_covariates else 0)
        encoder_kwargs = dict(
            n_cov=enc_cov,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            **self.encoder_norm,
            inject_covariates=deeply_inject_covariates,
        )
        self.z_encoder = GaussianEncoder(enc_in, n_latent, n_hidden=n_hidden, **encoder_kwargs)
        if not use_observed_lib_size:
            self.l_encoder = GaussianEncoder(enc_in, 1, n_hidden=n_hidden, **{**encoder_kwargs, "n_layers": 1})
        self.register_buffer("library_log_means", torch.zeros(1, n_batch))
        self.register_buffer("library_log_vars", torch.ones(1, n_batch))

        dec_in = n_latent + n_continuous_cov
        if linear_decoder:
            use_bn = self.decoder_norm["use_batch_norm"]
            self.scale_decoder = _linear_head(dec_in + n_cat, n_input, use_bn)
            self.dropout_decoder = _linear_head(dec_in + n_cat, n_input, use_bn)
        else:
            self.decoder = FCLayers(
                dec_in,
                n_hidden,
                n_cov=n_cat,
                n_layers=n_layers,
                n_hidden=n_hidden,
                dropout_rate=0.0,
                **self.decoder_norm,
                inject_covariates=deeply_inject_covariates,
            )
            self.scale_head = Linear(n_hidden, n_input)
            self.dropout_head = Linear(n_hidden, n_input)
            if dispersion == "gene-cell":
                self.theta_head = Linear(n_hidden, n_input)
        n_theta_cols = {"gene": 0, "gene-batch": n_batch, "gene-label": n_labels, "gene-cell": 0}[dispersion]
        if dispersion != "gene-cell":
            shape = (n_input, n_theta_cols) if n_theta_cols else (n_input,)
            self.log_theta = nn.Parameter(torch.randn(*shape))

    # -- covariates ---------------------------------------------------------------------
    def _one_hot(self, batch: torch.Tensor, cat_covs: torch.Tensor | None) -> torch.Tensor | None:
        return one_hot_covariates(batch, cat_covs, (self.n_batch, *self.n_cats_per_cov))

    # -- q(z, l | x) ------------------------------------------------------------------------
    def inference(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> dict[str, torch.Tensor]:
        """q(z | x) (and q(l | x)). ``tensors['X']`` may be a sparse CSR tensor (inference only).

        With ``tensors['qz_m']`` (a minified AnnData) the cached q(z | x) and observed library
        are used instead of encoding ``X``: the same draws as from the counts they came from.
        """
        if "qz_m" in tensors:
            return self.cached_inference(tensors, n_samples)
        x = tensors["X"]
        if x.layout == torch.sparse_csr and self.encode_covariates and tensors.get("cont_covs") is not None:
            x = x.to_dense()  # continuous covariates are extra encoder input columns
        enc_in, cov = encoder_input(self, torch.log1p(x), tensors)  # log1p keeps a sparse x sparse
        out = latent_posterior(self, enc_in, cov, n_samples)
        if self.use_observed_lib_size:
            total = x.sum(dim=-1, keepdim=True)
            library = torch.log(total.to_dense() if total.layout == torch.sparse_csr else total)
            out["library"] = library.expand(n_samples, *library.shape) if n_samples > 1 else library
        else:
            ql_m, ql_v = self.l_encoder(enc_in, cov)
            out.update(ql_m=ql_m, ql_v=ql_v, library=_rsample(ql_m, ql_v, n_samples))
        return out

    def cached_inference(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> dict[str, torch.Tensor]:
        """:meth:`inference` from a cached q(z | x) (``qz_m``, ``qz_v``) and ``observed_library``."""
        if not self.use_observed_lib_size:  # a learned library needs q(l | x), i.e. the counts
            msg = "A cached posterior of z serves only models with the observed library size."
            raise ValueError(msg)
        qz_m, qz_v = tensors["qz_m"], tensors["qz_v"]
        z = _rsample(qz_m, qz_v, n_samples)
        library = torch.log(tensors["observed_library"])
        library = library.expand(n_samples, *library.shape) if n_samples > 1 else library
        return {"qz_m": qz_m, "qz_v": qz_v, "z_untransformed": z, "z": self._as_decoder_z(z), "library": library}

    def sample_z(self, qz_m: torch.Tensor, qz_v: torch.Tensor) -> torch.Tensor:
        """One draw of z from q(z | x) = N(qz_m, qz_v), as the decoder takes it."""
        return self._as_decoder_z(_rsample(qz_m, qz_v, 1))

    def _as_decoder_z(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z, dim=-1) if self.latent_distribution == "ln" else z

    # -- p(x | z, l) ------------------------------------------------------------------------
    def _decoder_hidden(
        self, z: torch.Tensor, tensors: dict[str, torch.Tensor], transform_batch: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, batch): the decoder trunk's output (LDVAE: its full input) and the batch codes used."""
        batch = tensors["batch"]
        if transform_batch is not None:
            batch = torch.full_like(batch, transform_batch)
        cov = self._one_hot(batch, tensors.get("cat_covs"))
        dec_in = z
        cont = tensors.get("cont_covs")
        if cont is not None:
            dec_in = torch.cat([z, cont.expand(*z.shape[:-1], cont.shape[-1])], dim=-1)
        if self.linear_decoder:
            h = dec_in if cov is None else torch.cat([dec_in, cov.expand(*z.shape[:-1], cov.shape[-1])], -1)
        else:
            h = self.decoder(dec_in, cov)
        return h, batch

    def _px_scale(self, h: torch.Tensor) -> torch.Tensor:
        logits = _apply_2d(self.scale_decoder, h) if self.linear_decoder else self.scale_head(h)
        return F.softplus(logits) if self.use_size_factor else torch.softmax(logits, dim=-1)

    def log_library(self, library: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The log library the decoder scales by: the latent/observed one, or log size factors."""
        return torch.log(tensors["size_factor"]).expand_as(library) if self.use_size_factor else library

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        transform_batch: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decoder outputs. ``transform_batch`` replaces the batch code seen by the decoder."""
        h, batch = self._decoder_hidden(z, tensors, transform_batch)
        px_scale = self._px_scale(h)
        zi_logits = _apply_2d(self.dropout_decoder, h) if self.linear_decoder else self.dropout_head(h)
        px_rate = torch.exp(self.log_library(library, tensors)) * px_scale

        if self.dispersion == "gene":
            theta = torch.exp(self.log_theta)
        elif self.dispersion == "gene-batch":
            theta = torch.exp(self.log_theta[:, batch].T)
        elif self.dispersion == "gene-label":
            theta = torch.exp(self.log_theta[:, tensors["labels"]].T)
        else:
            theta = torch.exp(self.theta_head(h))
        return {"px_scale": px_scale, "px_rate": px_rate, "theta": theta, "zi_logits": zi_logits}

    def expression(
        self,
        z: torch.Tensor,
        library: torch.Tensor | None,
        tensors: dict[str, torch.Tensor],
        transform_batch: int | None = None,
        scaled_by_library: bool = False,
    ) -> torch.Tensor:
        """Only the decoder's frequencies (or, ``scaled_by_library``, the likelihood means).

        Equal to ``generative(...)['px_scale']`` (or ``['px_rate']``) without computing the
        dropout and dispersion outputs, which expression queries do not need. ``library`` is
        read only when ``scaled_by_library``.
        """
        h, _ = self._decoder_hidden(z, tensors, transform_batch)
        px_scale = self._px_scale(h)
        return px_scale * torch.exp(self.log_library(library, tensors)) if scaled_by_library else px_scale

    def log_likelihood(
        self, x: torch.Tensor, gen: dict[str, torch.Tensor], nz_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x | z, l) summed over genes (see :func:`count_log_likelihood`)."""
        return count_log_likelihood(self.gene_likelihood, x, gen, nz_index)

    def elementwise_log_likelihood(self, x: torch.Tensor, gen: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(x_g | z, l) per entry, by the reference formulas."""
        return elementwise_log_likelihood(self.gene_likelihood, x, gen)

    def forward(self, tensors: dict[str, torch.Tensor], n_samples: int = 1, transform_batch: int | None = None):
        inf = self.inference(tensors, n_samples=n_samples)
        gen = self.generative(inf["z"], inf["library"], tensors, transform_batch=transform_batch)
        return inf, gen

    # -- objective -----------------------------------------------------------------------------
    def loss(self, tensors: dict[str, torch.Tensor], kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-cell reconstruction and KL terms and the minibatch loss.

        loss = mean over cells of [recon + kl_weight * kl_z + kl_l]; only the z-KL is warmed up.
        """
        inf, gen = self(tensors)
        recon = -self.log_likelihood(tensors["X"], gen, tensors.get("nz_index"))
        kl_z = _kl_normal_std(inf["qz_m"], inf["qz_v"]).sum(-1)
        kl_l = torch.zeros_like(kl_z)
        if not self.use_observed_lib_size:
            prior_m, prior_v = self.library_prior(tensors["batch"])
            kl_l = _kl_normal(inf["ql_m"], inf["ql_v"], prior_m, prior_v).sum(-1)
        loss = torch.mean(recon + kl_weight * kl_z + kl_l)
        return {"loss": loss, "reconstruction_loss": recon, "kl_z": kl_z, "kl_l": kl_l}

    def library_prior(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.library_log_means[0, batch].unsqueeze(-1), self.library_log_vars[0, batch].unsqueeze(-1)

    @torch.no_grad()
    def marginal_ll(
        self, tensors: dict[str, torch.Tensor], n_mc_samples: int, max_elements: int = 2**22
    ) -> torch.Tensor:
        """Importance-sampled log p(x) per cell (see :func:`importance_sampled_log_likelihood`)."""
        return importance_sampled_log_likelihood(self, tensors, n_mc_samples, max_elements)

    @torch.no_grad()
    def loadings(self) -> torch.Tensor:
        """LDVAE gene loadings (genes, n_latent): the linear weight with batch norm folded in."""
        linear = self.scale_decoder[0]
        weight = linear.weight[:, : self.n_latent]
        if len(self.scale_decoder) > 1:
            bn = self.scale_decoder[1]
            weight = weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).unsqueeze(-1)
        return weight


def count_log_likelihood(
    likelihood: str, x: torch.Tensor, gen: dict[str, torch.Tensor], nz_index: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(x | z, l) summed over genes; shape = leading dims of ``gen['px_rate']`` without genes.

    For one draw per cell (the training case) the sum is taken over the nonzero counts with
    :func:`summed_log_likelihood` (told ``gen['theta_table']`` and ``gen['theta_rows']`` when the
    decoder's dispersion is a table of rows), at ``nz_index`` (flat positions of the nonzero
    entries of ``x``, found here when not given on the CPU); with several draws, or on a GPU
    without ``nz_index``, elementwise.
    """
    mu = gen["px_rate"]
    if mu.dim() == 2:
        if nz_index is None and x.is_cuda:  # elementwise: no search (a host synchronisation)
            return elementwise_log_likelihood(likelihood, x, gen).sum(dim=-1)
        if nz_index is None:
            rows, cols = x.nonzero(as_tuple=True)
            nz_index = rows * x.shape[1] + cols
        nz_values = x.reshape(-1).index_select(0, nz_index)
        return summed_log_likelihood(mu, gen["theta"], gen["zi_logits"], likelihood, nz_index, nz_values,
                                     theta_table=gen.get("theta_table"), theta_rows=gen.get("theta_rows"))  # fmt: skip
    return elementwise_log_likelihood(likelihood, x, gen).sum(dim=-1)


def elementwise_log_likelihood(likelihood: str, x: torch.Tensor, gen: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(x_g | z, l) per entry, by the reference formulas."""
    mu = gen["px_rate"]
    if likelihood == "zinb":
        return log_zinb(x, mu, gen["theta"], gen["zi_logits"])
    if likelihood == "nb":
        return log_nb(x, mu, gen["theta"])
    return log_poisson(x, mu)


@torch.no_grad()
def importance_sampled_log_likelihood(
    module: nn.Module, tensors: dict[str, torch.Tensor], n_mc_samples: int, max_elements: int = 2**22
) -> torch.Tensor:
    """Importance-sampled log p(x) per cell, with q(z, l | x) as the proposal, of a module with
    scVI's ``inference``, ``generative``, ``log_likelihood`` and library settings.

    Densities are evaluated at the untransformed z, which is the correct importance weight
    for both latent distributions (the reference uses the softmaxed z for ``ln``). Samples
    are drawn in passes of at most ``max_elements`` decoded entries, which keeps the
    temporaries cache-sized on CPU.
    """
    per_pass = max(1, max_elements // tensors["X"].numel())
    chunks = []
    remaining = n_mc_samples
    while remaining > 0:
        s = min(per_pass, remaining)
        remaining -= s
        inf = module.inference(tensors, n_samples=s)
        inf = {k: (v if v.dim() == 3 else v.expand(s, *v.shape)) for k, v in inf.items()}
        gen = module.generative(inf["z"], inf["library"], tensors)
        z = inf["z_untransformed"]
        log_w = (
            module.log_likelihood(tensors["X"], gen)
            + _log_normal(z, torch.zeros_like(z), torch.ones_like(z)).sum(-1)
            - _log_normal(z, inf["qz_m"], inf["qz_v"]).sum(-1)
        )
        if not module.use_observed_lib_size:
            lib = inf["library"]
            prior_m, prior_v = module.library_prior(tensors["batch"])
            log_w = log_w + (_log_normal(lib, prior_m, prior_v) - _log_normal(lib, inf["ql_m"], inf["ql_v"])).sum(-1)
        chunks.append(log_w)
    return torch.logsumexp(torch.cat(chunks, dim=0), dim=0) - math.log(n_mc_samples)


def one_hot_covariates(batch: torch.Tensor, cat_covs: torch.Tensor | None, sizes) -> torch.Tensor | None:
    """Batch and categorical covariates one-hot, concatenated (a one-category block has no columns)."""
    codes = [batch] + ([] if cat_covs is None else list(cat_covs.unbind(-1)))
    blocks = [F.one_hot(c, n).to(torch.float32) for c, n in zip(codes, sizes, strict=True) if n > 1]
    return torch.cat(blocks, dim=-1) if blocks else None


def encoder_input(module: nn.Module, counts_in: torch.Tensor, tensors: dict[str, torch.Tensor]):
    """(encoder input, one-hot covariates) of a module with ``encode_covariates`` and ``_one_hot``:
    the transformed counts, with the continuous covariates appended when it encodes covariates."""
    if not module.encode_covariates:
        return counts_in, None
    cont = tensors.get("cont_covs")
    if cont is not None:
        counts_in = torch.cat([counts_in, cont], dim=-1)
    return counts_in, module._one_hot(tensors["batch"], tensors.get("cat_covs"))


def latent_posterior(module: nn.Module, enc_in: torch.Tensor, cov, n_samples: int) -> dict[str, torch.Tensor]:
    """q(z | .) of ``module.z_encoder`` and ``n_samples`` draws: ``qz_m``, ``qz_v``,
    ``z_untransformed`` and ``z`` (as the decoder takes it)."""
    qz_m, qz_v = module.z_encoder(enc_in, cov)
    z = _rsample(qz_m, qz_v, n_samples)
    return {"qz_m": qz_m, "qz_v": qz_v, "z_untransformed": z, "z": module._as_decoder_z(z)}


def _linear_head(n_in: int, n_out: int, use_batch_norm: bool) -> nn.Sequential:
    layers = [Linear(n_in, n_out, bias=False)]
    if use_batch_norm:
        layers.append(batch_norm(n_out))
    return nn.Sequential(*layers)


def _rsample(mean: torch.Tensor, var: torch.Tensor, n_samples: int) -> torch.Tensor:
    shape = (n_samples, *mean.shape) if n_samples > 1 else mean.shape
    return mean + torch.sqrt(var) * torch.randn(shape, dtype=mean.dtype, device=mean.device)


def _log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def _kl_normal(m: torch.Tensor, v: torch.Tensor, prior_m: torch.Tensor, prior_v: torch.Tensor) -> torch.Tensor:
    """KL(N(m, v) || N(prior_m, prior_v)), elementwise."""
    return 0.5 * (torch.log(prior_v / v) + (v + (m - prior_m) ** 2) / prior_v - 1)


def _kl_normal_std(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """KL(N(m, v) || N(0, 1)), elementwise."""
    return 0.5 * (v + m**2 - 1 - torch.log(v))
