"""``pyro-scmodels demo``: simulate data with known truth, fit RegularizedVI and NDreamer, and report
what was recovered in words a newcomer can read.

Every figure of the report stands beside its truth or baseline with a verdict (good / weak /
failed) and one sentence of meaning; the thresholds are named in :data:`VERDICTS`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

# figure -> (good at or above, weak at or above); below the second is "failed"
VERDICTS = {
    "ambient": (0.9, 0.7),
    "dispersion": (0.7, 0.4),
    "ari_vs_pca": (-0.05, -0.2),  # latent ARI minus PCA's
    "ite": (0.7, 0.4),
    "effect_ratio": (0.7, 0.4),  # 1 - |log(estimated / true mean |ITE|)|
    "false_effect": (0.8, 0.6),  # 1 - (effect in other types / effect in responding types)
    "condition_mixing": (0.8, 0.6),
}


@dataclass
class Line:
    """One row of the report: a figure, what it is compared with, the verdict and its meaning."""

    name: str
    value: float
    reference: str
    verdict: str
    meaning: str


def verdict(score: float, key: str) -> str:
    """``"good"``, ``"weak"`` or ``"failed"`` for ``score`` under the thresholds of :data:`VERDICTS`."""
    good, weak = VERDICTS[key]
    if not np.isfinite(score):
        return "failed"
    return "good" if score >= good else "weak" if score >= weak else "failed"


def mixing_verdict(mixing: float, baseline: float) -> str:
    """Batch mixing: good when well mixed (>= 0.85, and not below PCA) or clearly better than PCA
    (+0.2); weak when about as mixed as PCA; failed when less mixed than PCA."""
    if (mixing >= max(0.85, baseline)) or mixing - baseline >= 0.2:
        return "good"
    return "weak" if mixing >= baseline - 0.02 else "failed"


def print_report(title: str, lines: list[Line]) -> None:
    """Print ``lines`` as an aligned table with a sentence under each figure."""
    print(f"\n{title}")
    for line in lines:
        print(f"  [{line.verdict:>6}] {line.name:<44} {line.value:8.3f}   ({line.reference})")
        print(f"           {line.meaning}")


def regularizedvi_report(adata, latent_key: str, seconds: float, epochs: int) -> list[Line]:
    """Recovery of the ambient profiles, dispersion, cell types and batch mixing against the truth."""
    from . import metrics as M

    true_ambient = adata.varm["true_ambient"]
    fitted = adata.varm["regularizedvi_ambient"].to_numpy()
    ambient = float(np.mean([M.pearson(np.log(fitted[:, b]), np.log(true_ambient[:, b]))
                             for b in range(true_ambient.shape[1])]))
    dispersion = M.spearman(adata.varm["regularizedvi_dispersion"].iloc[:, 0], adata.var["true_theta"])
    pca = M.log_normalised_pca(adata.layers["counts"])
    z = adata.obsm[latent_key]
    ari, ari_pca = M.cluster_ari(z, adata.obs["cell_type"]), M.cluster_ari(pca, adata.obs["cell_type"])
    mixing, mixing_pca = M.knn_entropy(z, adata.obs["batch"]), M.knn_entropy(pca, adata.obs["batch"])
    return [
        Line("ambient profile vs truth (Pearson of logs)", ambient, "1 = exact; mean over batches",
             verdict(ambient, "ambient"), "How well each batch's background RNA profile was recovered."),
        Line("dispersion vs truth (Spearman)", dispersion, "1 = same gene order", verdict(dispersion, "dispersion"),
             "Whether the genes the model finds noisier are the truly noisier ones."),
        Line("cell-type ARI, latent (k-means)", ari, f"PCA baseline {ari_pca:.3f}", verdict(ari - ari_pca, "ari_vs_pca"),
             "Do cells of one type cluster together in the latent space? 1 = perfectly; it should match PCA or beat it."),
        Line("batch mixing, latent (kNN entropy)", mixing, f"PCA baseline {mixing_pca:.3f}; 1 = fully mixed",
             mixing_verdict(mixing, mixing_pca),
             "Are batches mixed within a cell type? Higher than PCA means the batch effects were removed."),
        Line("training time (s)", seconds, f"{epochs} epochs", "info", "Wall time of RegularizedVI's training."),
    ]


def ndreamer_report(adata, results, genes) -> list[Line]:
    """NDreamer's per-cell effects against the simulated truth."""
    from . import metrics as M

    truth = adata[:, genes]
    responding = truth.var["responding"].to_numpy()
    ite = results.layers["ite_stimulated"][:, responding]
    true_ite = np.asarray(truth.layers["true_ite"])[:, responding]
    quiet = ~adata.obs["cell_type"].isin(adata.uns["simulation"]["responding_cell_types"]).to_numpy()
    r = M.pearson(ite, true_ite)
    estimated, true = float(np.abs(ite[~quiet].mean(0)).mean()), float(np.abs(true_ite[~quiet].mean(0)).mean())
    false = float(np.abs(ite[quiet].mean(0)).mean())
    ratio = 1 - abs(np.log(max(estimated, 1e-9) / max(true, 1e-9)))
    mixing = M.knn_entropy(results.obsm["X_effect_modifier_space_PCA"], adata.obs["condition"])
    return [
        Line("ITE vs truth (Pearson, responding genes)", r, "1 = exact", verdict(r, "ite"),
             "Each cell's estimated effect against its true one, pooled over cells and responding genes: it "
             "rewards the right effect per cell type and gene (this simulation has no within-type variation)."),
        Line("mean |ITE|, responding types", estimated, f"truth {true:.3f}", verdict(ratio, "effect_ratio"),
             "The size of the effect where there is one: it should be close to the truth."),
        Line("mean |ITE|, other types", false, "truth 0", verdict(1 - false / max(estimated, 1e-9), "false_effect"),
             "A false effect where there is none: it should be small next to the real one."),
        Line("condition mixing, modifier space", mixing, "1 = mixed", verdict(mixing, "condition_mixing"),
             "The modifier space should not separate the conditions, so that cells can be matched across them."),
    ]


