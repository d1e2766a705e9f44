"""NDreamer on real IFN-beta data: which genes are kept, the interferon ITE, donor reproducibility.

Usage::

    python benchmarks/bench_real_effects.py [--quick] [--parts selection interferon model donors] [--output PATH]

Needs ``../shared/data`` (the Kang et al. 2018 files). Four measurements (``--parts`` picks some):

1. Gene selection: which interferon-stimulated genes (ISGs) are kept on both Kang files, and how
   many responding genes on simulated data (2,000 cells, 3,000 genes, 40 responding), for HVGs
   per batch x condition group (the old default), HVGs per batch with the conditions pooled, and
   pooled HVGs plus a share of condition-responding genes (the default is 10 %).
2. Kang (scGen split, 1,975 cells): a default ``NDreamer`` (default network, gene selection and
   training), then ``estimate_ite()`` at its default k: the share of stimulated cells with a
   positive ITE for ISG15, IFI6, IFIT1 and IFIT3, without and with ``shrink="clusters"``, next to the share of stimulated cells in which
   the gene is detected at all (a treated cell's ITE is its observed expression minus its matched
   control, so an undetected gene cannot have a positive ITE).
3. Kang, the model route: a RegularizedVI in the basal-state design (condition given to the encoder and
   the decoder, ``latent_independence=10``, ``MODEL_EPOCHS`` epochs at ``MODEL_LR``), then
   ``NDreamer.from_model(...).estimate_model_ite()``: the share of stimulated cells whose model ITE
   is positive and whose 90 % interval lies above 0, and matching in the model's z at the default k.
4. Muscat Kang subset (2 donors): NDreamer on each donor alone; the correlation across genes of
   the two donors' mean ITE of stimulated cells (overall, and the mean over the 5 cell types), at
   k = 1, k = 10 and the default k with ``shrink=None``, and the default k with ``shrink="clusters"``,
   against the correlation of the donors' pseudobulk log fold changes (log1p of counts per 1e4 of summed cells).

``--factual observed|matched`` builds every NDreamer with that ``factual`` (how a treated cell's own batch and
condition enter its ITE; default: NDreamer's own default).

``--quick`` uses the compact network (``network_preset("small")``, batch size 256) for NDreamer and
``QUICK_MODEL_EPOCHS`` epochs for the model route, and writes nothing unless ``--output`` is given. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware_facts, now, write_section  # noqa: E402

import pyro_scmodels as ps  # noqa: E402
from pyro_scmodels.ndreamer import NDreamer  # noqa: E402
from pyro_scmodels.ndreamer import network_preset  # noqa: E402
from pyro_scmodels.ndreamer._constants import NEAREST_NEIGHBOR  # noqa: E402
from pyro_scmodels.ndreamer.effects import FACTUAL_CHOICES  # noqa: E402
from pyro_scmodels.ndreamer.preprocess import log_normalise, variable_genes  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KANG, MUSCAT = DATA / "kang2018_ifnb_scgen_valid_counts.h5ad", DATA / "kang2018_ifnb_muscat_example.h5ad"
INTERFERON = ["ISG15", "IFI6", "IFIT1", "IFIT3"]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"
SECTION_TITLE = "## NDreamer on real IFN-beta data (bench_real_effects.py)"
MODEL_SECTION_TITLE = "## NDreamer on Kang: the model route (bench_real_effects.py --parts model)"
GENE_SCALED_SECTION_TITLE = ("## NDreamer on Kang: the model route with the gene-scaled decoder "
                             "(bench_real_effects.py --parts model --decoder-gene-scale)")
# RegularizedVI on Kang (1,975 cells): 100 epochs at lr 1e-2 (the default 1e-3 left it far from fitting the ISGs
# after 100 epochs: posterior predictive mean of ISG15 in control cells 14 counts against 0.94 observed)
MODEL_EPOCHS, MODEL_LR, MODEL_DRAWS = 100, 1e-2, 30
QUICK_MODEL_EPOCHS = 20  # --quick: a check that the route runs, not its figures
PARTS = ("selection", "interferon", "model", "donors")


def per_group_hvg(expression, genes, groups, num_hvg) -> np.ndarray:
    """The old default: scanpy seurat HVGs with every batch x condition group as a batch."""
    frame = anndata.AnnData(X=expression, obs=pd.DataFrame({"group": pd.Categorical(groups)}),
                            var=pd.DataFrame(index=pd.Index(genes).astype(str)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(frame, n_top_genes=num_hvg, flavor="seurat", batch_key="group")
    return frame.var["highly_variable"].to_numpy()


def selections(expression, genes, batch, condition, control, num_hvg) -> dict[str, np.ndarray]:
    """Gene masks of every scheme compared."""
    out = {"per batch x condition HVG (old)": per_group_hvg(expression, genes, np.char.add(batch, condition), num_hvg)}
    for share in (0.0, 0.05, 0.1, 0.2):
        name = "pooled HVG" if share == 0 else f"pooled HVG + {share:.0%} responding" + (" (default)" if share == 0.1 else "")
        out[name] = variable_genes(expression, genes, batch, condition, control, num_hvg, response_share=share)
    return out


def gene_selection() -> list[str]:
    """Markdown rows: scheme -> ISGs kept (Kang files) or responding genes kept (simulated)."""
    rows = []
    for path, control, batch_key in ((KANG, "control", None), (MUSCAT, "ctrl", "donor")):
        adata = anndata.read_h5ad(path)
        expression = log_normalise(adata)
        condition = adata.obs["condition"].astype(str).to_numpy()
        batch = np.full(adata.n_obs, "all") if batch_key is None else adata.obs[batch_key].astype(str).to_numpy()
        isgs = [g for g in INTERFERON if g in adata.var_names]
        for num_hvg in (500, 1000, 2000):
            if num_hvg >= adata.n_vars:
                continue
            for name, mask in selections(expression, adata.var_names, batch, condition, control, num_hvg).items():
                kept = [g for g in isgs if mask[adata.var_names.get_loc(g)]]
                rows.append(f"| {path.stem} | {num_hvg} | {name} | {len(kept)}/{len(isgs)} ({', '.join(kept) or '-'}) |")
    adata = ps.datasets.simulate(n_cells=2000, n_genes=3000, n_responding_genes=40, seed=0)
    expression = log_normalise(adata, "counts")
    responding, markers = adata.var["responding"].to_numpy(), adata.var["is_marker"].to_numpy()
    for num_hvg in (300, 1000):
        for name, mask in selections(expression, adata.var_names, adata.obs["batch"].astype(str).to_numpy(),
                                     adata.obs["condition"].astype(str).to_numpy(), "control", num_hvg).items():
            rows.append(f"| simulated 2,000 x 3,000 | {num_hvg} | {name} | responding {int((mask & responding).sum())}/40, "
                        f"markers {int((mask & markers).sum())}/{int(markers.sum())} |")
    return rows


def train(adata, control: str, network: dict) -> tuple[NDreamer, float]:
    """A default NDreamer (apart from ``network``) trained for the default passes; its seconds."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer(adata, "condition", control, device="cpu", **network)
        nd.train(progress_bar=False)
    return nd, time.perf_counter() - start


