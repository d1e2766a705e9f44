"""NDreamer's choice of genes: those that respond to the condition, then the most variable (SPEC 3.1).

:func:`variable_genes` takes the genes whose mean log expression differs most between conditions within batches
(:func:`condition_response`), then scanpy's most variable genes; above ``HVG_MAX_CELLS`` cells it is run on a seeded
sample of each batch x condition group (:func:`gene_selection_cells`). Part of the preprocessing in
:mod:`pyro_scmodels.ndreamer.preprocess`, which imports these.
"""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from .._labels import names_as_text
from ._constants import HVG_MAX_CELLS, HVG_MIN_CELLS_PER_GROUP, RESPONSE_GENE_SHARE


def condition_response(log_expression: sp.csr_matrix, batch: np.ndarray, condition: np.ndarray,
                       control_name: str) -> np.ndarray:
    """How strongly each gene responds to the condition, measured within batches.

    For every treatment ``t`` and every batch holding both ``t`` and the control, the difference of
    mean log expression ``mean_t - mean_control``; these are averaged over the batches (so a
    response must be consistent, and differences between batches never count) and the largest
    absolute value over the treatments is the gene's score. When no batch holds both, the
    difference is taken over all cells.

    Parameters
    ----------
    log_expression
        Cells x genes, log-normalised.
    batch, condition
        Batch and condition label of every cell.
    control_name
        The control condition.

    Returns
    -------
    numpy.ndarray
        One non-negative score per gene (log scale: 1 is an e-fold change of ``1 + expression``).
    """
    batch, condition = np.asarray(batch).astype(str), np.asarray(condition).astype(str)
    mean = lambda cells: np.asarray(log_expression[np.flatnonzero(cells)].mean(0)).ravel()  # noqa: E731
    score = np.zeros(log_expression.shape[1])
    for treatment in dict.fromkeys(condition[condition != control_name]):
        differences = [mean((batch == b) & (condition == treatment)) - mean((batch == b) & (condition == control_name))
                       for b in dict.fromkeys(batch)
                       if ((batch == b) & (condition == treatment)).any() and ((batch == b) & (condition == control_name)).any()]
        if not differences:
            differences = [mean(condition == treatment) - mean(condition == control_name)]
        score = np.maximum(score, np.abs(np.mean(differences, axis=0)))
    return score


def gene_selection_cells(groups: np.ndarray, max_cells: int = HVG_MAX_CELLS,
                         min_per_group: int = HVG_MIN_CELLS_PER_GROUP, seed: int = 0) -> np.ndarray | None:
    """The cells the variable genes are chosen on: all (None) up to ``max_cells``, else a seeded sample.

    Each group (batch x condition) gives cells in proportion to its size, and at least
    ``min(size, min_per_group)``, so that small groups still count in the within-batch
    condition response and the per-batch dispersions.

    Parameters
    ----------
    groups
        Group label of every cell.
    max_cells, min_per_group
        Size of the sample; fewest cells taken from a group.
    seed
        Seed of the sample.

    Returns
    -------
    numpy.ndarray or None
        Increasing cell positions, or None for every cell.
    """
    groups = np.asarray(groups)
    if groups.size <= max_cells:
        return None
    rng = np.random.default_rng(seed)
    share = max_cells / groups.size
    chosen = []
    for name in np.unique(groups):
        members = np.flatnonzero(groups == name)
        take = min(members.size, max(int(round(share * members.size)), min_per_group))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))


def variable_genes(log_expression: sp.csr_matrix, genes, batch: np.ndarray, condition: np.ndarray,
                   control_name: str, num_hvg: int, response_share: float = RESPONSE_GENE_SHARE) -> np.ndarray:
    """Boolean mask of ``num_hvg`` genes: those that respond to the condition, then the most variable.

    First the ``ceil(response_share * num_hvg)`` genes with the largest
    :func:`condition_response` (within-batch difference between conditions), then the most
    variable genes (scanpy, seurat flavour, per batch with the conditions pooled) until
    ``num_hvg`` genes are chosen. All genes when there are no more than ``num_hvg``.

    Why both parts. Variability judged inside each batch x condition group cannot see a
    response: a gene that every stimulated cell switches on is not variable among stimulated
    cells. On the Kang IFN-beta data (1975 cells, 6998 genes) at ``num_hvg=2000``, HVGs per
    batch x condition group keep ISG15 but drop IFI6, IFIT1 and IFIT3, and HVGs on the pooled
    data still drop those three (they are highly expressed, and seurat dispersions are
    normalised within mean bins); ranked by the within-batch condition difference they are the
    top four genes. The variable part keeps the genes that describe the cell states.

    Parameters
    ----------
    log_expression
        Cells x genes, log-normalised.
    genes
        Gene names (for scanpy).
    batch, condition, control_name
        Batch and condition of every cell, and the control condition.
    num_hvg
        Genes kept.
    response_share
        Share of ``num_hvg`` given to the condition-responding genes, in [0, 1].

    Returns
    -------
    numpy.ndarray
        Boolean mask over the genes.
    """
    if not 0.0 <= response_share <= 1.0:
        raise ValueError(f"response_share must be in [0, 1], got {response_share}.")
    n_genes = len(genes)
    if n_genes <= num_hvg:
        return np.ones(n_genes, dtype=bool)
    n_response = int(np.ceil(response_share * num_hvg))
    # stable sort: ties (e.g. genes zero everywhere) keep gene order, so the choice is deterministic
    chosen = list(np.argsort(-condition_response(log_expression, batch, condition, control_name), kind="stable")[:n_response])
    # a text index: anndata warns ("Transforming to str index") on the default integer one
    cells = pd.Index(np.arange(len(batch)).astype(str))
    frame = anndata.AnnData(X=log_expression, obs=pd.DataFrame({"batch": pd.Categorical(np.asarray(batch).astype(str))},
                                                              index=cells),
                            var=pd.DataFrame(index=names_as_text(genes)))
    batch_key = "batch" if frame.obs["batch"].nunique() > 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(frame, n_top_genes=num_hvg, flavor="seurat", batch_key=batch_key)
    var = frame.var.reset_index(drop=True)
    # scanpy's own ranking: in more batches first, then by normalised dispersion
    keys = ["highly_variable_nbatches", "dispersions_norm"] if batch_key else ["dispersions_norm"]
    ranked = var.assign(dispersions_norm=var["dispersions_norm"].fillna(-np.inf)).sort_values(keys, ascending=False, kind="stable").index
    taken = set(chosen)
    for gene in ranked:
        if len(chosen) >= num_hvg:
            break
        if gene not in taken:
            chosen.append(gene)
            taken.add(gene)
    mask = np.zeros(n_genes, dtype=bool)
    mask[chosen] = True
    return mask
