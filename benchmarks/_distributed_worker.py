"""One rank of a ``bench_distributed.py`` measurement (started by torchrun; rank 0 writes the result).

Builds the simulated cells (same seed on every rank) or opens ``--h5ad`` backed, trains RegularizedVI one warm-up epoch,
then times further epochs and writes ``{"cells_per_s", "seconds", "epochs", ...}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import anndata
import torch

import pyro_scmodels as ps
from pyro_scmodels.distributed import is_writer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--genes", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--result", required=True)
    parser.add_argument("--h5ad", default=None, help="train from this file opened backed (raw counts in .X)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.h5ad:
        adata = anndata.read_h5ad(args.h5ad, backed="r")
        ps.RegularizedVI.setup_anndata(adata, batch_key="batch")
    else:
        adata = ps.datasets.simulate(n_cells=args.cells, n_genes=args.genes, seed=0)
        ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, seed=0)
    # under torchrun with one process this is plain single-process training (the baseline)
    settings = dict(batch_size=args.batch_size, early_stopping=False, progress_bar=False, accelerator=args.accelerator,
                    devices="auto")
    model.train(max_epochs=1, **settings)  # warm-up (process group, DDP buckets, allocator)
    before = len(model.history)
    start = time.perf_counter()
    # max_epochs counts this call's epochs (a second call trains that many more); the rows are counted all the same
    model.train(max_epochs=args.epochs, **settings)
    seconds = time.perf_counter() - start
    epochs = len(model.history) - before
    if is_writer():
        n_train = len(model.train_indices)
        with open(args.result, "w") as handle:
            json.dump({"cells_per_s": n_train * epochs / seconds, "seconds": seconds, "epochs": epochs,
                       "n_train": n_train, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}, handle)


if __name__ == "__main__":
    main()
