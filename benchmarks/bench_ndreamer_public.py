"""NDreamer end to end against the public NDreamer: wall time, time per pass and peak memory.

Usage::

    python benchmarks/bench_ndreamer_public.py --public-python /path/to/venv/bin/python [--cells 4000] [--no-write]
        [--genes 1500] [--batches 3] [--rounds 1] [--output PATH]

Data (issue 13): ``datasets.simulate(n_cells, n_genes, n_batches, effect_modifier=1.0)``, seed 0. Each
tool runs in a fresh process with one torch thread, end to end: preprocessing (its HVGs, normalisation,
Leiden pseudo-labels), training, and ITE for every cell. The runs alternate, ours first and last
(ours, public, ours, ... for ``--rounds`` public runs), so that a change in the machine's load shows
up as a difference between our two runs rather than as a false ratio.

Same number of passes over the data: ours trains its default 15 passes; the public code's "epoch" draws
2,048 cells from every batch x condition group (with replacement when a group is smaller), so it gets
``round(15 * n_cells / (2048 * groups))`` epochs (5 for 4,000 cells in 6 groups: 15.4 passes). The public
NDreamer is installed from its repository in its own interpreter (``--public-python`` or
``NDREAMER_PYTHON``) and run by ``_public_ndreamer_worker.py``, never imported here.

Peak memory is the child's maximum resident set size (``os.wait4``). Per-cell ITE correlation and CATE
correlation (:func:`pyro_scmodels.metrics.effect_recovery`) are printed beside the times, with causal
matching (k = 1) for both, the public code's only setting, and with our default k as well.
The figures go in the ``## NDreamer against the public NDreamer (bench_ndreamer_public.py)`` section
of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware_facts, now, run_single_threaded, section_header, write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
TITLE = "## NDreamer against the public NDreamer (bench_ndreamer_public.py)"
PUBLIC_BATCH = 2048  # cells the public code draws from each group per epoch (its default batch_size)


def ours_worker(source: str, output: str) -> None:
    """Child process: this package's NDreamer at its defaults, end to end, on the counts in ``source``."""
    import anndata
    import torch

    import pyro_scmodels as ps
    from pyro_scmodels.ndreamer import _constants as K

    torch.set_num_threads(1)
    adata = anndata.read_h5ad(source)
    start = time.perf_counter()
    nd = ps.NDreamer(adata, condition_key="condition", control_name="control", batch_key="batch", device="cpu", seed=0)
    nd.train(progress_bar=False)
    trained = time.perf_counter()
    results = {k: nd.estimate_ite(nearest_neighbor=k).layers["ite_stimulated"].copy() for k in (1, K.NEAREST_NEIGHBOR)}
    end = time.perf_counter()
    np.savez(output, genes=np.asarray(nd.results.var_names, dtype=str), k1=results[1],
             default=results[K.NEAREST_NEIGHBOR], train_seconds=trained - start, seconds=end - start,
             passes=K.PASSES)


