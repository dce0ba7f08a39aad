"""Pure-torch building blocks (no AnnData here): modules, their architectures, likelihoods."""

from ._architecture import (
    EXPIMAPArchitecture,
    SCANVIArchitecture,
    SCPOLIArchitecture,
    TOTALVIArchitecture,
    TRVAEArchitecture,
    VAEArchitecture,
)
from ._expimap import ProgramVAE, hsic
from ._likelihoods import log_nb_mixture, sample_counts, sample_nb_mixture
from ._numpy import to_numpy
from ._scanvae import SCANVAE, Classifier
from ._scpoli import EmbeddingVAE
from ._totalvae import TOTALVAE
from ._trvae import ConditionalVAE, mmd_between_conditions
from ._vae import VAE

__all__ = [
    "SCANVAE",
    "TOTALVAE",
    "VAE",
    "Classifier",
    "ConditionalVAE",
    "EXPIMAPArchitecture",
    "EmbeddingVAE",
    "ProgramVAE",
    "SCANVIArchitecture",
    "SCPOLIArchitecture",
    "TOTALVIArchitecture",
    "TRVAEArchitecture",
    "VAEArchitecture",
    "hsic",
    "log_nb_mixture",
    "mmd_between_conditions",
    "sample_counts",
    "sample_nb_mixture",
    "to_numpy",
]
