"""Statistics of predictive checks, accumulated over minibatches of draws.

Running sums of one observation site (per-gene and per-cell mean, variance, CV, zero fraction,
maximum), randomised PIT values and interval coverage, and the comparison of observed with
predicted statistics. Used by :mod:`pyro_scmodels.criticism`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

STATISTICS = ("mean", "variance", "cv", "zero_fraction", "max")
#: nominal levels of the central predictive intervals (0.5 and 0.9 among them)
INTERVAL_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: PIT histogram bins; with 20 bins every interval end (1 -/+ level) / 2 falls on a bin edge
PIT_BINS = 20
MAX_PIT_SAMPLE = 100_000


# --- statistics ------------------------------------------------------------------------------
def _finish(total, total_sq, zeros, maximum, n) -> dict[str, np.ndarray]:
    """Mean, (population) variance, CV, zero fraction and max from sums over ``n`` values."""
    mean = total / n
    # E[x^2] - E[x]^2 in float64; rounding can leave a tiny negative for constant values
    variance = np.maximum(total_sq / n - mean**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.where(mean > 0, np.sqrt(variance) / mean, np.nan)
    return {"mean": mean, "variance": variance, "cv": cv, "zero_fraction": zeros / n, "max": maximum}


def _stats(x: np.ndarray, axis: int) -> dict[str, np.ndarray]:
    """The five statistics of ``x`` (float64) along ``axis``."""
    return _finish(x.sum(axis), np.square(x).sum(axis), (x == 0).sum(axis), x.max(axis), x.shape[axis])


def _nanmean(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """``nanmean`` without the warning for all-NaN slices (a gene with no counts has no CV)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _sorted_quantile(ordered: np.ndarray, q: float) -> np.ndarray:
    """Quantile ``q`` along axis 0 of already sorted draws (numpy's default linear method)."""
    position = q * (ordered.shape[0] - 1)
    low = int(np.floor(position))
    high = min(low + 1, ordered.shape[0] - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


class SiteAccumulator:
    """Running sums of one observation site over the minibatches of a check."""

    def __init__(self, n_features: int, num_samples: int, max_pit_sample: int = MAX_PIT_SAMPLE):
        self.n_cells, self.num_samples, self.max_pit_sample = 0, num_samples, max_pit_sample
        # per gene: row 0 the observed data, row 1 + s the draw s
        shape = (num_samples + 1, n_features)
        self.total, self.total_sq, self.zeros = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        self.maximum = np.full(shape, -np.inf)
        self.pit_histogram = np.zeros(PIT_BINS, dtype=np.int64)
        self.inside = np.zeros(len(INTERVAL_LEVELS), dtype=np.int64)
        self.gene_inside = np.zeros(n_features)
        self.pit_keys, self.pit_values = np.empty(0), np.empty(0)
        self.cell_parts: list[dict[str, np.ndarray]] = []

    def _add_columns(self, row: int, x: np.ndarray) -> None:
        self.total[row] += x.sum(0)
        self.total_sq[row] += np.square(x).sum(0)
        self.zeros[row] += (x == 0).sum(0)
        np.maximum(self.maximum[row], x.max(0), out=self.maximum[row])

    def update(self, observed: np.ndarray, draws: np.ndarray, rng: np.random.Generator) -> None:
        """Add one minibatch: ``observed`` (cells x features), ``draws`` (samples x cells x features)."""
        x = observed.astype(np.float64)
        n_draws = draws.shape[0]
        self.n_cells += x.shape[0]
        self._add_columns(0, x)
        cells = {f"observed_{k}": v for k, v in _stats(x, axis=1).items()}
        per_draw = []
        less = np.zeros(x.shape, dtype=np.int32)
        equal = np.zeros(x.shape, dtype=np.int32)
        for s in range(n_draws):  # one draw at a time: float64 copies stay cells x features
            d = draws[s].astype(np.float64)
            self._add_columns(1 + s, d)
            per_draw.append(_stats(d, axis=1))
            less += d < x
            equal += d == x
        # per-cell statistics of each draw, averaged over draws (a draw with no counts has no CV)
        cells.update({f"predicted_{k}": _nanmean(np.stack([p[k] for p in per_draw]), 0) for k in STATISTICS})

        # randomised PIT: x is ranked among the draws and itself, ties broken uniformly at random,
        # so (#below + U (#tied + 1)) / (S + 1) is exactly Uniform(0, 1) when x is one more draw
        pit = (less + rng.random(x.shape) * (equal + 1)) / (n_draws + 1)
        self.pit_histogram += np.histogram(pit, bins=PIT_BINS, range=(0.0, 1.0))[0]
        self._subsample(pit.ravel(), rng)

        # central intervals [q_low, q_high] of the draws; x on an end counts as inside
        ordered = np.sort(draws, axis=0)
        for i, level in enumerate(INTERVAL_LEVELS):
            inside = (_sorted_quantile(ordered, (1 - level) / 2) <= x) & (x <= _sorted_quantile(ordered, (1 + level) / 2))
            self.inside[i] += int(inside.sum())
            if level == 0.9:
                self.gene_inside += inside.sum(0)
                cells["coverage_90"] = inside.mean(1)
        self.cell_parts.append(cells)

    def _subsample(self, pit: np.ndarray, rng: np.random.Generator) -> None:
        """Keep the values with the smallest random keys: a uniform sample of all PIT values so far."""
        keys = rng.random(pit.size)
        k = self.max_pit_sample
        if pit.size > k:
            keep = np.argpartition(keys, k - 1)[:k]
            keys, pit = keys[keep], pit[keep]
        self.pit_keys = np.concatenate([self.pit_keys, keys])
        self.pit_values = np.concatenate([self.pit_values, pit])
        if self.pit_values.size > k:
            keep = np.argpartition(self.pit_keys, k - 1)[:k]
            self.pit_keys, self.pit_values = self.pit_keys[keep], self.pit_values[keep]

    def result(self, site: str, features: pd.Index, cells: pd.Index, prior: bool) -> dict:
        """The fields of a :class:`~pyro_scmodels.criticism.SiteCheck` from the sums so far."""
        per_gene = _finish(self.total, self.total_sq, self.zeros, self.maximum, self.n_cells)
        genes = {}
        for k in STATISTICS:
            genes[f"observed_{k}"] = per_gene[k][0]
            genes[f"predicted_{k}"] = _nanmean(per_gene[k][1:], 0)  # per draw, then over draws
        genes["coverage_90"] = self.gene_inside / self.n_cells
        genes = pd.DataFrame(genes, index=features)
        columns = {k: np.concatenate([p[k] for p in self.cell_parts]) for k in self.cell_parts[0]}
        cell_frame = pd.DataFrame(columns, index=cells)
        n_entries = self.n_cells * len(features)
        coverage = {level: self.inside[i] / n_entries for i, level in enumerate(INTERVAL_LEVELS)}
        cumulative = np.concatenate([[0], np.cumsum(self.pit_histogram)]) / n_entries
        pit_coverage = {
            level: cumulative[round((1 + level) / 2 * PIT_BINS)] - cumulative[round((1 - level) / 2 * PIT_BINS)]
            for level in INTERVAL_LEVELS
        }
        ks = stats.kstest(self.pit_values, "uniform")
        return dict(
            site=site, summary=summary_table(genes, cell_frame), genes=genes, cells=cell_frame,
            pit_histogram=self.pit_histogram.copy(), pit_bin_edges=np.linspace(0.0, 1.0, PIT_BINS + 1),
            pit_sample=self.pit_values.copy(), coverage=coverage, pit_coverage=pit_coverage,
            # squared gaps between observed and nominal coverage, summed over levels (scvi-tools)
            calibration_error=float(sum((coverage[a] - a) ** 2 for a in INTERVAL_LEVELS)),
            pit_calibration_error=float(sum((pit_coverage[a] - a) ** 2 for a in INTERVAL_LEVELS)),
            ks_statistic=float(ks.statistic), ks_pvalue=float(ks.pvalue), num_samples=self.num_samples, prior=prior,
        )


def _compare(observed: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Averages, Spearman correlation and errors of one statistic across genes or cells."""
    ok = np.isfinite(observed) & np.isfinite(predicted)
    o, p = observed[ok], predicted[ok]
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # constant input: the correlation is NaN
        correlation = float(stats.spearmanr(o, p)[0]) if o.size > 2 else np.nan
        relative = np.abs(p - o)[o != 0] / np.abs(o[o != 0])
    average = (lambda v: float(v.mean()) if v.size else np.nan)  # noqa: E731
    return {"observed": average(o), "predicted": average(p), "correlation": correlation, "mae": average(np.abs(p - o)),
            "relative_error": float(np.median(relative)) if relative.size else np.nan}


def _mean_variance(mean: np.ndarray, variance: np.ndarray) -> tuple[float, float]:
    """Slope of log variance on log mean across genes, and the median overdispersion (var - mean) / mean^2."""
    ok = (mean > 0) & (variance > 0)
    slope = float(np.polyfit(np.log(mean[ok]), np.log(variance[ok]), 1)[0]) if ok.sum() > 2 else np.nan
    overdispersion = float(np.median((variance[ok] - mean[ok]) / mean[ok] ** 2)) if ok.any() else np.nan
    return slope, overdispersion


def summary_table(genes: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Observed against predicted statistics, one row per statistic (see ``SiteCheck.summary``).

    Parameters
    ----------
    genes, cells
        Per-gene and per-cell tables with ``observed_<stat>`` and ``predicted_<stat>`` columns.

    Returns
    -------
    pandas.DataFrame
        Rows ``gene_<stat>``, ``cell_<stat>``, ``mean_variance_slope`` and ``overdispersion``.
    """
    rows = {}
    for level, frame in (("gene", genes), ("cell", cells)):
        for k in STATISTICS:
            rows[f"{level}_{k}"] = _compare(frame[f"observed_{k}"].to_numpy(), frame[f"predicted_{k}"].to_numpy())
    observed = _mean_variance(genes["observed_mean"].to_numpy(), genes["observed_variance"].to_numpy())
    predicted = _mean_variance(genes["predicted_mean"].to_numpy(), genes["predicted_variance"].to_numpy())
    for i, name in enumerate(("mean_variance_slope", "overdispersion")):
        gap = abs(predicted[i] - observed[i])
        rows[name] = {"observed": observed[i], "predicted": predicted[i], "correlation": np.nan, "mae": gap,
                      "relative_error": gap / abs(observed[i]) if observed[i] else np.nan}
    return pd.DataFrame.from_dict(rows, orient="index")
