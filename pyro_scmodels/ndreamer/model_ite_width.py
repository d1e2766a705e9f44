"""The model ITE's interval widened by the model's disagreement with the matched ITE (an option of
:meth:`~pyro_scmodels.ndreamer.NDreamer.estimate_model_ite`).

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
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import norm

#: treated cells decoded and matched per block (two blocks x genes float arrays at a time)
BLOCK = 10_000
#: a group with fewer treated cells than this takes the disagreement over all treated cells
MIN_GROUP_CELLS = 20


def disagreement_variance(treated: np.ndarray, decoded: Callable[[np.ndarray], np.ndarray],
                          matched: Callable[[np.ndarray], np.ndarray], group_codes: np.ndarray | None = None,
                          n_groups: int = 1) -> np.ndarray:
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

    Returns
    -------
    numpy.ndarray
        ``(n_groups, n_genes)`` float64; a group with fewer than :data:`MIN_GROUP_CELLS` treated cells holds the
        value over all of them.
    """
    sums, counts = None, np.zeros(n_groups)
    for start in range(0, len(treated), BLOCK):
        rows = treated[start:start + BLOCK]
        squared = (np.asarray(decoded(rows), dtype=np.float64) - np.asarray(matched(rows), dtype=np.float64)) ** 2
        codes = np.zeros(len(rows), dtype=np.int64) if group_codes is None else group_codes[rows]
        if sums is None:
            sums = np.zeros((n_groups, squared.shape[1]))
        for code in np.unique(codes):
            sums[code] += squared[codes == code].sum(axis=0)
        counts += np.bincount(codes, minlength=n_groups)
    overall = sums.sum(axis=0) / counts.sum()
    variance = sums / np.maximum(counts, 1.0)[:, None]
    variance[counts < MIN_GROUP_CELLS] = overall
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
