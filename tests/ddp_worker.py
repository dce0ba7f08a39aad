"""Trains scVI once, alone or as one rank of a torchrun launch; used by test_distributed.py.

    python tests/ddp_worker.py DATA OUT --batch-size 128
    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py DATA OUT --batch-size 64 --ddp

DATA is an h5ad with counts in X, ``obs['batch']`` and ``obs['heldout']``; the held-out cells
are left out of training. Each process writes ``OUT/rank<r>.json``: a hash of the parameters
after every optimiser step, a hash of the final state (parameters and buffers), the history;
rank 0 also the held-out ELBO, the saved model (``OUT/model``) and its latent of every cell
(``OUT/latent.npy``). The data are read backed, so no process holds a copy of the counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from scanpy_scvi import SCVI
from scanpy_scvi.train import Objective, rank


def state_hash(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordingObjective(Objective):
    """The ELBO, recording a hash of the parameters after every step."""

    def __init__(self):
        self.hashes: list[str] = []

    def after_step(self, module):
        self.hashes.append(state_hash(module.parameters()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--blocks", action="store_true", help="train on the backed file itself: reads in blocks")
    args = p.parse_args()
    torch.set_num_threads(1)
    adata = ad.read_h5ad(args.data, backed="r")
    train = np.flatnonzero(~adata.obs["heldout"].to_numpy())
    data = adata if args.blocks else adata[train]  # a view of a backed file is read into memory
    model = SCVI(data, batch_key="batch", n_hidden=64, n_latent=8, random_state=0)
    recorder = RecordingObjective()
    model.objective = lambda bound, train_idx: recorder  # the ELBO, with a recording hook
    model.train(
        max_epochs=args.epochs, batch_size=args.batch_size, train_size=0.9, device="cpu",
        strategy="ddp" if args.ddp else None, progress_bar=False,
    )  # fmt: skip
    r = rank()
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "step_hashes": recorder.hashes,
        "final_state": state_hash(model.module.state_dict().values()),
        "history": model.history_,
    }
    if r == 0 and not args.blocks:
        held = adata[np.flatnonzero(adata.obs["heldout"].to_numpy())].to_memory()
        torch.manual_seed(0)  # the ELBO estimate draws z
        record["heldout_elbo"] = model.get_elbo(adata=held)
        model.save(args.out / "model")
        np.save(args.out / "latent.npy", model.get_latent_representation(adata=adata.to_memory()))
    (args.out / f"rank{r}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
