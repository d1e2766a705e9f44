"""Posterior and prior predictive checks of the count models, streamed over minibatches.

Draws ``num_samples`` replicate counts per cell from the (posterior or prior) predictive, one
minibatch at a time (memory ~ ``batch_size x num_samples x features``, whatever the number of
cells), and compares them with the observed counts: per-gene and per-cell mean, variance,
CV, zero fraction and maximum (per-gene statistics of the replicates are computed per draw from
running sums, then averaged over draws, as in ``scvi.criticism``), randomised PIT values,
coverage of central predictive intervals and a calibration error.

>>> check = posterior_predictive_check(model, split="validation")
>>> check.summary, check.coverage[0.9], check.ks_statistic
>>> check.save("ppc.png")
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import torch
from matplotlib.figure import Figure
from scipy import stats

from . import _validation as V

__all__ = ["PredictiveCheck", "SiteCheck", "posterior_predictive_check", "prior_predictive_check"]

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


class _SiteAccumulator:
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

    def result(self, site: str, features: pd.Index, cells: pd.Index, prior: bool) -> "SiteCheck":
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
        return SiteCheck(
            site=site, summary=_summary(genes, cell_frame), genes=genes, cells=cell_frame,
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


def _summary(genes: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
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


# --- results ---------------------------------------------------------------------------------
@dataclass(repr=False)
class SiteCheck:
    """Results of a predictive check for one observation site.

    Attributes
    ----------
    site
        Name of the observation site (e.g. ``"obs"``).
    summary
        One row per statistic (``gene_mean`` ... ``cell_max``, ``mean_variance_slope``,
        ``overdispersion``); columns ``observed`` and ``predicted`` (averages across genes or
        cells), ``correlation`` (Spearman, across genes or cells), ``mae`` and
        ``relative_error`` (median of ``|predicted - observed| / |observed|``).
    genes, cells
        Per-feature (indexed by feature names) and per-cell (indexed by ``obs_names``)
        ``observed_<stat>`` and ``predicted_<stat>`` columns for mean, variance, cv,
        zero_fraction and max, and ``coverage_90`` (fraction inside the 90 % interval).
        Variances are population variances (``ddof=0``).
    pit_histogram, pit_bin_edges
        Counts of all randomised PIT values in ``PIT_BINS`` equal bins of [0, 1].
    pit_sample
        A uniform random subsample (at most ``MAX_PIT_SAMPLE``) of the PIT values.
    coverage
        ``{level: fraction of observed counts inside the central interval of the draws}``
        for ``INTERVAL_LEVELS`` (counts on an interval end are inside, so discrete data
        cover more than nominal where the draws have many ties, e.g. rare genes, while
        quantiles of few draws give too narrow intervals for well-spread counts).
    pit_coverage
        The same from the randomised PIT (fraction of PIT values in ``[(1-a)/2, (1+a)/2]``):
        nominal in expectation for a correct model, whatever the ties.
    calibration_error, pit_calibration_error
        Sum over levels of ``(coverage - level)^2`` (scvi-tools), and the same from
        ``pit_coverage``. The first mixes in tie and finite-draw effects (see ``coverage``).
    ks_statistic, ks_pvalue
        Kolmogorov-Smirnov test of ``pit_sample`` against Uniform(0, 1).
    num_samples, prior
        Draws per cell, and whether they came from the prior predictive.
    """

    site: str
    summary: pd.DataFrame
    genes: pd.DataFrame
    cells: pd.DataFrame
    pit_histogram: np.ndarray
    pit_bin_edges: np.ndarray
    pit_sample: np.ndarray
    coverage: dict
    pit_coverage: dict
    calibration_error: float
    pit_calibration_error: float
    ks_statistic: float
    ks_pvalue: float
    num_samples: int
    prior: bool

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"{self.site}: {len(self.genes)} features, KS {self.ks_statistic:.3f}, coverage 50% "
            f"{self.coverage[0.5]:.3f} / 90% {self.coverage[0.9]:.3f} (PIT {self.pit_coverage[0.5]:.3f} / "
            f"{self.pit_coverage[0.9]:.3f}), calibration error {self.calibration_error:.4f}, zero fraction "
            f"{s.loc['gene_zero_fraction', 'observed']:.3f} observed vs {s.loc['gene_zero_fraction', 'predicted']:.3f}"
        )


class PredictiveCheck:
    """Results of a predictive check: one :class:`SiteCheck` per observation site.

    ``check["obs_rna"]`` gives a site's results. With a single site, its attributes
    (``genes``, ``cells``, ``pit_histogram``, ``pit_sample``, ``coverage``, ``pit_coverage``,
    ``calibration_error``, ``ks_statistic`` ...) are available on the check itself; ``summary``
    stacks the sites' summaries when there are several. ``figure`` (built on first use) shows
    one row of panels per site; ``save(path)`` writes it.
    """

    def __init__(self, sites: dict[str, SiteCheck], n_cells: int, num_samples: int, prior: bool):
        self.sites, self.n_cells, self.num_samples, self.prior = sites, n_cells, num_samples, prior
        self._figure: Figure | None = None

    def __getitem__(self, site: str) -> SiteCheck:
        return self.sites[site]

    def __iter__(self):
        return iter(self.sites)

    def __getattr__(self, name: str):
        # only called for names not found normally: a single site's fields read through
        if name in SiteCheck.__dataclass_fields__:
            return getattr(self._only_site(name), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _only_site(self, name: str) -> SiteCheck:
        if len(self.sites) != 1:
            raise AttributeError(f"The model has observation sites {list(self.sites)}: use check[site].{name}.")
        return next(iter(self.sites.values()))

    @property
    def summary(self) -> pd.DataFrame:
        """The summary of the only site, or the sites' summaries stacked (index: site, statistic)."""
        if len(self.sites) == 1:
            return self._only_site("summary").summary
        return pd.concat({site: check.summary for site, check in self.sites.items()}, names=["site", "statistic"])

    @property
    def figure(self) -> Figure:
        """Mean-variance, zero fraction, PIT histogram and coverage panels (a matplotlib Figure)."""
        if self._figure is None:
            self._figure = _draw(self)
        return self._figure

    def save(self, path, **kwargs) -> None:
        """Write :attr:`figure` to ``path`` (format from the extension, e.g. png or pdf).

        Parameters
        ----------
        path
            File to write.
        **kwargs
            Passed to ``Figure.savefig`` (e.g. ``dpi``).
        """
        kwargs.setdefault("dpi", 120)
        self.figure.savefig(path, **kwargs)

    def __repr__(self) -> str:
        kind = "prior" if self.prior else "posterior"
        lines = [f"PredictiveCheck({kind} predictive, {self.num_samples} draws, {self.n_cells} cells)"]
        return "\n  ".join(lines + [repr(check) for check in self.sites.values()])


