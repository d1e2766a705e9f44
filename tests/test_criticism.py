"""Predictive checks: calibration on well-specified and misspecified fits, streaming, exact statistics."""

import copy
import math
import os
import tracemalloc
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import pyro_scmodels as ps
from pyro_scmodels.criticism import PredictiveCheck, posterior_predictive_check, prior_predictive_check

# The well-specified check runs on the 300 validation cells x 500 genes with 20 draws: 150k PIT
# values, 100k of them in the KS subsample. Sampling noise alone gives KS ~ 1.36 / sqrt(1e5) =
# 0.004 at the 5 % level; the fitted (not true) parameters, the amortised posterior having seen
# the cells, and 20 draws add a little more: measured 0.009. The bound 0.02 leaves twice that,
# and stays well under the 0.055 measured for the Poisson-like fit below (bound there: 0.04).
KS_WELL_SPECIFIED = 0.02
KS_POISSON_LIKE = 0.04


@pytest.fixture(scope="module")
def validation_check(fitted):
    return posterior_predictive_check(fitted, split="validation", num_samples=20, seed=0)


@pytest.fixture(scope="module")
def poisson_like(fitted):
    """A copy of the fitted model whose dispersion guide puts theta at 1e6: a Poisson likelihood."""
    model = copy.deepcopy(fitted)
    site = model.module.guide.inverse_sqrt_theta  # "lognormal": loc is log u, scale is a positive PyroParam
    with torch.no_grad():
        site.loc.fill_(math.log(1e-3))  # u = 1 / sqrt(theta) = 1e-3
    site.scale = torch.full_like(site.scale, 1e-4)
    return model


@pytest.fixture(scope="module")
def untrained():
    adata = ps.datasets.simulate(n_cells=150, n_genes=40, n_markers_per_type=4, n_responding_genes=4, seed=5)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return ps.RegularizedVI(adata, n_hidden=16, n_latent=4, seed=0)


def test_well_specified_fit_is_calibrated(validation_check):
    """The simulator is the model's generative process: PIT is close to uniform, intervals cover nominal."""
    check = validation_check
    assert check.ks_statistic < KS_WELL_SPECIFIED
    # the randomised PIT gives exact coverage for a correct model, whatever the ties (measured 0.503 / 0.901)
    assert 0.42 < check.pit_coverage[0.5] < 0.58
    assert 0.85 < check.pit_coverage[0.9] < 0.95
    assert check.pit_calibration_error < 0.005
    density = check.pit_histogram / check.pit_histogram.sum() * len(check.pit_histogram)
    assert np.all((density > 0.85) & (density < 1.15))
    # intervals of the draws (scvi-tools convention, ends inside): 90 % is close (measured 0.918), while
    # narrow intervals over-cover because rare genes have many tied draws (measured 0.708 for 50 %)
    assert 0.85 < check.coverage[0.9] < 0.95
    assert check.coverage[0.5] > check.pit_coverage[0.5]
    assert set(check.coverage) >= {0.5, 0.9}


def test_poisson_like_fit_is_flagged(validation_check, poisson_like, fitted):
    """With theta forced to 1e6 the predictive is too narrow for counts simulated with theta in 0.5..50."""
    assert poisson_like.get_dispersion().to_numpy().min() > 1e5
    assert fitted.get_dispersion().to_numpy().max() < 1e3  # the shared fixture is untouched
    check = posterior_predictive_check(poisson_like, split="validation", num_samples=20, seed=0)
    well = validation_check
    assert check.ks_statistic > KS_POISSON_LIKE and check.ks_statistic > 4 * well.ks_statistic
    assert check.pit_coverage[0.9] < 0.87 and check.pit_coverage[0.5] < 0.46  # measured 0.824 / 0.432
    assert check.pit_calibration_error > 10 * well.pit_calibration_error
    # too many observations beyond the predictive: a U-shaped PIT histogram
    density = check.pit_histogram / check.pit_histogram.sum() * len(check.pit_histogram)
    assert density[0] > 1.3 and density[-1] > 1.3
    # most entries are small counts where Poisson and NB agree, so the overall 90 % coverage only
    # drops to ~0.84; on expressed genes (mean > 5) it is far below nominal
    assert check.coverage[0.9] < well.coverage[0.9] - 0.05
    expressed = well.genes["observed_mean"] > 5
    assert check.genes.loc[expressed, "coverage_90"].mean() < 0.75  # measured ~0.65
    assert well.genes.loc[expressed, "coverage_90"].mean() > 0.82  # measured ~0.87
    od = check.summary.loc["overdispersion"]
    assert od["predicted"] < 0.7 * od["observed"]
    assert well.summary.loc["overdispersion", "predicted"] > 0.8 * od["observed"]


