# %% [markdown]
# # Paired RNA + ATAC with RegularizedMultimodalVI
#
# Every latent mode on a small real multiome data set, which latent dimensions each modality's
# decoder uses (`get_modality_attribution`), and per-modality embeddings of the attribution-weighted z.
#
# **Data.** `pbmc_multiome_muon_test_rna_atac.h5mu` (1000 cells, 45 genes, 174 peaks) from
# `../shared/data` (relative to the repository root) when present; otherwise the package simulator
# `pyro_scmodels.datasets.simulate_multiome`. The real file is too small to judge quality; it shows
# the workflow. `PYRO_SCMODELS_QUICK=1` runs a small, fast version.


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

# %%
import warnings

import mudata

mudata.set_options(pull_on_update=False)
path = DATA / "pbmc_multiome_muon_test_rna_atac.h5mu"
if path.exists():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file was written by anndata tools, not mudata
        mdata = mudata.read_h5mu(path)
    layer, keys = None, {}
else:
    mdata = ps.datasets.simulate_multiome(n_cells=600 if QUICK else 1200, seed=0)
    layer, keys = "counts", dict(ambient_covariate_keys=["batch"], feature_scaling_covariate_keys=["batch"])
print(mdata)

FIT = dict(batch_size=256 if QUICK else 128, lr=1e-2, kl_warmup_epochs=3 if QUICK else 20, early_stopping=not QUICK,
           device="cpu" if QUICK else "auto", progress_bar=False)
EPOCHS = 20 if QUICK else 300

# %% [markdown]
# ## Every latent mode
# `concatenation`: one latent block per modality; `weighted_mean`: one shared z as a weighted mean of
# the per-modality posteriors (weights `equal`, `universal` or per `cell`); `single_encoder`: one encoder
# reading both modalities.

# %%
modes = [("concatenation", "equal"), ("weighted_mean", "universal"), ("weighted_mean", "cell"),
         ("single_encoder", "equal")]
models, rows = {}, []
for latent_mode, weights in modes:
    data = mdata.copy()
    ps.RegularizedMultimodalVI.setup_mudata(data, modalities=["rna", "atac"], layer=layer, **keys)
    model = ps.RegularizedMultimodalVI(data, n_latent=5, n_hidden=32 if QUICK else 64,
                                       latent_mode=latent_mode, modality_weights=weights)
    history = model.train(max_epochs=EPOCHS, **FIT)
    z = model.get_latent_representation()
    models[(latent_mode, weights)] = model
    rows.append(dict(latent_mode=latent_mode, weights=weights, latent_dims=z.shape[1],
                     first_loss=history["train_loss"].iloc[0], last_loss=history["train_loss"].iloc[-1],
                     last_validation=history["validation_loss"].iloc[-1]))
    print(f"{latent_mode:15s} {weights:10s} z {z.shape}, train loss {rows[-1]['first_loss']:.1f} -> {rows[-1]['last_loss']:.1f}")
print(pd.DataFrame(rows).round(2))

# %% [markdown]
# ## Modality attribution
# For each modality, how sensitive its decoder is to each latent dimension, per cell
# (`obsm["X_attribution_<m>"]`), and z weighted by that sensitivity (`obsm["X_weighted_z_<m>"]`).
# A cell without counts in a modality has NaN there (its z lies where that decoder was never fitted), so the
# averages are `np.nanmean`s over the cells measured in each modality.

# %%
model = models[("concatenation", "equal")]
attribution = model.get_modality_attribution()
mean_attribution = {m: np.nanmean(attribution[m]["attribution"], axis=0) for m in attribution}
share = pd.DataFrame({m: mean_attribution[m] / mean_attribution[m].sum() for m in attribution},
                     index=[f"z{i}" for i in range(model.get_latent_representation().shape[1])])
print("share of each decoder's sensitivity per latent dimension (concatenation: rna block first):")
print(share.round(3))

fig, ax = plt.subplots(figsize=(5, 3.2))
share.plot.bar(ax=ax)
ax.set_ylabel("share of decoder sensitivity")
fig.tight_layout()
fig.savefig(FIGURES / "03_modality_attribution.png", dpi=120)

# %% [markdown]
# ## Per-modality embeddings of the weighted z
# In quick mode a PCA (no UMAP); coloured by RNA library size (or cell type on simulated data).

# %%
obs = model.adata.obs
colour_by = "cell_type" if "cell_type" in obs else None
rna_counts = mdata.mod["rna"].layers["counts"] if layer else mdata.mod["rna"].X
library = np.log1p(np.asarray(rna_counts.sum(1)).ravel())
fig, axes = plt.subplots(1, len(attribution), figsize=(4.5 * len(attribution), 3.8))
for ax, modality in zip(np.atleast_1d(axes), attribution):
    measured = np.isfinite(model.adata.obsm[f"X_weighted_z_{modality}"]).all(1)  # cells with counts in the modality
    weighted = model.adata.obsm[f"X_weighted_z_{modality}"][measured]
    if QUICK:
        centred = weighted - weighted.mean(0)
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        emb = u[:, :2] * s[:2]
    else:
        view = sc.AnnData(np.zeros((weighted.shape[0], 1), dtype=np.float32))
        view.obsm["w"] = weighted
        sc.pp.neighbors(view, use_rep="w")
        sc.tl.umap(view)
        emb = view.obsm["X_umap"]
    if colour_by is not None:
        codes = pd.Categorical(obs[colour_by]).codes
        ax.scatter(emb[:, 0], emb[:, 1], s=3, c=codes[measured], cmap="tab10")
    else:
        im = ax.scatter(emb[:, 0], emb[:, 1], s=3, c=library[measured], cmap="viridis")
        fig.colorbar(im, ax=ax, label="log1p RNA counts")
    ax.set_title(f"weighted z, {modality}")
    ax.set_xticks([]), ax.set_yticks([])
fig.tight_layout()
fig.savefig(FIGURES / "03_weighted_z_embeddings.png", dpi=120)
print("figures written to", FIGURES)