def kang_interferon(network: dict) -> list[str]:
    """Markdown rows: gene -> kept, shares of stimulated cells with ITE > 0 and with the 90 % interval above 0
    (default k), share detected."""
    adata = anndata.read_h5ad(KANG)
    nd, seconds = train(adata, "control", network)
    # the layers of each call are copied: the second call replaces them in nd.results
    layers = {shrink: {name: np.array(nd.estimate_ite(interval=0.9, shrink=shrink).layers[f"ite_stimulated{name}"])
                       for name in ("", "_q05")} for shrink in (None, "clusters")}
    stimulated = (adata.obs["condition"] == "stimulated").to_numpy()
    rows = []
    for gene in INTERFERON:
        detected = float((np.asarray(adata[stimulated, gene].X.todense()).ravel() > 0).mean())
        if gene in set(nd.genes):
            column = list(nd.genes).index(gene)
            shares = " | ".join(f"{float((layers[shrink][name][stimulated, column] > 0).mean()):.3f}"
                                for shrink in (None, "clusters") for name in ("", "_q05"))
            rows.append(f"| {gene} | yes | {shares} | {detected:.3f} |")
        else:
            rows.append(f"| {gene} | no | - | - | - | - | {detected:.3f} |")
    print(f"Kang: {len(nd.genes)} genes, trained in {seconds:.0f} s", flush=True)
    return rows


