"""The four datasets of ``bench_integration.py``, each with a batch and a label column.

Every loader returns raw counts in ``.X`` (CSR), ``obs["batch"]`` and ``obs["label"]``
(categorical) and ``var`` restricted to the genes every method is given. Labels that the
source lacks are derived here from marker genes, without looking at any integration:

- **PBMC, three chemistries** (``pbmc_10x_3chemistries_scWGParis.h5ad``): each chemistry is
  clustered on its own (log-normalised PCA, Leiden on igraph), and each cluster takes the
  cell type whose marker score (mean z-scored log expression of its markers, below) is highest
  there. Clustering inside one batch means no batch effect can shape the labels. The labels
  are coarse (T, NK, B, myeloid): FCGR3A monocytes and dendritic cells are clusters of their own
  in the v2 and 5' samples but not in v3, where FCGR3A and FCER1A are rarely detected, so they
  join the CD14 monocytes as "myeloid". A v3 cluster scored as platelets (PPBP detected in 11 %
  of its cells) is trained on but left out of the scores (``obs["scored"]``).
- **muscat Kang subset**: donors are the batches, the provided ``cell_type`` the labels.
- **Multiome RNA** (45 genes, one sample, no batch): labels from the same marker rule on the
  whole sample; a second, semi-synthetic batch is made from a random half of the cells by
  binomial thinning of each gene's counts with its own retention ``exp(-|N(0, 0.5)|)``
  (a per-gene multiplicative technical effect on real counts, like a change of chemistry).
- **Simulator, hard case**: strong per-gene batch scaling (log-sd 0.5), weak markers
  (4 per type) and small type differences (log-sd 0.2).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# the known PBMC markers (shared/data/README.md), grouped by the type they mark
MARKERS = {
    "T cell": ["CD3E", "CD3D", "IL7R", "TRAC", "LEF1", "BCL11B"],
    "NK cell": ["NKG7", "GNLY"],
    "B cell": ["MS4A1", "CD79A", "BANK1", "TCL1A"],
    "CD14 monocyte": ["CD14", "LYZ", "S100A8", "VCAN"],
    "FCGR3A monocyte": ["FCGR3A", "MS4A7"],
    "dendritic cell": ["FCER1A", "CLEC10A"],
    "platelet": ["PPBP", "PF4"],
}


# the PBMC chemistries' labels (see the module docstring)
COARSE = {"CD14 monocyte": "myeloid", "FCGR3A monocyte": "myeloid", "dendritic cell": "myeloid"}


def _log_normalised(counts) -> np.ndarray:
    counts = sp.csr_matrix(counts, dtype=np.float64)
    size = np.asarray(counts.sum(axis=1)).ravel()
    scaled = sp.diags(1e4 / np.maximum(size, 1.0)) @ counts
    return np.log1p(scaled.toarray())


def marker_labels(adata: ad.AnnData, resolution: float = 1.0, seed: int = 0) -> pd.Series:
    """Cell-type labels of one sample from clusters and the marker scores of :data:`MARKERS`.

    Parameters
    ----------
    adata
        Raw counts of one batch (cells x genes).
    resolution
        Leiden resolution of the clustering.
    seed
        Seed of the PCA and the clustering.

    Returns
    -------
    pandas.Series
        One label per cell (index ``adata.obs_names``).
    """
    import scanpy as sc

    logx = _log_normalised(adata.X)
    sample = ad.AnnData(logx, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=adata.var_names))
    n_comps = min(30, sample.n_vars - 1, sample.n_obs - 1)
    sc.pp.pca(sample, n_comps=n_comps, random_state=seed)
    sc.pp.neighbors(sample, n_neighbors=15, random_state=seed)
    sc.tl.leiden(sample, resolution=resolution, flavor="igraph", n_iterations=2, random_state=seed)
    z = (logx - logx.mean(axis=0)) / np.maximum(logx.std(axis=0), 1e-8)
    scores = pd.DataFrame({
        cell_type: z[:, [sample.var_names.get_loc(g) for g in genes if g in sample.var_names]].mean(axis=1)
        for cell_type, genes in MARKERS.items() if any(g in sample.var_names for g in genes)
    }, index=adata.obs_names)
    by_cluster = scores.groupby(sample.obs["leiden"].values, observed=True).mean()
    return pd.Series(by_cluster.idxmax(axis=1).reindex(sample.obs["leiden"].values).values, index=adata.obs_names)


def _finish(adata: ad.AnnData, batch, label, scored=None) -> ad.AnnData:
    scored = np.ones(adata.n_obs, dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    adata.obs = pd.DataFrame({"batch": pd.Categorical(np.asarray(batch)),
                              "label": pd.Categorical(np.asarray(label)), "scored": scored}, index=adata.obs_names)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def select_genes(adata: ad.AnnData, n_genes: int) -> ad.AnnData:
    """Batch-aware highly variable genes (``seurat_v3`` on counts), the same for every method."""
    import scanpy as sc

    if adata.n_vars <= n_genes:
        return adata
    hvg = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_genes, batch_key="batch",
                                      inplace=False)
    return adata[:, hvg["highly_variable"].values].copy()


def pbmc_chemistries(n_genes: int = 2000) -> ad.AnnData:
    """The 10x PBMC sample in three chemistries, labels from per-chemistry marker clusters."""
    adata = ad.read_h5ad(DATA / "pbmc_10x_3chemistries_scWGParis.h5ad")
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    labels = pd.concat([marker_labels(adata[adata.obs["batch"] == b].copy(), resolution=2.0)
                        for b in adata.obs["batch"].cat.categories]).reindex(adata.obs_names)
    labels = labels.replace(COARSE)
    adata = _finish(adata, adata.obs["batch"].astype(str).values, labels.values, scored=labels != "platelet")
    return select_genes(adata, n_genes)


def kang_donors(n_genes: int = 2000) -> ad.AnnData:
    """muscat's Kang subset: donors as batches, the given cell types as labels."""
    adata = ad.read_h5ad(DATA / "kang2018_ifnb_muscat_example.h5ad")
    adata = _finish(adata, adata.obs["donor"].astype(str).values, adata.obs["cell_type"].astype(str).values)
    return select_genes(adata, n_genes)


