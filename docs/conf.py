"""Sphinx configuration for scanpy-scvi."""

from importlib.metadata import version as _version

project = "scanpy-scvi"
author = "scanpy-scvi developers"
copyright = "2026, scanpy-scvi developers"
release = _version("scanpy-scvi")

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]
autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
}
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_default_options = {"members": True, "undoc-members": False, "special-members": ""}
