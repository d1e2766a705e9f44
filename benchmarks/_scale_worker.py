"""One measured stage of ``bench_scale.py``, run in a fresh process so that its peak RSS is its own.

Usage::

    python benchmarks/_scale_worker.py STAGE --store DIR --n-cells N --result FILE.json

Stages: ``write`` (the on-disk store), ``read`` (epoch-like reads: anndata's backed reader against
the package's chunked reader), ``train`` (setup and one epoch of RegularizedVI from disk),
``infer`` (the latent of every cell, from disk), ``ndreamer`` (``NDreamer.from_model`` on the backed
data: matching, CATE per cell type, the ITE of 10,000 cells), ``match`` (``match_groups`` on the
saved latent, 4 groups). ``--device`` (default ``cpu``) is where torch and faiss run; ``gpu_check.sh``
runs the same stages with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from _common import status_mib

N_GENES = 2000
BASE_CELLS = 20_000
BLOCK = 50_000
THIN = 0.5  # binomial thinning of resampled cells: every block's counts are new draws
TRAIN_BATCH = 1024
ITE_CELLS = 10_000


def store_path(store: Path, n_cells: int) -> Path:
    return store / f"cells_{n_cells}.h5ad"


def write_store(store: Path, n_cells: int) -> dict:
    """The simulator's cells (20,000 x 2,000 genes), resampled and thinned to ``n_cells``, written block by block."""
    import anndata
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    store.mkdir(parents=True, exist_ok=True)

    import pyro_scmodels as ps

    base = ps.datasets.simulate(n_cells=BASE_CELLS, n_genes=N_GENES, n_batches=4, seed=0)
    counts = sp.csr_matrix(base.layers["counts"]).astype(np.int32)
    rng = np.random.default_rng(1)
    picks = rng.integers(0, BASE_CELLS, n_cells)
    obs = base.obs[["cell_type", "batch", "condition"]].iloc[picks].reset_index(drop=True)
    obs.index = pd.Index([f"cell_{i}" for i in range(n_cells)])
    path = store_path(store, n_cells)
    partial = path.with_suffix(".partial.h5ad")
    # the cell table and an empty X first; X is then replaced by the blocks, appended one at a time
    anndata.AnnData(X=sp.csr_matrix((n_cells, N_GENES), dtype=np.float32), obs=obs, var=base.var[[]]).write_h5ad(partial)
    with h5py.File(partial, "r+") as handle:
        del handle["X"]
        for start in range(0, n_cells, BLOCK):
            block = counts[picks[start : start + BLOCK]]
            block.data = rng.binomial(block.data, THIN).astype(np.float32)
            block = sp.csr_matrix(block, dtype=np.float32)
            if start == 0:
                write_elem(handle, "X", block)
            else:
                sparse_dataset(handle["X"]).append(block)
    os.replace(partial, path)
    backed = anndata.read_h5ad(path, backed="r")
    return {"cells": int(backed.n_obs), "genes": int(backed.n_vars), "file_gib": path.stat().st_size / 2**30}


def read_rates(path: Path) -> dict:
    """Cells per second reading 1,024-cell minibatches for 40,000 cells, A B A B: anndata's reader
    (random minibatches) and the chunked reader (chunk-shuffled order, each buffer read ahead)."""
    import anndata

    from pyro_scmodels.data import CountMatrix
    from pyro_scmodels.data.on_disk import chunk_shuffled_order, read_ahead_groups

    backed = anndata.read_h5ad(path, backed="r")
    counts = CountMatrix(backed.X, validate=False)
    n = backed.n_obs
    rates = {"anndata": [], "chunked": []}
    for repeat in range(2):
        rng = np.random.default_rng(repeat)
        # a store smaller than one minibatch reads all its cells per batch
        random_batches = [np.sort(rng.choice(n, min(TRAIN_BATCH, n), replace=False)) for _ in range(40)]
        start = time.perf_counter()
        for batch in random_batches:
            backed.X[batch].toarray()
        rates["anndata"].append(sum(len(batch) for batch in random_batches) / (time.perf_counter() - start))
        order = chunk_shuffled_order(np.arange(n), rng)[: 40 * TRAIN_BATCH]
        batches = [order[s : s + TRAIN_BATCH] for s in range(0, order.size, TRAIN_BATCH)]
        start = time.perf_counter()
        for group in read_ahead_groups(batches):
            counts.hold(np.concatenate(group))
            for batch in group:
                counts.rows(batch)
        rates["chunked"].append(order.size / (time.perf_counter() - start))  # fewer cells than 40 batches on small data
    return {f"{name}_cells_per_s": values for name, values in rates.items()}