def run(args, out: str, latent_key: str, store_results, write_figures) -> dict:
    """The demo's work, after the command line checked the arguments and the output folder."""
    from . import RegularizedVI, datasets
    from ._atomic import write_h5ad

    started = time.time()
    print(f"Simulating {args.n_cells} cells x {args.n_genes} genes (5 cell types, 3 batches, seed {args.seed}) ...")
    # markers and responding genes scale down with small gene numbers (5 types need 5 marker sets)
    n_markers = min(20, max(1, args.n_genes // 10))
    adata = datasets.simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_markers_per_type=n_markers,
                              n_responding_genes=min(40, max(1, args.n_genes // 10)), seed=args.seed)
    RegularizedVI.setup_anndata(
        adata, layer="counts", ambient_covariate_keys=["batch"], feature_scaling_covariate_keys=["batch"],
        library_size_key="batch",
    )
    model = RegularizedVI(adata, seed=args.seed)
    start = time.time()
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, kl_warmup_epochs=args.epochs // 10,
                early_stopping=False, device=args.device, seed=args.seed, progress_bar=not args.quiet)
    seconds = time.time() - start
    store_results(model, adata)
    lines = regularizedvi_report(adata, latent_key, seconds, args.epochs)
    print_report("RegularizedVI: recovered vs ground truth", lines)
    write_h5ad(adata, os.path.join(out, "results.h5ad"))
    model.save(os.path.join(out, "model"), overwrite=True)
    written = [os.path.join(out, "results.h5ad"), os.path.join(out, "model") + os.sep]
    written += write_figures(model, adata, out, colour_by=["batch", "cell_type"])
    if not args.skip_ndreamer:
        nd_lines, nd_written = _ndreamer(adata, out, args)
        lines, written = lines + nd_lines, written + nd_written
    print(f"\nDemo finished in {time.time() - started:.0f} s. Wrote:")
    for path in written:
        print(f"  {path}")
    print("\nNext: fit your own raw counts, e.g.\n  pyro-scmodels fit your_data.h5ad --batch-key batch --layer counts -o results/")
    return {line.name: line.value for line in lines}


def _ndreamer(adata, out: str, args) -> tuple[list[Line], list[str]]:
    from .figures import plot_ite_heatmap
    from .ndreamer import NDreamer, network_preset

    print("\nNDreamer: effect-modifier space and per-cell effects of 'stimulated' vs 'control' ...")
    nd = NDreamer(adata, "condition", "control", batch_key="batch", layer="counts", **network_preset("small"),
                  batch_size=256, device=args.device, seed=args.seed)
    nd.train(progress_bar=not args.quiet)
    nd.decompose_batch_effect()
    results = nd.estimate_ite()
    lines = ndreamer_report(adata, results, nd.genes)
    print_report("NDreamer: per-cell treatment effects vs ground truth", lines)
    folder = os.path.join(out, "ndreamer")
    nd.save(folder, overwrite=True)
    heatmap = plot_ite_heatmap(results.layers["ite_stimulated"], nd.genes, adata.obs["cell_type"],
                               os.path.join(out, "ndreamer_ite_heatmap.png"), condition="stimulated")
    return lines, [folder + os.sep, heatmap]
