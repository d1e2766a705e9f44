"""Exact group matching: ``pyro_scmodels.matching`` (FAISS) next to the NDreamer reference loop.

Usage::

    python benchmarks/bench_matching.py [--quick] [--loop-max-queries N] [--repeats N] [--threads N] [--output PATH]

The task is NDreamer's causal matching (SPEC 3.5, k = 1): every cell is matched to its nearest
cell in each of 4 groups (2 batches x 2 conditions) of a 50-dimensional embedding.

- ours: :func:`pyro_scmodels.matching.match_groups`: per group one exact faiss index and one
  batched search of all cells (best of ``--repeats`` runs);
- reference: as the public NDreamer code, a scipy ``cKDTree`` built per group and queried one
  cell at a time in a Python loop (one run).

Both are timed on 10,000 and 100,000 simulated cells (``--quick``: 2,000 cells). When a case
has more than ``--loop-max-queries`` (cell, group) queries, the reference loop runs on a random
subset of the cells and its time is extrapolated linearly (tree builds are timed in full); the
table says so. Indices are compared on every cell the reference queried; a differing index
counts as a tie when both distances agree within 1e-5 (relative), and any other difference
makes the script exit with status 1.

Results are printed; without ``--quick`` they are also written to the
``## Matching (bench_matching.py)`` section of ``benchmarks/RESULTS.md`` (other sections kept).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from scipy.spatial import cKDTree

from _common import cpu_model, package_version, total_memory_gib, update_results
from pyro_scmodels import matching

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "RESULTS.md"
SECTION_TITLE = "## Matching (bench_matching.py)"
FULL_SIZES, QUICK_SIZES = (10_000, 100_000), (2_000,)
N_DIMS, N_BATCHES, N_CONDITIONS, N_TYPES, SEED = 50, 2, 2, 30, 0
TIE_RTOL = 1e-5


def simulate_embedding(n_cells: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """A PCA-like embedding: cell-type clusters, variance decaying over dimensions, batch shifts.

    Parameters
    ----------
    n_cells
        Number of cells.
    seed
        Seed of the random generator.

    Returns
    -------
    embedding : numpy.ndarray
        (n_cells, 50) float32 coordinates.
    groups : numpy.ndarray
        Label ``"b<batch>_c<condition>"`` of each cell (4 groups of about equal size).
    """
    rng = np.random.default_rng(seed)
    scale = 4.0 / np.sqrt(np.arange(1, N_DIMS + 1))  # PCA components: decreasing spread
    centres = rng.normal(size=(N_TYPES, N_DIMS)) * scale
    batch_shift = rng.normal(scale=0.5, size=(N_BATCHES, N_DIMS)) * scale
    cell_type = rng.integers(0, N_TYPES, n_cells)
    batch, condition = rng.integers(0, N_BATCHES, n_cells), rng.integers(0, N_CONDITIONS, n_cells)
    noise = rng.normal(size=(n_cells, N_DIMS)) * scale * 0.3
    embedding = (centres[cell_type] + batch_shift[batch] + noise).astype(np.float32)
    groups = np.char.add(np.char.add("b", batch.astype(str)), np.char.add("_c", condition.astype(str)))
    return embedding, groups


def run_ours(embedding: np.ndarray, groups: np.ndarray, repeats: int) -> tuple[float, dict]:
    """Best wall time of ``match_groups`` (k = 1) over ``repeats`` runs, and its matches."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matches = matching.match_groups(embedding, groups, k=1)
        best = min(best, time.perf_counter() - start)
    return best, matches


def run_reference(embedding: np.ndarray, groups: np.ndarray, query_cells: np.ndarray) -> dict:
    """The reference loop: per group a ``cKDTree``, then one ``query`` call per cell.

    Parameters
    ----------
    embedding, groups
        As from :func:`simulate_embedding`.
    query_cells
        Positions of the cells to query (all cells, or a subset to extrapolate from).

    Returns
    -------
    dict
        ``build_s`` and ``loop_s`` (seconds, summed over groups) and, per group label,
        ``(indices, distances)`` of the queried cells (indices into the full array).
    """
    result = {"build_s": 0.0, "loop_s": 0.0}
    data = embedding.astype(np.float64)
    for label in dict.fromkeys(groups):
        members = np.flatnonzero(groups == label)
        start = time.perf_counter()
        tree = cKDTree(data[members])
        result["build_s"] += time.perf_counter() - start
        indices = np.empty(len(query_cells), dtype=np.int64)
        distances = np.empty(len(query_cells))
        start = time.perf_counter()
        for row, cell in enumerate(query_cells):
            distances[row], local = tree.query(data[cell], k=1)
            indices[row] = members[local]
        result["loop_s"] += time.perf_counter() - start
        result[label] = (indices, distances)
    return result


def compare(matches: dict, reference: dict, query_cells: np.ndarray) -> tuple[int, int, int]:
    """Identical indices, ties (different cell at the same distance) and real differences."""
    identical = ties = different = 0
    for label, match in matches.items():
        ref_indices, ref_distances = reference[label]
        ours_indices, ours_distances = match.indices[query_cells, 0], match.distances[query_cells, 0]
        same = ours_indices == ref_indices
        tie = ~same & np.isclose(ours_distances, ref_distances, rtol=TIE_RTOL, atol=TIE_RTOL)
        identical, ties = identical + int(same.sum()), ties + int(tie.sum())
        different += int((~same & ~tie).sum())
    return identical, ties, different


