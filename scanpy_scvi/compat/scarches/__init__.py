"""The door for code written for scArches 0.6: ``import scarches as sca`` becomes
``from scanpy_scvi.compat import scarches as sca``.

- :mod:`~scanpy_scvi.compat.scarches.models`: ``TRVAE``, ``EXPIMAP`` and ``scPoli``, subclasses
  of our :class:`~scanpy_scvi.TRVAE`, :class:`~scanpy_scvi.EXPIMAP` and
  :class:`~scanpy_scvi.SCPOLI` that take scArches' constructor and ``train`` arguments (with
  scArches' defaults) and add scArches' methods, each a few lines over our model API. Their
  files are our model files: they load with either class.
- :mod:`~scanpy_scvi.compat.scarches.utils`: ``add_annotations`` (expiMap's gene-program mask).
- :mod:`~scanpy_scvi.compat.scarches.dataset`: ``remove_sparsity`` (also at scArches' path
  ``dataset.trvae.data_handling``).

An argument that has no meaning here raises, naming it and what to use instead; the page
:doc:`/compat-scarches` maps every method and argument.
"""

from . import dataset, models, utils

__all__ = ["dataset", "models", "utils"]
