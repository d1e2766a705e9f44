# %% [markdown]
# # RegularizedVI quickstart: three 10x chemistries of PBMCs
#
# **Data.** The real data set (`pbmc_10x_3chemistries_scWGParis.h5ad`, obs `batch` = 10x chemistry) is
# read from `../shared/data` (relative to the repository root) when that folder is present; otherwise
# the tutorial falls back to the package simulator `pyro_scmodels.datasets.simulate`, so it always runs.
#
# Set `PYRO_SCMODELS_QUICK=1` for a quick run (fewer cells, genes and epochs; < 1 minute on 2 CPU cores).

# %%
import sys

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc

import pyro_scmodels as ps

pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 12)
from _setup import DATA, FIGURES, QUICK  # tutorials/_setup.py: quick mode, data and figure folders

print("quick mode:", QUICK, "| data folder:", DATA, "(present)" if DATA.is_dir() else "(absent: simulating)")

# %% [markdown]
# ## Load the counts and pick variable genes
# Raw UMI counts are kept in `layers["counts"]`; variable genes are chosen per chemistry on a
# log-normalised copy.

# %%
path = DATA / "pbmc_10x_3chemistries_scWGParis.h5ad"
if path.exists():
    adata = sc.read_h5ad(path)
else:
    adata = ps.datasets.simulate(n_cells=3000, n_genes=600, seed=0)
    adata.X = adata.layers["counts"].copy()
adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")
if QUICK and adata.n_obs > 1200:
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 1200, replace=False)].copy()
adata.layers["counts"] = adata.X.copy()


# %% [markdown]
# ## Cell-type labels from markers, one chemistry at a time
# The real data has no labels. Each chemistry is clustered on its own (so no batch effect can shape
# the labels) and each cluster takes the type whose markers score highest in it: T, NK, B or myeloid
# (CD14 and FCGR3A monocytes and dendritic cells together). They are used only to score the
# integration. The simulated data has its true `cell_type`.

# %%
MARKERS = {"T cell": ["CD3E", "CD3D", "IL7R"], "NK cell": ["NKG7", "GNLY"], "B cell": ["MS4A1", "CD79A"],
           "myeloid": ["CD14", "LYZ", "S100A8", "FCGR3A", "MS4A7", "FCER1A"]}


def marker_labels(counts: ad.AnnData) -> pd.Series:
    """Leiden clusters of each chemistry, each named after its highest-scoring marker set."""
    labels = []
    for chemistry in counts.obs["batch"].cat.categories:
        one = counts[counts.obs["batch"] == chemistry].copy()
        sc.pp.normalize_total(one, target_sum=1e4)
        sc.pp.log1p(one)
        sc.pp.pca(one, n_comps=20, random_state=0)
        sc.pp.neighbors(one, random_state=0)
        sc.tl.leiden(one, resolution=2.0, flavor="igraph", n_iterations=2, random_state=0)
        logx = one.X.toarray() if hasattr(one.X, "toarray") else np.asarray(one.X)
        z = (logx - logx.mean(0)) / np.maximum(logx.std(0), 1e-8)
        scores = pd.DataFrame({kind: z[:, one.var_names.get_indexer([g for g in genes if g in one.var_names])].mean(1)
                               for kind, genes in MARKERS.items()}, index=one.obs_names)
        by_cluster = scores.groupby(one.obs["leiden"].to_numpy()).mean().idxmax(axis=1)
        labels.append(pd.Series(by_cluster.reindex(one.obs["leiden"].to_numpy()).to_numpy(), index=one.obs_names))
    return pd.concat(labels).reindex(counts.obs_names)


if "cell_type" not in adata.obs:
    adata.obs["cell_type"] = pd.Categorical(marker_labels(adata))
print(pd.crosstab(adata.obs["cell_type"], adata.obs["batch"]))

# %%
n_top = 600 if QUICK else 2000
log = adata.copy()
sc.pp.normalize_total(log, target_sum=1e4)
sc.pp.log1p(log)
sc.pp.highly_variable_genes(log, n_top_genes=min(n_top, adata.n_vars), batch_key="batch", flavor="seurat")
markers = [g for g in ("CD14", "LYZ", "MS4A1", "NKG7") if g in adata.var_names]
if not markers and "marker_of" in adata.var:  # simulated data: one marker gene per cell type
    marked = adata.var[adata.var["is_marker"].astype(bool)]
    markers = list(marked.groupby("marker_of", observed=True).head(1).index[:4])
keep = log.var["highly_variable"].to_numpy() | adata.var_names.isin(markers)
adata = adata[:, keep].copy()
sc.pp.filter_cells(adata, min_counts=1)  # a cell with no counts in the chosen genes cannot be fitted
print(adata)
print(adata.obs["batch"].value_counts())

