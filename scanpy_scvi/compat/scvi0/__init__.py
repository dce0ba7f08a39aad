"""The door for code written for ``scanpy.external.pp.scvi`` and the scvi 0.x it wrapped.

``pp.scvi`` is the successor of ``scanpy.external.pp.scvi``; this module holds what is foreign
in that contract, so that ``pp.scvi`` itself speaks our vocabulary:

- :func:`architecture_from_vae_kwargs` and :func:`train_from_trainer_kwargs` translate the
  ``model_kwargs`` (scvi 0.6 ``VAE`` / ``LDVAE`` arguments) and ``trainer_kwargs`` (0.6
  ``UnsupervisedTrainer`` / ``Trainer`` arguments) of the historical call into our settings;
- :class:`Posterior` is what ``pp.scvi(..., return_posterior=True)`` returns, as the
  historical function did: the 0.x ``Posterior`` methods, each over the model's own methods
  and ``tl`` functions. :func:`load_posterior` reads what :meth:`Posterior.save_posterior`
  wrote.

Numbers follow our models: where 0.x differs (a natural-log fold change, a loss called ELBO),
the method's docstring says so.
"""

from __future__ import annotations

from ._arguments import OUR_TRAIN_SETTINGS, architecture_from_vae_kwargs, train_from_trainer_kwargs
from ._posterior import Posterior, load_posterior

__all__ = [
    "OUR_TRAIN_SETTINGS",
    "Posterior",
    "architecture_from_vae_kwargs",
    "load_posterior",
    "train_from_trainer_kwargs",
]