def _draw(check: PredictiveCheck) -> Figure:
    fig = Figure(figsize=(15, 3.6 * len(check.sites)), layout="constrained")
    axes = fig.subplots(len(check.sites), 4, squeeze=False)
    diagonal = dict(ls="--", color="grey", lw=1)
    for (ax_mv, ax_zero, ax_pit, ax_cov), (site, result) in zip(axes, check.sites.items()):
        g = result.genes
        for who, colour in (("observed", "k"), ("predicted", "tab:orange")):
            ok = (g[f"{who}_mean"] > 0) & (g[f"{who}_variance"] > 0)  # log axes
            ax_mv.scatter(g.loc[ok, f"{who}_mean"], g.loc[ok, f"{who}_variance"], s=4, alpha=0.5, color=colour, label=who)
        positive = g["observed_mean"][g["observed_mean"] > 0]
        if len(positive):
            line = np.geomspace(positive.min(), positive.max(), 50)
            ax_mv.plot(line, line, label="Poisson", **diagonal)
        ax_mv.set(xscale="log", yscale="log", xlabel="mean per feature", ylabel="variance", title=f"{site}: mean-variance")

        ax_zero.scatter(g["observed_zero_fraction"], g["predicted_zero_fraction"], s=4, alpha=0.5)
        ax_zero.plot([0, 1], [0, 1], **diagonal)
        ax_zero.set(xlabel="observed zero fraction", ylabel="predicted zero fraction", title="zeros per feature")

        widths = np.diff(result.pit_bin_edges)
        density = result.pit_histogram / max(result.pit_histogram.sum(), 1) / widths
        ax_pit.bar(result.pit_bin_edges[:-1], density, width=widths, align="edge", alpha=0.7)
        ax_pit.axhline(1.0, label="uniform", **diagonal)
        ax_pit.set(xlabel="randomised PIT", ylabel="density", title=f"PIT (KS {result.ks_statistic:.3f})")

        levels = np.array(INTERVAL_LEVELS)
        ax_cov.plot(levels, [result.coverage[a] for a in levels], "o-", label="interval of draws")
        ax_cov.plot(levels, [result.pit_coverage[a] for a in levels], "s-", label="from PIT")
        ax_cov.plot([0, 1], [0, 1], **diagonal)
        ax_cov.set(xlabel="nominal level", ylabel="coverage", xlim=(0, 1), ylim=(0, 1),
                   title=f"coverage (cal. error {result.calibration_error:.3f}, PIT {result.pit_calibration_error:.3f})")
        for ax in (ax_mv, ax_pit, ax_cov):
            ax.legend(fontsize=8)
    return fig


