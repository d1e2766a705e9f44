# %% [markdown]
# # NDreamer: interferon-beta response in PBMCs (Kang et al. 2018)
#
# Learn an effect-modifier space, estimate per-cell treatment effects (ITE) of IFN-beta, summarise
# them per cell type (CATE), then remove a donor effect on a second data set.
#
# **Data.** `kang2018_ifnb_scgen_valid_counts.h5ad` (condition control/stimulated, no donor) and
# `kang2018_ifnb_muscat_example.h5ad` (condition ctrl/stim, donor) from `../shared/data` (relative to
# the repository root) when present; otherwise the package simulator `pyro_scmodels.datasets.simulate`
# stands in for both. `PYRO_SCMODELS_QUICK=1` uses small networks and few epochs.


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

from pyro_scmodels import metrics as M
from pyro_scmodels.ndreamer import network_preset

# Network sizes: the defaults are for thousands of cells on a GPU; quick mode uses the compact preset
# (a smaller network, with the loss weights measured for it).
NET = dict(network_preset("small"), batch_size=256, device="cpu") if QUICK else {}
EPOCHS = 5 if QUICK else None  # None: the default (15 balanced passes)

# %% [markdown]
# ## IFN-beta stimulation (no donor column)

# %%
path = DATA / "kang2018_ifnb_scgen_valid_counts.h5ad"
if path.exists():
    kang = sc.read_h5ad(path)
    control = "control"
else:
    kang = ps.datasets.simulate(n_cells=2000, n_genes=400, seed=0)
    kang.X = kang.layers["counts"].copy()
    control = "control"
interferon = [g for g in ("ISG15", "IFI6", "IFIT1", "IFIT3") if g in kang.var_names]
if not interferon:  # simulated data: the simulator's responding genes that go up, as the interferon genes do
    interferon = list(kang.var_names[(kang.var["responding"] & (kang.var["true_lfc"] > 0)).to_numpy()][:4])
print(kang)
print(pd.crosstab(kang.obs["cell_type"], kang.obs["condition"]))

nd = ps.NDreamer(kang, condition_key="condition", control_name=control, keep_genes=interferon,
                 num_hvg=500 if QUICK else 2000, **NET)
history = nd.train(n_epochs=EPOCHS, progress_bar=not QUICK)
print(pd.DataFrame(history).tail(3))

# %% [markdown]
# ## The effect-modifier space
# Conditions should mix (the space holds what modifies the effect, not the effect itself) while cell
# types stay apart.

# %%
nd.get_modifier_space()
space = nd.results.obsm["X_effect_modifier_space_PCA"]
print(f"condition mixing (kNN entropy, 1 = mixed): {M.knn_entropy(space, kang.obs['condition']):.3f}")
print(f"cell-type ARI (k-means on the space): {M.cluster_ari(space, kang.obs['cell_type']):.3f}")
fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
for ax, key in zip(axes, ("condition", "cell_type")):
    labels = kang.obs[key].astype("category")
    for level in labels.cat.categories:
        cells = (labels == level).to_numpy()
        ax.scatter(space[cells, 0], space[cells, 1], s=2, label=level)
    ax.legend(markerscale=4, fontsize=7)
    ax.set_title(f"modifier space (PCA), {key}")
fig.tight_layout()
fig.savefig(FIGURES / "04_modifier_space.png", dpi=120)

# %% [markdown]
# ## Individual treatment effects: interferon genes per cell type

# %%
results = nd.estimate_ite(nearest_neighbor=5)
treatment = [c for c in nd.design.conditions if c != control][0]
ite = pd.DataFrame(results[:, interferon].layers[f"ite_{treatment}"], columns=interferon, index=kang.obs_names)
stimulated = (kang.obs["condition"] == treatment).to_numpy()
mean_ite = ite[stimulated].groupby(kang.obs["cell_type"].to_numpy()[stimulated]).mean()
print("mean ITE (log-normalised expression) in stimulated cells:\n", mean_ite.round(2))
fig, ax = plt.subplots(figsize=(1.2 * len(interferon) + 2, 0.4 * len(mean_ite) + 1.5))
im = ax.imshow(mean_ite.to_numpy(), cmap="RdBu_r", vmin=-np.abs(mean_ite.to_numpy()).max(),
               vmax=np.abs(mean_ite.to_numpy()).max(), aspect="auto")
