"""NDreamer codebook layer: code distances by matrix products next to the N x C x d reference.

Usage::

    python benchmarks/bench_ndreamer.py [--quick] [--seconds S] [--threads N] [--output PATH]

SPEC 3.2: the public NDreamer code computes, for each of the K codebooks, the squared distance
of every projection to every code by materialising an ``N x C x d`` difference tensor.
:func:`pyro_scmodels.ndreamer.code_choice.code_scores` computes the same logits (up to a constant per cell) as
``-(|p|^2 - 2 p.e + |e|^2)`` with one batched matrix product, so only ``K x N x C`` tensors exist.

Measured, at the SPEC defaults K = 32 codebooks, C = 1024 codes, d = 8:

1. the codebook layer alone, forward + backward, for N = 256 and N = 1024 cells: ours
   (``code_scores(projections (K, N, d), codebooks (K, C, d))``) against a naive reference
   written here (per codebook ``-((p[:, None, :] - e[None, :, :]) ** 2).sum(-1)``, stacked),
   both followed by the same softmax and weighted sum so that backward runs through them;
2. a full training step of :class:`NDreamerNetwork` + :func:`total_loss` (as
   ``NDreamer.train``: AdamW, gradient clipping, dead-code bookkeeping) with G = 2000 genes and
   N = 256 cells, once with our codebook layer and once with the naive distance patched in.

Every measurement runs in a fresh Python process (this script re-invoked with hidden
arguments). There, after the inputs (and network) are built, the peak-RSS mark ``VmHWM`` is
reset (``/proc/self/clear_refs``) and the current RSS noted; the warm-up and timed steps then
run, and *peak memory* is ``VmHWM`` at the end minus that RSS: the extra resident memory the
steps needed at their worst (torch's CPU allocator returns large blocks to the system, so this
follows the live tensors). Steps per second = timed steps / their wall time; each measurement
runs at least ``--seconds`` (default 6; and at least 3 steps) after 1 untimed warm-up step.
``--quick`` is a smoke run (layer at N = 128 only, training step with 64 cells, 1 timed step).

Every process uses ``--threads`` torch threads (default 1: on a shared 2-core machine, 2 OpenMP
threads stall on each other whenever another process holds a core, which made two-thread timings
3-10x slower and erratic; one thread measures the arithmetic, not the scheduler).

Before timing, a check process compares both layers' logits and gradients at the first layer N.

Results are printed; without ``--quick`` they are also written to the
``## NDreamer codebook layer (bench_ndreamer.py)`` section of ``benchmarks/RESULTS.md``
(other sections kept).
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
from _ndreamer_worker import C, D, IMPLEMENTATIONS, K, TRAIN_GENES, run_worker

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "RESULTS.md"
SECTION_TITLE = "## NDreamer codebook layer (bench_ndreamer.py)"

# one thread: on a shared machine, torch's OpenMP threads wait on each other at every parallel op
# whenever another process holds a core, which made 2-thread timings 3-10x slower and erratic
DEFAULT_THREADS = 1
# cells of the layer rows and of the training rows, untimed warm-up steps, least timed steps and seconds
FULL = {"layer_cells": (256, 1024), "train_cells": 256, "warmup": 1, "min_steps": 3, "seconds": 6.0}
QUICK = {"layer_cells": (128,), "train_cells": 64, "warmup": 1, "min_steps": 1, "seconds": 0.2}


# ------------------------------------------------------------------------------------------
# the measurements (each in a fresh process running _ndreamer_worker.run_worker)
# ------------------------------------------------------------------------------------------
def measure(part: str, impl: str, n_cells: int, timing: dict, threads: int | None, workdir: Path) -> dict:
    """Run one measurement in a fresh Python process (same interpreter); ``{"error": ...}`` on failure."""
    result_path = workdir / f"result_{part}_{impl}_{n_cells}.json"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--_worker", part, "--_impl", impl,
        "--_cells", str(n_cells), "--seconds", str(timing["seconds"]), "--_warmup", str(timing["warmup"]),
        "--_min_steps", str(timing["min_steps"]), "--_result", str(result_path),
    ]
    if threads:
        command += ["--threads", str(threads)]
    return run_in_child(command, result_path, workdir, {"part": part, "impl": impl, "cells": n_cells})


def measure_pair(part: str, n_cells: int, timing: dict, threads: int | None, workdir: Path,
                 notes: list[str]) -> list[dict]:
    """Measure both implementations on one row; the naive result gets the ratios."""
    rows, pair = [], {}
    for impl in IMPLEMENTATIONS:
        label = "codebook layer" if part == "layer" else "training step"
        print(f"\n{label}, N={n_cells}, {impl} ...", flush=True)
        result = measure(part, impl, n_cells, timing, threads, workdir)
        if "error" in result:
            print(f"  failed: {result['error']}")
        else:
            pair[impl] = result
            extra = result.get("peak_extra_mib")
            print(
                f"  {result['steps']} steps in {result['seconds']:.2f} s: {result['steps_per_s']:,.2f} steps/s, "
                f"peak extra RSS {'-' if extra is None else f'{extra:,.0f}'} MiB, torch threads {result['threads']}"
            )
            if not result.get("peak_reset", True):
                notes.append("VmHWM could not be reset: peak extra RSS counts from the process's earlier peak.")
        rows.append(result)
    if len(pair) == 2:
        ours, naive = pair["ours"], pair["naive"]
        naive["speedup"] = ours["steps_per_s"] / naive["steps_per_s"]
        if ours.get("peak_extra_mib") and naive.get("peak_extra_mib") is not None:
            naive["memory_ratio"] = naive["peak_extra_mib"] / ours["peak_extra_mib"]
        print(f"  ours / naive steps/s: {naive['speedup']:.1f}x")
    return rows


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def load_average() -> str:
    """The 1-minute load average (other processes compete for the cores), or ``"unknown"``."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def machine_facts(threads: str, torch_version: str, load: str) -> dict:
    """Facts about this machine and the software measured."""
    return {
        **hardware_facts(),
        "1-minute load average before / after the run": load,
        "torch threads": threads,
        "python": platform.python_version(),
        "torch": torch_version,
        "pyro_scmodels": package_version("pyro_scmodels") or package_version("pyro-scmodels") or "unknown",
    }