# --- entry points ----------------------------------------------------------------------------
def _split_indices(model, adata, indices, split):
    if V.choice("split", split, ("train", "validation"), allow_none=True) is None:
        return indices
    V.exclusive("split", split, "indices", indices)
    if adata is not None and adata is not getattr(model, "adata", None):
        raise ValueError("split refers to the cells the model was trained on; do not pass another adata with it.")
    trainer = getattr(model, "trainer", None)
    if trainer is None:
        raise ValueError(f"split={split!r} needs a trained model: this one has no train/validation split.")
    chosen = np.asarray(trainer.train_indices if split == "train" else trainer.validation_indices)
    if chosen.size == 0:
        raise ValueError(f"The model's {split} split holds no cells (train_size=1 leaves no validation cells).")
    return chosen


def _feature_names(model, site: str, n: int) -> pd.Index:
    # a model with several modalities may name its features per site in ``feature_names``
    per_site = getattr(model, "feature_names", None)
    if isinstance(per_site, dict) and site in per_site and len(per_site[site]) == n:
        return pd.Index(per_site[site])
    var_names = getattr(model, "var_names", None)
    if var_names is not None and len(var_names) == n:
        return pd.Index(var_names)
    return pd.Index([f"{site}_{i}" for i in range(n)])


def _run(model, adata, indices, num_samples, batch_size, seed, figure_path, prior) -> PredictiveCheck:
    num_samples = V.positive_int("num_samples", num_samples)
    batch_size = V.optional(V.positive_int, "batch_size", batch_size)
    seed = V.non_negative_int("seed", seed)
    figure_path = V.optional(V.output_path, "figure_path", figure_path)
    rng = np.random.default_rng(seed)
    accumulators: dict[str, _SiteAccumulator] = {}
    positions = []
    device = torch.device(getattr(model, "device", "cpu"))
    # the draws come from torch's generator: seed it without disturbing the caller's stream
    # (argument validation of every distribution is skipped: it costs ~15 % of the draws' time)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        for cells, sites in model.predictive_batches(num_samples, adata, indices, batch_size, prior=prior):
            positions.append(np.asarray(cells))
            for site, (observed, draws) in sites.items():
                if site not in accumulators:
                    accumulators[site] = _SiteAccumulator(observed.shape[-1], num_samples)
                accumulators[site].update(observed, draws, rng)
    if not positions:
        raise ValueError("No cells to check: indices selects none.")
    positions = np.concatenate(positions)
    source = adata if adata is not None else getattr(model, "adata", None)
    obs_names = pd.Index(source.obs_names)[positions] if source is not None else pd.RangeIndex(len(positions))
    results = {
        site: acc.result(site, _feature_names(model, site, acc.total.shape[1]), obs_names, prior)
        for site, acc in accumulators.items()
    }
    check = PredictiveCheck(results, len(positions), num_samples, prior)
    if figure_path is not None:
        check.save(figure_path)
    return check


def posterior_predictive_check(model, adata=None, indices=None, num_samples: int = 20, batch_size: int | None = None,
                               split: str | None = None, seed: int = 0, figure_path=None) -> PredictiveCheck:
    """Compare observed counts with draws from the posterior predictive distribution.

    Parameters
    ----------
    model
        A fitted model of this package (anything with ``predictive_batches``).
    adata
        AnnData to check; default the model's training data.
    indices
        Cells to check (positions or a boolean mask); default all.
    num_samples
        Predictive draws per cell (the PIT is resolved to ``1 / (num_samples + 1)``).
    batch_size
        Cells per minibatch: memory grows with ``batch_size x num_samples x features``.
    split
        ``"train"`` or ``"validation"``: check the cells of the model's training split
        (cannot be combined with ``indices``).
    seed
        Seeds the predictive draws, the PIT tie-breaking and the PIT subsample.
    figure_path
        Also write the figure there (png, pdf, ... from the extension).

    Returns
    -------
    PredictiveCheck
        Statistics, calibration and figure, per observation site.

    Raises
    ------
    ValueError
        For a bad ``split`` (unknown, no trainer, empty, or given with ``indices``), no cells,
        or a bad ``num_samples``.
    """
    indices = _split_indices(model, adata, indices, split)
    return _run(model, adata, indices, num_samples, batch_size, seed, figure_path, prior=False)


def prior_predictive_check(model, num_samples: int = 20, adata=None, indices=None, batch_size: int | None = None,
                           seed: int = 0, figure_path=None) -> PredictiveCheck:
    """Compare observed counts with draws from the prior predictive distribution.

    Every latent variable is drawn from its prior (the networks as they are), so the check
    works before training and shows whether the priors allow counts like the data's.

    Parameters
    ----------
    model
        A model of this package, trained or not.
    num_samples, adata, indices, batch_size, seed, figure_path
        As in :func:`posterior_predictive_check`.

    Returns
    -------
    PredictiveCheck
        The same statistics as the posterior check, from prior predictive draws.
    """
    return _run(model, adata, indices, num_samples, batch_size, seed, figure_path, prior=True)
