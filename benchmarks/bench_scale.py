"""Scale: RegularizedVI -> NDreamer -> FAISS on 10^5, 3 x 10^5 and 10^6 cells x 2,000 genes read from disk.

Usage::

    python benchmarks/bench_scale.py [--sizes 100000 300000 1000000] [--store DIR] [--output PATH]
        [--stages read train infer ndreamer match] [--no-write] [--report-only] [--note TEXT]

For each size the simulator's cells (20,000 cells x 2,000 genes, 4 batches, resampled and binomially
thinned to the size) are written block by block to an ``.h5ad`` (kept in ``--store`` and reused), then
each stage runs in a fresh process (``_scale_worker.py``) that opens the file with ``backed="r"``:

- ``read``: 40 minibatches of 1,024 cells read A B A B with anndata's backed reader (random cells) and
  with the package's chunked reader (chunk-shuffled order, each buffer read ahead), in cells per second;
- ``train``: ``setup_anndata`` and one epoch of RegularizedVI from disk (batch 1,024, CPU);
- ``infer``: the latent of every cell, from disk;
- ``ndreamer``: ``NDreamer.from_model`` on the backed data: latent, matching across conditions and
  batches, CATE per cell type for every gene, the ITE of 10,000 cells;
- ``match``: ``match_groups`` on the saved latent, 4 groups, k = 1.

Time and peak RSS (VmHWM) of each stage process are recorded, with the growth exponent of each over the
sizes run (the least-squares slope of log time on log cells). The load average is recorded
before and after. The figures go in the ``## Scale from disk (bench_scale.py)`` section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from _common import hardware_facts, now, run_in_child, section_header, write_section

HERE = Path(__file__).resolve().parent
TITLE = "## Scale from disk (bench_scale.py)"
STAGES = ("read", "train", "infer", "ndreamer", "match")
TIMES = {"train": "epoch_s", "infer": "infer_s", "ndreamer": "ndreamer_s", "match": "match_s"}
#: what a stage reads from the store, and the stage that writes it
NEEDS = {"infer": ("train", "model_{n}"), "ndreamer": ("train", "model_{n}"), "match": ("infer", "latent_{n}.npy")}


def missing_inputs(store: Path, sizes: list[int], stages: list[str]) -> list[str]:
    """The stages that would fail for want of an earlier stage's output: neither in the store nor run before them."""
    problems = []
    for n in sizes:
        for position, stage in enumerate(stages):
            if stage in NEEDS:
                producer, name = NEEDS[stage]
                if producer not in stages[:position] and not (store / name.format(n=n)).exists():
                    problems.append(f"{stage} at {n:,} cells reads {store / name.format(n=n)}, which the {producer} "
                                    f"stage writes: add '{producer}' before '{stage}' to --stages")
    return problems


def run_stage(stage: str, store: Path, n_cells: int, shrink: str | None = None) -> dict:
    result = store / f"result_{stage}_{n_cells}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(HERE / "_scale_worker.py"), stage, "--store", str(store), "--n-cells", str(n_cells),
               "--result", str(result)] + (["--shrink", shrink] if stage == "ndreamer" else [])
    out = run_in_child(command, result, HERE, {"stage": stage, "n_cells": n_cells})
    print(json.dumps(out), flush=True)
    return out


def exponent(sizes: list[int], values: list[float]) -> float:
    """Slope of log value on log size (least squares over the sizes measured)."""
    ok = [(s, v) for s, v in zip(sizes, values) if v and np.isfinite(v) and v > 0]
    if len(ok) < 2:
        return float("nan")
    x, y = np.log([s for s, _ in ok]), np.log([v for _, v in ok])
    return float(np.polyfit(x, y, 1)[0])


