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
# Every technical effect has its own covariate key: ambient RNA, per-gene feature scaling,
# dispersion and the library-size prior are all by chemistry.

# %%
ps.RegularizedVI.setup_anndata(
    adata, layer="counts",
    ambient_covariate_keys=["batch"],
    feature_scaling_covariate_keys=["batch"],
    dispersion_key="batch",
    library_size_key="batch",
)
model = ps.RegularizedVI(adata, n_latent=10, n_hidden=64 if QUICK else 128)
history = model.train(max_epochs=15 if QUICK else 300, batch_size=256 if QUICK else 512, lr=1e-2,
                      kl_warmup_epochs=3 if QUICK else 10, device="cpu" if QUICK else "auto",
                      progress_bar=not QUICK)
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
# `pyro_scmodels.metrics.knn_entropy` (1 = perfectly mixed) compared with PCA of log-normalised counts.

# %%
from pyro_scmodels import metrics as M

pca = M.log_normalised_pca(adata.layers["counts"])
print(f"chemistry mixing (kNN entropy): RegularizedVI {M.knn_entropy(adata.obsm['X_regularizedvi'], adata.obs['batch']):.3f}"
      f" | PCA {M.knn_entropy(pca, adata.obs['batch']):.3f}")

# %% [markdown]
# ## Ambient RNA profile per chemistry
# `get_ambient_profile()` is genes x chemistries (fractions of the ambient pool).

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
# the marker genes (it should agree across chemistries much better than raw counts do).

# %%
raw = pd.DataFrame(np.asarray(adata[:, markers].layers["counts"].toarray()
                              if hasattr(adata.layers["counts"], "toarray") else adata[:, markers].layers["counts"]),
                   index=adata.obs_names, columns=markers)
raw = raw.div(np.asarray(adata.layers["counts"].sum(1)).ravel(), axis=0) * 1e4
print("raw counts per 10k, mean by chemistry:\n", raw.groupby(adata.obs["batch"].to_numpy()).mean().round(2))
print("normalised expression per 10k, mean by chemistry:\n",
      normalised[markers].groupby(adata.obs["batch"].to_numpy()).mean().round(2))
print("figures written to", FIGURES)
