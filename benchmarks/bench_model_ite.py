"""Is the model-based counterfactual unbiased and calibrated? Variants scored against a known truth.

``datasets.simulate(effect_modifier=1.0)``: a continuous state inside each cell type scales the
response, and ``layers["true_ite"]`` holds every cell's true effect. A RegularizedVI whose decoder
is conditioned on the condition is trained per variant; ``NDreamer.from_model(...)
.estimate_model_ite()`` decodes each cell's posterior z under both conditions, and
:func:`pyro_scmodels.metrics.effect_recovery` scores the posterior mean and the 90 % interval
(stimulated cells; slope and coverage on responding cells x responding genes).

Variants (``--n-hidden`` and ``--n-layers`` set the networks, 128 wide and 1 layer by default as in the package):

- ``decoder_only``: the condition enters the decoder only (the encoder reads the treated counts,
  so z carries the condition);
- ``basal_state``: the condition also enters the encoder (``encoder_covariate_keys``), so z can
  leave it out and the decoder adds it back;
- ``basal_state_independence``: the same with ``latent_independence`` (10 by default), which keeps
  the condition out of z (the setup docs/ndreamer_model_route.md recommends);
- ``basal_state_independence_ensemble_<k>``: ``--ensemble`` such models with different seeds; the
  mean of their means, and an interval of +- 1.645 sd from the within-model (z) and between-model
  variance.

Every model trains without early stopping. Each variant's coverage is also given with the bounds widened by
the model's disagreement with the matched ITE (``widen_by_matching=True``) and with the matched interval
extended to the mean (``widen_by_matching="hull"``, ``estimate_model_ite()``'s default); ``--decoder-gene-scale`` trains
``RegularizedVI(decoder_gene_scale=True)``; ``--responding-cell-types type_0`` simulates one responding type of five. The table (with the oracle of
:func:`pyro_scmodels.metrics.oracle_effect`) is printed and written to the section
``## Model ITE variants (bench_model_ite.py, <cells> x <genes>)`` of ``benchmarks/RESULTS.md``
(``--no-write``: print only).

Run from the repository root::

    python benchmarks/bench_model_ite.py --n-cells 2000 --n-genes 200 --epochs 120
    python benchmarks/bench_model_ite.py --n-cells 3000 --n-genes 500 --epochs 200  # every option: --help
    python benchmarks/bench_model_ite.py --n-cells 2000 --n-genes 200 --epochs 120 --responding-cell-types type_0
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _common import hardware_facts, now, section_header, write_section
import pyro_scmodels as ps
from pyro_scmodels import metrics as M

HERE = Path(__file__).resolve().parent

Z_90 = 1.645  # standard-normal quantile of a central 90 % interval


def fit(adata, basal_state: bool, epochs: int, seed: int, n_hidden: int = 128, latent_independence: float = 0.0,
        decoder_gene_scale: bool = False, n_layers: int = 1):
    """A RegularizedVI conditioned on the condition (and, for the basal state, encoded with it); its model ITE's
    mean, z-only bounds (``widen_by_matching=False``), the bounds widened by matching (``True``) and the matched
    interval extended to the mean (``widen_by_matching="hull"``, the default)."""
    adata = adata.copy()
    setup = dict(layer="counts", ambient_covariate_keys=["batch"], feature_scaling_covariate_keys=["batch"],
                 library_size_key="batch", nn_conditioning_covariate_keys=["condition"])
    if basal_state:
        setup["encoder_covariate_keys"] = ["condition"]
    ps.RegularizedVI.setup_anndata(adata, **setup)
    model = ps.RegularizedVI(adata, n_hidden=n_hidden, n_layers=n_layers, seed=seed,
                             latent_independence=latent_independence, decoder_gene_scale=decoder_gene_scale)
    model.train(max_epochs=epochs, batch_size=256, lr=5e-3, kl_warmup_epochs=max(1, epochs // 10),
                early_stopping=False, device="cpu", progress_bar=False)
    nd = ps.NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu")
    results = nd.estimate_model_ite(num_samples=30, widen_by_matching=False)
    plain = tuple(np.array(results.layers[f"ite_model_stimulated{s}"]) for s in ("", "_q05", "_q95"))
    results = nd.estimate_model_ite(num_samples=30, widen_by_matching=True)
    widened = tuple(np.array(results.layers[f"ite_model_stimulated{s}"]) for s in ("_q05", "_q95"))
    results = nd.estimate_model_ite(num_samples=30, widen_by_matching="hull")
    return plain + widened + tuple(np.array(results.layers[f"ite_model_stimulated{s}"]) for s in ("_q05", "_q95"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=3000)
    parser.add_argument("--n-genes", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--n-hidden", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=1, help="hidden layers of the encoder and decoder")
    parser.add_argument("--latent-independence", type=float, default=10.0)
    parser.add_argument("--ensemble", type=int, default=3, help="models in the ensemble variant (0 or 1: skip it; an "
                                                                 "ensemble needs two or more)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated data")
    parser.add_argument("--decoder-gene-scale", action="store_true", help="RegularizedVI(decoder_gene_scale=True)")
    parser.add_argument("--responding-cell-types", nargs="+", default=None,
                        help="simulate(responding_cell_types=...), e.g. type_0 (one responding type of five)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    adata = ps.datasets.simulate(n_cells=args.n_cells, n_genes=args.n_genes, seed=args.seed, effect_modifier=1.0,
                                 **({} if args.responding_cell_types is None else
                                    {"responding_cell_types": args.responding_cell_types}))
    rows = []

    def score(name, mean, low, high, seconds, wide_low=None, wide_high=None, hull_low=None, hull_high=None):
        widened, hull = ((np.nan if a is None else M.effect_recovery(adata, mean, low=a, high=b)["coverage"])
                         for a, b in ((wide_low, wide_high), (hull_low, hull_high)))
        rows.append({"variant": name, **M.effect_recovery(adata, mean, low=low, high=high),
                     "coverage_widened_by_matching": widened, "coverage_hull": hull, "train_s": seconds})
        print(f"{name}: {rows[-1]}", flush=True)

    penalty = args.latent_independence
    variants = (("decoder_only", False, 0.0), ("basal_state", True, 0.0), ("basal_state_independence", True, penalty))
    for name, basal, weight in variants:
        start = time.time()
        mean, low, high, *wide_and_hull = fit(adata, basal, args.epochs, 0, args.n_hidden, weight, args.decoder_gene_scale,
                                        args.n_layers)
        score(name, mean, low, high, time.time() - start, *wide_and_hull)
    if args.ensemble > 1:
        start = time.time()
        fits = [fit(adata, True, args.epochs, s, args.n_hidden, penalty, args.decoder_gene_scale, args.n_layers)
                for s in range(args.ensemble)]
        means = np.stack([f[0] for f in fits])
        # the z interval of each model read as +- 1.645 sd; variances add (law of total variance)
        within = np.mean([((f[2] - f[1]) / (2 * Z_90)) ** 2 for f in fits], axis=0)
        sd = np.sqrt(within + means.var(0, ddof=1))
        mean = means.mean(0)
        score(f"basal_state_independence_ensemble_{args.ensemble}", mean, mean - Z_90 * sd, mean + Z_90 * sd,
              time.time() - start)
    oracle = M.effect_recovery(adata, M.oracle_effect(adata))
    rows.append({"variant": "oracle (observed - true type x batch control mean)", **oracle, "train_s": 0.0})
    load_after = os.getloadavg()
    table = pd.DataFrame(rows).set_index("variant").to_markdown(floatfmt=".3f")
    types = "" if args.responding_cell_types is None else f", responding_cell_types={args.responding_cell_types}"
    setting = (f"simulate(n_cells={args.n_cells}, n_genes={args.n_genes}, seed={args.seed}, effect_modifier=1.0{types}); "
               f"RegularizedVI(n_hidden={args.n_hidden}{f', n_layers={args.n_layers}' if args.n_layers != 1 else ''}"
               f"{', decoder_gene_scale=True' if args.decoder_gene_scale else ''}), {args.epochs} epochs at lr 5e-3, batch 256, no early stopping; "
               f"latent_independence={penalty} where named; estimate_model_ite(num_samples=30)")
    print(f"\n{setting}\n\n{table}")
    if args.no_write:
        return
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    title = (f"## Model ITE variants (bench_model_ite.py, {args.n_cells} x {args.n_genes}"
             f"{', gene-scaled decoder' if args.decoder_gene_scale else ''}"
             f"{f', {args.n_layers} hidden layers' if args.n_layers != 1 else ''}"
             f"{'' if args.responding_cell_types is None else ', responding types ' + ' '.join(args.responding_cell_types)})")
    facts = {"setting": setting, "commit": commit or "unknown", **hardware_facts(),
             "load average (1, 5, 15 min)": f"before {tuple(round(v, 2) for v in load_before)}, "
                                             f"after {tuple(round(v, 2) for v in load_after)}; one torch thread"}
    note = ("Scored on stimulated cells: per-cell r inside responding types, CATE r, false-effect ratio, slope of "
            "estimate on truth and coverage of the 90 % interval on responding cells x responding genes "
            "(`metrics.effect_recovery`); `coverage_widened_by_matching`: the same with "
            "`estimate_model_ite(widen_by_matching=True)`; `coverage_hull`: with `widen_by_matching=\"hull\"`, the default. "
            "Targets (issue 10, item 3): slope 0.8-1.25, coverage 0.85-0.95, per-cell r >= 0.6.")
    write_section(args.output, title, section_header(title, now(), facts) + table + "\n\n" + note + "\n")


if __name__ == "__main__":
    main()