def test_memory_does_not_grow_with_cells(fitted):
    """Only one minibatch of draws is held: 4x the cells, same batch size, about the same peak."""
    posterior_predictive_check(fitted, indices=np.arange(10), num_samples=2, batch_size=200)  # warm caches
    peaks, checks = [], []
    for n in (400, 1600):
        tracemalloc.start()
        try:
            checks.append(posterior_predictive_check(fitted, indices=np.arange(n), num_samples=2, batch_size=200))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    print(f"tracemalloc peaks: {peaks[0] / 1e6:.1f} MB (400 cells), {peaks[1] / 1e6:.1f} MB (1600 cells)")
    assert peaks[1] < 1.5 * peaks[0]
    for n, check in zip((400, 1600), checks):
        assert len(check.cells) == n and len(check.genes) == 500
        assert check.pit_histogram.sum() == n * 500
        assert len(check.pit_sample) == min(100_000, n * 500)


def test_statistics_match_numpy(validation_check, fitted):
    """Observed per-gene and per-cell statistics equal numpy's on the same cells; predictions track them."""
    cells = fitted.trainer.validation_indices
    x = fitted.adata.layers["counts"][cells].toarray().astype(np.float64)
    genes, per_cell = validation_check.genes, validation_check.cells
    for frame, axis in ((genes, 0), (per_cell, 1)):
        np.testing.assert_allclose(frame["observed_mean"], x.mean(axis), rtol=1e-10)
        np.testing.assert_allclose(frame["observed_variance"], x.var(axis), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(frame["observed_zero_fraction"], (x == 0).mean(axis))
        np.testing.assert_allclose(frame["observed_max"], x.max(axis))
    assert list(genes.index) == list(fitted.var_names)
    summary = validation_check.summary
    assert summary.loc["gene_mean", "correlation"] > 0.98 and summary.loc["gene_mean", "relative_error"] < 0.1
    assert summary.loc["gene_zero_fraction", "mae"] < 0.03
    assert set(summary.columns) == {"observed", "predicted", "correlation", "mae", "relative_error"}


class TwoSiteModel:
    """Stands in for a multimodal model: fixed observed counts and draws for two sites."""

    def __init__(self, data, n_cells):
        self.data = data
        self.adata = SimpleNamespace(obs_names=pd.Index([f"c{i}" for i in range(n_cells)]))

    def predictive_batches(self, num_samples, adata=None, indices=None, batch_size=None, prior=False):
        cells = np.arange(len(self.adata.obs_names)) if indices is None else np.asarray(indices)
        for start in range(0, len(cells), batch_size):
            chunk = cells[start : start + batch_size]
            yield chunk, {site: (obs[chunk], draws[:num_samples, chunk]) for site, (obs, draws) in self.data.items()}


def test_any_model_with_several_sites(tmp_path):
    """Per-site results; predicted statistics are per-draw numpy statistics averaged over draws;
    PIT is uniform when the observation is one more draw, even for tie-heavy sparse counts."""
    rng = np.random.default_rng(1)
    n_cells, n_draws = 400, 10
    mu = rng.lognormal(0.5, 1.0, size=(1, 50))
    rna = rng.poisson(rng.gamma(2.0, mu / 2.0, size=(n_draws + 1, n_cells, 50))).astype(np.float32)
    atac = rng.poisson(0.2, size=(n_draws + 1, n_cells, 30)).astype(np.float32)
    model = TwoSiteModel({"obs_rna": (rna[0], rna[1:]), "obs_atac": (atac[0], atac[1:])}, n_cells)
    check = posterior_predictive_check(model, num_samples=n_draws, batch_size=64, figure_path=tmp_path / "two.pdf")
    assert list(check) == ["obs_rna", "obs_atac"]
    with pytest.raises(AttributeError, match="use check"):
        check.genes
    assert check.summary.index.names == ["site", "statistic"]
    for site, values in (("obs_rna", rna), ("obs_atac", atac)):
        result, obs, draws = check[site], values[0].astype(float), values[1:].astype(float)
        assert list(result.genes.index[:2]) == [f"{site}_0", f"{site}_1"]
        assert list(result.cells.index) == list(model.adata.obs_names)
        for frame, axis in ((result.genes, 1), (result.cells, 2)):
            np.testing.assert_allclose(frame["predicted_mean"], draws.mean(axis).mean(0), rtol=1e-10)
            np.testing.assert_allclose(frame["predicted_variance"], draws.var(axis).mean(0), rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(frame["predicted_max"], draws.max(axis).mean(0))
            np.testing.assert_allclose(frame["observed_zero_fraction"], (obs == 0).mean(axis - 1))
        assert result.ks_statistic < 0.03  # 20k (rna) / 12k (atac) PIT values: KS noise ~0.01
        assert abs(result.pit_coverage[0.5] - 0.5) < 0.02 and abs(result.pit_coverage[0.9] - 0.9) < 0.02
    # 80 % of the ATAC entries are 0, and so are most draws: the interval [0, 0] "covers" them
    assert check["obs_atac"].coverage[0.5] > 0.75
    assert len(check.figure.axes) == 8 and os.path.getsize(tmp_path / "two.pdf") > 0
    assert "obs_atac" in repr(check)


def test_validation_split_and_bad_arguments(validation_check, fitted, untrained):
    expected = fitted.adata.obs_names[fitted.validation_indices]
    assert validation_check.cells.index.equals(expected)
    assert len(validation_check.pit_sample) == 100_000
    with pytest.raises(ValueError, match="split must be"):
        posterior_predictive_check(fitted, split="test")
    with pytest.raises(ValueError, match="either split or indices"):
        posterior_predictive_check(fitted, split="train", indices=[0, 1])
    with pytest.raises(ValueError, match="no train/validation split"):
        posterior_predictive_check(untrained, split="validation")
    # the split is read through the model's public train_indices / validation_indices
    empty = SimpleNamespace(train_indices=np.arange(5), validation_indices=np.array([], int))
    with pytest.raises(ValueError, match="holds no cells"):
        posterior_predictive_check(empty, split="validation")
    with pytest.raises(ValueError, match="indices selects no cells"):
        posterior_predictive_check(fitted, indices=np.array([], int), num_samples=2)
    with pytest.raises(ValueError, match="num_samples"):
        posterior_predictive_check(fitted, num_samples=0)
    # the figure's format comes from its extension: checked before the check runs (it was lost after)
    for bad in ("ppc.xyz", "ppc"):
        with pytest.raises(ValueError, match="figure_path .*use one of"):
            posterior_predictive_check(fitted, num_samples=2, figure_path=bad)


def test_prior_check_on_untrained_model(untrained, tmp_path):
    path = tmp_path / "prior.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not trained" warning for a prior check
        check = prior_predictive_check(untrained, num_samples=5, batch_size=64, figure_path=path)
    assert isinstance(check, PredictiveCheck) and check.prior and "prior predictive" in repr(check)
    assert np.isfinite(check.summary[["observed", "predicted"]].to_numpy()).all()
    assert np.isfinite(check.genes.drop(columns=["observed_cv", "predicted_cv"]).to_numpy()).all()
    assert len(check.cells) == 150 and check.pit_histogram.sum() == 150 * 40
    assert isinstance(check.figure, Figure) and os.path.getsize(path) > 1000
    again = prior_predictive_check(untrained, num_samples=5, batch_size=64)
    pd.testing.assert_frame_equal(check.genes, again.genes)  # the seed fixes draws and PIT
    np.testing.assert_array_equal(check.pit_histogram, again.pit_histogram)


def test_one_predictive_draw_is_refused():
    # with one draw the randomised PIT reads nominal coverage whatever the fit
    adata = ps.datasets.simulate(n_cells=100, n_genes=30, n_markers_per_type=3, n_responding_genes=3, seed=0)
    ps.RegularizedVI.setup_anndata(adata, layer="counts")
    model = ps.RegularizedVI(adata, n_hidden=8, n_latent=2)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        prior_predictive_check(model, num_samples=1)
    # the second argument of the posterior check is adata: 30 failed in anndata's attribute access
    with pytest.raises(TypeError, match="adata must be an AnnData .*got 30; pass the number of draws as num_samples"):
        posterior_predictive_check(model, 30)