# %% [markdown]
# ## Set up and train
# Every technical effect has its own covariate key. `batch_key="batch"` gives each chemistry its own
# ambient RNA profile, dispersion and library-size prior. To *integrate* the chemistries:
# - the decoder is conditioned on them (`nn_conditioning_covariate_keys`), which gives each chemistry
#   its own per-gene feature scaling too: 5' and 3' chemistries differ gene by gene, and with a
#   batch-free decoder and one global scaling nothing but z could absorb that;
# - the encoder is told the chemistry (`encoder_covariate_keys`) and `latent_independence=10` adds an
#   MMD penalty that makes q(z) the same in every chemistry, so the batch is carried by the decoder's
#   input and not by z (docs: "Integrating batches", with scib-metrics figures on four datasets);
# - `global_lr_factor=10` lets the global sites (ambient, feature scaling, dispersion) learn at ten times
#   the learning rate, which kept more of the cell-type structure in the same benchmark.
#
# For a long run on the CPU, `model.train(..., compile=True)` computes each step through `torch.compile`:
# 11-50 s of compiling at the first step, then 1.1-1.4x the cells per second on 2 cores (it needs a C++
# compiler; docs: "Compiled training"). This short tutorial trains without it.

# %%
ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch", nn_conditioning_covariate_keys=["batch"],
                               encoder_covariate_keys=["batch"])
model = ps.RegularizedVI(adata, n_latent=10, n_hidden=64 if QUICK else 128, latent_independence=10.0)
EPOCHS, BATCH_SIZE = (15, 256) if QUICK else (200, 128)
history = model.train(max_epochs=EPOCHS, batch_size=BATCH_SIZE, kl_warmup_epochs=3 if QUICK else 400,
                      global_lr_factor=10.0, early_stopping=False, device="cpu" if QUICK else "auto", progress_bar=not QUICK)
print(history.tail())

# %%
fig, ax = plt.subplots(figsize=(5, 3.5))
for column in history.columns:
    if "loss" in column:
        ax.plot(history.index, history[column], label=column)
ax.set_xlabel("epoch")
ax.set_ylabel("loss (per cell)")
ax.legend()
fig.tight_layout()
fig.savefig(FIGURES / "01_training_curve.png", dpi=120)

# %% [markdown]
# ## Latent embedding
# Chemistries should mix while cell types (monocytes: CD14, LYZ; B cells: MS4A1; NK cells: NKG7)
# stay apart. In quick mode a PCA of the latent is plotted instead of a UMAP.

