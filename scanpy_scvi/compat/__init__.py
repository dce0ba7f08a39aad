"""Doors for code written for the systems this package replaces.

Our own interface is :mod:`scanpy_scvi.pp`, :mod:`scanpy_scvi.tl` and the model classes of
:mod:`scanpy_scvi.model`. Each module here is a thin adapter for one foreign system, over
that interface, so that such code runs with only its import changed:

- :mod:`scanpy_scvi.compat.scvi0`: ``scanpy.external.pp.scvi`` and the scvi 0.x
  ``Posterior`` it returned (``pp.scvi(..., return_posterior=True)``), and the 0.x ``VAE`` /
  ``UnsupervisedTrainer`` argument names of its ``model_kwargs`` / ``trainer_kwargs``.
- :mod:`scanpy_scvi.compat.scvi_tools`: scvi-tools' ``scvi.model.SCVI``, ``SCANVI`` and
  ``TOTALVI`` workflow (``setup_anndata``, ``train(accelerator=...)``, ...).
- :mod:`scanpy_scvi.compat.scarches`: scArches' ``TRVAE``, ``EXPIMAP`` and ``scPoli``
  (constructor, ``train`` and method names).
"""
