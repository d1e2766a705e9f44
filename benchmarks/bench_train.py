"""Training throughput of ``pyro_scmodels.RegularizedVI`` on the CPU, next to scvi-tools' SCVI.

Usage::

    python benchmarks/bench_train.py [--quick] [--epochs N] [--threads N] [--batch-sizes 1024 128]  # every option: --help
        [--rounds 2] [--output PATH]

Both tools train the same architecture (``n_hidden=128``, ``n_latent=10``, ``n_layers=1``,
``train_size=0.9``, each batch size of ``--batch-sizes`` (default 1024), validation loss every epoch, no early stopping) on

1. the PBMC 3-chemistries data (``../shared/data/pbmc_10x_3chemistries_scWGParis.h5ad``
   from the repository root; skipped with a note when absent), and
2. a simulated 20,000 cells x 2,000 genes set (``pyro_scmodels.datasets.simulate``).

scvi-tools is not a dependency of the package: SCVI is measured only when ``import scvi``
works (e.g. run the script with a Python that has scvi-tools installed).

The tools alternate, A B A B for ``--rounds 2``, and the ratio is of their mean cells/s, so that a
change in the machine's load shows up as a difference between rounds, not as a false ratio; the load
average before and after is recorded. Every (dataset, tool) measurement runs in a fresh Python process (this script re-invoked
with hidden arguments), so that its peak resident memory (``VmHWM``) is its own. In that
process the model is built, trained once for 1 epoch (warm-up, not timed), then trained for
``E`` more epochs under the clock. Throughput is ``n_train_cells * E / seconds``.

Results are printed and written to the ``## Training throughput (bench_train.py)`` section of
``benchmarks/RESULTS.md`` (other sections are kept). ``--quick`` runs tiny subsets and writes
nothing unless ``--output`` is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

from _common import hardware_facts, note_lines, now, package_version, run_in_child, section_header, write_section
from _train_worker import (
    BATCH_SIZE, N_HIDDEN, N_LATENT, N_LAYERS, SEED, TRAIN_SIZE, WARMUP_EPOCHS, run_worker, scvi_available,
)

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
PBMC_PATH = REPO_ROOT.parent / "shared" / "data" / "pbmc_10x_3chemistries_scWGParis.h5ad"
DEFAULT_OUTPUT = HERE / "RESULTS.md"
SECTION_TITLE = "## Training throughput (bench_train.py)"

# default timed epochs, and the quick-mode sizes (the training settings are in _train_worker.py)
DEFAULT_EPOCHS = {"pbmc": 10, "simulated": 5}
QUICK_EPOCHS = 1
QUICK_CELLS = 500
SIMULATED_SHAPE = (20000, 2000)
TOOLS = ("pyro_scmodels", "pyro_scmodels-compiled", "pyro_scmodels-trace", "scvi-tools")
# pyro_scmodels-trace: ours with Pyro's Trace_ELBO (direct form off); -compiled: train(compile=True)
DEFAULT_TOOLS = ("pyro_scmodels", "pyro_scmodels-compiled", "scvi-tools")
OURS = ("pyro_scmodels", "pyro_scmodels-compiled", "pyro_scmodels-trace")


# ------------------------------------------------------------------------------------------
# machine facts
# ------------------------------------------------------------------------------------------
def machine_facts(threads: int) -> dict:
    """Facts about this machine and the software measured.

    Parameters
    ----------
    threads
        The number of torch intra-op threads the measurements use.

    Returns
    -------
    dict
        Human-readable values keyed by label.
    """
    import pyro
    import torch

    import pyro_scmodels

    scvi_version = package_version("scvi-tools") if scvi_available() else None
    return {
        **hardware_facts(),
        "torch threads": str(threads),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro-ppl": pyro.__version__,
        "pyro_scmodels": pyro_scmodels.__version__,
        "scvi-tools": scvi_version or "not installed",
    }


# ------------------------------------------------------------------------------------------
# the measurements (each in a fresh process running _train_worker.run_worker)
# ------------------------------------------------------------------------------------------
def measure(tool: str, data_path: Path, epochs: int, threads: int | None, workdir: Path,
            batch_size: int = BATCH_SIZE) -> dict:
    """Run one measurement in a fresh Python process (same interpreter).

    Parameters
    ----------
    tool
        Which tool to train.
    data_path
        The dataset as ``.h5ad``.
    epochs
        Timed epochs.
    threads
        torch threads for the child, or None for torch's default.
    workdir
        Scratch folder: the child's working directory (scvi/Lightning may write logs there).
    batch_size
        Minibatch size of the child.

    Returns
    -------
    dict
        The child's result, or ``{"error": ...}`` when it failed.
    """
    result_path = workdir / f"result_{tool}_{data_path.stem}.json"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--_worker", tool, "--_data", str(data_path),
        "--_epochs", str(epochs), "--_result", str(result_path), "--_batch", str(batch_size),
    ]
    if threads:
        command += ["--threads", str(threads)]
    return run_in_child(command, result_path, workdir, {"tool": tool, "epochs": epochs})


def print_result(result: dict, epochs: int, threads: int) -> None:
    """Print one successful measurement and warn when it was not the run asked for."""
    print(
        f"  {result['n_train']} training cells, {result['seconds']:.2f} s, "
        f"{result['cells_per_s']:,.0f} cells/s, torch threads {result['threads']}, "
        f"RSS loaded {result['rss_loaded_mib']:,.0f} MiB, peak {result['rss_peak_mib']:,.0f} MiB"
    )
    # fairness checks: every timed epoch ran and computed a validation loss
    for key in ("epochs_run", "validation_epochs"):
        if result.get(key) is not None and result[key] != epochs:
            print(f"  warning: {key} = {result[key]}, expected {epochs}")
    if result["threads"] != threads:
        print(f"  warning: the child used {result['threads']} torch threads, expected {threads}")


def measure_dataset(dataset: dict, tools: list[str], epochs: int, child_threads: int | None,
                    threads: int, workdir: Path, batch_size: int = BATCH_SIZE, rounds: int = 2) -> list[dict]:
    """Measure every tool on one dataset, alternating them (A B A B for two rounds).

    Our rows get ``ratio``: the mean of our cells/s over the rounds over scvi-tools' mean.
    """
    shape = f"{dataset['n_cells']:,} x {dataset['n_genes']:,}"
    rows, speed = [], {}
    for round_ in range(1, rounds + 1):
        for tool in tools:
            print(f"\n{dataset['label']} ({shape}), batch {batch_size}, round {round_}, {tool}: {WARMUP_EPOCHS} warm-up "
                  f"+ {epochs} timed epoch(s) ...", flush=True)
            result = measure(tool, dataset["path"], epochs, child_threads, workdir, batch_size)
            result.update(dataset=dataset["label"], shape=shape, batch_size=batch_size, round=round_)
            if "error" in result:
                print(f"  failed: {result['error']}")
            else:
                result["cells_per_s"] = result["n_train"] * epochs / result["seconds"]
                speed.setdefault(tool, []).append(result["cells_per_s"])
                print_result(result, epochs, threads)
            rows.append(result)
    mean = {tool: sum(values) / len(values) for tool, values in speed.items()}
    if "scvi-tools" in mean:
        for tool in OURS:
            if tool in mean:
                for row in rows:
                    if row["tool"] == tool:
                        row["ratio"] = mean[tool] / mean["scvi-tools"]
                print(f"  ratio {tool} / scvi-tools (mean cells/s over rounds): {mean[tool] / mean['scvi-tools']:.2f}")
    if "pyro_scmodels" in mean and "pyro_scmodels-trace" in mean:
        print(f"  ratio direct ELBO / Trace_ELBO: {mean['pyro_scmodels'] / mean['pyro_scmodels-trace']:.2f}")
    return rows


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def prepare_datasets(names: list[str], quick: bool, pbmc_path: Path, workdir: Path) -> list[dict]:
    """Write the datasets to ``workdir`` as ``.h5ad`` so every child reads the same cells.

    Parameters
    ----------
    names
        Datasets to prepare, among ``"pbmc"`` and ``"simulated"``.
    quick
        Use ``QUICK_CELLS`` cells only (a random PBMC subset; a smaller simulation).
    pbmc_path
        The PBMC file; the dataset is skipped with a note when it is missing.
    workdir
        Where the files go.

    Returns
    -------
    list of dict
        ``name``, ``label``, ``path``, ``n_cells``, ``n_genes`` per dataset.
    """
    import anndata
    import numpy as np

    from pyro_scmodels.datasets import simulate

    datasets = []
    for name in names:
        if name == "pbmc":
            if not pbmc_path.exists():
                print(f"PBMC data not found at {pbmc_path}: skipped.")
                continue
            adata = anndata.read_h5ad(pbmc_path)
            if quick and adata.n_obs > QUICK_CELLS:
                keep = np.sort(np.random.default_rng(SEED).choice(adata.n_obs, QUICK_CELLS, replace=False))
                adata = adata[keep].copy()
            label = "PBMC 3 chemistries"
        else:
            n_cells, n_genes = SIMULATED_SHAPE
            adata = simulate(n_cells=QUICK_CELLS if quick else n_cells, n_genes=n_genes, seed=SEED)
            label = "simulated"
        path = workdir / f"{name}.h5ad"
        adata.write_h5ad(path)
        datasets.append({"name": name, "label": label, "path": path, "n_cells": adata.n_obs, "n_genes": adata.n_vars})
    return datasets


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def results_table(rows: list[dict]) -> str:
    """Markdown table of the measurements (one row per dataset and tool).

    Parameters
    ----------
    rows
        Measurement results with ``dataset``, ``shape`` and the child's fields added.

    Returns
    -------
    str
        The table; ``ratio`` is ours / scvi-tools in cells per second, on our row.
    """
    header = (
        "| dataset | cells x genes | batch | round | tool | epochs | seconds | cells/s | warm-up epoch s | "
        "RSS loaded / peak (MiB) | ratio ours/scvi |\n|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['dataset']} | {row['shape']} | {row['batch_size']} | {row['round']} | {row['tool']} | "
                         f"{row['epochs']} | failed | failed | - | - | - |")
            continue
        ratio = f"{row['ratio']:.2f}" if row.get("ratio") is not None else "-"
        warmup = f"{row['warmup_seconds']:.1f}" if row.get("warmup_seconds") is not None else "-"
        lines.append(
            f"| {row['dataset']} | {row['shape']} | {row['batch_size']} | {row['round']} | {row['tool']} | {row['epochs']} | {row['seconds']:.2f} "
            f"| {row['cells_per_s']:,.0f} | {warmup} | {row['rss_loaded_mib']:,.0f} / {row['rss_peak_mib']:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def section_text(facts: dict, table: str, command: str, when: str, notes: list[str]) -> str:
    """The full ``RESULTS.md`` section: date, machine facts, settings, table, command."""
    return (
        section_header(SECTION_TITLE, when, facts)
        + f"Settings: n_hidden={N_HIDDEN}, n_latent={N_LATENT}, n_layers={N_LAYERS}, batch size as in the table, "
        f"train_size={TRAIN_SIZE}, CPU, no early stopping, validation loss every epoch (both tools). "
        f"Each (dataset, tool) runs in a fresh process: the model is built, trained {WARMUP_EPOCHS} warm-up "
        f"epoch (not timed; its seconds are in the table: for `pyro_scmodels-compiled`, `train(compile=True)`, they include "
        f"compiling), then trained for the listed epochs under the clock; the tools alternate (A B A B). "
        f"cells/s = training cells x epochs / seconds. RSS: peak resident memory (`VmHWM`) of that process after loading the "
        f"data (including imports) and at the end (peak).{note_lines(notes)}\n\n"
        f"{table}\n\n"
        f"Command:\n\n```\n{command}\n```\n"
    )


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the ``--_*`` ones are for the measured child processes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"tiny run: {QUICK_CELLS} cells per dataset, {QUICK_EPOCHS} timed epoch; writes nothing unless --output is given")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs for every dataset (default: PBMC 10, simulated 5; quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both tools (default: torch's default)")
    parser.add_argument("--datasets", nargs="+", choices=["pbmc", "simulated"], default=["pbmc", "simulated"], help="datasets to run")
    parser.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(DEFAULT_TOOLS),
                        help="tools to run (scvi-tools only when importable; pyro_scmodels-trace: ours with Pyro's Trace_ELBO)")
    parser.add_argument("--pbmc", type=Path, default=PBMC_PATH, help="path of the PBMC .h5ad file")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[BATCH_SIZE], help="minibatch sizes, each measured")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the alternating tools (A B A B for 2)")
    parser.add_argument("--output", type=Path, default=None, help=f"markdown file to update (default: {DEFAULT_OUTPUT.relative_to(REPO_ROOT)}; none with --quick)")
    # hidden: one measurement in a child process
    for name, kind in (("--_worker", str), ("--_data", str), ("--_epochs", int), ("--_result", str), ("--_batch", int)):
        parser.add_argument(name, type=kind, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be a positive integer")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be a positive integer")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    if args._worker:
        run_worker(args._worker, args._data, args._epochs, args.threads, args._result, args._batch or BATCH_SIZE)
        return 0

    import torch

    threads = args.threads or torch.get_num_threads()
    facts = machine_facts(threads)
    print("Training throughput benchmark")
    for key, value in facts.items():
        print(f"  {key}: {value}")

    tools = [tool for tool in TOOLS if tool in args.tools]
    notes = []
    if "scvi-tools" in tools and not scvi_available():
        print("scvi-tools not installed: skipped")
        notes.append("scvi-tools not installed: skipped.")
        tools.remove("scvi-tools")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:
        workdir = Path(scratch)
        datasets = prepare_datasets(args.datasets, args.quick, args.pbmc, workdir)
        if len(datasets) < len(args.datasets):
            notes.append("Datasets whose file was missing were skipped.")
        load_before = os.getloadavg()
        for batch_size in args.batch_sizes:
            for dataset in datasets:
                epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS[dataset["name"]])
                rows += measure_dataset(dataset, tools, epochs, args.threads, threads, workdir, batch_size, args.rounds)
        load_after = os.getloadavg()
        notes.append(f"load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, "
                     f"after {tuple(round(v, 2) for v in load_after)}")

    table = results_table(rows)
    print("\n" + table)

    output = args.output if args.output is not None else (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        command = shlex.join([sys.executable, *sys.argv])
        write_section(output, SECTION_TITLE, section_text(facts, table, command, now(), notes))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