def measure(n_cells: int, repeats: int, loop_max_queries: int, rng: np.random.Generator) -> dict:
    """Time both approaches on ``n_cells`` simulated cells; one row of the results table."""
    embedding, groups = simulate_embedding(n_cells)
    n_groups = len(set(groups))
    ours_s, matches = run_ours(embedding, groups, repeats)
    n_queried = n_cells
    if loop_max_queries and n_cells * n_groups > loop_max_queries:
        n_queried = max(1, loop_max_queries // n_groups)
    query_cells = np.sort(rng.choice(n_cells, n_queried, replace=False)) if n_queried < n_cells else np.arange(n_cells)
    reference = run_reference(embedding, groups, query_cells)
    # the per-cell loop scales linearly with the number of queries; the tree builds were complete
    reference_s = reference["build_s"] + reference["loop_s"] * n_cells / n_queried
    identical, ties, different = compare(matches, reference, query_cells)
    return {
        "cells": n_cells, "groups": n_groups, "queries": n_cells * n_groups, "queried": n_queried * n_groups,
        "ours_s": ours_s, "reference_s": reference_s, "extrapolated": n_queried < n_cells,
        "identical": identical, "ties": ties, "different": different,
    }


def results_table(rows: list[dict]) -> str:
    """Markdown table of the measurements."""
    lines = [
        "| cells | groups | queries (cell x group) | ours (s) | reference (s) | reference / ours | indices compared: identical / ties / different |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        reference = f"{row['reference_s']:.2f}" + (f" (extrapolated from {row['queried']:,} queries)" if row["extrapolated"] else "")
        lines.append(
            f"| {row['cells']:,} | {row['groups']} | {row['queries']:,} | {row['ours_s']:.3f} | {reference} "
            f"| {row['reference_s'] / row['ours_s']:,.1f}x | {row['identical']:,} / {row['ties']:,} / {row['different']:,} |"
        )
    return "\n".join(lines)


def machine_facts() -> dict:
    """Facts about this machine and the software measured."""
    memory = total_memory_gib()
    return {
        "CPU": cpu_model(), "logical CPUs": len(os.sched_getaffinity(0)),
        "memory": f"{memory:.1f} GiB" if memory else "unknown",
        "faiss": f"{faiss.__version__} ({'GPU' if matching.faiss_gpu_available() else 'CPU'}), "
                 f"{faiss.omp_get_max_threads()} OpenMP threads",
        "numpy": np.__version__, "scipy": package_version("scipy"), "python": sys.version.split()[0],
    }


def section_text(facts: dict, table: str, command: str, when: str, repeats: int) -> str:
    """The full ``RESULTS.md`` section."""
    fact_lines = "\n".join(f"- {key}: {value}" for key, value in facts.items())
    return (
        f"{SECTION_TITLE}\n\n"
        f"Measured {when}.\n\n{fact_lines}\n\n"
        f"Task: match every cell (k = 1, exact L2) to its nearest cell in each of {N_BATCHES * N_CONDITIONS} groups "
        f"({N_BATCHES} batches x {N_CONDITIONS} conditions) of a simulated {N_DIMS}-dimensional PCA-like embedding "
        f"({N_TYPES} cell types). Ours: `pyro_scmodels.matching.match_groups`, one faiss `IndexFlatL2` per group and one "
        f"batched search of all cells, best of {repeats} runs. Reference (as the public NDreamer code): scipy `cKDTree` "
        "per group, queried one cell at a time in a Python loop, one run; where marked, the loop was timed on a random "
        "subset of cells and scaled linearly (tree builds timed in full). Differing indices count as ties when both "
        f"distances agree within {TIE_RTOL:g} (relative).\n\n"
        f"{table}\n\nCommand:\n\n```\n{command}\n```\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 when the indices really differ)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 cells only; writes nothing unless --output is given")
    parser.add_argument("--loop-max-queries", type=int, default=50_000,
                        help="largest number of (cell, group) queries run by the reference loop before it is "
                             "extrapolated from a subset (0: never extrapolate; default 50,000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours, the best is kept (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: faiss' default)")
    parser.add_argument("--output", type=Path, default=None, help="markdown file to update (default benchmarks/RESULTS.md; none with --quick)")
    args = parser.parse_args(argv)
    if args.loop_max_queries < 0 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--loop-max-queries must be >= 0, --repeats and --threads >= 1")
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)

    facts = machine_facts()
    for key, value in facts.items():
        print(f"{key}: {value}")
    rng = np.random.default_rng(SEED + 1)
    rows = []
    for n_cells in QUICK_SIZES if args.quick else FULL_SIZES:
        row = measure(n_cells, args.repeats, args.loop_max_queries, rng)
        rows.append(row)
        print(f"{n_cells:,} cells: ours {row['ours_s']:.3f} s, reference {row['reference_s']:.2f} s"
              f"{' (extrapolated)' if row['extrapolated'] else ''}, ratio {row['reference_s'] / row['ours_s']:,.1f}x; "
              f"indices identical {row['identical']:,}, ties {row['ties']:,}, different {row['different']:,}", flush=True)
    table = results_table(rows)
    print("\n" + table)

    output = args.output if args.output is not None else (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])])
        update_results(output, section_text(facts, table, command, when, args.repeats), SECTION_TITLE)
        print(f"\nWrote the '{SECTION_TITLE[3:]}' section of {output}")
    if any(row["different"] for row in rows):
        print("ERROR: some matched indices differ from the reference beyond ties", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
