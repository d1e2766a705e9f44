"""The model ITE's interval from matching: widened by the model's disagreement with the matched ITE
(``widen_by_matching=True``), or the matched interval extended to the model ITE (:func:`matched_hull`, the default
of :meth:`~pyro_scmodels.ndreamer.NDreamer.estimate_model_ite`).

The decoded interval holds the spread of each cell's z only; the decoder's misfit to the true process, which data
drawn from the model do not contain, is most of the error (benchmarks/RESULTS.md, "Model ITE: a parametric bootstrap
of the estimator"). The matched ITE in the same latent estimates the same effect from the observed expression, with
errors of its own. For a treatment and a gene, the disagreement is

    v_g = mean over the treatment's cells of (E - M)^2,

E the decoded ITE and M the matched ITE. Where the two estimators' errors are uncorrelated, the expectation of
(E - M)^2 is the sum of their mean squared errors, so v_g bounds the decoded ITE's mean squared error from above, by
the matched ITE's noise. Each bound moves away from E by sqrt(h^2 + z^2 v_g), h its half-width from z and z the
normal quantile of its level. Per group (``groups``, e.g. Leiden clusters of the latent), v is taken over the group's
treated cells, where it follows errors that differ between cell types; a group with fewer than
:data:`MIN_GROUP_CELLS` treated cells takes the per-gene value.

``widen_by_matching="hull"`` (:func:`matched_hull`) takes another route: the matched ITE's interval
(:meth:`~pyro_scmodels.ndreamer.NDreamer.estimate_ite` with ``interval=``), with the cell's own term taken from its
observed expression whatever the NDreamer's ``factual``, extended to hold the decoded ITE where it lies outside. It
holds where the two routes' errors correlate (one responding cell type of five) and the disagreement above does not
(0.85-0.90 there, 0.90-0.94 in the standard design; the interval alone 0.82-0.87: benchmarks/RESULTS.md).

Above :data:`MAX_CELLS` treated cells the means are taken over a seeded sample of them (every group keeps at least
:data:`MIN_SAMPLED_PER_GROUP` of its cells, or all, so the sample may exceed :data:`MAX_CELLS` by those floors), each
cell weighted by its group's inverse sampling fraction: the matched ITE of every treated cell would cost as much as the
CATE over all cells again (the matches themselves still cover every cell).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import norm

#: treated cells decoded and matched per block (two blocks x genes float arrays at a time)
BLOCK = 10_000
#: a group with fewer treated cells than this takes the disagreement over all treated cells
MIN_GROUP_CELLS = 20
#: treated cells of a treatment over which the disagreement is taken at most (a seeded sample above it)
MAX_CELLS = 20_000
#: cells of each group kept in that sample at least (or all of the group's)
MIN_SAMPLED_PER_GROUP = 200


def disagreement_sample(treated: np.ndarray, group_codes: np.ndarray | None, n_groups: int, seed: int,
                        max_cells: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The treated cells over which the disagreement is taken, and each one's weight.

    Every treated cell with weight 1 up to ``max_cells`` of them; above it, a seeded sample drawn within each group
    (``round(max_cells x the group's share)`` cells, at least :data:`MIN_SAMPLED_PER_GROUP` or the whole group),
    each cell weighted by its group's cells over its sampled cells, so that weighted means estimate the means over
    every treated cell.

    Parameters
    ----------
    treated
        Positions of the treatment's cells, increasing.
    group_codes, n_groups
        Every cell's group (0 .. n_groups - 1) and their number; None and 1 for one group.
    seed
        Seed of the sample.
    max_cells
        The most cells taken without sampling; :data:`MAX_CELLS` when None.

    Returns
    -------
    tuple of numpy.ndarray
        The chosen positions (increasing) and their float64 weights.
    """
    max_cells = MAX_CELLS if max_cells is None else int(max_cells)
    if len(treated) <= max_cells:
        return treated, np.ones(len(treated))
    rng = np.random.default_rng(seed)
    codes = np.zeros(len(treated), dtype=np.int64) if group_codes is None else group_codes[treated]
    chosen, weights = [], []
    for code in range(n_groups):
        members = treated[codes == code]
        if len(members) == 0:
            continue
        quota = min(len(members), max(MIN_SAMPLED_PER_GROUP, round(max_cells * len(members) / len(treated))))
        chosen.append(rng.choice(members, quota, replace=False))
        weights.append(np.full(quota, len(members) / quota))
    chosen, weights = np.concatenate(chosen), np.concatenate(weights)
    order = np.argsort(chosen)
    return chosen[order], weights[order]


