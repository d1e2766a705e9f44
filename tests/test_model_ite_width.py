"""The model ITE's bounds widened by its disagreement with the matched ITE (``estimate_model_ite(widen_by_matching=
True)``): the disagreement and the widened bounds against numpy, what a subset of cells gets, and refused input.
Its coverage on the simulator is asserted in test_ndreamer_real_data.py::test_from_model_matching_and_model_based_counterfactuals.
"""

import warnings

import numpy as np
import pytest
from scipy.stats import norm

import pyro_scmodels as ps
from pyro_scmodels.ndreamer import NDreamer
from pyro_scmodels.ndreamer.model_ite_width import (MIN_GROUP_CELLS, MIN_SAMPLED_PER_GROUP, disagreement_sample,
                                                     disagreement_variance, widened_bounds)


def test_the_disagreement_is_the_mean_squared_difference_over_the_treated_cells_per_group(monkeypatch):
    from pyro_scmodels.ndreamer import model_ite_width

    monkeypatch.setattr(model_ite_width, "BLOCK", 7)  # several blocks
    rng = np.random.default_rng(0)
    decoded, matched = rng.normal(size=(120, 5)), rng.normal(size=(120, 5))
    treated = np.sort(rng.choice(120, 70, replace=False))
    groups = np.where(np.arange(120) < 100, np.arange(120) % 2, 2)  # groups 0 and 1 large, group 2 small
    variance = disagreement_variance(treated, lambda r: decoded[r], lambda r: matched[r], groups, 3)
    squared = (decoded - matched) ** 2
    for g in (0, 1):
        rows = treated[groups[treated] == g]
        assert len(rows) >= MIN_GROUP_CELLS
        np.testing.assert_allclose(variance[g], squared[rows].mean(0))
    assert 0 < (groups[treated] == 2).sum() < MIN_GROUP_CELLS
    np.testing.assert_allclose(variance[2], squared[treated].mean(0))  # too few cells: the value over all
    np.testing.assert_allclose(disagreement_variance(treated, lambda r: decoded[r], lambda r: matched[r])[0],
                               squared[treated].mean(0))


def test_above_the_cap_a_seeded_sample_per_group_stands_for_every_treated_cell():
    rng = np.random.default_rng(1)
    treated = np.sort(rng.choice(100_000, 30_000, replace=False))
    groups = rng.choice(4, 100_000, p=[0.7, 0.25, 0.045, 0.005])  # the last group: about 150 treated cells
    everyone, ones = disagreement_sample(treated, groups, 4, seed=0, max_cells=30_000)
    np.testing.assert_array_equal(everyone, treated)  # up to the cap: every treated cell, weight 1
    assert (ones == 1).all()
    rows, weights = disagreement_sample(treated, groups, 4, seed=0, max_cells=2_000)
    assert np.isin(rows, treated).all() and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, disagreement_sample(treated, groups, 4, seed=0, max_cells=2_000)[0])  # seeded
    for g in range(4):
        members, sampled = treated[groups[treated] == g], rows[groups[rows] == g]
        assert len(sampled) == min(len(members), max(MIN_SAMPLED_PER_GROUP, round(2_000 * len(members) / 30_000)))
        np.testing.assert_allclose(weights[groups[rows] == g].sum(), len(members))  # the group's cells, weighted
    # weighted means of the sample estimate the means over every treated cell, per group and over all
    values = rng.gamma(2.0, size=(100_000, 3)) * (1 + groups[:, None])  # groups differ in their disagreement
    full = disagreement_variance(treated, lambda r: values[r], lambda r: np.zeros((len(r), 3)), groups, 4)
    sampled = disagreement_variance(rows, lambda r: values[r], lambda r: np.zeros((len(r), 3)), groups, 4, weights)
    np.testing.assert_allclose(sampled, full, rtol=0.15)
    one_full = disagreement_variance(treated, lambda r: values[r], lambda r: np.zeros((len(r), 3)))
    rows1, weights1 = disagreement_sample(treated, groups, 4, seed=3, max_cells=2_000)
    one_sampled = disagreement_variance(rows1, lambda r: values[r], lambda r: np.zeros((len(r), 3)), None, 1, weights1)
    np.testing.assert_allclose(one_sampled, one_full, rtol=0.1)


