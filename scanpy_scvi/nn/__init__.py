"""Pure-torch building blocks (no AnnData here): modules, their architectures, likelihoods."""

from ._architecture import SCANVIArchitecture, VAEArchitecture
from ._likelihoods import sample_counts
from ._numpy import to_numpy
from ._scanvae import SCANVAE
from ._vae import VAE

__all__ = ["SCANVAE", "VAE", "SCANVIArchitecture", "VAEArchitecture", "sample_counts", "to_numpy"]