def disagreement_variance(treated: np.ndarray, decoded: Callable[[np.ndarray], np.ndarray],
                          matched: Callable[[np.ndarray], np.ndarray], group_codes: np.ndarray | None = None,
                          n_groups: int = 1, weights: np.ndarray | None = None) -> np.ndarray:
    """The mean squared difference between the decoded and the matched ITE over the treated cells, per group.

    Parameters
    ----------
    treated
        Positions of the treatment's cells.
    decoded, matched
        The two estimates for some of those positions: ``(len(rows), n_genes)`` arrays.
    group_codes
        Every cell's group (0 .. n_groups - 1), or None for one group.
    n_groups
        The number of groups.
    weights
        Each treated cell's weight (:func:`disagreement_sample`); None: all 1.

    Returns
    -------
    numpy.ndarray
        ``(n_groups, n_genes)`` float64 weighted means; a group with fewer than :data:`MIN_GROUP_CELLS` treated
        cells holds the value over all of them.
    """
    weights = np.ones(len(treated)) if weights is None else np.asarray(weights, dtype=np.float64)
    sums, mass = None, np.zeros(n_groups)  # mass: the treated cells each group's sums stand for
    for start in range(0, len(treated), BLOCK):
        rows, w = treated[start:start + BLOCK], weights[start:start + BLOCK]
        squared = (np.asarray(decoded(rows), dtype=np.float64) - np.asarray(matched(rows), dtype=np.float64)) ** 2
        codes = np.zeros(len(rows), dtype=np.int64) if group_codes is None else group_codes[rows]
        if sums is None:
            sums = np.zeros((n_groups, squared.shape[1]))
        for code in np.unique(codes):
            here = codes == code
            sums[code] += w[here] @ squared[here]
        mass += np.bincount(codes, weights=w, minlength=n_groups)
    overall = sums.sum(axis=0) / mass.sum()
    variance = sums / np.maximum(mass, 1e-300)[:, None]
    # the group's treated cells decide, not its sampled ones (a sampled group keeps at least MIN_SAMPLED_PER_GROUP)
    variance[mass < MIN_GROUP_CELLS] = overall
    return variance


def widened_bounds(mean: np.ndarray, low: np.ndarray, high: np.ndarray, quantiles: tuple[float, float],
                   variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``low`` and ``high`` moved away from ``mean`` by the added ``variance``: each half-width h becomes
    sqrt(h^2 + z^2 variance), z the standard-normal quantile of its bound's level.

    Parameters
    ----------
    mean, low, high
        The decoded ITE and its bounds from the spread of z (cells x genes).
    quantiles
        The bounds' levels, e.g. (0.05, 0.95).
    variance
        The added variance, broadcastable to ``mean`` (cells x genes, or one row per gene).

    Returns
    -------
    tuple of numpy.ndarray
        The widened lower and upper bounds, float32.
    """
    z_low, z_high = norm.ppf(1.0 - quantiles[0]), norm.ppf(quantiles[1])
    # a mean outside its own bounds (a skewed spread of z) keeps them: each new bound lies beyond the old one
    below = np.sqrt(np.square(np.maximum(mean - low, 0.0), dtype=np.float64) + z_low ** 2 * variance)
    above = np.sqrt(np.square(np.maximum(high - mean, 0.0), dtype=np.float64) + z_high ** 2 * variance)
    return (np.minimum(low, mean - below).astype(np.float32, copy=False),
            np.maximum(high, mean + above).astype(np.float32, copy=False))


#: ``widen_by_matching``'s value for :func:`matched_hull`
HULL = "hull"


def matched_hull(mean: np.ndarray, matched_low: np.ndarray, matched_high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The matched ITE's interval extended to hold the decoded ITE: ``[min(E, M_low), max(E, M_high)]``.

    Parameters
    ----------
    mean
        The decoded ITE E (cells x genes).
    matched_low, matched_high
        The matched ITE's bounds at the same level, for the same cells and genes.

    Returns
    -------
    tuple of numpy.ndarray
        The lower and upper bounds, float32.
    """
    return (np.minimum(mean, matched_low).astype(np.float32, copy=False),
            np.maximum(mean, matched_high).astype(np.float32, copy=False))