# %%
adata.obsm["X_regularizedvi"] = model.get_latent_representation()
if QUICK:
    z = adata.obsm["X_regularizedvi"]
    z = z - z.mean(0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    adata.obsm["X_embedding"] = u[:, :2] * s[:2]
    basis = "PCA of latent"
else:
    sc.pp.neighbors(adata, use_rep="X_regularizedvi")
    sc.tl.umap(adata)
    adata.obsm["X_embedding"] = adata.obsm["X_umap"]
    basis = "UMAP"

normalised = model.get_normalized_expression(library_size=1e4)
log_rho = np.log1p(normalised)
panels = ["batch", *(["cell_type"] if "cell_type" in adata.obs else []), *markers]
fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
emb = adata.obsm["X_embedding"]
for ax, key in zip(np.atleast_1d(axes), panels):
    if key in adata.obs:
        labels = adata.obs[key].astype("category")
        for level in labels.cat.categories:
            cells = (labels == level).to_numpy()
            ax.scatter(emb[cells, 0], emb[cells, 1], s=2, label=level)
        ax.legend(markerscale=4, fontsize=7)
    else:
        im = ax.scatter(emb[:, 0], emb[:, 1], s=2, c=log_rho[key].to_numpy(), cmap="viridis")
        fig.colorbar(im, ax=ax)
    ax.set_title(key)
    ax.set_xticks([]), ax.set_yticks([])
fig.suptitle(f"RegularizedVI latent ({basis}); genes: log1p normalised expression")
fig.tight_layout()
fig.savefig(FIGURES / "01_latent_embedding.png", dpi=120)

# %% [markdown]
# ## Batch mixing and cell-type separation, in numbers
# `pyro_scmodels.metrics.knn_entropy` (1 = perfectly mixed) overall and inside monocytes, B cells and
# NK cells (mixed chemistries, types apart), and the k-means ARI of the cell types, next to PCA of the
# log-normalised counts.

# %%
from pyro_scmodels import metrics as M

pca = M.log_normalised_pca(adata.layers["counts"], n_components=30)
cell_type = adata.obs["cell_type"].astype(str).to_numpy()
for name, embedding in (("RegularizedVI", adata.obsm["X_regularizedvi"]), ("PCA", pca)):
    within = {kind: M.knn_entropy(embedding[cell_type == kind], adata.obs["batch"].to_numpy()[cell_type == kind], k=15)
              for kind in ("myeloid", "B cell", "NK cell", "type_0", "type_1") if (cell_type == kind).sum() > 30}
    print(f"{name}: chemistry mixing {M.knn_entropy(embedding, adata.obs['batch']):.3f} (within "
          + ", ".join(f"{kind} {value:.3f}" for kind, value in within.items())
          + f"), cell-type ARI {M.cluster_ari(embedding, cell_type):.3f}")

# %% [markdown]
# ## The scib-metrics table against scVI
# When scvi-tools and scib-metrics are installed (`pip install scvi-tools scib-metrics`), scVI is trained
# with the same genes, architecture and epochs, and scverse's scib-metrics scores both (bio
# conservation, batch correction and their aggregate, unscaled). `benchmarks/bench_integration.py`
# runs the same comparison on four datasets.

# %%
import importlib.util

if importlib.util.find_spec("scvi") and importlib.util.find_spec("scib_metrics"):
    import scvi
    from scib_metrics.benchmark import Benchmarker

    scvi.settings.seed = 0
    reference = adata.copy()
    scvi.model.SCVI.setup_anndata(reference, layer="counts", batch_key="batch")
    scvi_model = scvi.model.SCVI(reference, n_latent=10, n_hidden=64 if QUICK else 128, gene_likelihood="nb")
    scvi_model.train(max_epochs=EPOCHS, batch_size=BATCH_SIZE, early_stopping=False, enable_progress_bar=False)
    scored = adata.copy()
    scored.obsm["scVI"] = scvi_model.get_latent_representation()
    scored.obsm["RegularizedVI"] = adata.obsm["X_regularizedvi"]
    scored.obsm["PCA"] = pca
    bench = Benchmarker(scored, batch_key="batch", label_key="cell_type", embedding_obsm_keys=["PCA", "scVI", "RegularizedVI"],
                        pre_integrated_embedding_obsm_key="PCA", progress_bar=False)
    bench.benchmark()
    table = bench.get_results(min_max_scale=False).drop(index="Metric Type").astype(float)
    print(table[["Bio conservation", "Batch correction", "Total"]].round(3))
else:
    print("scvi-tools or scib-metrics is not installed: pip install scvi-tools scib-metrics for the table")

# %% [markdown]
# ## Ambient RNA profile per chemistry
# `get_ambient_profile()` is genes x chemistries: the background's expected counts per gene at a typical library
# size (divide a column by its sum for the shares of the ambient pool).

# %%
ambient = model.get_ambient_profile()
print(ambient.shape)
fig, axes = plt.subplots(1, ambient.shape[1], figsize=(4 * ambient.shape[1], 3.6))
for ax, column in zip(np.atleast_1d(axes), ambient.columns):
    top = ambient[column].sort_values(ascending=False).head(10)
    print(f"top ambient genes, {column}:", ", ".join(top.index))
    ax.barh(top.index[::-1], top.to_numpy()[::-1])
    ax.set_title(str(column), fontsize=9)
fig.tight_layout()
fig.savefig(FIGURES / "01_ambient_profiles.png", dpi=120)

# %% [markdown]
# ## Normalised expression
# `get_normalized_expression()` is background- and scaling-free expression: mean per chemistry of
# the marker genes. Raw counts differ between chemistries by their capture; the last table gives, gene by gene,
# the ratio of the largest to the smallest chemistry's mean, raw and normalised (it need not shrink for every
# marker: a quick run of 2026-12-06 had it shrink for LYZ, MS4A1 and NKG7 and grow for CD14).

# %%
raw = pd.DataFrame(np.asarray(adata[:, markers].layers["counts"].toarray()
                              if hasattr(adata.layers["counts"], "toarray") else adata[:, markers].layers["counts"]),
                   index=adata.obs_names, columns=markers)
raw = raw.div(np.asarray(adata.layers["counts"].sum(1)).ravel(), axis=0) * 1e4
raw_means = raw.groupby(adata.obs["batch"].to_numpy()).mean()
normalised_means = normalised[markers].astype(float).groupby(adata.obs["batch"].to_numpy()).mean()
print("raw counts per 10k, mean by chemistry:\n", raw_means.round(2))
print("normalised expression per 10k, mean by chemistry:\n", normalised_means.round(2))
print("largest / smallest chemistry mean, raw and normalised:\n",
      pd.DataFrame({"raw": raw_means.max() / raw_means.min(),
                    "normalised": normalised_means.max() / normalised_means.min()}).round(2))
print("figures written to", FIGURES)