ax.set_xticks(range(len(interferon)), interferon)
ax.set_yticks(range(len(mean_ite)), mean_ite.index)
fig.colorbar(im, ax=ax, label="mean ITE")
ax.set_title("IFN-beta ITE per cell type")
fig.tight_layout()
fig.savefig(FIGURES / "04_ite_heatmap.png", dpi=120)

# %% [markdown]
# ## Per-cell uncertainty: a 90 % interval for each ITE
# `interval=0.9` adds the bounds `ite_<c>_q05` / `ite_<c>_q95`, a Student t interval from the spread of
# each cell's k matched cells (docs/ndreamer.md, "An interval for the matched ITE"). It holds their
# measurement noise, not how far their state is from the cell's. The default k = 20 gives the spread
# 19 degrees of freedom.

# %%
import scipy.sparse as sp

bounded = nd.estimate_ite(interval=0.9)  # the default k = 20
low = pd.DataFrame(bounded[:, interferon].layers[f"ite_{treatment}_q05"], columns=interferon, index=kang.obs_names)
detected = pd.DataFrame(sp.csr_matrix(kang[:, interferon].X).toarray() > 0, columns=interferon, index=kang.obs_names)
print("share of stimulated cells whose 90 % interval lies above 0, and the share detecting the gene:")
print(pd.DataFrame({"interval above 0": (low[stimulated] > 0).mean(), "detected": detected[stimulated].mean()}).round(3))

# %% [markdown]
# ## Conditional average treatment effects (CATE) per cell type
# Mean ITE, a sign test and a z test per cell type and gene, BH-adjusted within each cell type.

# %%
cate = nd.estimate_cate(groupby="cell_type")
print(cate[cate["gene"].isin(interferon)].sort_values(["gene", "mean_ite"], ascending=[True, False])
      [["group", "gene", "n_cells", "mean_ite", "fraction_positive", "sign_test_p_adj"]].round(3).to_string(index=False))
print("top genes by mean ITE over all cell types:")
print(cate.groupby("gene")["mean_ite"].mean().sort_values(ascending=False).head(10).round(3))

# %% [markdown]
# ## Donors and conditions at once: batch denoising (muscat example)
# `batch_key="donor"` makes NDreamer match each cell to cells of the other donors;
# `decompose_batch_effect` gives `layers["denoised"]` and `layers["batch_effect"]`.

# %%
path = DATA / "kang2018_ifnb_muscat_example.h5ad"
if path.exists():
    muscat = sc.read_h5ad(path)
    control, donor_key = "ctrl", "donor"
else:
    muscat = ps.datasets.simulate(n_cells=1500, n_genes=300, seed=1)
    muscat.X = muscat.layers["counts"].copy()
    control, donor_key = "control", "batch"
print(pd.crosstab(muscat.obs[donor_key], muscat.obs["condition"]))
nd2 = ps.NDreamer(muscat, condition_key="condition", control_name=control, batch_key=donor_key,
                  num_hvg=500 if QUICK else 2000, **NET)
nd2.train(n_epochs=EPOCHS, progress_bar=not QUICK)
denoised = nd2.decompose_batch_effect(nearest_neighbor=5)

import scipy.sparse as sp

for condition in muscat.obs["condition"].astype(str).unique():
    cells = (muscat.obs["condition"].astype(str) == condition).to_numpy()
    donors = muscat.obs[donor_key].astype(str).to_numpy()[cells]
    observed = M.knn_entropy(M.log_normalised_pca(sp.csr_matrix(np.expm1(denoised.X[cells].toarray()))), donors)
    cleaned = M.knn_entropy(M.log_normalised_pca(sp.csr_matrix(np.expm1(denoised.layers["denoised"][cells]))), donors)
    print(f"{condition}: donor mixing (kNN entropy) observed {observed:.3f} -> denoised {cleaned:.3f}")
print("figures written to", FIGURES)
