"""Data-parallel training throughput: cells/s of RegularizedVI with 1 and 2 CPU processes (and 1..k GPUs).

Usage::

    python benchmarks/bench_distributed.py [--quick] [--rounds R] [--cells N] [--backed] [--gpus K] [--output PATH]

Each measurement is a ``torchrun --standalone --nproc_per_node=P`` launch of
``_distributed_worker.py`` (one torch thread per process, the gloo backend on the CPU, NCCL on
GPUs): simulated cells, one warm-up epoch, then timed epochs; throughput = training cells x
epochs / seconds. The process counts alternate (1, 2, 1, 2, ...) so that a change in the load of
a shared machine falls on both, and the 1-minute load average is recorded before and after each
run. ``--backed`` adds the same runs reading the counts from an h5ad opened ``backed="r"`` (the
chunked on-disk loader, each rank reading ahead only its shards). Scaling efficiency = cells/s with P processes / (P x cells/s with 1), from the medians.
The global minibatch is the same for every P (each rank takes 1/P of it), so the optimisation is
the same and only its speed changes. Results go to the ``## Data-parallel training
(bench_distributed.py)`` section of ``benchmarks/RESULTS.md``; ``--quick`` writes nothing
unless ``--output`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import hardware_facts, now, package_version, section_header, write_section

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "RESULTS.md"
SECTION_TITLE = "## Data-parallel training (bench_distributed.py)"
FULL = dict(cells=8000, genes=1000, epochs=3, batch_size=1024)
QUICK = dict(cells=1000, genes=200, epochs=1, batch_size=256)


def write_cells(sizes: dict, path: Path) -> Path:
    """The simulated cells of ``sizes`` with their raw counts in X, as an h5ad read backed by the workers."""
    import pyro_scmodels as ps

    adata = ps.datasets.simulate(n_cells=sizes["cells"], n_genes=sizes["genes"], seed=0)
    adata.X = adata.layers.pop("counts")
    for layer in list(adata.layers):
        del adata.layers[layer]
    adata.write_h5ad(path)
    return path


def measure(processes: int, sizes: dict, accelerator: str, workdir: Path, h5ad: Path | None = None) -> dict:
    """One torchrun launch with ``processes`` ranks; the worker's JSON plus the load before and after."""
    result = workdir / f"result-{processes}-{os.getpid()}-{len(list(workdir.iterdir()))}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(HERE / "_distributed_worker.py"), "--cells", str(sizes["cells"]), "--genes", str(sizes["genes"]),
               "--epochs", str(sizes["epochs"]), "--batch-size", str(sizes["batch_size"]),
               "--accelerator", accelerator, "--result", str(result)] + (["--h5ad", str(h5ad)] if h5ad else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    load_before = os.getloadavg()[0]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    load_after = os.getloadavg()[0]
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    return {**json.loads(result.read_text()), "processes": processes, "load_before": load_before, "load_after": load_after}


def summarise(runs: list[dict], label: str) -> tuple[list[str], list[str]]:
    """Table rows of every run and of the medians with the scaling efficiency."""
    rows = [f"| {label} | {r['processes']} | {r['cells_per_s']:,.0f} | {r['seconds']:.1f} | {r['load_before']:.2f} / "
            f"{r['load_after']:.2f} |" for r in runs]
    counts = sorted({r["processes"] for r in runs})
    median = {p: statistics.median(r["cells_per_s"] for r in runs if r["processes"] == p) for p in counts}
    summary = [f"| {label} | {p} | {median[p]:,.0f} | {median[p] / (p * median[counts[0]]):.2f} |" for p in counts]
    return rows, summary


def load_note(runs: list[dict]) -> str:
    """What the load average says about the figures (a shared machine leaves P processes fewer than P cores)."""
    loads = [value for r in runs for value in (r["load_before"], r["load_after"])]
    cpus = os.cpu_count() or 1
    note = f"The 1-minute load average during the runs was {min(loads):.1f} to {max(loads):.1f} on {cpus} logical CPUs."
    if max(loads) > cpus:
        note += (" The machine was shared and over-subscribed: the processes of a run did not have a free core each, "
                 "so the efficiency measures this loaded machine, not the scaling on idle cores.")
    return note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (default: %(default)s)")
    parser.add_argument("--gpus", type=int, default=0, help="also measure 1..K GPUs (one process each)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--cells", type=int, default=None, help="simulated cells (default 8,000; --quick 1,000)")
    parser.add_argument("--backed", action="store_true",
                        help="also train from an h5ad opened backed (the chunked on-disk loader; each rank reads its shards)")
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    if args.cells is not None:
        sizes["cells"] = args.cells
    plans = [("CPU (gloo)", "cpu", [1, 2] * args.rounds, False)]
    if args.backed:
        plans.append(("CPU (gloo), counts on disk", "cpu", [1, 2] * args.rounds, True))
    if args.gpus:
        plans.append(("GPU (NCCL)", "gpu", list(range(1, args.gpus + 1)) * args.rounds, False))
    rows, summary, all_runs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        h5ad = write_cells(sizes, Path(tmp) / "cells.h5ad") if args.backed else None
        for label, accelerator, order, backed in plans:
            runs = []
            for processes in order:
                runs.append(measure(processes, sizes, accelerator, Path(tmp), h5ad if backed else None))
                r = runs[-1]
                print(f"{label} P={processes}: {r['cells_per_s']:,.0f} cells/s ({r['seconds']:.1f} s, load "
                      f"{r['load_before']:.2f} -> {r['load_after']:.2f})")
            all_runs += runs
            run_rows, summary_rows = summarise(runs, label)
            rows += run_rows
            summary += summary_rows
    facts = {**hardware_facts(), "torch": package_version("torch"), "pyro_scmodels": package_version("pyro_scmodels")}
    section = section_header(SECTION_TITLE, now(), facts) + (
        f"Settings: RegularizedVI defaults (n_hidden 128, n_latent 10), simulated {sizes['cells']:,} cells x "
        f"{sizes['genes']:,} genes, global minibatch {sizes['batch_size']} (each of P ranks takes 1/P), one torch "
        f"thread per process, 1 warm-up epoch then {sizes['epochs']} timed epoch(s) per run; runs alternate P as listed.\n\n"
        "| backend | processes P | cells/s (median) | scaling efficiency |\n|---|---:|---:|---:|\n" + "\n".join(summary)
        + "\n\nEvery run, in order:\n\n| backend | processes | cells/s | seconds | 1-min load before / after |\n"
        "|---|---:|---:|---:|---|\n" + "\n".join(rows) + "\n\n" + load_note(all_runs) + "\n\nCommand:\n\n```\npython benchmarks/bench_distributed.py"
        + (" --quick" if args.quick else "") + (f" --cells {args.cells}" if args.cells else "") + (" --backed" if args.backed else "") + (f" --gpus {args.gpus}" if args.gpus else "")
        + "\n```\n"
    )
    print("\n" + section)
    output = args.output if args.output is not None else (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        write_section(output, SECTION_TITLE, section)


if __name__ == "__main__":
    main()
