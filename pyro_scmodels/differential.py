"""Bayesian differential expression from posterior samples of normalised expression.

The "change" test of scvi-tools, on a model's background-free expression rho: draw pairs of
(cell, posterior sample) from the two groups, form log2 fold changes, and per gene report the
posterior probability that |LFC| exceeds ``delta``; genes are selected by posterior expected
false discovery rate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

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
