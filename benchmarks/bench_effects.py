"""Per-cell treatment effects against a known truth: pyro_scmodels' two routes, the oracle, the public NDreamer.

Data: ``pyro_scmodels.datasets.simulate(effect_modifier=1.0)``: inside each responding cell type a
continuous state scales the response, so every stimulated cell has its own true effect
(``layers["true_ite"]``). Every row is scored on the same cells with
:func:`pyro_scmodels.metrics.effect_recovery` (stimulated cells):

- ``per_cell_r``: mean over responding types x responding genes of the correlation, across cells, of
  estimated and true effect (the within-type, effect-modifier part);
- ``cate_r``: correlation of per-type mean effects over responding types x all genes;
- ``false_effect``: mean |estimated CATE| in non-responding types over mean |true CATE| (responding genes);
- ``slope``: least-squares slope of estimate on truth; ``coverage``: share of true effects inside the
  90 % interval: the model ITE's (spread of z) and the matched ITE's (``estimate_ite(interval=0.9)``,
  the spread of the matched cells; not for k = 1).

Rows:

- ``oracle``: observed log expression minus the true type x batch control mean (knows type and batch);
- ``NDreamer ...``: this package's NDreamer with a cell's own counts (``factual="observed"``) unshrunk, at causal
  matching and the default k; and at its defaults (``factual="auto"``: ``"matched"`` for the default network, and
  ``shrink="clusters"``) and the same unshrunk;
- ``RegularizedVI matching`` / ``RegularizedVI model ITE``: ``NDreamer.from_model`` on a RegularizedVI
  in the basal-state design (the condition given to the encoder and to the decoder); matching in its z
  (``factual="matched"``, the default there, and ``"observed"``: a cell's own batch and condition from its
  matched cells or from itself), and decoding z under both conditions; once per ``--latent-independence``
  weight (0: off);
- ``public NDreamer``: github.com/lugia-xiao/NDreamer at its constructor defaults, run in the interpreter
  given by ``--public-python`` (or ``NDREAMER_PYTHON``), where it is installed from its repository
  (``pip install -e <clone>``, plus ``leidenalg``). Skipped, and said so, when not given.

Usage::

    python benchmarks/bench_effects.py --seeds 0 1 --public-python /path/to/venv/bin/python [--no-write]  # every option: --help
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware_facts, now, section_header, write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
TITLE = "## Treatment effects against the truth (bench_effects.py)"
METRICS = ("per_cell_r", "cate_r", "false_effect_ratio", "slope", "coverage")
TARGETS = ("per-cell r >= oracle, CATE r >= 0.96, false effect <= 0.09; model-based counterfactual: slope 0.8-1.25, "
           "coverage 0.85-0.95, per-cell r >= 0.6")


def simulate(args, seed: int):
    import pyro_scmodels as ps

    return ps.datasets.simulate(n_cells=args.cells, n_genes=args.genes, seed=seed, effect_modifier=args.effect_modifier)


def ndreamer_rows(adata, seed: int, args) -> dict:
    """This package's NDreamer: with a cell's own counts (``factual="observed"``) unshrunk, at causal matching (k = 1)
    and the default k; then the same trained network (resumed from the first one's checkpoint: the setting changes
    no training) at its defaults (``factual="auto"``, which is ``"matched"`` for the default network, and
    ``shrink="clusters"``) and unshrunk."""
    import tempfile

    import pyro_scmodels as ps
    from pyro_scmodels import metrics as M
    from pyro_scmodels.ndreamer import _constants as K

    rows = {}
    k_default = K.NEAREST_NEIGHBOR
    with tempfile.TemporaryDirectory() as checkpoints:
        for factual in ("observed", "auto"):
            start = time.perf_counter()
            nd = ps.NDreamer(adata, condition_key="condition", control_name="control", batch_key="batch", layer="counts",
                             device="cpu", seed=seed, factual=factual)
            nd.train(progress_bar=False, checkpoint_dir=checkpoints)
            if factual == "observed":
                trained = time.perf_counter() - start
                settings = (("NDreamer k=1, factual=observed, unshrunk", 1, None),
                            (f"NDreamer k={k_default}, factual=observed, unshrunk", k_default, None))
            else:
                chosen = nd.settings["factual"]
                settings = ((f"NDreamer default (k={k_default}, factual={chosen}, shrink=clusters)", k_default, "clusters"),
                            (f"NDreamer k={k_default}, factual={chosen}, unshrunk", k_default, None))
            for name, k, shrink in settings:
                result = nd.estimate_ite(nearest_neighbor=k, interval=0.9 if k > 1 else None, shrink=shrink)
                bounds = {} if k == 1 else {"low": result.layers["ite_stimulated_q05"],
                                            "high": result.layers["ite_stimulated_q95"]}
                rows[name] = {**M.effect_recovery(adata, result.layers["ite_stimulated"], genes=result.var_names, **bounds),
                              "seconds": trained}
    return rows


def model_rows(adata, seed: int, args) -> dict:
    """RegularizedVI with a condition-conditioned decoder: matching in z and the model's own counterfactual.

    Basal-state design, trained once without and once with ``latent_independence`` (the MMD
    penalty that keeps the condition out of z).
    """
    import pyro_scmodels as ps
    from pyro_scmodels import metrics as M

    rows = {}
    for weight in args.latent_independence:
        data = adata.copy()
        ps.RegularizedVI.setup_anndata(data, layer="counts", ambient_covariate_keys=["batch"],
                                       feature_scaling_covariate_keys=["batch"], library_size_key="batch",
                                       nn_conditioning_covariate_keys=["condition", "batch"],
                                       encoder_covariate_keys=["condition"])  # basal state: z need not carry it
        start = time.perf_counter()
        model = ps.RegularizedVI(data, n_latent=10, seed=seed, latent_independence=weight)
        model.train(max_epochs=args.model_epochs, lr=2e-2, device="cpu", progress_bar=False)
        trained = time.perf_counter() - start
        nd = ps.NDreamer.from_model(model, condition_key="condition", control_name="control", batch_key="batch")
        matched = nd.estimate_ite(interval=0.9)  # factual="matched", from_model's default
        observed = ps.NDreamer.from_model(model, condition_key="condition", control_name="control", batch_key="batch",
                                          factual="observed").estimate_ite(interval=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the no-penalty variant is warned about; it is measured on purpose
            # the spread of z alone, as this bench's rows recorded it before the widened default (2026-12-06);
            # bench_model_ite.py scores the default bounds
            modelled = nd.estimate_model_ite(widen_by_matching=False)
        mean, low, high = (modelled.layers[f"ite_model_stimulated{s}"] for s in ("", "_q05", "_q95"))
        label = f"latent_independence={weight:g}"
        for name, result in ((f"RegularizedVI matching ({label})", matched),
                             (f"RegularizedVI matching, factual=observed ({label})", observed)):
            rows[name] = {**M.effect_recovery(adata, result.layers["ite_stimulated"], genes=result.var_names,
                                              low=result.layers["ite_stimulated_q05"],
                                              high=result.layers["ite_stimulated_q95"]),
                          "seconds": trained}
        rows[f"RegularizedVI model ITE ({label})"] = {
            **M.effect_recovery(adata, mean, genes=modelled.var_names, low=low, high=high), "seconds": trained}
    return rows


def public_row(adata, seed: int, python: str) -> dict:
    """The public NDreamer in its own interpreter, on the same log-normalised expression."""
    import anndata
    import scipy.sparse as sp
    from pyro_scmodels import metrics as M
    from pyro_scmodels.ndreamer.preprocess import log_normalise

    with tempfile.TemporaryDirectory() as work:
        source, output = os.path.join(work, "input.h5ad"), os.path.join(work, "ite.npz")
        anndata.AnnData(X=sp.csr_matrix(log_normalise(adata, "counts")), obs=adata.obs[["condition", "batch"]].astype(str),
                        var=adata.var[[]]).write_h5ad(source)
        completed = subprocess.run([python, str(HERE / "_public_ndreamer_worker.py"), source, output, work, str(seed)],
                                   capture_output=True, text=True)
        if completed.returncode != 0:
            tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-10:])
            raise RuntimeError(f"public NDreamer failed (exit {completed.returncode}):\n{tail}")
        stored = np.load(output)
        genes = list(stored["genes"])
        record = adata.uns["simulation"]
        treated = np.flatnonzero((adata.obs[record["condition_key"]] == record["stimulated_name"]).to_numpy())
        missing = np.setdiff1d(treated, stored["rows"])
        if missing.size:  # a zero filled in would score as "no effect" for the public tool
            raise RuntimeError(f"public NDreamer returned no ITE for {missing.size} of the {treated.size} stimulated "
                               "cells; their scores would be made up.")
        # NaN for the control cells, which the scores do not read (a NaN where they do is refused)
        estimate = np.full((adata.n_obs, len(genes)), np.nan, dtype=np.float32)
        estimate[stored["rows"]] = stored["ite"]
        return {"public NDreamer": {**M.effect_recovery(adata, estimate, genes=genes), "seconds": float(stored["seconds"])}}


def table(per_seed: dict[int, dict]) -> str:
    """Markdown table of the mean (and range) over seeds of every metric, one row per setting."""
    names = list(dict.fromkeys(name for rows in per_seed.values() for name in rows))
    lines = ["| setting | " + " | ".join(METRICS) + " | train s |", "|" + "---|" * (len(METRICS) + 2)]
    for name in names:
        cells = []
        for metric in METRICS + ("seconds",):
            values = [rows[name][metric] for rows in per_seed.values() if name in rows and metric in rows[name]]
            if not values:
                cells.append("")
            elif len(values) == 1 or metric == "seconds":
                cells.append(f"{np.mean(values):.3f}" if metric != "seconds" else f"{np.mean(values):.0f}")
            else:
                cells.append(f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--effect-modifier", type=float, default=1.0)
    parser.add_argument("--model-epochs", type=int, default=120)
    parser.add_argument("--latent-independence", type=float, nargs="+", default=[0.0, 10.0],
                        help="RegularizedVI latent_independence weights, one model each")
    parser.add_argument("--public-python", default=os.environ.get("NDREAMER_PYTHON"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["ndreamer", "model", "public"])
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()

    import torch
    from pyro_scmodels import metrics as M

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load_before = os.getloadavg()
    per_seed, notes = {}, []
    for seed in args.seeds:
        adata = simulate(args, seed)
        rows = {"oracle (true type x batch control mean)": M.effect_recovery(adata, M.oracle_effect(adata))}
        if "ndreamer" not in args.skip:
            rows.update(ndreamer_rows(adata, seed, args))
        if "model" not in args.skip:
            rows.update(model_rows(adata, seed, args))
        if "public" not in args.skip:
            if args.public_python:
                rows.update(public_row(adata, seed, args.public_python))
            elif seed == args.seeds[0]:
                notes.append("public NDreamer not run: no --public-python / NDREAMER_PYTHON given")
        per_seed[seed] = rows
        print(f"\nseed {seed}\n" + table({seed: rows}), flush=True)
    load_after = os.getloadavg()
    text = table(per_seed)
    print("\nall seeds (mean, range)\n" + text)
    notes += [f"load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, "
              f"after {tuple(round(v, 2) for v in load_after)}; one torch thread per process; train s is wall time"]
    print("\n".join(notes))
    if args.no_write:
        return
    facts = {"data": f"simulate(n_cells={args.cells}, n_genes={args.genes}, effect_modifier={args.effect_modifier}), "
                     f"seeds {args.seeds}; scored on stimulated cells",
             "targets": TARGETS, **hardware_facts()}
    section = section_header(TITLE, now(), facts) + text + "\n" + "\n".join(f"\n- {n}" for n in notes) + "\n"
    # a partial run (--skip, or the public NDreamer not given) gets its own section: it never replaces the full table
    skipped = list(args.skip) + (["public"] if "public" not in args.skip and not args.public_python else [])
    title = TITLE if not skipped else f"{TITLE[:-1]}, without {' and '.join(skipped)})"
    write_section(args.output, title, section.replace(TITLE, title, 1))


if __name__ == "__main__":
    main()