def kang_model_route(epochs: int = MODEL_EPOCHS, lr: float = MODEL_LR, decoder_gene_scale: bool = False) -> list[str]:
    """Markdown rows per ISG: shares of stimulated cells with model ITE > 0, q05 > 0 and matching ITE > 0;
    share detected; mean model ITE, observed difference of mean log expression, y_stimulated / y_control.
    ``decoder_gene_scale`` trains the model with ``RegularizedVI(decoder_gene_scale=True)``."""
    adata = anndata.read_h5ad(KANG)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # no feature_scaling_covariate_keys: the condition is also a feature-scaling key (the default)
        ps.RegularizedVI.setup_anndata(adata, nn_conditioning_covariate_keys=["condition"],
                                       encoder_covariate_keys=["condition"])
        model = ps.RegularizedVI(adata, latent_independence=10.0, seed=0, decoder_gene_scale=decoder_gene_scale)
        model.train(max_epochs=epochs, lr=lr, device="cpu", progress_bar=False)
        nd = NDreamer.from_model(model, "condition", "control", device="cpu")
        # the bounds from the spread of z alone, as this bench recorded them before the widened default (2026-12-06)
        decoded = nd.estimate_model_ite(num_samples=MODEL_DRAWS, gene_list=INTERFERON, widen_by_matching=False)
        matched = nd.estimate_ite(gene_list=INTERFERON)
    stimulated = (adata.obs["condition"] == "stimulated").to_numpy()
    logged = np.log1p(1e4 * np.asarray(adata[:, INTERFERON].X.todense()) / np.asarray(adata.X.sum(1)))
    observed = logged[stimulated].mean(0) - logged[~stimulated].mean(0)
    scaling = model.get_feature_scaling().loc[INTERFERON]
    rows = []
    for column, gene in enumerate(INTERFERON):
        share = {name: float((np.asarray(layer)[stimulated, column] > 0).mean()) for name, layer in (
            ("mean", decoded.layers["ite_model_stimulated"]), ("low", decoded.layers["ite_model_stimulated_q05"]),
            ("matched", matched.layers["ite_stimulated"]))}
        detected = float((np.asarray(adata[stimulated, gene].X.todense()).ravel() > 0).mean())
        effect = float(np.asarray(decoded.layers["ite_model_stimulated"])[stimulated, column].mean())
        ratio = float(scaling.loc[gene, "stimulated"] / scaling.loc[gene, "control"])
        rows.append(f"| {gene} | {share['mean']:.3f} | {share['low']:.3f} | {share['matched']:.3f} | {detected:.3f} | "
                    f"{effect:.2f} | {observed[column]:.2f} | {ratio:.2f} |")
    print(f"Kang model route: {epochs} epochs, {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def pseudobulk_log_fold_change(counts, stimulated: np.ndarray) -> np.ndarray:
    """log1p of counts per 1e4 of the summed stimulated cells minus that of the summed controls."""
    sums = [np.asarray(counts[np.flatnonzero(cells)].sum(0)).ravel() for cells in (stimulated, ~stimulated)]
    stim, ctrl = (np.log1p(1e4 * s / s.sum()) for s in sums)
    return stim - ctrl


def muscat_reproducibility(network: dict) -> list[str]:
    """Markdown rows: estimate -> donor-vs-donor correlation across genes, overall and per cell type."""
    adata = anndata.read_h5ad(MUSCAT)
    types = sorted(adata.obs["cell_type"].astype(str).unique())
    tables: dict[str, dict] = {}
    for donor in sorted(adata.obs["donor"].astype(str).unique()):
        cells = adata[adata.obs["donor"].astype(str) == donor].copy()
        nd, seconds = train(cells, "ctrl", network)
        stimulated = (cells.obs["condition"] == "stim").to_numpy()
        cell_type = cells.obs["cell_type"].astype(str).to_numpy()
        by_type = lambda values: {"all": values(np.ones_like(stimulated)), **{t: values(cell_type == t) for t in types}}  # noqa: E731
        tables.setdefault("pseudobulk log fold change", {})[donor] = by_type(
            lambda keep: pseudobulk_log_fold_change(cells.X[keep], stimulated[keep]))
        for k in sorted({1, 10, NEAREST_NEIGHBOR}):
            # unshrunk, as the rows were named before shrink="clusters" became estimate_ite's default
            ite = nd.estimate_ite(nearest_neighbor=k, shrink=None).layers["ite_stim"]
            tables.setdefault(f"NDreamer mean ITE, k = {k}" + (" (default)" if k == NEAREST_NEIGHBOR else "")
                              + ", shrink=None", {})[donor] = by_type(
                lambda keep: ite[stimulated & keep].mean(0))
        shrunk = nd.estimate_ite(shrink="clusters").layers["ite_stim"]
        tables.setdefault(f"NDreamer mean ITE, k = {NEAREST_NEIGHBOR}, shrink=\"clusters\"", {})[donor] = by_type(
            lambda keep: shrunk[stimulated & keep].mean(0))
        print(f"muscat donor {donor}: {cells.n_obs} cells, trained in {seconds:.0f} s", flush=True)
    rows = []
    for name, per_donor in tables.items():
        first, second = per_donor.values()
        r = {part: float(np.corrcoef(first[part], second[part])[0, 1]) for part in first}
        rows.append(f"| {name} | {r['all']:.3f} | {np.mean([r[t] for t in types]):.3f} | "
                    + " / ".join(f"{r[t]:.3f}" for t in types) + " |")
    return rows, types


def main(argv: list[str] | None = None) -> int:
    """Run the measurements, print them and (unless --quick) write the RESULTS.md sections they complete."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"compact network, {QUICK_MODEL_EPOCHS} model epochs; writes nothing unless --output is given")
    parser.add_argument("--output", type=Path, default=None, help="markdown file to update (default benchmarks/RESULTS.md)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="measurements to run (default all); a section of RESULTS.md is written only by a run of all its parts")
    parser.add_argument("--factual", choices=FACTUAL_CHOICES, default=None,
                        help="NDreamer(factual=...) for the interferon and donors parts (default: NDreamer's default)")
    parser.add_argument("--decoder-gene-scale", action="store_true",
                        help="the model part with RegularizedVI(decoder_gene_scale=True); written to its own section")
    args = parser.parse_args(argv)
    if not KANG.exists() or not MUSCAT.exists():
        print(f"needs {KANG} and {MUSCAT}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    network = {**network_preset("small"), "batch_size": 256} if args.quick else {}
    if args.factual is not None:  # the network's training does not read it, only the ITE's arithmetic
        network["factual"] = args.factual
    body, model_body = "", ""
    if "selection" in args.parts:
        body += ("Gene selection (ISGs of ISG15, IFI6, IFIT1, IFIT3 kept; on simulated data responding genes and markers "
                 "kept):\n\n| data | num_hvg | selection | kept |\n|---|---:|---|---|\n" + "\n".join(gene_selection()) + "\n\n")
    if "interferon" in args.parts:
        body += (f"Kang, default NDreamer{' (quick: compact network)' if args.quick else ''}"
                 f"{f', factual={args.factual!r}' if args.factual else ''}, `estimate_ite(interval=0.9, shrink=None)` "
                 f"(k = {NEAREST_NEIGHBOR}): share of stimulated cells with ITE > 0, and with its 90 % interval above 0. "
                 "With `factual=\"observed\"` (the cell's own counts) the share in which the gene is detected bounds the "
                 "first; with `\"matched\"` (the default network's `\"auto\"`) a cell's own term comes from its matched "
                 "cells.\n\n"
                 "The last two shares with `estimate_ite(interval=0.9, shrink=\"clusters\")`, the default (the bounds "
                 "widened by the cluster mean's posterior sd).\n\n"
                 "| gene | kept | ITE > 0 | q05 > 0 | ITE > 0, shrunk | q05 > 0, shrunk | detected |\n"
                 "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(kang_interferon(network))
                 + "\n\n")
    model_epochs = QUICK_MODEL_EPOCHS if args.quick else MODEL_EPOCHS
    if "model" in args.parts:
        model_body = (f"RegularizedVI on Kang in the basal-state design (`encoder_covariate_keys` and "
                      f"`nn_conditioning_covariate_keys` = condition, so the condition is also a feature-scaling key; "
                      f"`latent_independence=10`{', `decoder_gene_scale=True`' if args.decoder_gene_scale else ''}, {model_epochs} epochs{' (quick)' if args.quick else ''} at lr {MODEL_LR:g}), "
                      "then `NDreamer.from_model(...)`: "
                      f"share of stimulated cells whose decoded ITE (`estimate_model_ite`, {MODEL_DRAWS} draws of z) is "
                      "above 0, whose 90 % interval lies above 0, and whose matching ITE in the model's z (`estimate_ite`, "
                      "default k) is above 0; the share detected; the mean decoded ITE of stimulated cells against the "
                      "observed difference of mean log-normalised expression (stimulated - control); and the ratio of "
                      "the condition's feature scaling y, which the counterfactual switches with the decoder's condition.\n\n"
                      "| gene | model ITE > 0 | q05 > 0 | matching ITE > 0 | detected | mean model ITE | observed "
                      "difference | y_stim / y_ctrl |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
                      + "\n".join(kang_model_route(epochs=model_epochs, decoder_gene_scale=args.decoder_gene_scale)) + "\n")
    if "donors" in args.parts:
        reproducibility, types = muscat_reproducibility(network)
        body += (f"Muscat Kang subset, NDreamer{f' (factual={args.factual!r})' if args.factual else ''} on each donor alone: "
                 "correlation across genes between the two donors.\n\n"
                 f"| estimate | overall | mean over cell types | {' / '.join(types)} |\n|---|---:|---:|---|\n"
                 + "\n".join(reproducibility) + "\n")
    print("\n" + body + model_body)
    output = args.output if args.output is not None else (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        command = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])])
        facts = {**hardware_facts(), "torch threads": "1"}
        # each section is written only by a run that measured all of it
        main_parts = {"selection", "interferon", "donors"}
        for title, text, complete in ((SECTION_TITLE, body, main_parts <= set(args.parts)),
                                      (GENE_SCALED_SECTION_TITLE if args.decoder_gene_scale else MODEL_SECTION_TITLE,
                                       model_body, "model" in args.parts)):
            if complete:
                header = f"{title}\n\nMeasured {now()}.\n\n" + "\n".join(f"- {k}: {v}" for k, v in facts.items()) + "\n\n"
                write_section(output, title, header + text + f"\nCommand:\n\n```\n{command}\n```\n")
            else:  # it exited 0 having written nothing, without a word
                print(f"not written to {output}: {title!r} is written only by a run of its parts "
                      f"({sorted(main_parts) if title == SECTION_TITLE else ['model']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