def table(results: dict, sizes: list[int]) -> list[str]:
    lines = ["| stage | " + " | ".join(f"{n:,} cells: s / peak RSS GiB" for n in sizes) + " | time exponent |",
             "|---|" + "---|" * len(sizes) + "---|"]
    for stage, key in TIMES.items():
        cells, times = [], []
        for n in sizes:
            r = results.get((stage, n), {})
            if "error" in r or key not in r:
                cells.append("failed" if "error" in r else "not run")
                times.append(float("nan"))
            else:
                cells.append(f"{r[key]:.1f} / {r['peak_rss_gib']:.2f}")
                times.append(r[key])
        slope = exponent(sizes, times)
        lines.append(f"| {stage} | " + " | ".join(cells) + (f" | {slope:.2f} |" if np.isfinite(slope) else " | - |"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--store", type=Path, default=HERE / "_scale_store")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print the figures without writing --output")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: build the section from the stage results kept in --store")
    parser.add_argument("--shrink", choices=["clusters", "none"], default="clusters",
                        help="the ndreamer stage's estimate_cate / estimate_ite shrink= (none: unshrunk)")
    parser.add_argument("--note", action="append", default=[], help="a line added under the table (repeatable)")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    stages = [stage for stage in STAGES if stage in args.stages]  # the stages run in their pipeline order
    problems = [] if args.report_only else missing_inputs(args.store, sizes, stages)
    if problems:
        parser.error("; ".join(problems))
    args.stages = stages
    args.store.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    results = {}
    for n in sizes:
        if args.report_only:
            for stage in args.stages:
                kept = args.store / f"result_{stage}_{n}.json"
                if kept.exists():
                    results[(stage, n)] = json.loads(kept.read_text())
            continue
        if not (args.store / f"cells_{n}.h5ad").exists():
            run_stage("write", args.store, n)
        for stage in args.stages:
            results[(stage, n)] = run_stage(stage, args.store, n, args.shrink)
    load_after = os.getloadavg()
    facts = hardware_facts()
    if not args.report_only:
        facts["load average (1, 5, 15 min)"] = (f"before {tuple(round(v, 2) for v in load_before)}, "
                                                f"after {tuple(round(v, 2) for v in load_after)}")
    lines = [section_header(TITLE, now(), facts).rstrip("\n"), "",
             "Each stage is a fresh process reading the `.h5ad` with `backed=\"r\"` (CPU, torch's default threads). "
             "Time is the stage's own work (not imports); peak RSS is the whole process's.", ""]
    lines += table(results, sizes)
    reads = [(n, results.get(("read", n), {})) for n in sizes]
    reads = [(n, r) for n, r in reads if "anndata_cells_per_s" in r]
    if reads:
        lines += ["", "Reading 1,024-cell minibatches (cells per second, two repeats A B A B):", "",
                  "| cells | anndata backed reader, random cells | chunked reader, read ahead | ratio |", "|---|---|---|---|"]
        for n, r in reads:
            a, c = r["anndata_cells_per_s"], r["chunked_cells_per_s"]
            lines.append(f"| {n:,} | {', '.join(f'{v:,.0f}' for v in a)} | {', '.join(f'{v:,.0f}' for v in c)} | "
                         f"{np.mean(c) / np.mean(a):.1f}x |")
    for n in sizes:
        train = results.get(("train", n), {})
        if "train_cells_per_s" in train:
            lines.append(f"\nTraining from disk, {n:,} cells: {train['train_cells_per_s']:,.0f} cells/s "
                         f"(setup {train['setup_s']:.1f} s).")
    failed = [f"{stage} at {n:,}: {r['error'].splitlines()[-1]}" for (stage, n), r in results.items() if "error" in r]
    if failed:
        lines += ["", "Failed: " + "; ".join(failed)]
    lines += [f"\n{note}" for note in args.note]
    lines += ["", "Targets (issue 11): peak RSS of training from disk <= 3 GB at 10^6 cells; NDreamer end to end at "
              "10^6 cells with peak RSS <= 6 GB; time exponent <= 1.1."]
    text = "\n".join(lines)
    print(text)
    if args.no_write:
        return
    write_section(args.output, TITLE, text + "\n")


if __name__ == "__main__":
    main()
