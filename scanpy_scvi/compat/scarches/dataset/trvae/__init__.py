"""scArches' ``scarches.dataset.trvae`` (its tutorials import ``data_handling`` from here)."""
