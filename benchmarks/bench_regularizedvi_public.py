"""RegularizedVI against the public regularizedvi: training time per epoch and peak memory (issue 13).

Usage::

    python benchmarks/bench_regularizedvi_public.py --public-python /path/to/venv/bin/python [--cells 4000] [--no-write]
        [--genes 1500] [--batches 3] [--epochs 10] [--warmup 1] [--batch-sizes 128 1024] [--rounds 2]
        [--public-commit SHA] [--output PATH]

Data: ``datasets.simulate(n_cells, n_genes, n_batches, seed=0)``, written once to a temporary ``.h5ad`` (raw
counts in ``layers["counts"]``, ``obs["batch"]``) that every run reads. Both tools declare the batch the same
way, ``setup_anndata(adata, layer="counts", batch_key="batch")``: in both it sets the ambient, dispersion and
library-size keys to the batch (batch-free decoder, no ``nn_conditioning_covariate_keys``). Both train
``n_hidden=128, n_latent=10, n_layers=1``, ``train_size=0.9``, validation loss every epoch, no early
stopping, on the CPU with one torch thread (``OMP/MKL/OPENBLAS_NUM_THREADS=1``, ``torch.set_num_threads(1)``);
everything else is each tool's default.

Each run is a fresh process: it reads the data, builds the model, trains ``--warmup`` epochs (not timed),
then trains ``--epochs`` more under the clock (a second ``train`` call; both tools continue from the current
weights). Timed: that second call, validation passes included. cells/s = training cells x epochs / seconds.
The runs alternate, ours then public, for each round (A B A B), so that a change in the machine's load
shows up as a difference between rounds; the ratio ours / public is of cells/s in the same round. The
1-minute load average is recorded at the start and end of each run, and the full load before and after.

Peak memory is the child's maximum resident set size from ``os.wait4``. On Linux that figure also holds
the parent's peak at the moment of ``exec``, so this driver never imports torch or pyro_scmodels itself:
the data are simulated in a child too. The child's own ``VmHWM`` is recorded as a check.

The public package is installed from its repository in its own interpreter (``--public-python`` or
``REGULARIZEDVI_PYTHON``) and run by ``_public_regularizedvi_worker.py``, never imported here. The figures
go in the ``## RegularizedVI against the public regularizedvi (bench_regularizedvi_public.py)`` section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware_facts, now, run_single_threaded, section_header, status_mib, write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
TITLE = "## RegularizedVI against the public regularizedvi (bench_regularizedvi_public.py)"
N_HIDDEN, N_LATENT, N_LAYERS, TRAIN_SIZE, SEED = 128, 10, 1, 0.9, 0  # as in _public_regularizedvi_worker.py
OURS, PUBLIC = "pyro_scmodels RegularizedVI", "public regularizedvi"


def source_state() -> str:
    """The commit of this repository and the files of ``pyro_scmodels/`` changed in the working tree."""
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=HERE.parent, capture_output=True, text=True).stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--", "pyro_scmodels").splitlines()]
    digest = hashlib.sha1(git("diff", "HEAD", "--", "pyro_scmodels").encode()).hexdigest()[:10]
    return f"commit {git('rev-parse', '--short', 'HEAD').strip() or 'unknown'}" + (
        f", uncommitted changes to {', '.join(changed)} (sha1 of the diff {digest})" if changed
        else ", no uncommitted changes to pyro_scmodels/")


def prepare(path: str, cells: int, genes: int, batches: int) -> None:
    """Child process: simulate the data and write counts and batch to ``path``."""
    import anndata

    import pyro_scmodels as ps

    adata = ps.datasets.simulate(n_cells=cells, n_genes=genes, n_batches=batches, seed=SEED)
    counts = adata.layers["counts"]
    anndata.AnnData(X=counts, layers={"counts": counts}, obs=adata.obs[["batch"]], var=adata.var[[]]).write_h5ad(path)


def ours_worker(source: str, output: str, batch_size: int, epochs: int, warmup: int) -> None:
    """Child process: build, warm up and time this package's RegularizedVI; write a JSON result."""
    import anndata
    import pyro
    import torch

    import pyro_scmodels as ps

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    adata = anndata.read_h5ad(source)
    start = time.perf_counter()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, n_hidden=N_HIDDEN, n_latent=N_LATENT, n_layers=N_LAYERS, seed=SEED)
    settings = dict(batch_size=batch_size, train_size=TRAIN_SIZE, early_stopping=False, device="cpu", seed=SEED,
                    check_val_every_n_epoch=1, progress_bar=False)
    model.train(max_epochs=warmup, **settings)
    warm = time.perf_counter()
    model.train(max_epochs=epochs, **settings)  # as in scvi-tools: max_epochs more from the current weights
    seconds = time.perf_counter() - warm
    timed = model.history.iloc[warmup:]
    result = {
        "tool": OURS, "n_train": len(model.train_indices), "n_validation": len(model.validation_indices),
        "seconds": seconds, "build_warmup_seconds": warm - start, "epochs": epochs, "epochs_run": len(timed),
        "validation_epochs": int(timed["validation_loss"].notna().sum()),
        "final_validation_loss": float(model.history["validation_loss"].iloc[-1]),
        "threads": torch.get_num_threads(), "vmhwm_mib": status_mib("VmHWM"),
        "versions": {"torch": torch.__version__, "pyro-ppl": pyro.__version__, "pyro_scmodels": ps.__version__},
    }
    with open(output, "w") as handle:
        json.dump(result, handle)


