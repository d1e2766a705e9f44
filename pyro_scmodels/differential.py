"""Bayesian differential expression from posterior samples of normalised expression.

The "change" test of scvi-tools, on a model's background-free expression rho: draw pairs of
(cell, posterior sample) from the two groups, form log2 fold changes, and per gene report the
posterior probability that |LFC| exceeds ``delta``; genes are selected by posterior expected
false discovery rate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import _validation as V

PSEUDOCOUNT = 0.01  # added to rho (counts at a typical library) before the log: a silent gene is not a huge fold change


def change_test(log2_expression_1: np.ndarray, log2_expression_2: np.ndarray, genes, delta: float = 0.25,
                fdr_target: float = 0.05, n_pairs: int = 5000, rng: np.random.Generator | None = None) -> pd.DataFrame:
    """Per-gene posterior of the log2 fold change between two groups.

    Parameters
    ----------
    log2_expression_1, log2_expression_2
        Posterior samples of log2 expression (draws x genes) for cells of each group; a row is
        one posterior sample of one cell.
    genes
        Gene names (columns).
    delta
        Effect size below which a change does not count (log2 scale).
    fdr_target
        Target of the posterior expected false discovery rate.
    n_pairs
        Random pairs of rows (one from each group) whose differences form the LFC posterior.
    rng
        Random generator for the pairs.

    Returns
    -------
    pandas.DataFrame
        Indexed by gene, sorted by ``proba_de``: ``lfc_mean``, ``lfc_median``, ``lfc_std``,
        ``lfc_q05``, ``lfc_q95``, ``proba_de`` (P(|LFC| > delta)), ``proba_not_de``,
        ``bayes_factor`` (log odds of ``proba_de``), ``scale1``, ``scale2`` (mean expression),
        ``is_de_fdr_<target>``.
    """
    rng = rng or np.random.default_rng(0)
    first = rng.integers(len(log2_expression_1), size=n_pairs)
    second = rng.integers(len(log2_expression_2), size=n_pairs)
    lfc = log2_expression_1[first] - log2_expression_2[second]
    proba = (np.abs(lfc) > delta).mean(0)
    clipped = np.clip(proba, 1e-6, 1 - 1e-6)
    table = pd.DataFrame(
        {
            "lfc_mean": lfc.mean(0),
            "lfc_median": np.median(lfc, 0),
            "lfc_std": lfc.std(0),
            "lfc_q05": np.quantile(lfc, 0.05, axis=0),
            "lfc_q95": np.quantile(lfc, 0.95, axis=0),
            "proba_de": proba,
            "proba_not_de": 1.0 - proba,
            "bayes_factor": np.log(clipped) - np.log1p(-clipped),
            "scale1": np.exp2(log2_expression_1).mean(0),
            "scale2": np.exp2(log2_expression_2).mean(0),
        },
        index=pd.Index(genes, name="gene"),
    ).sort_values("proba_de", ascending=False)
    table[f"is_de_fdr_{fdr_target}"] = expected_fdr_selection(table["proba_de"].to_numpy(), fdr_target)
    return table


def expected_fdr_selection(proba_de_sorted: np.ndarray, fdr_target: float) -> np.ndarray:
    """Largest set of top genes whose posterior expected FDR, mean(1 - proba_de), stays <= target.

    ``proba_de_sorted`` must be in decreasing order; returns a boolean mask in that order.
    """
    expected_fdr = np.cumsum(1.0 - proba_de_sorted) / np.arange(1, len(proba_de_sorted) + 1)
    passing = np.flatnonzero(expected_fdr <= fdr_target)
    selected = np.zeros(len(proba_de_sorted), dtype=bool)
    if passing.size:
        selected[: passing[-1] + 1] = True
    return selected


def differential_expression(model, groupby: str, group1: str, group2: str | None = None, delta: float = 0.25,
                            fdr_target: float = 0.05, num_samples: int = 20, n_cells: int = 500, n_pairs: int = 5000,
                            pseudocount: float = PSEUDOCOUNT, adata=None, batch_size: int | None = None, seed: int = 0,
                            modality: str | None = None) -> pd.DataFrame:
    """Bayesian differential expression of group1 vs group2 (scvi-tools' "change" mode).

    Uses seeded posterior samples of the background- and scaling-free expression rho
    (``model.decode_samples``).

    Parameters
    ----------
    model
        A fitted ``RegularizedVI`` or ``RegularizedMultimodalVI``.
    groupby
        Column of ``adata.obs`` with the groups.
    group1, group2
        The groups compared; ``group2=None`` compares ``group1`` with all other cells.
    delta
        Smallest log2 fold change that counts as a change.
    fdr_target
        Posterior expected false discovery rate of the selected genes (``is_de_fdr_*``).
    num_samples
        Posterior samples per cell.
    n_cells
        At most this many cells per group (a random subset).
    n_pairs
        Random (cell, sample) pairs behind each gene's LFC posterior.
    pseudocount
        Added to rho (counts at a typical library size) before taking log2.
    adata, batch_size, seed
        Cells (default the training data), minibatch size, seed of subsets and samples.
    modality
        Multimodal models: the modality tested (default the first).

    Returns
    -------
    pandas.DataFrame
        One row per feature, sorted by ``proba_de`` (see :func:`change_test`).
    """
    adata = model.adata if adata is None else adata
    for name, value in (("num_samples", num_samples), ("n_cells", n_cells), ("n_pairs", n_pairs)):
        V.positive_int(name, value)
    if not delta >= 0 or not 0 < fdr_target < 1 or not pseudocount > 0:
        raise ValueError(f"Need delta >= 0, 0 < fdr_target < 1 and pseudocount > 0; got {delta}, {fdr_target}, {pseudocount}.")
    if group1 == group2:
        raise ValueError(f"group1 and group2 are the same group ({group1!r}).")
    if groupby not in adata.obs:
        raise KeyError(f"Column {groupby!r} not found in adata.obs.")
    if adata.obs[groupby].isna().any():
        raise ValueError(f"adata.obs[{groupby!r}] has missing values; fill or drop them first.")
    modality = model.default_modality(modality)
    labels = adata.obs[groupby].astype(str).to_numpy()
    known = sorted(set(labels))
    for group in (group1, group2):
        if group is not None and group not in known:
            raise ValueError(f"Group {group!r} not found in adata.obs[{groupby!r}] (groups: {known[:20]}).")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == group1), np.flatnonzero(labels != group1 if group2 is None else labels == group2)]
    if min(len(m) for m in members) == 0:
        raise ValueError(f"One of the groups compared in adata.obs[{groupby!r}] has no cells.")
    samples = []
    for offset, cells in enumerate(members):
        cells = np.sort(rng.choice(cells, size=min(n_cells, len(cells)), replace=False))
        draws = model.decode_samples(adata, cells, batch_size, num_samples, seed + offset, modality=modality)
        rho = torch.cat([rho.cpu() for _, _, rho in draws], dim=1).numpy()  # samples x cells x features
        samples.append(np.log2(rho.reshape(-1, rho.shape[-1]) + pseudocount))
    return change_test(samples[0], samples[1], model.feature_names(modality), delta, fdr_target, n_pairs, rng)