def diff_tensor_mib(n_cells: int) -> float:
    """Size of one codebook's ``N x C x d`` float32 difference tensor, in MiB."""
    return n_cells * C * D * 4 / 1024**2


def results_table(rows: list[dict]) -> str:
    """Markdown table: one row per (part, N, implementation); ratios on the naive row."""
    header = (
        "| measurement | N | codebook distances | steps/s | ms/step | peak extra RSS (MiB) "
        "| speed-up ours vs naive | memory naive / ours |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        what = "codebook layer fwd+bwd" if row["part"] == "layer" else f"training step, G={TRAIN_GENES:,}"
        impl = "ours (matmul)" if row["impl"] == "ours" else "naive (N x C x d)"
        if "error" in row:
            lines.append(f"| {what} | {row['cells']:,} | {impl} | failed | failed | - | - | - |")
            continue
        extra = "-" if row.get("peak_extra_mib") is None else f"{row['peak_extra_mib']:,.0f}"
        speed = f"{row['speedup']:.1f}x" if row.get("speedup") is not None else "-"
        memory = f"{row['memory_ratio']:.1f}x" if row.get("memory_ratio") is not None else "-"
        lines.append(
            f"| {what} | {row['cells']:,} | {impl} | {row['steps_per_s']:,.2f} | {1000 / row['steps_per_s']:,.1f} "
            f"| {extra} | {speed} | {memory} |"
        )
    return "\n".join(lines)


def check_lines(check: dict) -> list[str]:
    """Human-readable agreement of the two layers (from the check process)."""
    if "error" in check:
        return [f"Agreement check failed to run: {check['error'].splitlines()[0]}"]
    return [
        f"Agreement at N = {check['cells']} (float32, ours vs naive, max |difference| / max |value|): "
        f"logits {check['logits_max_abs_diff']:.1e} / {check['logits_max_abs']:.1f}, "
        f"gradient wrt projections {check['grad_projections_max_abs_diff']:.1e} / {check['grad_projections_max_abs']:.1e}, "
        f"wrt codebooks {check['grad_codebooks_max_abs_diff']:.1e} / {check['grad_codebooks_max_abs']:.1e}."
    ]


def section_text(facts: dict, table: str, command: str, when: str, timing: dict, notes: list[str]) -> str:
    """The full ``RESULTS.md`` section: date, machine facts, settings, table, command."""
    sizes = ", ".join(f"{diff_tensor_mib(n):,.0f} MiB at N = {n:,} ({K * diff_tensor_mib(n):,.0f} MiB for all {K})" for n in timing["layer_cells"])
    return (
        section_header(SECTION_TITLE, when, facts)
        + f"Settings: K={K} codebooks, C={C} codes, d={D} (SPEC defaults), float32, CPU. "
        f"Codebook layer: ours = `code_scores` (`2 p.e - |e|^2`, one `baddbmm`); naive = per codebook "
        f"`-((p[:, None, :] - e[None, :, :]) ** 2).sum(-1)`, stacked (one N x C x d float32 tensor per codebook: {sizes}); "
        f"both followed by softmax over codes and a fixed weighted sum, then backward to projections and codebooks. "
        f"Training step: `NDreamerNetwork` at its defaults (encoder 1024-512, embedding 512, z 256, decoder 512-1024), "
        f"{TRAIN_GENES:,} genes, {timing['train_cells']} cells (2 conditions x 2 batches), `total_loss` with default weights, "
        f"AdamW + gradient clipping + dead-code resets as `NDreamer.train`; naive = the reference distance patched into the network. "
        f"Torch threads: as listed (one by default: with two, torch's threads stall on each other whenever another "
        f"process holds a core of this shared machine). Each row runs in a fresh process: inputs built, peak-RSS mark (`VmHWM`) reset, {timing['warmup']} warm-up step(s), then "
        f"steps for at least {timing['seconds']:g} s (and {timing['min_steps']} steps) under the clock. "
        f"Peak extra RSS = `VmHWM` at the end minus the RSS before the first step: the most memory the steps held at once. "
        f"speed-up = ours steps/s / naive steps/s.{note_lines(notes)}\n\n"
        f"{table}\n\n"
        f"Command:\n\n```\n{command}\n```\n"
    )


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the ``--_*`` ones are for the measured child processes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (N=128 layer, 64-cell training step, 1 timed step); writes nothing unless --output is given")
    parser.add_argument("--seconds", type=float, default=None, help=f"least timed seconds per row (default {FULL['seconds']:g}; quick {QUICK['seconds']:g})")
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS,
        help=f"torch.set_num_threads in every measurement (default {DEFAULT_THREADS}: see the module docstring)",
    )
    parser.add_argument("--output", type=Path, default=None, help=f"markdown file to update (default: {DEFAULT_OUTPUT.name} next to this script; none with --quick)")
    hidden = (("--_worker", str), ("--_impl", str), ("--_cells", int), ("--_warmup", int), ("--_min_steps", int), ("--_result", str))
    for name, kind in hidden:
        parser.add_argument(name, type=kind, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be a positive integer")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    if args._worker:
        timing = {"warmup": args._warmup, "min_steps": args._min_steps, "seconds": args.seconds}
        run_worker(args._worker, args._impl, args._cells, timing, args.threads, args._result)
        return 0

    timing = dict(QUICK if args.quick else FULL)
    if args.seconds is not None:
        timing["seconds"] = args.seconds
    print(
        f"NDreamer codebook layer benchmark (K={K}, C={C}, d={D}; {timing['warmup']} warm-up step(s), then at least "
        f"{timing['seconds']:g} s and {timing['min_steps']} step(s) per row)"
    )
    print(
        "Peak memory: each row runs in a fresh process; VmHWM is reset once inputs are built, and\n"
        "'peak extra RSS' = VmHWM after the steps - RSS before them (torch's CPU allocator returns\n"
        "large blocks to the system, so this follows the tensors the steps held at once)."
    )
    rows, notes = [], []
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_ndreamer_") as scratch:
        workdir = Path(scratch)
        check = measure("check", "both", timing["layer_cells"][0], timing, args.threads, workdir)
        for line in check_lines(check):
            print(line)
        notes += check_lines(check)
        cases = [("layer", n) for n in timing["layer_cells"]] + [("train", timing["train_cells"])]
        for part, n_cells in cases:
            rows += measure_pair(part, n_cells, timing, args.threads, workdir, notes)

    measured = [row for row in rows if "error" not in row] + ([check] if "error" not in check else [])
    threads = ", ".join(sorted({str(row["threads"]) for row in measured})) or "unknown"
    torch_version = next((row["torch"] for row in measured), package_version("torch") or "unknown")
    facts = machine_facts(threads, torch_version, f"{load_before} / {load_average()}")
    print()
    for key, value in facts.items():
        print(f"  {key}: {value}")
    table = results_table(rows)
    print("\n" + table)

    output = args.output if args.output is not None else (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        command = shlex.join(["python", *sys.argv])
        section = section_text(facts, table, command, now(), timing, list(dict.fromkeys(notes)))
        write_section(output, SECTION_TITLE, section)
    return 1 if any("error" in row for row in rows) or "error" in check else 0


if __name__ == "__main__":
    sys.exit(main())
