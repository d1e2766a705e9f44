"""CUDA figures for ``gpu_check.sh``: training cells/s against scvi-tools SCVI, and matching 10^6 cells.

Usage::

    python3 benchmarks/gpu_figures.py --output gpu_figures.json [--device cpu --cells 2000 --match-cells 20000]

Training: ``simulate(20,000 cells x 2,000 genes)``; both tools train the architecture of
``bench_train.py`` (128 hidden units, 10 latent dimensions, 1 layer, 90 % of the cells, validation
every epoch), one warm-up epoch and then 3 timed epochs, at batch 128 and 1024. In each round the
order is: ours with counts densified on the host per minibatch, scvi-tools SCVI (its own data loader,
``accelerator="gpu"``), ours with the counts held on the GPU (``counts_on_device=True``); two rounds
(A B C A B C). Matching: ``bench_matching.simulate_embedding(10^6)`` (50 dimensions, 4 groups)
matched with ``match_groups(k=1)`` on the device faiss chooses (exact, the GPU index when faiss has
GPU support), twice; then on the CPU (IVF at this size) once, and recall@1 of the CPU's matches
against the exact ones over every cell (a differing index with an equal distance counts as a tie).
Each figure is added to ``--output`` (kept across calls with different ``--parts``) as soon as it is
measured. ``--device cpu`` is a dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_worker import N_HIDDEN, N_LATENT, N_LAYERS, TRAIN_SIZE  # noqa: E402
from bench_matching import simulate_embedding  # noqa: E402

import pyro_scmodels as ps  # noqa: E402
from pyro_scmodels import matching  # noqa: E402

TIMED_EPOCHS = 3


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_ours(adata, batch_size: int, device: str, counts_on_device: bool, direct: bool = True,
               compile: bool = False) -> float:
    """Training cells per second of RegularizedVI over the timed epochs (``direct=False``: Pyro's Trace_ELBO;
    ``compile=True``: ``train(compile=True)``, compiled in the warm-up epoch)."""
    from pyro_scmodels.models.regularizedvi_module import RegularizedVIModel

    RegularizedVIModel.direct_elbo = direct  # the class's declaration decides (infer.ELBOLoss)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, n_hidden=N_HIDDEN, n_latent=N_LATENT, n_layers=N_LAYERS, seed=0)
    settings = dict(batch_size=batch_size, train_size=TRAIN_SIZE, device=device, counts_on_device=counts_on_device,
                    early_stopping=False, progress_bar=False, compile=compile)
    model.train(max_epochs=1, **settings)  # warm-up: CUDA kernels, allocator (and compiling)
    _synchronize(device)
    start = time.perf_counter()
    model.train(max_epochs=TIMED_EPOCHS, **settings)  # as in scvi-tools: epochs more from the current weights
    _synchronize(device)
    seconds = time.perf_counter() - start
    RegularizedVIModel.direct_elbo = True
    if model.trainer.elbo_loss.direct is not direct:
        raise RuntimeError(f"asked for direct={direct}, trained with direct={model.trainer.elbo_loss.direct}")
    return TIMED_EPOCHS * len(model.train_indices) / seconds


def train_scvi(adata, batch_size: int, device: str) -> float:
    """Training cells per second of scvi-tools' SCVI (negative binomial) over the timed epochs."""
    import logging
    import warnings

    import scvi

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "scvi", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.seed = 0
    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = scvi.model.SCVI(adata, n_hidden=N_HIDDEN, n_latent=N_LATENT, n_layers=N_LAYERS, gene_likelihood="nb")
    settings = dict(batch_size=batch_size, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                    train_size=TRAIN_SIZE, early_stopping=False, enable_progress_bar=False, check_val_every_n_epoch=1)
    model.train(max_epochs=1, **settings)
    _synchronize(device)
    start = time.perf_counter()
    model.train(max_epochs=TIMED_EPOCHS, **settings)
    _synchronize(device)
    return TIMED_EPOCHS * len(model.train_indices) / (time.perf_counter() - start)