def score(adata, estimate, genes) -> dict:
    """Per-cell r and CATE r of an ITE matrix (stimulated cells scored)."""
    from pyro_scmodels import metrics as M

    scores = M.effect_recovery(adata, estimate, genes=list(genes))
    return {"per_cell_r": scores["per_cell_r"], "cate_r": scores["cate_r"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=4000)
    parser.add_argument("--genes", type=int, default=1500)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="public runs; ours runs one more time than this")
    parser.add_argument("--public-python", default=os.environ.get("NDREAMER_PYTHON"))
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print the figures without writing --output")
    parser.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        ours_worker(*args._worker)
        return
    if not args.public_python:
        raise SystemExit("give --public-python (or NDREAMER_PYTHON): an interpreter with the public NDreamer installed")

    import anndata
    import scipy.sparse as sp

    import pyro_scmodels as ps
    from pyro_scmodels.ndreamer import _constants as K
    from pyro_scmodels.ndreamer.preprocess import log_normalise

    adata = ps.datasets.simulate(n_cells=args.cells, n_genes=args.genes, n_batches=args.batches, seed=0,
                                 effect_modifier=1.0)
    groups = adata.obs["batch"].nunique() * adata.obs["condition"].nunique()
    epochs = max(1, round(K.PASSES * args.cells / (PUBLIC_BATCH * groups)))
    public_passes = epochs * PUBLIC_BATCH * groups / args.cells
    rows, load_before = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        counts, lognorm = os.path.join(work, "counts.h5ad"), os.path.join(work, "lognorm.h5ad")
        anndata.AnnData(X=sp.csr_matrix(adata.layers["counts"]), obs=adata.obs[["condition", "batch"]].astype(str),
                        var=adata.var[[]]).write_h5ad(counts)
        anndata.AnnData(X=sp.csr_matrix(log_normalise(adata, "counts")), obs=adata.obs[["condition", "batch"]].astype(str),
                        var=adata.var[[]]).write_h5ad(lognorm)
        for round_ in range(2 * args.rounds + 1):
            output = os.path.join(work, f"run{round_}.npz")
            if round_ % 2 == 0:
                wall, rss = run_single_threaded([sys.executable, __file__, "--_worker", counts, output])
                rss /= 1024  # GiB
                stored = np.load(output)
                row = {"tool": "pyro_scmodels NDreamer", "passes": float(stored["passes"]), "wall": wall, "rss": rss,
                       "inside": float(stored["seconds"]),
                       **{f"k1_{m}": v for m, v in score(adata, stored["k1"], stored["genes"]).items()},
                       **{f"k{K.NEAREST_NEIGHBOR}_{m}": v
                          for m, v in score(adata, stored["default"], stored["genes"]).items()}}
            else:
                workdir = os.path.join(work, f"public{round_}")
                os.makedirs(workdir)
                wall, rss = run_single_threaded([args.public_python, str(HERE / "_public_ndreamer_worker.py"), lognorm,
                                                 output, workdir, "0", str(epochs)])
                rss /= 1024  # GiB
                stored = np.load(output)
                estimate = np.zeros((adata.n_obs, len(stored["genes"])), dtype=np.float32)
                estimate[stored["rows"]] = stored["ite"]
                row = {"tool": "public NDreamer", "passes": float(stored["epochs"]) * PUBLIC_BATCH * groups / args.cells,
                       "wall": wall, "rss": rss, "inside": float(stored["seconds"]),
                       **{f"k1_{m}": v for m, v in score(adata, estimate, stored["genes"]).items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    load_after = os.getloadavg()
    ours = [row for row in rows if row["tool"] != "public NDreamer"]
    public = [row for row in rows if row["tool"] == "public NDreamer"]
    header = (f"| run | tool | passes | wall s (process) | s per pass | peak RSS GiB | per-cell r k=1 | CATE r k=1 | "
              f"per-cell r k={K.NEAREST_NEIGHBOR} | CATE r k={K.NEAREST_NEIGHBOR} |")
    lines = [header, "|" + "---|" * 10]
    for number, row in enumerate(rows, 1):
        default = [f"{row[f'k{K.NEAREST_NEIGHBOR}_{m}']:.3f}" if f"k{K.NEAREST_NEIGHBOR}_{m}" in row else ""
                   for m in ("per_cell_r", "cate_r")]
        lines.append(f"| {number} | {row['tool']} | {row['passes']:.1f} | {row['wall']:.0f} | "
                     f"{row['wall'] / row['passes']:.1f} | {row['rss']:.2f} | {row['k1_per_cell_r']:.3f} | "
                     f"{row['k1_cate_r']:.3f} | {default[0]} | {default[1]} |")
    ratio = np.mean([r["wall"] / r["passes"] for r in public]) / np.mean([r["wall"] / r["passes"] for r in ours])
    text = "\n".join(lines) + (
        f"\n\n- time per pass, public / ours: **{ratio:.1f}x** (mean of each tool's runs; end to end, process wall time)"
        f"\n- peak RSS: ours {max(r['rss'] for r in ours):.2f} GiB, public {max(r['rss'] for r in public):.2f} GiB"
        f"\n- public epochs: {epochs} ({public_passes:.1f} passes); ours: {K.PASSES} passes"
        f"\n- targets (issue 13): >= 10x faster end to end, peak RSS <= 2 GB"
        f"\n- load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, "
        f"after {tuple(round(v, 2) for v in load_after)}; one thread per process\n")
    print(text)
    facts = {"data": f"simulate(n_cells={args.cells}, n_genes={args.genes}, n_batches={args.batches}, "
                     "effect_modifier=1.0), seed 0", **hardware_facts()}
    if args.no_write:
        return
    write_section(args.output, TITLE, section_header(TITLE, now(), facts) + text)


if __name__ == "__main__":
    main()