def measure(command: list[str], result_path: str, workdir: str, batch_size: int, round_: int) -> dict:
    """One run: the child's JSON result with wall time, wait4 peak RSS, load and the derived rates added."""
    load_start = os.getloadavg()[0]
    wall, rss = run_single_threaded(command, workdir)
    with open(result_path) as handle:
        row = json.load(handle)
    row.update(batch_size=batch_size, round=round_, wall=wall, rss_mib=rss, load_start=load_start,
               load_end=os.getloadavg()[0], cells_per_s=row["n_train"] * row["epochs"] / row["seconds"],
               s_per_epoch=row["seconds"] / row["epochs"])
    for key in ("epochs_run", "validation_epochs"):
        if row.get(key) is not None and row[key] != row["epochs"]:
            print(f"  warning: {row['tool']} {key} = {row[key]}, expected {row['epochs']}")
    if row["threads"] != 1:
        print(f"  warning: {row['tool']} used {row['threads']} torch threads")
    print(json.dumps({k: v for k, v in row.items() if k != "versions"}), flush=True)
    return row


def report(rows: list[dict], args: argparse.Namespace, loads: tuple) -> str:
    """The table, the per-batch-size summary and the notes, as markdown."""
    lines = ["| batch | round | tool | timed epochs | seconds | s per epoch | cells/s | build + warm-up s | "
             "process wall s | peak RSS MiB (wait4) | load 1 min start / end | cells/s ours / public | "
             "final val. loss (own scale) |", "|" + "---:|" * 2 + "---|" + "---:|" * 10]
    summary = []
    for batch_size in args.batch_sizes:
        ratios, rss_ratios = [], []
        for round_ in range(1, args.rounds + 1):
            pair = {r["tool"]: r for r in rows if r["batch_size"] == batch_size and r["round"] == round_}
            ours, public = pair.get(OURS), pair.get(PUBLIC)
            ratio = ours["cells_per_s"] / public["cells_per_s"] if ours and public else None
            if ratio is not None:
                ratios.append(ratio)
                rss_ratios.append(ours["rss_mib"] / public["rss_mib"])
            for row in (ours, public):
                if row is None:
                    continue
                shown = f"**{ratio:.2f}**" if row is ours and ratio is not None else ""
                lines.append(
                    f"| {batch_size} | {round_} | {row['tool']} | {row['epochs']} | {row['seconds']:.1f} | "
                    f"{row['s_per_epoch']:.2f} | {row['cells_per_s']:,.0f} | {row['build_warmup_seconds']:.1f} | "
                    f"{row['wall']:.1f} | {row['rss_mib']:,.0f} | {row['load_start']:.2f} / {row['load_end']:.2f} | "
                    f"{shown} | {row['final_validation_loss']:,.1f} |")
        if ratios:
            summary.append(f"batch {batch_size}: cells/s ours / public {', '.join(f'{r:.2f}' for r in ratios)} "
                           f"by round (mean **{sum(ratios) / len(ratios):.2f}x**); peak RSS ours / public "
                           f"{', '.join(f'{r:.2f}' for r in rss_ratios)}")
    first = rows[0]
    notes = summary + [
        f"timed: the second `train` call ({args.epochs} epochs after {args.warmup} untimed warm-up epoch(s) in the "
        f"same process), validation loss on {first['n_validation']:,} cells every epoch included; cells/s = "
        f"{first['n_train']:,} training cells x epochs / seconds",
        "peak RSS: the child's maximum resident set size from `os.wait4` (the driver stays small: it imports neither "
        "torch nor pyro_scmodels); the child's own `VmHWM`, MiB: "
        + ", ".join(f"{r['vmhwm_mib']:,.0f}" for r in rows),
        "the final validation losses are each tool's own figure (different models, terms and normalisation): "
        "not comparable, not a quality comparison",
        f"load average (1, 5, 15 min) before {tuple(round(v, 2) for v in loads[0])}, after "
        f"{tuple(round(v, 2) for v in loads[1])}; one torch thread per process; 2-core machine shared with "
        "other work, runs alternate ours, public",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=4000)
    parser.add_argument("--genes", type=int, default=1500)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="timed epochs per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs before the timed ones")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of ours, public")
    parser.add_argument("--public-python", default=os.environ.get("REGULARIZEDVI_PYTHON"))
    parser.add_argument("--public-commit", default=None, help="commit of the public repository installed (noted)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print the figures without writing --output")
    parser.add_argument("--_prepare", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--_worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._prepare:
        prepare(args._prepare[0], *map(int, args._prepare[1:]))
        return
    if args._worker:
        ours_worker(args._worker[0], args._worker[1], *map(int, args._worker[2:]))
        return
    if not args.public_python:
        raise SystemExit("give --public-python (or REGULARIZEDVI_PYTHON): an interpreter with the public "
                         "regularizedvi installed")

    rows, loads, state = [], [os.getloadavg()], source_state()
    with tempfile.TemporaryDirectory(prefix="bench_rvi_public_") as work:
        data = os.path.join(work, "counts.h5ad")
        run_single_threaded([sys.executable, __file__, "--_prepare", data, str(args.cells), str(args.genes),
                             str(args.batches)], work)
        for batch_size in args.batch_sizes:
            for round_ in range(1, args.rounds + 1):
                for tool in (OURS, PUBLIC):
                    result = os.path.join(work, f"b{batch_size}_r{round_}_{'ours' if tool == OURS else 'public'}.json")
                    settings = [str(batch_size), str(args.epochs), str(args.warmup)]
                    command = ([sys.executable, __file__, "--_worker", data, result, *settings] if tool == OURS else
                               [args.public_python, str(HERE / "_public_regularizedvi_worker.py"), data, result,
                                *settings])
                    print(f"\nbatch {batch_size}, round {round_}, {tool}: {args.warmup} warm-up + {args.epochs} "
                          "timed epochs ...", flush=True)
                    rows.append(measure(command, result, work, batch_size, round_))
    loads.append(os.getloadavg())
    text = report(rows, args, tuple(loads))
    print("\n" + text)
    versions = {}
    for row in rows:
        versions.update(row["versions"])
    end_state = source_state()
    versions["pyro_scmodels"] += (f" ({state})" if end_state == state
                                  else f" ({state} at the start; {end_state} at the end)")
    if args.public_commit:
        versions["regularizedvi"] += f" (commit {args.public_commit})"
    facts = {"data": f"simulate(n_cells={args.cells}, n_genes={args.genes}, n_batches={args.batches}), seed {SEED}",
             "setup (both)": '`setup_anndata(adata, layer="counts", batch_key="batch")`',
             "model (both)": f"n_hidden={N_HIDDEN}, n_latent={N_LATENT}, n_layers={N_LAYERS}, train_size={TRAIN_SIZE}, "
                             "no early stopping, validation every epoch, CPU, other settings each tool's defaults",
             **hardware_facts(), **versions}
    command = shlex.join([sys.executable, *sys.argv])
    section = section_header(TITLE, now(), facts) + text + f"\nCommand:\n\n```\n{command}\n```\n"
    if args.no_write:
        return
    write_section(args.output, TITLE, section)


if __name__ == "__main__":
    main()
