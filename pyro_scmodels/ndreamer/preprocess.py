"""NDreamer input: log-normalised expression of variable genes and pseudo cell-state labels (SPEC 3.1)."""

from __future__ import annotations

import logging
import warnings

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from ._constants import (
    LEIDEN_ITERATIONS,
    LEIDEN_NEIGHBOURS,
    LEIDEN_PCA_COMPONENTS,
    LEIDEN_RESOLUTIONS,
    LOG_CHECK_SAMPLE,
    LOG_DATA_MAX,
    MIN_CELLS_FOR_LEIDEN,
    TARGET_SUM,
)

logger = logging.getLogger(__name__)


def is_log_normalised(matrix) -> bool:
    """True when values are not raw counts (non-integer) and small enough to be log-scale."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()
    if values.size == 0:
        return False
    sample = values[: min(values.size, LOG_CHECK_SAMPLE)]
    if (sample < 0).any() or not np.isfinite(sample).all():
        raise ValueError("Expression must be finite and non-negative (raw counts or log-normalised values).")
    return bool(not np.all(sample == np.round(sample)) and sample.max() < LOG_DATA_MAX)


def log_normalise(adata: anndata.AnnData, layer: str | None = None) -> sp.csr_matrix:
    """log1p of counts per ``TARGET_SUM`` (raw counts), or the matrix as it is when it already is log-normalised."""
    matrix = adata.X if layer is None else adata.layers[layer]
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    if is_log_normalised(matrix):
        logger.info("NDreamer: the input looks log-normalised (non-integer values below %g); used as it is.", LOG_DATA_MAX)
        return matrix
    logger.info("NDreamer: the input looks like raw counts; normalising to %g per cell and taking log1p.", TARGET_SUM)
    totals = np.asarray(matrix.sum(1)).ravel()
    if (totals <= 0).any():
        raise ValueError(f"{int((totals <= 0).sum())} cell(s) have no counts; remove them first.")
    normalised = sp.csr_matrix(sp.diags((TARGET_SUM / totals).astype(np.float32)) @ matrix)
    normalised.data = np.log1p(normalised.data)
    return normalised


def variable_genes(log_expression: sp.csr_matrix, genes, groups: np.ndarray, num_hvg: int) -> np.ndarray:
    """Boolean mask of the ``num_hvg`` most variable genes (scanpy, seurat flavour, per group); all when fewer."""
    if len(genes) <= num_hvg:
        return np.ones(len(genes), dtype=bool)
    frame = anndata.AnnData(X=log_expression, obs=pd.DataFrame({"group": pd.Categorical(groups)}),
                            var=pd.DataFrame(index=pd.Index(genes).astype(str)))
    batch_key = "group" if frame.obs["group"].nunique() > 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(frame, n_top_genes=num_hvg, flavor="seurat", batch_key=batch_key)
    return frame.var["highly_variable"].to_numpy()


def pseudo_labels(log_expression: sp.csr_matrix, groups: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Leiden clusters at low and high resolution, found within each batch x condition group.

    Returns two integer label vectors (unique across groups), aligned with the cells.
    """
    labels = {resolution: np.zeros(len(groups), dtype=np.int64) for resolution in LEIDEN_RESOLUTIONS}
    offset = {resolution: 0 for resolution in LEIDEN_RESOLUTIONS}
    for group in dict.fromkeys(groups):
        cells = np.flatnonzero(groups == group)
        if len(cells) < MIN_CELLS_FOR_LEIDEN:
            for resolution in LEIDEN_RESOLUTIONS:
                labels[resolution][cells] = offset[resolution]
                offset[resolution] += 1
            continue
        frame = anndata.AnnData(X=log_expression[cells])
        n_components = min(LEIDEN_PCA_COMPONENTS, len(cells) - 1, frame.n_vars - 1)
        sc.pp.pca(frame, n_comps=n_components, random_state=seed)
        # the gaussian kernel avoids compiling umap's numba code (seconds) for a connectivity graph
        sc.pp.neighbors(frame, n_neighbors=min(LEIDEN_NEIGHBOURS, len(cells) - 1), random_state=seed, method="gauss", transformer="sklearn")
        for resolution in LEIDEN_RESOLUTIONS:
            sc.tl.leiden(frame, resolution=resolution, key_added="leiden", random_state=seed, flavor="igraph",
                         n_iterations=LEIDEN_ITERATIONS, directed=False)
            codes = frame.obs["leiden"].astype(int).to_numpy()
            labels[resolution][cells] = codes + offset[resolution]
            offset[resolution] += codes.max() + 1
    return labels[LEIDEN_RESOLUTIONS[0]], labels[LEIDEN_RESOLUTIONS[1]]