def multiome_rna(seed: int = 0) -> ad.AnnData:
    """The multiome sample's RNA; labels from markers, a thinned second batch (see the module)."""
    import mudata

    rna = mudata.read_h5mu(DATA / "pbmc_multiome_muon_test_rna_atac.h5mu")["rna"]
    adata = ad.AnnData(sp.csr_matrix(rna.X, dtype=np.float64), obs=pd.DataFrame(index=rna.obs_names),
                       var=pd.DataFrame(index=rna.var_names))
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    labels = marker_labels(adata, resolution=0.8)
    rng = np.random.default_rng(seed)
    second = rng.random(adata.n_obs) < 0.5
    retention = np.exp(-np.abs(rng.normal(0.0, 0.5, adata.n_vars)))
    counts = adata.X.toarray().astype(np.int64)
    counts[second] = rng.binomial(counts[second], retention[None, :])
    adata.X = sp.csr_matrix(counts)
    keep = counts.sum(axis=1) > 0
    adata = _finish(adata, np.where(second, "thinned", "original"), labels.values)
    return adata[keep].copy()


def simulated_hard(seed: int = 0) -> ad.AnnData:
    """The package simulator with strong batch scaling and weak markers."""
    from pyro_scmodels.datasets import simulate

    adata = simulate(n_cells=3000, n_genes=1000, n_cell_types=6, n_batches=3, n_markers_per_type=4, type_sd=0.2,
                     batch_scaling_sd=0.5, stimulated_fraction=0.0, seed=seed)
    return _finish(adata, adata.obs["batch"].astype(str).values, adata.obs["cell_type"].astype(str).values)


LOADERS = {"pbmc_chemistries": pbmc_chemistries, "kang_donors": kang_donors, "multiome_rna": multiome_rna,
           "simulated_hard": simulated_hard}
