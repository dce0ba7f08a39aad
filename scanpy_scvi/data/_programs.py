"""Gene programs as gene sets: GMT files read, and sets matched to a model's genes by symbol."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

Programs = str | os.PathLike | Mapping[str, Sequence[str]] | Sequence[str | os.PathLike]


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Gene sets of a GMT file: one per line, ``name <tab> description <tab> gene <tab> gene ...``."""
    sets: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) == 1 and fields[0].strip():  # some files separate by spaces
                fields = fields[0].split()
            if not fields or not fields[0].strip():
                continue
            if len(fields) < 3:
                msg = f"{path}, line {number}: a GMT line needs a name, a description and genes."
                raise ValueError(msg)
            sets[fields[0].strip()] = [g.strip() for g in fields[2:] if g.strip()]
    return sets


def gene_sets(programs: Programs) -> dict[str, list[str]]:
    """Program name -> genes, from a GMT file, several, or a dict (nothing is downloaded)."""
    if isinstance(programs, Mapping):
        sets = {str(k): [str(g) for g in v] for k, v in programs.items()}
    else:
        sets = {}
        for path in [programs] if isinstance(programs, (str, os.PathLike)) else list(programs):
            sets.update(read_gmt(path))
    if not sets:
        msg = "No gene programs given (empty GMT file or dict)."
        raise ValueError(msg)
    return sets


def program_rows(var_names: Sequence[str], sets: Mapping[str, Sequence[str]], *, genes_use_upper: bool = True) -> dict:
    """Program name -> positions in ``var_names`` of its genes (case-insensitive by default)."""
    names = pd.Index(pd.Index(var_names).astype(str))
    names = names.str.upper() if genes_use_upper else names
    position = pd.Series(np.arange(len(names)), index=names)
    position = position[~position.index.duplicated()]
    rows = {}
    for name, genes in sets.items():
        genes = [g.upper() for g in genes] if genes_use_upper else list(genes)
        rows[name] = position.reindex(pd.Index(genes).unique()).dropna().to_numpy(dtype=np.int64)
    return rows
