"""Is the ambient background learned? Fractions and profiles against a known truth.

Two designs, each printed as a markdown table (``--write`` also puts them in RESULTS.md):

- ``simulator``: ``datasets.simulate(ambient_fractions=(0.03, 0.08, 0.15, 0.25))``, four batches
  at known background shares with per-cell variation. Per variant of the model: each batch's
  mean inferred share against the truth, Spearman of the per-cell share with the truth (all
  cells, and within batches), log-profile correlation with the truth (fitted and initial), and
  integration (kNN batch entropy and cell-type ARI of k-means on the latent).
- ``spikein``: PBMC 3 chemistries (``../shared/data``), 1,000 most-counted genes; the cells are
  split at random into four groups and soup counts (the pooled profile of all cells) are
  added to make 0 %, 2 %, 8 % and 20 % of each cell's counts. The model gets the group as an
  ambient key; reported: the slope of the inferred share on the added share (per-group means),
  Spearman per cell, and the group means. ``--soup per-droplet`` instead adds the same expected soup
  counts to every cell of a group (the group's share of its mean library), as a droplet takes up
  ambient RNA whatever its cell holds.

Variants: ``seed`` (the SPEC defaults: init 0.2 x mean, prior masked), ``init_prior``,
``prior_on`` (Gamma(1, 100) counted), ``learned_scale`` (Gamma(1, 1/m_e) with m_e learned per
category), ``shape_prior`` (the package's ``ambient_shape_prior=10``: Gamma(a, a / (m_e p_g)) counted, centred
on the mean normalised expression p, the amount m_e per category learned, every gene still learned; ``shape_prior:A``
for a = A),
``droplet`` (the package's ``ambient_per_droplet=True``: mu = (l rho + s) y, the background as counts per droplet), ``low_count_init`` (profile initialised from the 10 % lowest-count cells),
``gene_scaled`` (the package's ``decoder_gene_scale=True``: the decoder's output in units of each gene's mean
normalised expression, rho_g = m_g softplus(W h + b)_g / log 2), ``global_lr`` (global sites at 5 x the learning rate), ``independence`` (the encoder told the design's category,
the batch or the spiked group, and z made independent of it: ``latent_independence=10``; ``independence:W`` for
weight W), ``profile_empties`` (``ambient_profile=``
from simulated empty droplets; only the amount per category is learned), ``scaling`` (the category's per-gene
scaling y modelled too: ``feature_scaling_covariate_keys``), ``profile_pooled``
(``ambient_profile=`` the pooled profile of all cells, the same for every category) and
combinations joined by ``+``. ``cellbender`` runs CellBender remove-background (installed in its own
environment: ``--cellbender PATH`` or $CELLBENDER) on the same counts plus simulated empty droplets,
one run per channel: per batch on the simulator (its empty droplets drawn from that batch's true
background), once on the spiked PBMC cells (empty droplets drawn from the soup that was added);
``cellbender_per_group`` runs one channel per spiked group, each with empty droplets at its own
soup amount (the 0 % group has no soup and is left out).

Run from the repository root::

    python benchmarks/bench_ambient.py simulator --variants seed,profile_empties  # every option: --help
    python benchmarks/bench_ambient.py spikein --variants seed,global_lr
    python benchmarks/bench_ambient.py simulator --variants seed,cellbender --cellbender /work/cb_venv/bin/cellbender
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cellbender import cellbender_simulator, cellbender_spikein, find_cellbender  # noqa: E402
from _common import hardware_facts, now, update_results  # noqa: E402

from pyro_scmodels import RegularizedPriors, RegularizedVI, datasets  # noqa: E402
from pyro_scmodels import metrics as M  # noqa: E402
from pyro_scmodels.models.ambient import profile_from_droplets  # noqa: E402
from pyro_scmodels.models.regularizedvi_guide import RegularizedVIGuide  # noqa: E402
from pyro_scmodels.models.regularizedvi_module import RegularizedVIModel  # noqa: E402
from pyro_scmodels.pyro_modules import PositiveSiteGuide  # noqa: E402

FRACTIONS = (0.03, 0.08, 0.15, 0.25)
SPIKES = (0.0, 0.02, 0.08, 0.20)
PBMC = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc_10x_3chemistries_scWGParis.h5ad"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GLOBAL_LR_FACTOR = 5.0
LATENT_INDEPENDENCE = 10.0  # the weight of the documented integration setup (docs/models.md)


# --- the learned-scale prior (an experiment, not a package option) -------------------------
class LearnedScaleModel(RegularizedVIModel):
    """s_{e,g} ~ Gamma(1, 1 / m_e), the mean m_e ~ LogNormal(log 0.01, 2) learned per category."""

    def sample_ambient(self, genes):
        prior = dist.LogNormal(torch.tensor(np.log(0.01)), torch.tensor(2.0)).expand([self.dims.n_ambient, 1])
        mean = pyro.sample("ambient_mean", prior.to_event(2))
        with pyro.plate("ambient_categories", self.dims.n_ambient, dim=-2), genes:
            return pyro.sample("ambient", dist.Gamma(torch.ones(()), 1.0 / mean))


class LearnedScaleGuide(RegularizedVIGuide):
    """The seed guide plus a point estimate of m_e, starting at the mean of the initial s."""

    def __init__(self, dims, init, *args, **kwargs):
        super().__init__(dims, init, *args, **kwargs)
        start = torch.as_tensor(init["ambient"], dtype=torch.float32).mean(-1, keepdim=True)
        self.ambient_mean = PositiveSiteGuide(start, "map")

    def global_sites(self):
        # outside the plate (the model's plate of that name is entered once per trace), as one (E, 1) value
        pyro.sample("ambient_mean", dist.Delta(self.ambient_mean.value, event_dim=2))
        return super().global_sites()


class LearnedScaleVI(RegularizedVI):
    model_class = LearnedScaleModel
    guide_class = LearnedScaleGuide


# --- data ---------------------------------------------------------------------------------
def simulated(n_cells: int, n_genes: int, seed: int = 0):
    return datasets.simulate(n_cells=n_cells, n_genes=n_genes, n_batches=len(FRACTIONS), n_markers_per_type=10,
                             n_responding_genes=20, ambient_fractions=FRACTIONS, seed=seed)


def spiked_pbmc(n_genes: int = 1000, seed: int = 0, added_as: str = "per-count"):
    """PBMC counts with soup added to random quarters of the cells at the shares in SPIKES.

    ``added_as="per-count"``: each cell gets soup in proportion to its own counts, so that it makes the group's share of
    every cell (the seed model's assumption). ``"per-droplet"``: each cell of a group draws the same expected soup
    counts (Poisson), the group's share of its mean library, as a droplet takes up ambient RNA whatever its cell
    holds; cells with less RNA then carry a larger share.
    """
    import anndata
    from scipy import sparse

    adata = anndata.read_h5ad(PBMC)
    totals = np.asarray(adata.X.sum(0)).ravel()
    adata = adata[:, np.sort(np.argsort(-totals)[:n_genes])].copy()
    counts = adata.X.toarray().astype(np.int64)
    rng = np.random.default_rng(seed)
    soup = counts.sum(0) / counts.sum()
    group = rng.permutation(np.arange(adata.n_obs) % len(SPIKES))
    share = np.asarray(SPIKES)[group]
    totals = counts.sum(1)
    if added_as == "per-droplet":
        group_mean = np.array([totals[group == g].mean() for g in range(len(SPIKES))])[group]
        added = rng.poisson(share / (1.0 - share) * group_mean).astype(np.int64)
    else:
        added = np.round(share / (1.0 - share) * totals).astype(np.int64)
    for n in np.flatnonzero(added):
        counts[n] += rng.multinomial(added[n], soup)
    adata.X = sparse.csr_matrix(counts.astype(np.float32))
    adata.obs["spike"] = pd.Categorical([f"spike_{int(100 * s)}" for s in share],
                                        categories=[f"spike_{int(100 * s)}" for s in SPIKES])
    adata.obs["added_fraction"] = added / counts.sum(1)
    adata.obs["added_counts"] = added
    adata.uns["soup"] = soup
    return adata


# --- fitting --------------------------------------------------------------------------------
def variant_options(name: str, adata, key: str = "batch") -> dict:
    """Constructor and training options of a variant (names joined by '+' combine).

    ``key`` is the design's ambient category under test (the batch on the simulator, the spiked group on PBMC).
    """
    options = {"model": {}, "train": {}, "setup": {}, "cls": RegularizedVI, "global_lr": False, "low_count_init": False}
    for part in name.split("+"):
        if part == "seed":
            continue
        elif part.split(":")[0] == "independence":  # the encoder told the category, z penalised (MMD) for carrying it
            options["setup"]["encoder_covariate_keys"] = [key]
            options["model"]["latent_independence"] = float(part.split(":")[1]) if ":" in part else LATENT_INDEPENDENCE
        elif part == "init_prior":
            options["model"]["init"] = "prior"
        elif part == "prior_on":
            options["model"]["priors"] = RegularizedPriors(regularize_ambient=True)
        elif part == "learned_scale":
            options["cls"] = LearnedScaleVI
        elif part == "droplet":  # the package option: the background as counts per droplet, mu = (l rho + s) y
            options["model"]["ambient_per_droplet"] = True
        elif part.split(":")[0] == "shape_prior":  # the package option: Gamma(a, a / (m_e p_g)), m_e learned
            options["model"]["ambient_shape_prior"] = float(part.split(":")[1]) if ":" in part else 10.0
        elif part == "gene_scaled":  # the package option: rho_g = m_g softplus(W h + b)_g / log 2
            options["model"]["decoder_gene_scale"] = True
        elif part == "scaling":  # the category's per-gene scaling y modelled too (the simulator draws one per batch)
            options["setup"]["feature_scaling_covariate_keys"] = [key]
        elif part == "low_count_init":
            options["low_count_init"] = True
        elif part == "global_lr":
            options["global_lr"] = True
        elif part == "profile_pooled":  # no empty droplets: the pooled profile of all cells, for every category
            options["model"]["ambient_profile"] = profile_from_droplets(adata, layer="counts" if "counts" in adata.layers else None)
        elif part == "profile_empties":
            options["model"]["ambient_profile"] = profile_from_droplets(datasets.simulate_empty_droplets(adata), groupby="batch")
        else:
            raise ValueError(f"unknown variant {part!r}")
    return options


def init_from_low_count_cells(model, adata) -> None:
    """Each batch's initial s: same total, the profile of its 10 % lowest-count cells."""
    counts = adata.layers["counts"]
    totals = np.asarray(counts.sum(1)).ravel()
    codes = adata.obs["batch"].cat.codes.to_numpy()
    value = model.module.guide.ambient.value.detach().clone()
    for k in range(value.shape[0]):
        cells = np.flatnonzero(codes == k)
        low = cells[totals[cells] <= np.quantile(totals[cells], 0.1)]
        profile = np.asarray(counts[low].sum(0)).ravel() + 0.5
        value[k] = torch.as_tensor(profile / profile.sum() * value[k].sum().item(), dtype=value.dtype)
    model.module.guide.ambient.value = value  # a PyroParam: assigning sets its unconstrained value


def fit(adata, name: str, setup: dict, epochs: int, lr: float, batch_size: int, seed: int = 0, key: str = "batch"):
    """Set up, build and train one variant; returns the model, its initial profile and seconds."""
    options = variant_options(name, adata, key)
    RegularizedVI.setup_anndata(adata, layer="counts" if "counts" in adata.layers else None, **setup, **options["setup"])
    model = options["cls"](adata, n_hidden=64, n_latent=8, seed=seed, **options["model"])
    if options["low_count_init"]:
        init_from_low_count_cells(model, adata)
    initial_profile = model.get_ambient_profile().to_numpy().copy()
    start = time.time()
    model.train(max_epochs=epochs, lr=lr, batch_size=batch_size, early_stopping=False, kl_warmup_epochs=epochs // 4,
                progress_bar=False, seed=seed, global_lr_factor=GLOBAL_LR_FACTOR if options["global_lr"] else 1.0)
    return model, initial_profile, time.time() - start


def log_profile_r(fitted: np.ndarray, truth: np.ndarray) -> float:
    """Mean over categories of the Pearson correlation of log normalised profiles (genes x categories)."""
    fitted, truth = fitted / fitted.sum(0), truth / truth.sum(0)
    return float(np.mean([M.pearson(np.log(fitted[:, k]), np.log(truth[:, k])) for k in range(truth.shape[1])]))


def measure_simulator(name: str, n_cells: int, n_genes: int, epochs: int, lr: float, seed: int = 0,
                      cellbender: str | None = None, threads: int = 1) -> dict:
    adata = simulated(n_cells, n_genes, seed)
    truth = adata.obs["true_ambient_fraction"].to_numpy()
    batch = adata.obs["batch"].to_numpy()
    levels = list(adata.obs["batch"].cat.categories)
    if name == "cellbender":  # no latent space and no initial profile of ours to compare
        run = cellbender_simulator(adata, find_cellbender(cellbender), epochs, threads)
        inferred, profile, initial, z, seconds = run["share"], run["profile"], None, None, run["seconds"]
        name = f"{name} ({run['unanalysed']} cells not analysed)" if run["unanalysed"] else name
    else:
        model, initial, seconds = fit(adata, name, {"batch_key": "batch"}, epochs, lr, batch_size=128, seed=seed)
        inferred, profile = model.get_ambient_fraction(), model.get_ambient_profile().to_numpy()
        z = model.get_latent_representation()
    keep = ~np.isnan(inferred)  # CellBender may leave a few cells unanalysed
    inferred, truth, batch = inferred[keep], truth[keep], batch[keep]
    by_batch = np.array([inferred[batch == b].mean() for b in levels])
    true_by_batch = np.array([truth[batch == b].mean() for b in levels])
    return {
        "variant": name, "inferred": by_batch, "truth": true_by_batch,
        "max_rel_error": float(np.max(np.abs(by_batch / true_by_batch - 1.0))),
        "spearman": M.spearman(inferred, truth),
        "spearman_within": float(np.mean([M.spearman(inferred[batch == b], truth[batch == b]) for b in levels])),
        "profile_r": log_profile_r(profile, adata.varm["true_ambient"]),
        "profile_r_initial": np.nan if initial is None else log_profile_r(initial, adata.varm["true_ambient"]),
        "batch_entropy": np.nan if z is None else M.knn_entropy(z, adata.obs["batch"]),
        "type_ari": np.nan if z is None else M.cluster_ari(z, adata.obs["cell_type"]),
        "seconds": seconds,
    }


def measure_spikein(name: str, epochs: int, lr: float, seed: int = 0, cellbender: str | None = None,
                    threads: int = 1, added_as: str = "per-count") -> dict:
    adata = spiked_pbmc(seed=seed, added_as=added_as)
    if name in ("cellbender", "cellbender_per_group"):
        run = cellbender_spikein(adata, find_cellbender(cellbender), epochs, threads, per_group=name == "cellbender_per_group")
        inferred, seconds = run["share"], run["seconds"]
        name = f"{name} ({run['unanalysed']} cells not analysed)" if run["unanalysed"] else name
    else:
        setup = {"ambient_covariate_keys": ["batch", "spike"], "dispersion_key": "batch", "library_size_key": "batch"}
        model, _, seconds = fit(adata, name, setup, epochs, lr, batch_size=512, seed=seed, key="spike")
        inferred = model.get_ambient_fraction()
    added = adata.obs["added_fraction"].to_numpy()
    group = adata.obs["spike"].to_numpy()
    levels = list(adata.obs["spike"].cat.categories)
    means = np.array([np.nanmean(inferred[group == g]) if np.isfinite(inferred[group == g]).any() else np.nan
                      for g in levels])  # NaN for a group a variant leaves out
    added_means = np.array([added[group == g].mean() for g in levels])
    present, analysed = ~np.isnan(means), ~np.isnan(inferred)
    return {"variant": name, "inferred": means, "added": added_means,
            "slope": float(np.polyfit(added_means[present], means[present], 1)[0]),
            "spearman": M.spearman(inferred[analysed], added[analysed]), "seconds": seconds}


# --- tables -----------------------------------------------------------------------------------
def number(value: float, digits: int) -> str:
    """``value`` to ``digits`` decimals, or a dash where it does not apply (NaN)."""
    return "-" if np.isnan(value) else f"{value:.{digits}f}"


def percent(values) -> str:
    return " / ".join("-" if np.isnan(v) else f"{100 * v:.1f}" for v in values)


def simulator_table(rows: list[dict]) -> str:
    lines = ["| variant | inferred % per batch | true % | max rel. error | Spearman (all / within batch) | "
             "log-profile r (fitted / initial) | batch entropy | type ARI | s |", "|---|---|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {percent(r['inferred'])} | {percent(r['truth'])} | {r['max_rel_error']:.2f} | "
                     f"{r['spearman']:.2f} / {r['spearman_within']:.2f} | {r['profile_r']:.3f} / {number(r['profile_r_initial'], 3)} | "
                     f"{number(r['batch_entropy'], 3)} | {number(r['type_ari'], 2)} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def spikein_table(rows: list[dict]) -> str:
    lines = ["| variant | inferred % per group | added % | slope | Spearman per cell | s |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {percent(r['inferred'])} | {percent(r['added'])} | {r['slope']:.2f} | "
                     f"{r['spearman']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("design", choices=("simulator", "spikein"))
    parser.add_argument("--variants", default="seed,init_prior,prior_on,learned_scale,low_count_init,global_lr,"
                                               "profile_empties,profile_empties+global_lr")
    parser.add_argument("--n-cells", type=int, default=600, help="simulator design only (spikein: all PBMC cells)")
    parser.add_argument("--n-genes", type=int, default=100, help="simulator design only (spikein: the PBMC genes)")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data (spike groups, simulated cells) and the model")
    parser.add_argument("--cellbender", default=None, help="the cellbender command for the 'cellbender' variant "
                        "(default: $CELLBENDER or the one on PATH)")
    parser.add_argument("--cellbender-epochs", type=int, default=150, help="CellBender's epochs (its default: 150)")
    parser.add_argument("--soup", choices=("per-count", "per-droplet"), default="per-count",
                        help="spikein: soup in proportion to each cell's counts, or the same expected counts per droplet")
    parser.add_argument("--write", action="store_true", help="replace this design's section of RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for name in args.variants.split(","):
        if args.design == "simulator":
            rows.append(measure_simulator(name, args.n_cells, args.n_genes,
                                          args.cellbender_epochs if name.startswith("cellbender") else args.epochs, args.lr,
                                          seed=args.seed, cellbender=args.cellbender, threads=args.threads))
            table = simulator_table(rows)
        else:
            rows.append(measure_spikein(name, args.cellbender_epochs if name.startswith("cellbender") else args.epochs, args.lr,
                                        seed=args.seed, cellbender=args.cellbender, threads=args.threads,
                                        added_as=args.soup))
            table = spikein_table(rows)
        print(table.splitlines()[-1], flush=True)
    print(table)
    if args.write:
        # the sections' titles in RESULTS.md ("spikein" wrote a new section beside "spike-in on PBMC")
        title = "## Ambient: simulator" if args.design == "simulator" else "## Ambient: spike-in on PBMC"
        if args.design == "spikein" and args.soup == "per-droplet":
            title += " (soup per droplet)"
        settings = (f"{args.n_cells} cells x {args.n_genes} genes, " if args.design == "simulator" else "") + \
            f"{args.epochs} epochs, lr {args.lr:g}, no early stopping; " + ", ".join(f"{k}: {v}" for k, v in hardware_facts().items())
        load_after = os.getloadavg()
        run = (f"Measured {now()}; load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
               f"{tuple(round(x, 2) for x in load_after)}. Command: `python benchmarks/bench_ambient.py "
               f"{' '.join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))}`")
        update_results(RESULTS, f"{title}\n\n{run}\n\n{settings}.\n\n{table}\n", title)


if __name__ == "__main__":
    main()