def recall_against(exact: dict, other: dict) -> float:
    """Fraction of (cell, group) first matches of ``other`` equal to ``exact``'s, ties (equal distance) counted."""
    hits = total = 0
    for label, reference in exact.items():
        found = other[label]
        same = found.indices[:, 0] == reference.indices[:, 0]
        tie = np.isclose(found.distances[:, 0], reference.distances[:, 0], rtol=1e-5, atol=1e-6)
        hits += int(np.sum(same | tie))
        total += same.size
    return hits / total


def training_figures(args, record, attempt) -> None:
    """Training cells/s, two rounds of: ours (host counts), SCVI, ours (device counts); with ``--trace-too`` each
    of ours also with Pyro's Trace_ELBO (the A/B of the direct ELBO), with ``--compiled-too`` also with
    ``train(compile=True)``."""
    adata = ps.datasets.simulate(n_cells=args.cells, n_genes=2_000, seed=0)
    forms = ([("", True, False)] + ([("_trace", False, False)] if args.trace_too else [])
             + ([("_compiled", True, True)] if args.compiled_too else []))
    for batch_size in args.batch_sizes:
        for round_ in range(2):
            for suffix, direct, compile in forms:
                attempt(f"ours_host{suffix}_b{batch_size}_r{round_}", train_ours, adata.copy(), batch_size, args.device,
                        False, direct, compile)
            attempt(f"scvi_b{batch_size}_r{round_}", train_scvi, adata, batch_size, args.device)
            for suffix, direct, compile in forms:
                attempt(f"ours_device{suffix}_b{batch_size}_r{round_}", train_ours, adata.copy(), batch_size,
                        args.device, True, direct, compile)


def matching_figures(args, record, figures, cpu_too: bool) -> None:
    """Matching ``--match-cells`` cells into 4 groups on faiss' device, twice; then on the CPU with recall."""
    embedding, groups = simulate_embedding(args.match_cells)
    on_gpu = args.device.startswith("cuda")
    record("faiss_device", matching.resolve_faiss_device("auto" if on_gpu else "cpu"))
    exact = None
    for repeat in range(2):
        start = time.perf_counter()
        exact = matching.match_groups(embedding, groups, k=1, device="auto" if on_gpu else "cpu",
                                      method="exact" if figures["faiss_device"] == "cuda" else "auto")
        record(f"match_{args.match_cells}_auto_s_{repeat}", time.perf_counter() - start)
    if cpu_too and figures["faiss_device"] == "cuda":
        import faiss

        record("cpu_ivf_threads", faiss.omp_get_max_threads())
        start = time.perf_counter()
        approximate = matching.match_groups(embedding, groups, k=1, device="cpu")
        record(f"match_{args.match_cells}_cpu_s", time.perf_counter() - start)
        record("cpu_recall_at_1_vs_gpu_exact", recall_against(exact, approximate))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script on a machine without a GPU")
    parser.add_argument("--parts", nargs="+", choices=["training", "matching", "cpu-matching"],
                        default=["training", "matching", "cpu-matching"],
                        help="cpu-matching: matching again on the CPU (IVF), with recall@1 against the GPU's")
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--match-cells", type=int, default=1_000_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--trace-too", action="store_true", help="each of ours also with Pyro's Trace_ELBO")
    parser.add_argument("--compiled-too", action="store_true", help="each of ours also with train(compile=True)")
    args = parser.parse_args()
    figures = json.loads(args.output.read_text()) if args.output.exists() else {}
    figures.update(device=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                   torch=torch.__version__, cpu_threads=torch.get_num_threads())
    figures[f"loadavg_before_{'_'.join(args.parts)}"] = os.getloadavg()

    def record(key, value):
        figures[key] = value
        print(key, value, flush=True)
        args.output.write_text(json.dumps(figures, indent=1))

    def attempt(key, function, *arguments):
        # one failing tool (e.g. scvi-tools' import on that image) must not cost the other figures
        try:
            record(key, function(*arguments))
        except Exception:  # noqa: BLE001
            record(key, "failed: " + traceback.format_exc(limit=3)[-600:])

    if "training" in args.parts:
        training_figures(args, record, attempt)
    if "matching" in args.parts:
        matching_figures(args, record, figures, cpu_too="cpu-matching" in args.parts)
    record(f"loadavg_after_{'_'.join(args.parts)}", os.getloadavg())


if __name__ == "__main__":
    main()
