"""CUDA figures for ``gpu_check.sh``: RegularizedVI training cells/s and matching time at 10^6 cells.

Usage::

    python3 benchmarks/gpu_figures.py --output gpu_figures.json

Training: simulate(20,000 cells x 2,000 genes), RegularizedVI defaults, one warm-up epoch then two timed
epochs, at batch 128 and 1024, with the counts densified on the host per minibatch and held on the GPU
(``counts_on_device=True``); the order alternates (host, device, host, device). Matching:
``bench_matching.simulate_embedding(10^6)`` matched into its 4 groups with ``match_groups(k=1)`` on the
device faiss chooses (the GPU index when faiss has GPU support). Each figure is written as it is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import pyro_scmodels as ps
from pyro_scmodels import matching


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training(adata, batch_size: int, counts_on_device: bool, device: str) -> float:
    model = ps.RegularizedVI(adata, seed=0)
    settings = dict(batch_size=batch_size, device=device, counts_on_device=counts_on_device, early_stopping=False,
                    progress_bar=False)
    model.train(max_epochs=1, **settings)  # warm-up
    before = len(model.history)
    _synchronize(device)
    start = time.perf_counter()
    model.train(max_epochs=3, **settings)
    _synchronize(device)
    return (len(model.history) - before) * len(model.train_indices) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script on a machine without a GPU")
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--match-cells", type=int, default=1_000_000)
    args = parser.parse_args()
    figures = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__}

    def record(key, value):
        figures[key] = value
        print(key, value, flush=True)
        args.output.write_text(json.dumps(figures, indent=1))

    adata = ps.datasets.simulate(n_cells=args.cells, n_genes=2_000, seed=0)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    for batch_size in (128, 1024):
        for repeat in range(2):
            for on_device in (False, True):
                record(f"train_cells_per_s_batch{batch_size}_{'device' if on_device else 'host'}_{repeat}",
                       training(adata, batch_size, on_device, args.device))
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_matching import simulate_embedding

    embedding, groups = simulate_embedding(args.match_cells)
    record("faiss_device", matching.resolve_faiss_device("auto"))
    start = time.perf_counter()
    matching.match_groups(embedding, groups, k=1)
    record(f"match_{args.match_cells}_cells_4_groups_s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
