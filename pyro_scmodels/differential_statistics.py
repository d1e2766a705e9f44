"""The two decision rules of Bayesian differential expression, on paired draws of log2 expression.

The "change" test (scvi-tools' default here): per gene, the posterior probability that the log2 fold change between
two groups exceeds ``delta`` in size, and the genes selected at a posterior expected false discovery rate. The
"vanilla" test: the probability that the first group's expression is the higher. Both work on draws of (cell,
posterior sample) pairs; :func:`pyro_scmodels.differential.differential_expression` makes the draws and the comparisons.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def change_test(log2_expression_1, log2_expression_2, genes, delta: float | None = 0.25, fdr_target: float = 0.05,
                n_pairs: int = 5000, rng: np.random.Generator | None = None, pseudocount: float = 0.0,
                weights1=None, weights2=None) -> pd.DataFrame:
    """Per-gene posterior of the log2 fold change between two groups.

    Parameters
    ----------
    log2_expression_1, log2_expression_2
        Posterior samples of log2 expression (draws x genes) for cells of each group; a row is
        one posterior sample of one cell. Lists of such arrays (one per stratum, e.g. per batch
        the cells were decoded as) pair rows within the same stratum only.
    genes
        Gene names (columns).
    delta
        Effect size below which a change does not count (log2 scale); None: estimated from the
        genes' LFC means (:func:`estimate_delta`).
    fdr_target
        Target of the posterior expected false discovery rate.
    n_pairs
        Random pairs of rows (one from each group) whose differences form the LFC posterior,
        shared evenly among strata.
    rng
        Random generator for the pairs.
    pseudocount
        The pseudocount added before the log, removed again from ``scale1``/``scale2``.
    weights1, weights2
        Probabilities of each group's rows (a list per stratum where the draws are), by which the pairs are drawn
        and ``scale1``/``scale2`` averaged (``weights="importance"``); None: every row alike.

    Returns
    -------
    pandas.DataFrame
        Indexed by gene, sorted by ``proba_de``: ``proba_de`` (P(|LFC| > delta)),
        ``proba_not_de``, ``bayes_factor`` (log odds of ``proba_de``), ``scale1``, ``scale2``
        (mean expression), ``delta`` (the threshold used), ``lfc_mean``, ``lfc_median``, ``lfc_std``,
        ``lfc_min``, ``lfc_max``,
        ``lfc_q05``, ``lfc_q95``, ``is_de_fdr_<target>``.
    """
    rng = rng or np.random.default_rng(0)
    lfc, scale = _paired_differences(log2_expression_1, log2_expression_2, n_pairs, rng, pseudocount, weights1, weights2)
    delta = estimate_delta(lfc.mean(0)) if delta is None else delta
    proba = (np.abs(lfc) > delta).mean(0)
    table = pd.DataFrame(
        {
            "proba_de": proba,
            "proba_not_de": 1.0 - proba,
            "bayes_factor": _log_odds(proba),
            "scale1": scale[0],
            "scale2": scale[1],
            "delta": delta,
            "lfc_mean": lfc.mean(0),
            "lfc_median": np.median(lfc, 0),
            "lfc_std": lfc.std(0),
            "lfc_min": lfc.min(0),
            "lfc_max": lfc.max(0),
            "lfc_q05": np.quantile(lfc, 0.05, axis=0),
            "lfc_q95": np.quantile(lfc, 0.95, axis=0),
        },
        index=pd.Index(genes, name="gene"),
    ).sort_values("proba_de", ascending=False)
    table[f"is_de_fdr_{fdr_target}"] = expected_fdr_selection(table["proba_de"].to_numpy(), fdr_target)
    return table


def estimate_delta(lfc_means: np.ndarray, coefficient: float = 0.6, floor: float = 0.1, seed: int = 0) -> float:
    """The smallest log2 fold change that counts as a change, read from the genes' LFC means (``delta=None``).

    A mixture of three normals is fitted to the genes' mean LFCs (down, unchanged, up); the threshold is
    ``coefficient`` times the mean size of its outer two means, at least ``floor`` (the rule of scvi-tools'
    ``delta=None``; Boyeau et al., 2023).

    Parameters
    ----------
    lfc_means
        One mean log2 fold change per gene.
    coefficient, floor
        The share of the outer modes' mean size taken, and the smallest threshold returned.
    seed
        Seed of the mixture's initialisation.

    Returns
    -------
    float
        The threshold, in log2 units.
    """
    from sklearn.mixture import GaussianMixture

    lfc_means = np.asarray(lfc_means, dtype=np.float64)
    if lfc_means.ndim != 1 or len(lfc_means) < 3 or not np.isfinite(lfc_means).all():
        raise ValueError(f"delta=None estimates the threshold from three or more finite per-gene LFC means; got shape "
                         f"{lfc_means.shape}. Pass a number, e.g. delta=0.25.")
    means = np.sort(GaussianMixture(n_components=3, random_state=seed).fit(lfc_means[:, None]).means_.ravel())
    return float(max(floor, coefficient * np.abs(means[[0, -1]]).mean()))


def vanilla_test(log2_expression_1, log2_expression_2, genes, n_pairs: int = 5000,
                 rng: np.random.Generator | None = None, pseudocount: float = 0.0, weights1=None,
                 weights2=None) -> pd.DataFrame:
    """Per gene, the posterior probability that group 1 expresses more than group 2 (scvi-tools' ``"vanilla"``).

    The hypotheses are M1: h1 > h2 and M2: h1 <= h2, judged on random pairs of rows drawn as in
    :func:`change_test`.

    Parameters
    ----------
    log2_expression_1, log2_expression_2
        Posterior samples of log2 expression (draws x genes) of each group, or lists of them per
        stratum (rows are paired within a stratum), as for :func:`change_test`.
    genes
        Gene names (columns).
    n_pairs
        Random pairs of rows, shared evenly among strata.
    rng
        Random generator for the pairs.
    pseudocount
        The pseudocount added before the log, removed again from ``scale1``/``scale2``.
    weights1, weights2
        Probabilities of the rows, as for :func:`change_test`.

    Returns
    -------
    pandas.DataFrame
        Indexed by gene, sorted by ``bayes_factor``: ``proba_m1``, ``proba_m2``, ``bayes_factor``
        (log odds of M1), ``scale1``, ``scale2`` (mean expression).
    """
    rng = rng or np.random.default_rng(0)
    lfc, scale = _paired_differences(log2_expression_1, log2_expression_2, n_pairs, rng, pseudocount, weights1, weights2)
    proba = (lfc > 0).mean(0)
    table = pd.DataFrame({"proba_m1": proba, "proba_m2": 1.0 - proba, "bayes_factor": _log_odds(proba),
                          "scale1": scale[0], "scale2": scale[1]}, index=pd.Index(genes, name="gene"))
    return table.sort_values("bayes_factor", ascending=False)


def _paired_differences(log2_expression_1, log2_expression_2, n_pairs: int, rng: np.random.Generator,
                        pseudocount: float, weights1=None, weights2=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """log2 fold changes of random row pairs (within each stratum; rows drawn by their weights where given), and each
    group's (weighted) mean expression."""
    as_list = lambda values: values if isinstance(values, list) else [values]  # noqa: E731
    first_strata, second_strata = as_list(log2_expression_1), as_list(log2_expression_2)
    first_weights, second_weights = ([None] * len(strata) if weights is None else as_list(weights)
                                     for strata, weights in ((first_strata, weights1), (second_strata, weights2)))
    per_stratum = max(1, n_pairs // len(first_strata))

    def pick(rows: np.ndarray, weights) -> np.ndarray:
        # a uniform draw keeps the generator's stream of the unweighted test, so that weights=None repeats it
        return rows[rng.integers(len(rows), size=per_stratum) if weights is None else
                    rng.choice(len(rows), size=per_stratum, p=weights)]

    lfc = np.concatenate([pick(a, wa) - pick(b, wb) for a, b, wa, wb in
                          zip(first_strata, second_strata, first_weights, second_weights)])
    scale = []
    for strata, weights in ((first_strata, first_weights), (second_strata, second_weights)):
        rows = np.concatenate([np.exp2(a) for a in strata])
        if any(w is None for w in weights):
            scale.append(rows.mean(0) - pseudocount)
        else:
            scale.append(np.average(rows, axis=0, weights=np.concatenate(weights)) - pseudocount)
    return lfc, scale


def _log_odds(proba: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with p kept off 0 and 1 so that a certain call is finite."""
    clipped = np.clip(proba, 1e-6, 1 - 1e-6)
    return np.log(clipped) - np.log1p(-clipped)


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


# --- which cells are compared ----------------------------------------------------------------
