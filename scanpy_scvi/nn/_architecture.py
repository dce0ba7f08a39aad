"""The architecture settings of each module: declared once, used by the module, the model class,
the ``pp`` function and the saved JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .._settings import Settings, positive_int, setting, unit_interval

Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]
Likelihood = Literal["zinb", "nb", "poisson"]
NormChoice = Literal["encoder", "decoder", "both", "none"]
NORMS = ("encoder", "decoder", "both", "none")


@dataclass(frozen=True)
class NetworkSettings(Settings):
    """Base of the architectures: the behaviour they share (their fields are their own)."""

    @classmethod
    def given(cls, architecture: Settings | None, settings: dict) -> Settings:
        """``architecture``, or one built from its fields passed as keywords (not both)."""
        if architecture is None:
            return cls(**settings)
        if settings:
            msg = f"Pass the architecture or its settings {sorted(settings)}, not both."
            raise TypeError(msg)
        return architecture

    def normalised(self, part: Literal["encoder", "decoder"]) -> dict[str, bool]:
        """Which normalisation the hidden layers of ``part`` use, as ``FCLayers`` flags."""
        return {
            "use_batch_norm": self.use_batch_norm in (part, "both"),
            "use_layer_norm": self.use_layer_norm in (part, "both"),
        }


@dataclass(frozen=True)
class VAEArchitecture(NetworkSettings):
    """scVI / LDVAE architecture; defaults are the published (scvi-tools) ones."""

    n_hidden: int = setting(128, "Hidden units per layer (default 128).", check=positive_int)
    n_latent: int = setting(10, "Latent dimensions (default 10).", check=positive_int)
    n_layers: int = setting(1, "Hidden layers of the encoders and the decoder (default 1).", check=positive_int)
    dropout_rate: float = setting(0.1, "Dropout of the encoders' hidden layers (default 0.1).", check=unit_interval)
    dispersion: Dispersion = setting(
        "gene",
        "Negative binomial dispersion: ``'gene'`` (one per gene), ``'gene-batch'``, ``'gene-label'`` or "
        "``'gene-cell'``.",
        choices=("gene", "gene-batch", "gene-label", "gene-cell"),
    )
    gene_likelihood: Likelihood | None = setting(
        None,
        "``'zinb'``, ``'nb'`` or ``'poisson'``. Default (``None``): ``'zinb'`` for scVI, ``'nb'`` for LDVAE, "
        "the published defaults.",
        choices=("zinb", "nb", "poisson"),
    )
    latent_distribution: Literal["normal", "ln"] = setting(
        "normal", "``'normal'`` or ``'ln'`` (logistic normal).", choices=("normal", "ln")
    )
    use_observed_lib_size: bool | None = setting(
        None,
        "Use log total counts as the library (default for scVI), or learn it with a per-batch log-normal "
        "prior (``False``; default for LDVAE).",
        choices=(True, False),
    )
    linear_decoder: bool = setting(
        False, "LDVAE: a linear, batch-normalised decoder whose loadings are interpretable.", choices=(True, False)
    )
    encode_covariates: bool = setting(
        False,
        "Feed the batch and covariates to the encoders too (off in the reference model; needed by a reference "
        "that queries will be mapped onto, see ``pp.REFERENCE_MAPPING``).",
        choices=(True, False),
    )
    deeply_inject_covariates: bool = setting(
        True, "Inject categorical covariates into every hidden layer, not just the first.", choices=(True, False)
    )
    use_batch_norm: NormChoice = setting(
        "both", "Where hidden layers are batch-normalised: ``'encoder'``, ``'decoder'``, ``'both'`` or ``'none'``.",
        choices=NORMS,
    )  # fmt: skip
    use_layer_norm: NormChoice = setting(
        "none", "Where hidden layers are layer-normalised: ``'encoder'``, ``'decoder'``, ``'both'`` or ``'none'``.",
        choices=NORMS,
    )  # fmt: skip

    def __post_init__(self) -> None:
        # settings whose default depends on the decoder are resolved here, so that a saved
        # architecture records what was built
        if self.gene_likelihood is None:
            object.__setattr__(self, "gene_likelihood", "nb" if self.linear_decoder else "zinb")
        if self.use_observed_lib_size is None:
            object.__setattr__(self, "use_observed_lib_size", not self.linear_decoder)
        super().__post_init__()


@dataclass(frozen=True)
class SCANVIArchitecture(VAEArchitecture):
    """scANVI: the scVI architecture plus the classifier's."""

    linear_classifier: bool = setting(
        False, "A single linear layer from the latent space to the labels instead of an MLP.", choices=(True, False)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dispersion == "gene-label":
            msg = (
                "scANVI does not support dispersion='gene-label' (unlabelled cells have no label); "
                "use 'gene' or 'gene-batch'."
            )
            raise ValueError(msg)
        if self.linear_decoder:
            msg = "scANVI has no linear decoder (LDVAE) variant."
            raise ValueError(msg)


@dataclass(frozen=True)
class TOTALVIArchitecture(NetworkSettings):
    """totalVI (Gayoso et al. 2021) architecture; defaults are the published (scvi-tools ``TOTALVAE``) ones."""

    n_hidden: int = setting(
        256, "Hidden units per layer of the encoder and the decoders (default 256).", check=positive_int
    )
    n_latent: int = setting(20, "Latent dimensions (default 20).", check=positive_int)
    n_layers_encoder: int = setting(2, "Hidden layers of the encoder (default 2).", check=positive_int)
    n_layers_decoder: int = setting(
        1,
        "Hidden layers of each decoder network (RNA, protein background, foreground, mixing; default 1).",
        check=positive_int,
    )
    dropout_rate_encoder: float = setting(
        0.2, "Dropout of the encoder's hidden layers (default 0.2).", check=unit_interval
    )
    dropout_rate_decoder: float = setting(
        0.2, "Dropout of the decoders' hidden layers (default 0.2).", check=unit_interval
    )
    gene_dispersion: Literal["gene", "gene-batch", "gene-label"] = setting(
        "gene",
        "RNA negative binomial dispersion: ``'gene'`` (one per gene), ``'gene-batch'`` or ``'gene-label'``.",
        choices=("gene", "gene-batch", "gene-label"),
    )
    protein_dispersion: Literal["protein", "protein-batch", "protein-label"] = setting(
        "protein",
        "Protein negative binomial dispersion: ``'protein'`` (one per protein), ``'protein-batch'`` or "
        "``'protein-label'``.",
        choices=("protein", "protein-batch", "protein-label"),
    )
    gene_likelihood: Literal["nb", "zinb"] = setting(
        "nb", "RNA count likelihood: ``'nb'`` (default) or ``'zinb'``.", choices=("nb", "zinb")
    )
    latent_distribution: Literal["normal", "ln"] = setting(
        "normal", "``'normal'`` or ``'ln'`` (logistic normal).", choices=("normal", "ln")
    )
    encode_covariates: bool = setting(
        True,
        "Feed the batch and covariates to the encoder too (default, as in scvi-tools' totalVI).",
        choices=(True, False),
    )
    deeply_inject_covariates: bool = setting(
        True, "Inject categorical covariates into every hidden layer, not just the first.", choices=(True, False)
    )
    use_observed_lib_size: bool = setting(
        True,
        "Use log total RNA counts as the library (default), or learn it with a per-batch log-normal prior (``False``).",
        choices=(True, False),
    )
    use_batch_norm: NormChoice = setting(
        "both", "Where hidden layers are batch-normalised: ``'encoder'``, ``'decoder'``, ``'both'`` or ``'none'``.",
        choices=NORMS,
    )  # fmt: skip
    use_layer_norm: NormChoice = setting(
        "none", "Where hidden layers are layer-normalised: ``'encoder'``, ``'decoder'``, ``'both'`` or ``'none'``.",
        choices=NORMS,
    )  # fmt: skip


def _layer_sizes(name: str, value) -> None:
    if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        msg = f"{name} must be a non-empty sequence of positive integers, got {value!r}."
        raise ValueError(msg)


def _boundary(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        msg = f"{name} must be None or a positive integer (the number of reference conditions), got {value!r}."
        raise ValueError(msg)


@dataclass(frozen=True)
class TRVAEArchitecture(NetworkSettings):
    """trVAE (Lotfollahi et al. 2020) architecture and MMD penalty; defaults are scArches' ``TRVAE`` ones."""

    hidden_layer_sizes: tuple[int, ...] = setting(
        (256, 64), "Hidden layer sizes of the encoder; the decoder mirrors them (default (256, 64)).",
        check=_layer_sizes,
    )  # fmt: skip
    n_latent: int = setting(10, "Latent dimensions (default 10; scArches' ``latent_dim``).", check=positive_int)
    dropout_rate: float = setting(
        0.05, "Dropout after every hidden layer (default 0.05; scArches' ``dr_rate``).", check=unit_interval
    )
    gene_likelihood: Literal["nb", "zinb", "mse"] = setting(
        "nb",
        "Reconstruction (scArches' ``recon_loss``): ``'nb'`` (default) or ``'zinb'`` on raw counts, with one "
        "dispersion per gene and condition; ``'mse'``: squared error on log-normalised values (pass them as "
        "``layer``; the integer check is then off).",
        choices=("nb", "zinb", "mse"),
    )
    use_mmd: bool = setting(
        True, "Add ``beta`` times the MMD between the conditions of each minibatch to the loss.", choices=(True, False)
    )
    mmd_on: Literal["z", "y"] = setting(
        "z", "Where the MMD is taken: ``'z'`` (the latent sample) or ``'y'`` (the first decoder layer's output).",
        choices=("z", "y"),
    )  # fmt: skip
    mmd_boundary: int | None = setting(
        None,
        "``None``: MMD between every pair of conditions. ``k``: only between the first ``k`` conditions (the "
        "reference's, in category order) and the others.",
        check=_boundary,
    )
    beta: float = setting(1.0, "Weight of the MMD term (default 1).")
    use_batch_norm: NormChoice = setting(
        "none", "Where hidden layers are batch-normalised: ``'encoder'``, ``'decoder'``, ``'both'`` or ``'none'``.",
        choices=NORMS,
    )  # fmt: skip
    use_layer_norm: NormChoice = setting(
        "both", "Where hidden layers are layer-normalised (default ``'both'``, as scArches' ``use_ln=True``).",
        choices=NORMS,
    )  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.hidden_layer_sizes, (list, range)):  # e.g. read back from JSON
            object.__setattr__(self, "hidden_layer_sizes", tuple(self.hidden_layer_sizes))
        super().__post_init__()
        if not isinstance(self.beta, (int, float)) or isinstance(self.beta, bool) or not self.beta >= 0:
            msg = f"beta must be a number >= 0, got {self.beta!r}."
            raise ValueError(msg)


def _optional_layer_sizes(name: str, value) -> None:
    if value is not None:
        _layer_sizes(name, value)


def _count(name: str, value) -> None:
    if value != 0:
        positive_int(name, value)


def _positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        msg = f"{name} must be a positive number, got {value!r}."
        raise ValueError(msg)


@dataclass(frozen=True)
class SCPOLIArchitecture(TRVAEArchitecture):
    """scPoli (De Donno et al. 2023) architecture: trVAE's networks with learned condition
    embeddings instead of one-hot conditions; defaults are scArches' ``scPoli`` ones."""

    hidden_layer_sizes: tuple[int, ...] | None = setting(
        None,
        "Hidden layer sizes of the encoder; the decoder mirrors them. Default: one layer of "
        "ceil(sqrt(n_genes)) units (scArches).",
        check=_optional_layer_sizes,
    )
    use_mmd: bool = setting(
        False, "Add ``beta`` times the MMD between conditions to the loss (off in scPoli).", choices=(True, False)
    )
    embedding_dims: int = setting(10, "Dimensions of each condition key's embedding (default 10).", check=positive_int)
    embedding_max_norm: float = setting(
        1.0, "Largest Euclidean norm of a condition embedding (default 1).", check=_positive_number
    )
    inject_condition: Literal["both", "encoder", "decoder"] = setting(
        "both", "Where the condition embeddings enter: ``'both'`` (default), ``'encoder'`` or ``'decoder'``.",
        choices=("both", "encoder", "decoder"),
    )  # fmt: skip

    n_unlabeled_prototypes: int | None = setting(
        None,
        "Prototypes of the unlabelled cells (k-means centroids in the latent space). Default: twice the number "
        "of cell types; recorded as built.",
        check=lambda name, value: value is None or positive_int(name, value),
    )

    def for_genes(self, n_genes: int) -> SCPOLIArchitecture:
        """With the default hidden layer resolved for ``n_genes`` genes: ceil(sqrt(n_genes)) units."""
        if self.hidden_layer_sizes is not None:
            return self
        return self.replace(hidden_layer_sizes=(math.ceil(math.sqrt(n_genes)),))


@dataclass(frozen=True)
class EXPIMAPArchitecture(TRVAEArchitecture):
    """expiMap (Lotfollahi et al. 2023) architecture: trVAE's encoder and a masked linear decoder
    with one latent unit per gene program; defaults are scArches' ``EXPIMAP`` ones."""

    hidden_layer_sizes: tuple[int, ...] = setting(
        (256, 256), "Hidden layer sizes of the encoder (default (256, 256)).", check=_layer_sizes
    )
    n_latent: int = setting(
        10, "Latent dimensions: set by the model to the number of gene programs in the mask.", check=positive_int
    )
    gene_likelihood: Literal["nb", "mse"] = setting(
        "nb", "``'nb'`` (default) on raw counts, or ``'mse'`` on log-normalised values.", choices=("nb", "mse")
    )
    use_mmd: bool = setting(False, "Add an MMD between conditions (off in expiMap).", choices=(True, False))
    soft_mask: bool = setting(
        False,
        "Let genes outside a program's mask enter its decoder column, kept sparse by an L1 proximal step "
        "(``alpha_l1`` in training) instead of being fixed at zero.",
        choices=(True, False),
    )
    n_ext: int = setting(
        0,
        "Unconstrained extension programs (latent units whose decoder column may use any gene), e.g. learned "
        "from a query by ``tl.map_query(..., n_ext=)``; sparsified by ``gamma_ext`` in training.",
        check=_count,
    )
    n_ext_masked: int = setting(
        0,
        "Constrained extension programs: new annotated programs with their own gene mask, added after the "
        "reference's programs by ``tl.map_query(..., new_programs=)`` (scArches' ``n_ext_m``).",
        check=_count,
    )
    soft_ext_mask: bool = setting(
        False,
        "Let genes outside a constrained extension program's mask enter its decoder column, kept sparse by the "
        "L1 step of ``alpha_l1`` (scArches' ``soft_ext_mask``).",
        choices=(True, False),
    )
    use_hsic: bool = setting(
        False,
        "Penalise the dependence (HSIC) between the extension programs and the annotated ones, so that the "
        "extensions capture what the annotated programs do not.",
        choices=(True, False),
    )
