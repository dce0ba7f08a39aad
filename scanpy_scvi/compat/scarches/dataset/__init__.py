"""scArches' ``scarches.dataset``: the data helpers its tutorials import."""

from .trvae.data_handling import remove_sparsity

__all__ = ["remove_sparsity"]