def test_each_bound_moves_away_from_the_mean_by_its_normal_quantile():
    mean, low, high = np.array([[0.0, 1.0]]), np.array([[-0.2, 0.5]]), np.array([[0.4, 1.1]])
    variance = np.array([[0.25, 0.0]])
    new_low, new_high = widened_bounds(mean, low, high, (0.1, 0.95), variance)
    np.testing.assert_allclose(new_low, [[-np.sqrt(0.04 + norm.ppf(0.9) ** 2 * 0.25), 0.5]], rtol=1e-6)
    np.testing.assert_allclose(new_high, [[np.sqrt(0.16 + norm.ppf(0.95) ** 2 * 0.25), 1.1]], rtol=1e-6)
    # a mean outside its own bounds (a skewed spread of z): the new bounds still lie beyond the old ones
    new_low, new_high = widened_bounds(np.array([[2.0]]), np.array([[2.5]]), np.array([[3.0]]), (0.05, 0.95),
                                       np.array([[0.01]]))
    assert new_low[0, 0] <= 2.0 - norm.ppf(0.95) * 0.1 + 1e-6 and new_high[0, 0] >= 3.0


@pytest.fixture(scope="module")
def from_model():
    adata = ps.datasets.simulate(n_cells=300, n_genes=40, n_markers_per_type=4, n_responding_genes=6, seed=2,
                                 effect_modifier=1.0)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch",
                                   nn_conditioning_covariate_keys=["condition"], encoder_covariate_keys=["condition"])
    model = ps.RegularizedVI(adata, n_hidden=32, n_latent=4, latent_independence=10.0)
    model.train(max_epochs=3, batch_size=64, device="cpu", progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu")


def test_widened_bounds_hold_the_disagreement_and_a_subset_gets_the_whole_datas(from_model, monkeypatch):
    from pyro_scmodels.ndreamer import model_ite_width

    monkeypatch.setattr(model_ite_width, "BLOCK", 64)  # the 300 cells widened in several blocks
    nd = from_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = nd.estimate_model_ite(num_samples=4, widen_by_matching=False).copy()
        assert nd.results.uns["model_ite_interval"]["widen_by_matching"] is False
        wide = nd.estimate_model_ite(num_samples=4, widen_by_matching=True)
    assert nd.results.uns["model_ite_interval"] == {"widen_by_matching": True, "disagreement_groups": ""}
    mean, low, high = (wide.layers[f"ite_model_stimulated{s}"] for s in ("", "_q05", "_q95"))
    np.testing.assert_array_equal(mean, plain.layers["ite_model_stimulated"])  # the estimate is unchanged
    treated = (nd.results.obs["condition"] == "stimulated").to_numpy()
    matched = nd.estimate_ite(shrink=None).layers["ite_stimulated"]  # the widening reads the unshrunk ITE
    variance = ((mean - matched)[treated].astype(np.float64) ** 2).mean(0)
    expected = widened_bounds(mean, plain.layers["ite_model_stimulated_q05"], plain.layers["ite_model_stimulated_q95"],
                              (0.05, 0.95), variance[None, :])
    np.testing.assert_allclose(low, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(high, expected[1], rtol=1e-5, atol=1e-6)
    assert ((high - low) > (plain.layers["ite_model_stimulated_q95"] - plain.layers["ite_model_stimulated_q05"])).mean() > 0.99
    # a few cells get bounds from the disagreement over every treated cell, not over themselves
    cells, genes = [3, 50, 200], list(nd.genes[:6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = nd.estimate_model_ite(num_samples=4, widen_by_matching=True, indices=cells, gene_list=genes)
    columns = [list(nd.genes).index(g) for g in genes]
    width = (high - low)[np.ix_(cells, columns)]
    np.testing.assert_allclose(part.layers["ite_model_stimulated_q95"] - part.layers["ite_model_stimulated_q05"], width,
                               rtol=0.05)


def test_widened_bounds_per_group_take_each_groups_treated_cells(from_model):
    nd = from_model
    nd.results.obs["type_group"] = nd.results.obs["cell_type"].astype(str).to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = nd.estimate_model_ite(num_samples=4, widen_by_matching=False).copy()
        wide = nd.estimate_model_ite(num_samples=4, widen_by_matching=True, disagreement_groups="type_group")
    mean = wide.layers["ite_model_stimulated"]
    matched = nd.estimate_ite(shrink=None).layers["ite_stimulated"]  # the widening reads the unshrunk ITE
    treated = (nd.results.obs["condition"] == "stimulated").to_numpy()
    squared = (mean - matched).astype(np.float64) ** 2
    group = nd.results.obs["type_group"].to_numpy()
    variance = np.stack([squared[treated & (group == g)].mean(0) if (treated & (group == g)).sum() >= MIN_GROUP_CELLS
                         else squared[treated].mean(0) for g in group])
    expected = widened_bounds(mean, plain.layers["ite_model_stimulated_q05"], plain.layers["ite_model_stimulated_q95"],
                              (0.05, 0.95), variance)
    np.testing.assert_allclose(wide.layers["ite_model_stimulated_q95"], expected[1], rtol=1e-5, atol=1e-6)
    assert nd.results.uns["model_ite_interval"]["disagreement_groups"] == "type_group"


def test_disagreement_groups_are_checked_before_decoding(from_model):
    nd = from_model
    with pytest.raises(ValueError, match="disagreement_groups needs widen_by_matching=True"):
        nd.estimate_model_ite(num_samples=2, widen_by_matching=False, disagreement_groups="cell_type")
    with pytest.raises(KeyError, match="'leiden' is not a column of nd.results.obs"):
        nd.estimate_model_ite(num_samples=2, widen_by_matching=True, disagreement_groups="leiden")
    nd.results.obs["partial"] = np.where(np.arange(nd.results.n_obs) < 10, None, "a")
    with pytest.raises(ValueError, match=r"nd.results.obs\['partial'\] has 10 missing values"):
        nd.estimate_model_ite(num_samples=2, widen_by_matching=True, disagreement_groups="partial")
    with pytest.raises(ValueError, match="widen_by_matching='yes': give True"):
        nd.estimate_model_ite(num_samples=2, widen_by_matching="yes")
    with pytest.raises(TypeError, match="widen_by_matching must be True .*, 'hull' .* or False .*; got 2"):
        nd.estimate_model_ite(num_samples=2, widen_by_matching=2)
    with pytest.raises(ValueError, match="central quantiles such as"):
        nd.estimate_model_ite(num_samples=2, widen_by_matching="hull", quantiles=(0.1, 0.95))
    with pytest.raises(ValueError, match="disagreement_groups needs widen_by_matching=True"):
        nd.estimate_model_ite(num_samples=2, widen_by_matching="hull", disagreement_groups="cell_type")


def test_the_bounds_take_the_sample_when_the_treated_cells_exceed_the_cap(from_model, monkeypatch):
    from pyro_scmodels.ndreamer import model_ite_width

    nd = from_model
    treated = np.flatnonzero((nd.results.obs["condition"] == "stimulated").to_numpy())
    monkeypatch.setattr(model_ite_width, "MAX_CELLS", 40)
    monkeypatch.setattr(model_ite_width, "MIN_SAMPLED_PER_GROUP", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = nd.estimate_model_ite(num_samples=4, widen_by_matching=False).copy()
        wide = nd.estimate_model_ite(num_samples=4, widen_by_matching=True)
    assert len(treated) > 40
    rows, weights = disagreement_sample(treated, None, 1, seed=nd.settings["seed"])
    assert len(rows) == 40 and np.allclose(weights, len(treated) / 40)
    mean = wide.layers["ite_model_stimulated"]
    matched = nd.estimate_ite(shrink=None).layers["ite_stimulated"]  # the widening reads the unshrunk ITE
    variance = ((mean - matched)[rows].astype(np.float64) ** 2).mean(0)  # over the sample, not every treated cell
    expected = widened_bounds(mean, plain.layers["ite_model_stimulated_q05"], plain.layers["ite_model_stimulated_q95"],
                              (0.05, 0.95), variance[None, :])
    np.testing.assert_allclose(wide.layers["ite_model_stimulated_q95"], expected[1], rtol=1e-5, atol=1e-6)
    everyone = ((mean - matched)[treated].astype(np.float64) ** 2).mean(0)
    assert not np.allclose(variance, everyone)  # the sample differs from the whole, so the check above can fail


def test_cells_asked_for_are_warned_about_the_setup_once():
    adata = ps.datasets.simulate(n_cells=200, n_genes=30, n_markers_per_type=3, n_responding_genes=5, seed=1)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch", nn_conditioning_covariate_keys=["condition"],
                                   encoder_covariate_keys=["condition"])
    model = ps.RegularizedVI(adata, n_hidden=16, n_latent=3)  # no latent_independence: a setup warning
    model.train(max_epochs=2, batch_size=64, device="cpu", progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the treated cells are decoded again for the widening
        nd.estimate_model_ite(num_samples=2, indices=[0, 5], widen_by_matching=True)
    setup = [w for w in caught if "latent_independence" in str(w.message)]
    assert len(setup) == 1 and setup[0].filename == __file__, [(str(w.message), w.filename) for w in caught]


def test_the_hull_is_the_matched_interval_extended_to_the_model_ite(from_model, monkeypatch):
    from pyro_scmodels.ndreamer import model_ite_width

    monkeypatch.setattr(model_ite_width, "BLOCK", 64)  # several blocks of cells
    nd = from_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # float32 levels (0.1 and 1 - 0.9 differ by ~1e-8 there) are central too
        own_matched = nd.estimate_ite(interval=0.8, shrink=None).copy()  # from_model's own term: matched cells
        hull = nd.estimate_model_ite(num_samples=4, widen_by_matching="hull",
                                     quantiles=np.array([0.1, 0.9], dtype=np.float32)).copy()
        # the hull's interval takes a cell's own term from its observed expression, whatever the NDreamer's factual
        # (the matched own term's variance is an allowance: its interval alone covered 0.92-0.93 at 3000 x 500, and
        # extended to the model ITE 0.95-0.97)
        observed = NDreamer.from_model(nd.model, "condition", "control", batch_key="batch", device="cpu",
                                       factual="observed")
        matched = observed.estimate_ite(interval=0.8, shrink=None)
    assert nd.settings["factual"] == "matched" and observed.settings["factual"] == "observed"
    assert not np.allclose(own_matched.layers["ite_stimulated_q10"], matched.layers["ite_stimulated_q10"])
    assert nd.results.uns["model_ite_interval"]["widen_by_matching"] == "hull"
    mean = hull.layers["ite_model_stimulated"]
    low, high = hull.layers["ite_model_stimulated_q10"], hull.layers["ite_model_stimulated_q90"]
    np.testing.assert_allclose(low, np.minimum(mean, matched.layers["ite_stimulated_q10"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(high, np.maximum(mean, matched.layers["ite_stimulated_q90"]), rtol=1e-6, atol=1e-7)
    outside = (mean < matched.layers["ite_stimulated_q10"]) | (mean > matched.layers["ite_stimulated_q90"])
    assert 0 < outside.mean() < 1  # both cases occur: E an end point, and the matched interval as it is
    # a few cells and genes get the same bounds as the whole
    cells, genes = [7, 120, 250], list(nd.genes[[5, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = nd.estimate_model_ite(num_samples=4, widen_by_matching="hull", quantiles=(0.1, 0.9), indices=cells,
                                     gene_list=genes)
    np.testing.assert_allclose(part.layers["ite_model_stimulated_q10"], low[np.ix_(cells, [5, 1])], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part.layers["ite_model_stimulated_q90"], high[np.ix_(cells, [5, 1])], rtol=1e-5, atol=1e-6)


def test_the_default_bounds_are_the_hull_and_its_refusals_name_the_other_mode(from_model):
    # True under-covered where one cell type responds (0.58-0.71); the hull is the default since 2026-12-06
    nd = from_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = nd.estimate_model_ite(num_samples=4).copy()
        assert nd.results.uns["model_ite_interval"]["widen_by_matching"] == "hull"
        hull = nd.estimate_model_ite(num_samples=4, widen_by_matching="hull")
    for bound in ("_q05", "_q95"):
        np.testing.assert_array_equal(default.layers[f"ite_model_stimulated{bound}"],
                                      hull.layers[f"ite_model_stimulated{bound}"])
    with pytest.raises(ValueError, match="widen_by_matching=True for others"):  # non-central quantiles at the default
        nd.estimate_model_ite(num_samples=2, quantiles=(0.1, 0.95))
    with pytest.raises(ValueError, match="disagreement_groups needs widen_by_matching=True"):
        nd.estimate_model_ite(num_samples=2, disagreement_groups="cell_type")


def test_the_default_hull_refuses_a_group_of_one_cell_before_decoding_and_names_the_other_modes(monkeypatch):
    # min_cells_per_group=1 lets a batch x condition group of one cell through; the hull's matched interval needs two
    adata = ps.datasets.simulate(n_cells=300, n_genes=40, n_markers_per_type=3, n_responding_genes=5, seed=0)
    batch = adata.obs["batch"].astype(str).to_numpy().copy()
    condition = adata.obs["condition"].astype(str).to_numpy()
    batch[np.r_[np.flatnonzero(condition != "control")[:2], np.flatnonzero(condition == "control")[:1]]] = "x"
    adata.obs["batch"] = batch
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch", nn_conditioning_covariate_keys=["condition"],
                                   encoder_covariate_keys=["condition"])
    model = ps.RegularizedVI(adata, n_hidden=16, n_latent=3)
    model.train(max_epochs=2, batch_size=100, early_stopping=False, device="cpu", progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu", min_cells_per_group=1)
        from pyro_scmodels.ndreamer import model_effects

        def no_decoding(**kwargs):
            raise AssertionError("decoded before the refusal")

        with monkeypatch.context() as patch:
            patch.setattr(model_effects, "model_counterfactual_ite", no_decoding)
            with pytest.raises(ValueError, match=r"'x\|control'\] hold a single cell: pass widen_by_matching=True"):
                nd.estimate_model_ite(num_samples=2)
        widened = nd.estimate_model_ite(num_samples=2, widen_by_matching=True)  # the other modes still work
    assert np.isfinite(widened.layers["ite_model_stimulated_q05"]).all()
