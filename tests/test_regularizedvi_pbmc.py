"""RegularizedVI on real data: PBMCs from three 10x chemistries (v2 3', v3 3', 5').

The chemistries differ strongly per gene, so each technical effect gets its own key (ambient,
feature scaling, dispersion and library prior all by chemistry). 2000 variable genes keep the
test fast on two CPU cores.
"""

import anndata
import numpy as np
import pytest
import scanpy as sc

import pyro_scmodels as ps
from pyro_scmodels import metrics as M

from .conftest import shared_file

MARKER_PAIRS = {"monocyte": ("CD14", "LYZ"), "B": ("MS4A1", "CD79A"), "NK": ("NKG7", "GNLY")}


@pytest.fixture(scope="module")
def pbmc():
    adata = anndata.read_h5ad(shared_file("pbmc_10x_3chemistries_scWGParis.h5ad"))
    adata.layers["counts"] = adata.X.copy()
    log = adata.copy()
    sc.pp.normalize_total(log, target_sum=1e4)
    sc.pp.log1p(log)
    sc.pp.highly_variable_genes(log, n_top_genes=2000, batch_key="batch", flavor="seurat")
    markers = [g for pair in MARKER_PAIRS.values() for g in pair]
    keep = log.var["highly_variable"].to_numpy() | adata.var_names.isin(markers)
    adata = adata[:, keep].copy()
    # cells whose marker pair clearly dominates: monocytes, B cells, NK cells
    scores = np.stack([log[:, list(pair)].X.toarray().mean(1) for pair in MARKER_PAIRS.values()], axis=1)
    ordered = np.sort(scores, axis=1)
    clear = (ordered[:, -1] > 1.0) & (ordered[:, -1] - ordered[:, -2] > 1.0)
    adata.obs["marker_group"] = np.where(clear, np.array(list(MARKER_PAIRS))[scores.argmax(1)], "unclear")
    ps.RegularizedVI.setup_anndata(
        adata, layer="counts", ambient_covariate_keys=["batch"], feature_scaling_covariate_keys=["batch"],
        dispersion_key="batch", library_size_key="batch",
    )
    model = ps.RegularizedVI(adata)
    model.train(max_epochs=60, batch_size=512, lr=1e-2, kl_warmup_epochs=6, early_stopping=False,
                device="cpu", progress_bar=False)
    return model


def test_training_decreases_loss_without_nan(pbmc):
    history = pbmc.history
    assert np.isfinite(history.to_numpy()).all()
    assert history["train_loss"].iloc[-5:].mean() < 0.8 * history["train_loss"].iloc[:2].mean()
    assert history["validation_loss"].iloc[-5:].mean() < history["validation_loss"].iloc[:5].mean()


def test_chemistries_mix_better_than_pca(pbmc):
    adata = pbmc.adata
    z = pbmc.get_latent_representation()
    pca = M.log_normalised_pca(adata.layers["counts"])
    assert M.knn_entropy(z, adata.obs["batch"]) > M.knn_entropy(pca, adata.obs["batch"]) + 0.15


def test_marker_defined_cell_groups_stay_separated(pbmc):
    adata = pbmc.adata
    clear = (adata.obs["marker_group"] != "unclear").to_numpy()
    groups = adata.obs["marker_group"][clear].to_numpy()
    assert min(np.unique(groups, return_counts=True)[1]) > 100
    z = pbmc.get_latent_representation()[clear]
    assert M.knn_entropy(z, groups, k=15) < 0.1
    assert M.cluster_ari(z, groups) > 0.9


def test_ambient_profiles_are_per_chemistry(pbmc):
    ambient = pbmc.get_ambient_profile()
    assert list(ambient.columns) == list(pbmc.adata.obs["batch"].cat.categories)
    assert (ambient.to_numpy() > 0).all()
    theta = pbmc.get_dispersion()
    assert theta.shape == (pbmc.adata.n_vars, 3) and np.isfinite(theta.to_numpy()).all()
