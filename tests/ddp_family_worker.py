"""Trains one model of the scArches family as one rank of a torchrun launch, on a backed file;
used by test_distributed.py.

    torchrun --standalone --nproc-per-node 2 tests/ddp_family_worker.py DATA OUT trvae

Each rank writes ``OUT/rank<r>.json``: a hash of the final state (parameters and buffers) and
the history.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import torch
from ddp_worker import state_hash  # this script's folder is on sys.path

import scanpy_scvi as ss
from scanpy_scvi.train import rank

OWN = {"trvae": {}, "scpoli": {"cell_type_keys": "labels", "pretraining_epochs": 2}, "expimap": {}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("model", choices=sorted(OWN))
    args = p.parse_args()
    torch.set_num_threads(1)
    adata = ad.read_h5ad(args.data, backed="r")  # read in blocks, each rank its own
    model = getattr(ss.pp, args.model)(
        adata, batch_key="batch", max_epochs=4, use_highly_variable_genes=False, strategy="ddp", device="cpu",
        progress_bar=False, return_model=True, **OWN[args.model],
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"final_state": state_hash(model.module.state_dict().values()), "history": model.history_}
    (args.out / f"rank{rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