def _backed_model(store: Path, n_cells: int):
    import anndata

    import pyro_scmodels as ps

    backed = anndata.read_h5ad(store_path(store, n_cells), backed="r")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    return backed


def train(store: Path, n_cells: int, device: str = "cpu") -> dict:
    import pyro_scmodels as ps

    start = time.perf_counter()
    backed = _backed_model(store, n_cells)
    model = ps.RegularizedVI(backed, seed=0)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    model.train(max_epochs=1, batch_size=TRAIN_BATCH, device=device, progress_bar=False, early_stopping=False)
    epoch_s = time.perf_counter() - start
    model.save(str(store / f"model_{n_cells}"), overwrite=True)
    return {"setup_s": setup_s, "epoch_s": epoch_s, "train_cells_per_s": len(model.trainer.train_indices) / epoch_s}


def infer(store: Path, n_cells: int, device: str = "cpu") -> dict:
    import pyro_scmodels as ps

    backed = _backed_model(store, n_cells)
    model = ps.RegularizedVI.load(str(store / f"model_{n_cells}"), adata=backed, device=device)
    start = time.perf_counter()
    latent = model.get_latent_representation(batch_size=4096)
    seconds = time.perf_counter() - start
    np.save(store / f"latent_{n_cells}.npy", latent)
    return {"infer_s": seconds, "infer_cells_per_s": n_cells / seconds}


def ndreamer(store: Path, n_cells: int, device: str = "cpu", shrink: str | None = "clusters") -> dict:
    import pyro_scmodels as ps

    backed = _backed_model(store, n_cells)
    model = ps.RegularizedVI.load(str(store / f"model_{n_cells}"), adata=backed, device=device)
    start = time.perf_counter()
    nd = ps.NDreamer.from_model(model, condition_key="condition", control_name="control", batch_key="batch", device=device)
    cate = nd.estimate_cate("cell_type", shrink=shrink)
    cells = np.sort(np.random.default_rng(0).choice(n_cells, min(ITE_CELLS, n_cells), replace=False))
    ite = nd.estimate_ite(indices=cells, shrink=shrink)
    seconds = time.perf_counter() - start
    return {"ndreamer_s": seconds, "cate_rows": int(len(cate)), "ite_shape": list(ite.shape), "shrink": shrink}


def match(store: Path, n_cells: int, device: str = "cpu") -> dict:
    import anndata
    import pandas as pd

    from pyro_scmodels import matching

    latent = np.load(store / f"latent_{n_cells}.npy")
    obs = anndata.read_h5ad(store_path(store, n_cells), backed="r").obs
    # 4 groups: condition x two halves of the batches (0-1 and 2-3)
    pair = np.where(obs["batch"].isin(["batch_0", "batch_1"]), "a", "b")
    groups = pd.Series(obs["condition"].astype(str).to_numpy()) + "_" + pair
    start = time.perf_counter()
    matching.match_groups(latent, groups.to_numpy(), k=1, device=device)
    return {"match_s": time.perf_counter() - start, "groups": int(groups.nunique())}


STAGES = {"write": write_store, "train": train, "infer": infer, "ndreamer": ndreamer, "match": match}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=[*STAGES, "read"])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--n-cells", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--device", default="cpu", help="torch's and faiss' device for train, infer, ndreamer, match")
    parser.add_argument("--shrink", choices=["clusters", "none"], default="clusters",
                        help="the ndreamer stage's estimate_cate / estimate_ite shrink= (none: unshrunk)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.stage == "read":
        result = read_rates(store_path(args.store, args.n_cells))
    elif args.stage == "write":
        result = write_store(args.store, args.n_cells)
    elif args.stage == "ndreamer":
        result = ndreamer(args.store, args.n_cells, args.device, None if args.shrink == "none" else args.shrink)
    else:
        result = STAGES[args.stage](args.store, args.n_cells, args.device)
    result.update(stage=args.stage, n_cells=args.n_cells, device=args.device, wall_s=time.perf_counter() - start,
                  peak_rss_gib=(status_mib("VmHWM") or float("nan")) / 1024)
    if args.device.startswith("cuda") and args.stage != "write":
        import torch

        result["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 1024**3  # torch's tensors only, not faiss'
    args.result.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
