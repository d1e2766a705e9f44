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

from dataclasses import dataclass

import warnings

import numpy as np
import pandas as pd
import pyro
import torch
from matplotlib.figure import Figure

from .predictive_statistics import INTERVAL_LEVELS, MAX_PIT_SAMPLE, PIT_BINS, STATISTICS, SiteAccumulator  # noqa: F401

from . import _validation as V
from ._stacklevel import user_stacklevel
from ._atomic import atomic_path
from .figures import figure_path as checked_figure_path
from .seeding import seeded

__all__ = ["PredictiveCheck", "SiteCheck", "posterior_predictive_check", "prior_predictive_check"]


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
        Kolmogorov-Smirnov distance of ``pit_sample`` from Uniform(0, 1), and the p-value the test would give to
        independent draws. Read the distance, not the p-value: posterior predictive PITs are not exactly uniform
        even for a correct model (the posterior was fitted to the same counts) and the PITs of one cell or gene are
        dependent, so at this sample size the p-value rejects correct models. RegularizedVI fitted to data
        simulated from its own family gave p = 1e-3 and 7e-7 on its training cells (two seeds), while the distance
        was 0.006-0.009 against 0.033-0.041 for counts with half their non-zeros set to 0, which the 50 %
        ``pit_coverage`` (0.45 against 0.50-0.51) and ``pit_calibration_error`` also flag.
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
        # the headline is the randomised-PIT calibration (nominal for a correct model, whatever the
        # ties of discrete counts); the raw interval coverage is shown after it, labelled as such
        return (
            f"{self.site}: {len(self.genes)} features x {len(self.cells)} cells, calibration (randomised PIT): "
            f"coverage 50% "
            f"{self.pit_coverage[0.5]:.3f} / 90% {self.pit_coverage[0.9]:.3f}, calibration error "
            f"{self.pit_calibration_error:.4f}, KS {self.ks_statistic:.3f}; raw interval coverage (ties count as inside) "
            f"50% {self.coverage[0.5]:.3f} / 90% {self.coverage[0.9]:.3f}, error {self.calibration_error:.4f}; zero "
            f"fraction {s.loc['gene_zero_fraction', 'observed']:.3f} observed vs {s.loc['gene_zero_fraction', 'predicted']:.3f}"
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
        # the format comes from the extension unless it is given
        path = V.output_path("path", path) if "format" in kwargs else checked_figure_path("path", path)
        # savefig picks the format from the extension, which the temporary name keeps
        with atomic_path(path) as temporary:
            self.figure.savefig(temporary, **kwargs)

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
    try:
        chosen = np.asarray(model.train_indices if split == "train" else model.validation_indices)
    except (AttributeError, ValueError) as err:
        raise ValueError(f"split={split!r} needs a trained model: this one has no train/validation split.") from err
    if chosen.size == 0:
        raise ValueError(f"The model's {split} split holds no cells (train_size=1 leaves no validation cells).")
    return chosen


def _feature_names(model, site: str, n: int) -> pd.Index:
    # the model says which modality (None: its only one) an observation site belongs to
    try:
        names = pd.Index(model.feature_names(model.site_modality(site)))
    except (AttributeError, ValueError, KeyError):
        names = None
    return names if names is not None and len(names) == n else pd.Index([f"{site}_{i}" for i in range(n)])


def _run(model, adata, indices, num_samples, batch_size, seed, figure_path, prior) -> PredictiveCheck:
    # one draw makes the randomised PIT uniform on [0, 1/2] or [1/2, 1] whatever the fit: its coverage reads nominal
    if adata is not None and not hasattr(adata, "obs"):  # e.g. posterior_predictive_check(model, 30)
        raise V.ArgumentTypeError(f"adata must be an AnnData (or MuData) or None, got {adata!r}; pass the number of draws "
                                  "as num_samples=...")
    num_samples = V.integer("num_samples", num_samples, minimum=2, description=(
        "an integer >= 2 (with one draw the PIT coverage reads nominal whatever the fit; 20 or more is advised)"))
    batch_size = V.optional(V.positive_int, "batch_size", batch_size)
    seed = V.seed("seed", seed)
    figure_path = V.optional(checked_figure_path, "figure_path", figure_path)
    rng = np.random.default_rng(seed)
    accumulators: dict[str, SiteAccumulator] = {}
    positions, site_positions = [], {}
    # a multimodal model masks the likelihood of a cell without counts in a modality: its zeros are no measurement,
    # and counted they read as perfectly calibrated (ATAC's 90 % coverage 0.816 with them, 0.773 without)
    skip_empty = bool(getattr(model, "masks_cells_without_counts", False))
    device = torch.device(getattr(model, "device", "cpu"))
    # the draws come from torch's generator: seed it without disturbing the caller's stream
    # (argument validation of every distribution is skipped: it costs ~15 % of the draws' time)
    with seeded(seed, device), pyro.validation_enabled(False):
        for cells, sites in model.predictive_batches(num_samples, adata, indices, batch_size, prior=prior):
            positions.append(np.asarray(cells))
            for site, (observed, draws) in sites.items():
                kept = np.asarray(cells)
                if skip_empty:
                    measured = observed.sum(-1) > 0
                    observed, draws, kept = observed[measured], draws[:, measured], kept[measured]
                    if not kept.size:
                        continue
                if site not in accumulators:
                    accumulators[site] = SiteAccumulator(observed.shape[-1], num_samples)
                accumulators[site].update(observed, draws, rng)
                site_positions.setdefault(site, []).append(kept)
    positions = np.concatenate(positions)
    unmeasured = [site for site in getattr(model, "observation_sites", {}) if site not in accumulators]
    if unmeasured:  # every chosen cell lacks that modality: the site had nothing to check (it was left out silently)
        warnings.warn(f"None of the {len(positions)} cells checked has counts for {unmeasured}: those sites are left "
                      "out of the check.", UserWarning, stacklevel=user_stacklevel())
    source = adata if adata is not None else getattr(model, "adata", None)
    names = pd.Index(source.obs_names) if source is not None else None
    results = {}
    for site, acc in accumulators.items():
        cells = np.concatenate(site_positions[site])
        obs_names = names[cells] if names is not None else pd.Index(cells)
        results[site] = SiteCheck(**acc.result(site, _feature_names(model, site, acc.total.shape[1]), obs_names, prior))
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
        Statistics, calibration and figure, per observation site. For a multimodal model, a modality's site
        counts only the cells with counts in it (the others' likelihood is masked).

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
