"""Intervals for matched per-cell effects, from the spread of the matched cells.

A treated cell's matched ITE is a difference of averages: over each batch, its own value (in its own
batch) or the weighted mean of its k matched cells there, averaged over the batches; minus the same
for the control. (With ``factual="matched"`` the own batch, too, takes the weighted mean of the k
matched cells there, itself among them; the variance of that term stays one measurement's, ``s^2``,
as an allowance for how far those cells' state lies from the cell's: see
:func:`~pyro_scmodels.ndreamer.effects.effects_of_cells`.)
Each average is estimated from cells that share the cell's state, so the spread of
those k cells, their sample variance s^2, estimates the noise of one measurement at that state. The
weighted mean of them (weights w normalised to 1) has variance ``s^2 sum_j w_j^2``; the cell's own
value, one measurement, has variance ``s^2`` (from its matches in its own group, itself among them).
The ITE's variance is the sum of these over the number of batches squared, and the interval is a
Student t interval with k - 1 degrees of freedom (k capped by the smallest group used). The spread is
not kernel-weighted: the weights may put almost all their mass on the nearest cell (a cell is its
own nearest in its own group), which would leave it with almost no degrees of freedom.

A spread estimated from k matched zeros is not evidence of no noise: every s^2 is floored at that of
one count among the k matched cells, ``u^2 / k`` with u the log-normalised value of a single count in
the cell whose effect is estimated (its smallest positive value).

What the interval leaves out: how far the matched cells' state is from the cell's own, beyond their
spread (a representation that matches loosely gives intervals that cover less), and the
difference between the mean of log-normalised counts and the log of their mean.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy import stats

from .. import _validation as V
from .._labels import quantile_label
from .matched_row_sums import matched_moments


def interval_level(interval) -> float:
    """``interval`` checked as a level in (0, 1)."""
    return V.level("interval", interval)


def bound_names(level: float) -> tuple[str, str]:
    """Layer suffixes of an interval's bounds, named by their quantiles: 0.9 -> ``("q05", "q95")``, 0.95 ->
    ``("q2.5", "q97.5")``."""
    return tuple(quantile_label(q) for q in ((1 - level) / 2, (1 + level) / 2))


def single_cell_groups(design) -> list[str]:
    """The batch x condition groups holding a single cell, which no matched interval can be estimated in (a spread
    needs at least two matched cells).

    Parameters
    ----------
    design
        The counterfactual design (:class:`~pyro_scmodels.ndreamer.effects.CounterfactualDesign`).

    Returns
    -------
    list of str
        Those groups' labels (empty when every group holds two cells or more).
    """
    names, sizes = np.unique(design.groups, return_counts=True)
    return [str(name) for name, size in zip(names, sizes) if size < 2]


def smallest_positive(rows) -> np.ndarray:
    """Each row's smallest positive value (0 for a row without one): a single count's log-normalised value."""
    if sp.issparse(rows):
        rows = sp.csr_matrix(rows)
        data = np.where(rows.data > 0, rows.data, np.inf)
        starts, lengths = rows.indptr[:-1], np.diff(rows.indptr)
        out = np.full(rows.shape[0], np.inf)
        filled = lengths > 0
        out[filled] = np.minimum.reduceat(data, starts[filled]) if data.size else np.inf
    else:
        rows = np.asarray(rows)
        out = np.where(rows > 0, rows, np.inf).min(axis=1)
    return np.where(np.isfinite(out), out, 0.0)


def matched_spread(expression, indices: np.ndarray, weights: np.ndarray, unit: np.ndarray, genes=None):
    """Weighted mean of the matched rows, their spread s^2 and the sum of squared normalised weights.

    The spread is the plain sample variance of the k matched values (degrees of freedom k - 1): the
    kernel weights may put almost all their mass on the nearest cell (a cell is its own nearest in its
    own group), which leaves a weighted spread with almost no degrees of freedom.

    Parameters
    ----------
    expression
        Cells x genes: dense, sparse or a row store (see :func:`~pyro_scmodels.matching.weighted_average`).
    indices, weights
        (cells, k) matches of the cells asked for, k >= 2.
    unit
        A single count's value in each of those cells (:func:`smallest_positive`).
    genes
        Gene positions kept (default all).

    Returns
    -------
    tuple
        ``(mean, spread, squared_weights)``: (cells, genes) arrays (the weighted mean as
        :func:`~pyro_scmodels.matching.weighted_average` gives it, the spread float64) and a (cells, 1) array.
    """
    k = indices.shape[1]
    normalised = weights / weights.sum(axis=1, keepdims=True)
    squared_weights = (normalised.astype(np.float64) ** 2).sum(axis=1, keepdims=True)
    # one read of the matched rows: their plain moments, and the kernel-weighted mean the estimate uses
    plain_mean, plain_square, mean = matched_moments(expression, indices, weights, genes)
    # max(mean square - mean^2, 0) k / (k - 1), in place of the plain mean (not needed after): no temporaries
    spread = np.square(plain_mean, out=plain_mean)
    np.subtract(plain_square, spread, out=spread)
    np.maximum(spread, 0.0, out=spread)
    spread *= k / (k - 1)
    # k matched zeros are not evidence of no noise: at least the spread of one count among the k
    np.maximum(spread, np.asarray(unit, dtype=np.float64)[:, None] ** 2 / k, out=spread)
    return mean, spread, squared_weights


def interval_bounds(effect: np.ndarray, variance: np.ndarray, dof: float, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Student t bounds ``effect -/+ t_{(1 + level) / 2, dof} sqrt(variance)``, float32."""
    half = stats.t.ppf(0.5 + level / 2, max(dof, 1)) * np.sqrt(variance)
    return (effect - half).astype(np.float32), (effect + half).astype(np.float32)
