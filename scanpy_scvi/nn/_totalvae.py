"""totalVI (Gayoso et al. 2021): joint RNA and protein (CITE-seq) variational autoencoder.

Pure torch: a module sees dense count tensors and integer codes, never an AnnData. A
minibatch is a dict with the :mod:`._vae` keys (``X``, ``batch``, ``labels``, optional
``cat_covs``, ``cont_covs``, ``size_factor``, ``nz_index``) plus

``Y``          (cells, proteins) float protein counts

The generative model, for a cell n in batch s with RNA counts x and protein counts y:

- z ~ N(0, I) (``'ln'``: softmax of it), RNA library l observed (log total counts) or
  log l ~ N(mu_s, var_s);
- x_g | z, l ~ NB(l rho_g(z, s), theta_g) (or ZINB), rho on the simplex (softmax);
- per protein t: the log background log beta_t ~ N(c_ts, d_ts^2) (the prior
  ``background_pro_alpha`` c, ``exp(background_pro_log_beta)`` d, learned), the foreground
  rate beta_t alpha_t(z, s) with alpha_t >= 1, and
  y_t | z, beta ~ pi_t NB(beta_t, phi_t) + (1 - pi_t) NB(beta_t alpha_t, phi_t),
  pi_t = sigmoid(``mixing``_t(z, s)) the probability that the count is *background*.

The variational posterior is q(z | x, y, s) q(l | x, y, s) q(log beta | z, s): as in the
reference, the background posterior N(``back_m``, ``back_v``) is amortised by a network of
z (and the covariates), not of the counts directly. Proteins not measured in a batch are
removed from the likelihood and from the background KL by ``protein_mask``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._architecture import TOTALVIArchitecture
from ._layers import FCLayers, Linear, _broadcast_like
from ._likelihoods import log_nb, log_nb_mixture, log_zinb, summed_log_likelihood
from ._vae import (
    GaussianEncoder,
    _kl_normal,
    _kl_normal_std,
    _log_normal,
    _rsample,
    encoder_input,
    latent_posterior,
    one_hot_covariates,
)

LOG_LIBRARY_MAX = 15.0  # a sampled log library is clamped here, as in the reference
BACKGROUND_EPS = 1e-8  # added to the background posterior's standard deviation (reference)
FOREGROUND_EPS = 1e-8  # alpha = 1 + ReLU(.) + 1e-8 > 1 (reference)
MIXING_PENALTY = 1e-3  # scvi-tools 1.4: -1e-3 log P(background) per protein keeps the background alive
BACKGROUND_PRIOR_START = (3.0, 0.0)  # scvi-tools 1.4: prior mean and log scale before training


class TOTALVAE(nn.Module):
    """The totalVI module: one encoder of RNA and protein counts, four decoder networks.

    The encoder reads ``log1p(x / (1 + mean_g x))`` and ``log1p(y / (1 + mean_t y))`` (each
    cell's counts over one plus their mean, as scvi-tools 1.4), so that its input does not
    follow the sequencing depth.

    The decoder follows the reference ``DecoderTOTALVI``: four ``FCLayers`` trunks of
    ``(z, continuous covariates)`` with the categorical covariates injected (RNA, protein
    background, protein foreground, mixing), and linear heads on each trunk's output
    concatenated with the trunk's input and the one-hot covariates:

    - RNA: ``px_scale = softmax(head)`` (softplus with size factors), and the ZINB
      zero-inflation logits from the mixing trunk;
    - background: q(log beta | z, s) = N(``back_m``, ``back_v``), ``back_m`` a head,
      ``sqrt(back_v) = softplus(head) + 1e-8``;
    - foreground: ``alpha = 1 + ReLU(head) + 1e-8``, ``rate_fore = rate_back * alpha``;
    - mixing: ``mixing`` logits, sigmoid(mixing) = P(protein count is background).

    Takes the data's sizes and category counts; the architecture as a
    :class:`TOTALVIArchitecture`, or its fields as keywords.
    """

    architecture_class = TOTALVIArchitecture
    #: parameters of the first encoder layer (expression inputs): what a query trains with
    #: ``freeze_expression=False``
    expression_inputs = ("z_encoder.trunk.layers.0.0.",)

    def __init__(
        self,
        n_input: int,
        *,
        n_proteins: int,
        n_batch: int = 1,
        n_labels: int = 1,
        n_cats_per_cov: tuple[int, ...] = (),
        n_continuous_cov: int = 0,
        use_size_factor: bool = False,
        architecture: TOTALVIArchitecture | None = None,
        **settings,
    ):
        """``n_input`` genes, ``n_proteins`` proteins and the data's category counts."""
        super().__init__()
        architecture = self.architecture_class.given(architecture, settings)
        if n_proteins < 1:
            msg = f"totalVI needs at least one protein, got n_proteins={n_proteins}."
            raise ValueError(msg)
        self.architecture = a = architecture
        self.n_input, self.n_proteins = n_input, n_proteins
        self.n_batch, self.n_labels, self.n_latent = n_batch, n_labels, a.n_latent
        self.n_hidden = n_hidden = a.n_hidden
        self.n_cats_per_cov = tuple(n_cats_per_cov)
        self.n_continuous_cov = n_continuous_cov
        self.gene_dispersion = a.gene_dispersion
        self.protein_dispersion = a.protein_dispersion
        self.gene_likelihood = a.gene_likelihood
        self.latent_distribution = a.latent_distribution
        # size factors replace the library, which is then never learned (reference)
        self.use_observed_lib_size = use_observed_lib_size = a.use_observed_lib_size or use_size_factor
        self.use_size_factor = use_size_factor
        self.encode_covariates = a.encode_covariates

        # One-hot widths of the categorical covariates (batch first); 1-category ones are dropped.
        self.cat_sizes = [n for n in (n_batch, *self.n_cats_per_cov) if n > 1]
        n_cat = sum(self.cat_sizes)

        enc_in = n_input + n_proteins + (n_continuous_cov if a.encode_covariates else 0)
        encoder_kwargs = dict(
            n_hidden=n_hidden,
            n_cov=n_cat if a.encode_covariates else 0,
            dropout_rate=a.dropout_rate_encoder,
            inject_covariates=a.deeply_inject_covariates,
            **a.normalised("encoder"),
        )
        self.z_encoder = GaussianEncoder(enc_in, a.n_latent, n_layers=a.n_layers_encoder, **encoder_kwargs)
        if not use_observed_lib_size:
            self.l_encoder = GaussianEncoder(enc_in, 1, n_layers=1, **encoder_kwargs)
        self.register_buffer("library_log_means", torch.zeros(1, n_batch))
        self.register_buffer("library_log_vars", torch.ones(1, n_batch))
        # 1 where a protein was measured in a batch, 0 where not (then it leaves the likelihood)
        self.register_buffer("protein_mask", torch.ones(n_batch, n_proteins))

        dec_in = a.n_latent + n_continuous_cov

        def trunk() -> FCLayers:
            return FCLayers(
                dec_in,
                n_hidden,
                n_cov=n_cat,
                n_layers=a.n_layers_decoder,
                n_hidden=n_hidden,
                dropout_rate=a.dropout_rate_decoder,
                inject_covariates=a.deeply_inject_covariates,
                **a.normalised("decoder"),
            )

        head_in = n_hidden + dec_in + n_cat
        self.rna_decoder = trunk()
        self.scale_head = Linear(head_in, n_input)
        self.background_decoder = trunk()
        self.background_mean_head = Linear(head_in, n_proteins)
        self.background_scale_head = Linear(head_in, n_proteins)
        self.foreground_decoder = trunk()
        self.foreground_head = Linear(head_in, n_proteins)
        self.mixing_decoder = trunk()
        self.mixing_head = Linear(head_in, n_proteins)
        if a.gene_likelihood == "zinb":
            self.dropout_head = Linear(head_in, n_input)

        gene_cols = {"gene": 0, "gene-batch": n_batch, "gene-label": n_labels}[a.gene_dispersion]
        self.gene_log_theta = nn.Parameter(torch.randn(*((n_input, gene_cols) if gene_cols else (n_input,))))
        protein_cols = {"protein": 0, "protein-batch": n_batch, "protein-label": n_labels}[a.protein_dispersion]
        shape = (n_proteins, protein_cols) if protein_cols else (n_proteins,)
        self.protein_log_theta = nn.Parameter(2 * torch.rand(*shape))  # theta = exp(.) in [1, e^2)

        # log-normal prior of the protein background per protein and batch (scvi-tools 1.4's
        # start without an empirical prior; see set_background_prior)
        mean, log_scale = BACKGROUND_PRIOR_START
        self.background_pro_alpha = nn.Parameter(torch.full((n_proteins, n_batch), mean))
        self.background_pro_log_beta = nn.Parameter(torch.full((n_proteins, n_batch), log_scale))

    # -- set-up from data -------------------------------------------------------------------
    @torch.no_grad()
    def set_background_prior(self, mean: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor) -> None:
        """Copy an empirical prior of the log protein background in (the prior still learns).

        ``mean`` and ``scale`` (> 0, a standard deviation) are (n_proteins, n_batch), or
        (n_proteins,) / (n_proteins, 1) for every batch, or scalars: the prior of log beta_ts is
        N(mean_ts, scale_ts^2), as the reference's ``protein_background_prior_mean`` /
        ``_scale`` (log-scale GMM background component of ``_get_totalvi_protein_priors``).
        """
        shape = self.background_pro_alpha.shape
        values = []
        for name, value in (("mean", mean), ("scale", scale)):
            t = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value, dtype=torch.float32)
            t = t.reshape(1, 1) if t.dim() == 0 else t.unsqueeze(-1) if t.dim() == 1 else t
            if t.dim() != 2 or t.shape[0] not in (1, shape[0]) or t.shape[1] not in (1, shape[1]):
                msg = f"Background prior {name} has shape {tuple(t.shape)}; expected (n_proteins, n_batch) = {tuple(shape)}."
                raise ValueError(msg)
            if not torch.isfinite(t).all():
                msg = f"Background prior {name} has non-finite values."
                raise ValueError(msg)
            values.append(t.expand(shape))
        if not (values[1] > 0).all():
            msg = "Background prior scale must be positive."
            raise ValueError(msg)
        self.background_pro_alpha.copy_(values[0])
        self.background_pro_log_beta.copy_(torch.log(values[1]))

    @torch.no_grad()
    def set_protein_mask(self, mask: np.ndarray | torch.Tensor) -> None:
        """Set which proteins were measured in each batch: (n_batch, n_proteins), True/1 = measured."""
        t = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
        if tuple(t.shape) != tuple(self.protein_mask.shape):
            msg = f"Protein mask has shape {tuple(t.shape)}; expected (n_batch, n_proteins) = {tuple(self.protein_mask.shape)}."
            raise ValueError(msg)
        self.protein_mask.copy_((t != 0).to(self.protein_mask.dtype))

    # -- covariates ---------------------------------------------------------------------------
    def _one_hot(self, batch: torch.Tensor, cat_covs: torch.Tensor | None) -> torch.Tensor | None:
        return one_hot_covariates(batch, cat_covs, (self.n_batch, *self.n_cats_per_cov))

    def _decoder_input(
        self, z: torch.Tensor, tensors: dict[str, torch.Tensor], batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z with the continuous covariates appended, the one-hot categorical covariates)."""
        cont = tensors.get("cont_covs")
        dec_in = z if cont is None else torch.cat([z, cont.expand(*z.shape[:-1], cont.shape[-1])], dim=-1)
        return dec_in, self._one_hot(batch, tensors.get("cat_covs"))

    @staticmethod
    def _head_input(trunk: FCLayers, dec_in: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
        """A trunk's output with its input and the covariates appended (the reference's skip)."""
        parts = [trunk(dec_in, cov), dec_in]
        if cov is not None:
            parts.append(_broadcast_like(cov, dec_in))
        return torch.cat(parts, dim=-1)

    def _background_posterior(
        self, dec_in: torch.Tensor, cov: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._head_input(self.background_decoder, dec_in, cov)
        back_m = self.background_mean_head(h)
        back_sd = F.softplus(self.background_scale_head(h)) + BACKGROUND_EPS
        return back_m, back_sd**2

    # -- q(z, l, log beta | x, y) ---------------------------------------------------------------
    def inference(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> dict[str, torch.Tensor]:
        """The variational posterior and one draw (or ``n_samples``, a leading axis) from it.

        Returns ``qz_m``, ``qz_v``, ``z_untransformed``, ``z`` (softmaxed for ``'ln'``),
        ``library`` (log RNA library: observed, or drawn from q(l) = N(``ql_m``, ``ql_v``) and
        clamped at 15 as in the reference), ``back_m``, ``back_v`` (q(log beta | z, s), a
        function of the drawn z and the observed batch) and ``log_background`` (a draw of log
        beta). ``tensors['X']`` may be a sparse CSR tensor (it is densified).
        """
        x = tensors["X"]
        if x.layout == torch.sparse_csr:
            x = x.to_dense()
        y = tensors["Y"]
        enc_in, cov = encoder_input(self, torch.cat([_depth_free_log(x), _depth_free_log(y)], dim=-1), tensors)
        out = latent_posterior(self, enc_in, cov, n_samples)
        z = out["z"]
        if self.use_observed_lib_size:
            library = torch.log(x.sum(dim=-1, keepdim=True))
            out["library"] = library.expand(n_samples, *library.shape) if n_samples > 1 else library
        else:
            ql_m, ql_v = self.l_encoder(enc_in, cov)
            library = torch.clamp(_rsample(ql_m, ql_v, n_samples), max=LOG_LIBRARY_MAX)
            out.update(ql_m=ql_m, ql_v=ql_v, library=library)
        back_m, back_v = self._background_posterior(*self._decoder_input(z, tensors, tensors["batch"]))
        out.update(back_m=back_m, back_v=back_v, log_background=_rsample(back_m, back_v, 1))
        return out

    def sample_z(self, qz_m: torch.Tensor, qz_v: torch.Tensor) -> torch.Tensor:
        """One draw of z from q(z | x, y) = N(qz_m, qz_v), as the decoder takes it."""
        return self._as_decoder_z(_rsample(qz_m, qz_v, 1))

    def _as_decoder_z(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z, dim=-1) if self.latent_distribution == "ln" else z

    # -- p(x, y | z, l, beta) ---------------------------------------------------------------------
    def log_library(self, library: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The log library the RNA decoder scales by: the latent/observed one, or log size factors."""
        return torch.log(tensors["size_factor"]).expand_as(library) if self.use_size_factor else library

    def _px_scale(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.scale_head(h)
        return F.softplus(logits) if self.use_size_factor else torch.softmax(logits, dim=-1)

    def expression(
        self,
        z: torch.Tensor,
        library: torch.Tensor | None,
        tensors: dict[str, torch.Tensor],
        transform_batch: int | None = None,
        scaled_by_library: bool = False,
    ) -> torch.Tensor:
        """Only the RNA frequencies ``px_scale`` (or, ``scaled_by_library``, ``px_rate``).

        Equal to ``generative(...)['px_scale']`` without the protein networks, for RNA-only
        queries (e.g. gene DE). ``library`` is read only when ``scaled_by_library``.
        """
        batch = self._decoder_batch(tensors, transform_batch)
        h = self._head_input(self.rna_decoder, *self._decoder_input(z, tensors, batch))
        px_scale = self._px_scale(h)
        return px_scale * torch.exp(self.log_library(library, tensors)) if scaled_by_library else px_scale

    @staticmethod
    def _decoder_batch(tensors: dict[str, torch.Tensor], transform_batch: int | None) -> torch.Tensor:
        batch = tensors["batch"]
        return batch if transform_batch is None else torch.full_like(batch, transform_batch)

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        transform_batch: int | None = None,
        log_background: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decoder outputs for z (cells, n_latent) or (samples, cells, n_latent).

        ``transform_batch`` replaces the batch code seen by the decoders and the per-batch
        dispersions. ``log_background``: a draw of log beta (``inference(...)
        ['log_background']``, which training passes); when None, q(log beta | z, s) is
        computed here with the decoder's batch and drawn from (the reference, which decodes
        the background in the decoder, does this under ``transform_batch``), and ``back_m`` /
        ``back_v`` are returned too.

        RNA: ``px_scale`` (rows sum to 1 without size factors), ``px_rate`` (= exp(library)
        px_scale), ``theta``, ``zi_logits`` (None for ``'nb'``). Protein: ``rate_back`` (=
        exp(log beta)), ``rate_fore`` (= rate_back * alpha, alpha > 1), ``mixing`` (logits;
        sigmoid(mixing) = P(background)), ``py_theta`` and ``protein_scale`` = rate_fore *
        (1 - sigmoid(mixing)), the foreground expression of the reference's
        ``get_normalized_expression`` (defaults: no background, no L1 scaling).
        """
        batch = self._decoder_batch(tensors, transform_batch)
        dec_in, cov = self._decoder_input(z, tensors, batch)
        out = {}

        px_scale = self._px_scale(self._head_input(self.rna_decoder, dec_in, cov))
        px_rate = torch.exp(self.log_library(library, tensors)) * px_scale
        theta = torch.exp(self._per_feature(self.gene_log_theta, self.gene_dispersion, batch, tensors))

        if log_background is None:
            back_m, back_v = self._background_posterior(dec_in, cov)
            log_background = _rsample(back_m, back_v, 1)
            out.update(back_m=back_m, back_v=back_v)
        rate_back = torch.exp(log_background)
        h_fore = self._head_input(self.foreground_decoder, dec_in, cov)
        alpha = 1.0 + F.relu(self.foreground_head(h_fore)) + FOREGROUND_EPS
        rate_fore = rate_back * alpha

        h_mix = self._head_input(self.mixing_decoder, dec_in, cov)
        mixing = self.mixing_head(h_mix)
        zi_logits = self.dropout_head(h_mix) if self.gene_likelihood == "zinb" else None
        py_theta = torch.exp(self._per_feature(self.protein_log_theta, self.protein_dispersion, batch, tensors))

        out.update(
            px_scale=px_scale,
            px_rate=px_rate,
            theta=theta,
            zi_logits=zi_logits,
            log_background=log_background,
            rate_back=rate_back,
            rate_fore=rate_fore,
            mixing=mixing,
            py_theta=py_theta,
            protein_scale=rate_fore * self.protein_foreground_probability(mixing),
        )
        return out

    @staticmethod
    def _per_feature(
        log_theta: torch.Tensor, dispersion: str, batch: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """log theta per feature (features,), or per cell (cells, features) by batch or label."""
        if dispersion.endswith("-batch"):
            return log_theta[:, batch].T
        if dispersion.endswith("-label"):
            return log_theta[:, tensors["labels"]].T
        return log_theta

    @staticmethod
    def protein_foreground_probability(mixing: torch.Tensor) -> torch.Tensor:
        """P(a protein count is foreground) = 1 - sigmoid(mixing) = sigmoid(-mixing).

        The reference's ``get_protein_foreground_probability`` (its (1 - pi_nt)); ``mixing``
        is ``generative(...)['mixing']``.
        """
        return torch.sigmoid(-mixing)

    def forward(self, tensors: dict[str, torch.Tensor], n_samples: int = 1, transform_batch: int | None = None):
        inf = self.inference(tensors, n_samples=n_samples)
        log_background = inf["log_background"] if transform_batch is None else None
        gen = self.generative(
            inf["z"], inf["library"], tensors, transform_batch=transform_batch, log_background=log_background
        )
        return inf, gen

    # -- likelihoods ------------------------------------------------------------------------------
    def rna_log_likelihood(
        self, x: torch.Tensor, gen: dict[str, torch.Tensor], nz_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(x | z, l) summed over genes; shape = leading dims of ``px_rate`` without genes.

        One draw per cell: from the nonzero counts (:func:`summed_log_likelihood`, as
        ``VAE.log_likelihood``); several draws: elementwise :func:`log_nb` / :func:`log_zinb`.
        """
        mu = gen["px_rate"]
        if mu.dim() == 2 and (nz_index is not None or not x.is_cuda):  # on a GPU: elementwise, no search
            if nz_index is None:
                rows, cols = x.nonzero(as_tuple=True)
                nz_index = rows * x.shape[1] + cols
            nz_values = x.reshape(-1).index_select(0, nz_index)
            return summed_log_likelihood(mu, gen["theta"], gen["zi_logits"], self.gene_likelihood, nz_index, nz_values)
        if self.gene_likelihood == "zinb":
            return log_zinb(x, mu, gen["theta"], gen["zi_logits"]).sum(-1)
        return log_nb(x, mu, gen["theta"]).sum(-1)

    def measured(self, batch: torch.Tensor) -> torch.Tensor:
        """(cells, proteins) bool: whether each protein was measured in each cell's batch."""
        return self.protein_mask[batch] > 0

    def protein_log_likelihood(
        self, y: torch.Tensor, gen: dict[str, torch.Tensor], batch: torch.Tensor
    ) -> torch.Tensor:
        """log p(y | z, beta) summed over the proteins measured in each cell's batch.

        Per protein :func:`log_nb_mixture` (background = first component, weight
        sigmoid(mixing)); unmeasured proteins (``protein_mask[batch] == 0``) contribute 0.
        """
        ll = log_nb_mixture(y, gen["rate_back"], gen["rate_fore"], gen["py_theta"], gen["mixing"])
        return torch.where(self.measured(batch), ll, torch.zeros_like(ll)).sum(-1)

    def background_kl(self, inf: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """KL(q(log beta | z, s) || p(log beta | s)) summed over the measured proteins, per cell.

        KL(N(m, v) || N(c, d^2)) = 1/2 [log(d^2 / v) + (v + (m - c)^2) / d^2 - 1] with m, v =
        ``back_m``, ``back_v`` and c, d = ``background_pro_alpha``, exp(``background_pro_log_beta``)
        at the cell's batch.
        """
        prior_m = self.background_pro_alpha[:, batch].T
        prior_v = torch.exp(2 * self.background_pro_log_beta[:, batch].T)
        kl = _kl_normal(inf["back_m"], inf["back_v"], prior_m, prior_v)
        return torch.where(self.measured(batch), kl, torch.zeros_like(kl)).sum(-1)

    # -- objective --------------------------------------------------------------------------------
    def loss(
        self, tensors: dict[str, torch.Tensor], kl_weight: float = 1.0, pro_recons_weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Per-cell terms of the negative ELBO and the minibatch loss, as the reference ``TOTALVAE.loss``.

        Per cell n (one draw of z, l and log beta from q):

        - ``reconstruction_loss_gene`` = -log p(x_n | z, l) (NB or ZINB, summed over genes);
        - ``reconstruction_loss_protein`` = -sum_t m_{s_n t} log[sigmoid(mixing_nt)
          NB(y_nt; rate_back_nt, phi_t) + sigmoid(-mixing_nt) NB(y_nt; rate_fore_nt, phi_t)],
          m = ``protein_mask``;
        - ``reconstruction_loss`` = the sum of the two;
        - ``kl_z`` = KL(N(qz_m, qz_v) || N(0, I)), summed over latent dimensions;
        - ``kl_l`` = KL(N(ql_m, ql_v) || N(library_log_means_s, library_log_vars_s)) (0 with the
          observed library) + :meth:`background_kl` (the masked background KL).

        ``loss`` = mean over cells of [recon_gene + ``kl_weight`` * (``pro_recons_weight`` *
        recon_protein + kl_z + kl_background + penalty) + kl_library], as scvi-tools 1.4: the
        warm-up weight multiplies the protein reconstruction, the z and background KLs and
        ``penalty`` = -1e-3 * sum_t log sigmoid(mixing_nt), which keeps every protein's
        background probability away from 0; not the RNA terms or the library KL.
        ``reconstruction_loss + kl_z + kl_l`` is the negative ELBO whatever the weights (the
        penalty is not part of it).
        """
        inf = self.inference(tensors)
        gen = self.generative(inf["z"], inf["library"], tensors, log_background=inf["log_background"])
        batch = tensors["batch"]
        recon_gene = -self.rna_log_likelihood(tensors["X"], gen, tensors.get("nz_index"))
        recon_protein = -self.protein_log_likelihood(tensors["Y"], gen, batch)
        kl_z = _kl_normal_std(inf["qz_m"], inf["qz_v"]).sum(-1)
        kl_background = self.background_kl(inf, batch)
        kl_library = torch.zeros_like(kl_z)
        if not self.use_observed_lib_size:
            prior_m = self.library_log_means[0, batch].unsqueeze(-1)
            prior_v = self.library_log_vars[0, batch].unsqueeze(-1)
            kl_library = _kl_normal(inf["ql_m"], inf["ql_v"], prior_m, prior_v).sum(-1)
        penalty = -MIXING_PENALTY * F.logsigmoid(gen["mixing"]).sum(-1)
        loss = torch.mean(
            recon_gene + kl_weight * (pro_recons_weight * recon_protein + kl_z + kl_background + penalty) + kl_library
        )
        return {
            "loss": loss,
            "reconstruction_loss": recon_gene + recon_protein,
            "kl_z": kl_z,
            "kl_l": kl_library + kl_background,
            "reconstruction_loss_gene": recon_gene,
            "reconstruction_loss_protein": recon_protein,
            "z": inf["z"],  # for objectives that look at the latent (adversarial batch classifier)
        }

    @torch.no_grad()
    def marginal_ll(
        self, tensors: dict[str, torch.Tensor], n_mc_samples: int, max_elements: int = 2**22
    ) -> torch.Tensor:
        """Importance-sampled log p(x, y) per cell, with q(z, l, log beta | x, y) as the proposal.

        Each draw's log weight is log p(x | z, l) + log p(y | z, beta) + log p(z) - log q(z | x, y)
        (+ log p(l) - log q(l | x, y) with a learned library) + the sum over the proteins measured
        in the cell's batch of log p(log beta_t) - log q(log beta_t | z): p(log beta_t) = N(c_ts,
        d_ts^2) as in :meth:`background_kl`. Proteins not measured in a batch leave the
        likelihood, so their background is integrated out exactly and left out (the reference
        adds its prior-to-posterior ratio, which only adds noise). Densities of z are taken at
        the untransformed z (the correct weight also for ``'ln'``). Draws come in passes of at
        most ``max_elements`` decoded entries. Its average over draws of the log weight is the
        ELBO, so the estimate is at least the ELBO in expectation and tends to log p from below.
        """
        x = tensors["X"].to_dense() if tensors["X"].layout == torch.sparse_csr else tensors["X"]
        tensors = {**tensors, "X": x}
        batch = tensors["batch"]
        measured = self.measured(batch)
        prior_m = self.background_pro_alpha[:, batch].T
        prior_v = torch.exp(2 * self.background_pro_log_beta[:, batch].T)
        per_pass = max(1, max_elements // (x.numel() + tensors["Y"].numel()))
        chunks, remaining = [], n_mc_samples
        while remaining > 0:
            s = min(per_pass, remaining)
            remaining -= s
            inf = self.inference(tensors, n_samples=s)
            inf = {k: (v if v.dim() == 3 else v.expand(s, *v.shape)) for k, v in inf.items()}
            gen = self.generative(inf["z"], inf["library"], tensors, log_background=inf["log_background"])
            z, log_back = inf["z_untransformed"], inf["log_background"]
            latent = _log_normal(z, torch.zeros_like(z), torch.ones_like(z)) - _log_normal(z, inf["qz_m"], inf["qz_v"])
            log_w = (
                self.rna_log_likelihood(x, gen) + self.protein_log_likelihood(tensors["Y"], gen, batch) + latent.sum(-1)
            )
            background = _log_normal(log_back, prior_m, prior_v) - _log_normal(log_back, inf["back_m"], inf["back_v"])
            log_w = log_w + torch.where(measured, background, torch.zeros_like(background)).sum(-1)
            if not self.use_observed_lib_size:
                lib = inf["library"]
                lib_m = self.library_log_means[0, batch].unsqueeze(-1)
                lib_v = self.library_log_vars[0, batch].unsqueeze(-1)
                log_w = log_w + (_log_normal(lib, lib_m, lib_v) - _log_normal(lib, inf["ql_m"], inf["ql_v"])).sum(-1)
            chunks.append(log_w)
        return torch.logsumexp(torch.cat(chunks, dim=0), dim=0) - math.log(n_mc_samples)


def _depth_free_log(counts: torch.Tensor) -> torch.Tensor:
    """log1p of each cell's counts over one plus their mean: the encoder's input."""
    return torch.log1p(counts / (1 + counts.mean(dim=-1, keepdim=True)))
