"""differential_expression's scvi-tools options weights="uniform" | "importance" and filter_outlier_cells."""

import functools
import inspect
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from pyro import poutine
from scipy.special import logsumexp

import pyro_scmodels as ps
from pyro_scmodels.data import CountMatrix
from pyro_scmodels.differential import differential_expression, raw_count_properties
from pyro_scmodels.differential_cells import filter_outlier_cells, latent_inliers
from pyro_scmodels.differential_weights import effective_sample_size, per_cell_effective_sample_size, row_weights
from pyro_scmodels.models.evidence import library_noise
from pyro_scmodels.pyro_modules import evaluating

from ._scvi_api import FIT, SMALL


@pytest.fixture(scope="module")
def fitted():
    adata = ps.datasets.simulate(n_cells=400, n_genes=60, n_markers_per_type=5, n_responding_genes=8, seed=3)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, **SMALL, seed=0)
    model.train(max_epochs=40, **FIT)
    return model


def _quiet_de(model, **arguments):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return model.differential_expression(**arguments)


def _de_call(model, through: str):
    """``model.differential_expression`` or the public function ``differential_expression(model, ...)``: the test
    calls it, so its line is the user's (a partial adds no Python frame)."""
    return model.differential_expression if through == "method" else functools.partial(differential_expression, model)


# --- importance weights ---------------------------------------------------------------------------
def test_row_weights_normalise_each_cells_draws_and_favour_the_higher_log_joint():
    log_ratios = np.array([[-10.0, -50.0, 3.0], [-12.0, -50.0, 3.0], [-11.0, -49.0, 3.0]])  # samples x cells
    p = row_weights(log_ratios).reshape(3, 3)  # rows come sample-major, as the decoded draws
    np.testing.assert_allclose(p.sum(axis=0), 1 / 3)  # each cell the same share: the group's aggregate posterior
    assert p[0, 0] > p[2, 0] > p[1, 0]  # within a cell, the order of the log joints
    np.testing.assert_allclose(p[0, 0] / p[2, 0], np.e)
    np.testing.assert_allclose(p[:, 2], 1 / 9)  # equal ratios: equal weights
    assert row_weights(log_ratios[:1]) is None  # one draw per cell: the uniform draw
    assert effective_sample_size(p.ravel()) < 9
    with pytest.raises(ValueError, match="no draw of finite log joint"):
        row_weights(np.array([[-np.inf, 0.0], [np.nan, 0.0]]))


def test_log_importance_ratios_average_to_the_marginal_likelihood(fitted):
    cells = np.arange(6)
    ratios = fitted.log_importance_ratios(indices=cells, n_samples=200, seed=1)
    assert ratios.shape == (200, 6) and np.isfinite(ratios).all()
    np.testing.assert_array_equal(ratios, fitted.log_importance_ratios(indices=cells, n_samples=200, seed=1))
    # log mean exp of p(x, z, l) / q(z, l | x) over the draws estimates log p(x), as get_marginal_ll does
    estimate = logsumexp(ratios, axis=0) - np.log(200)
    marginal = fitted.get_marginal_ll(indices=cells, n_mc_samples=200, return_mean=False, seed=2)
    np.testing.assert_allclose(estimate, marginal, atol=0.5)
    assert (ratios.std(axis=0) > 0).all()  # the weights are not all alike


def test_log_importance_ratios_score_the_decoded_z_draws(fitted):
    """The ratios are log p(x, z, l) - log q(z, l | x) at the z that decode_samples decodes with the same seed, traced
    here by Pyro directly (l = exp(loc + scale * noise) of the guide's q(l | x) at the library's own per-cell noise,
    the globals at their medians)."""
    cells, seed = np.arange(5), 5
    z = torch.as_tensor(fitted.posterior_z(indices=cells, n_samples=3, seed=seed))  # decode_samples' z
    [(_, (batch, n_obs))] = list(fitted.minibatches(indices=cells))
    guide_module = fitted.module.guide
    medians = guide_module.global_medians()
    expected = []
    with evaluating(fitted.module), torch.no_grad():
        q_library = guide_module.library_posterior(guide_module.encoder_input(batch), batch, medians["library_residual_weight"])
        library = torch.exp(q_library.loc + q_library.scale * library_noise(seed, 3, fitted.device).of(cells, 1)[..., 0])
        for z_k, l_k in zip(z, library):
            given = {**medians, "z": z_k, "library": l_k}
            guide = poutine.trace(poutine.condition(guide_module, data=given)).get_trace(batch, n_obs)
            replayed = poutine.replay(poutine.condition(fitted.module.model, data=given), trace=guide)
            model = poutine.trace(replayed).get_trace(batch, n_obs)
            log_p = [site["fn"].log_prob(site["value"]) for name, site in model.nodes.items()
                     if site["type"] == "sample" and any(f.name == "cells" for f in site["cond_indep_stack"])]
            log_q = [site["fn"].log_prob(site["value"]) for name, site in guide.nodes.items()
                     if site["type"] == "sample" and any(f.name == "cells" for f in site["cond_indep_stack"])]
            expected.append((sum(log_p) - sum(log_q)).double().numpy())
    ratios = fitted.log_importance_ratios(indices=cells, n_samples=3, seed=seed)
    np.testing.assert_allclose(ratios, np.stack(expected), rtol=1e-5, atol=1e-3)


def test_log_importance_ratios_depend_on_neither_batch_size_nor_the_other_cells(fitted):
    """Each cell's z and l come from its own seeded noise, so its ratios are those of (cell, seed, draw) alone, as the
    uniform test's draws are (the library once came from torch's stream, re-seeded per minibatch: up to 14 nats off)."""
    cells = np.arange(100)
    whole = fitted.log_importance_ratios(indices=cells, n_samples=4, seed=2, batch_size=100)
    np.testing.assert_allclose(fitted.log_importance_ratios(indices=cells, n_samples=4, seed=2, batch_size=30), whole,
                               rtol=1e-6, atol=1e-4)
    alone = fitted.log_importance_ratios(indices=cells[57:], n_samples=4, seed=2, batch_size=100)
    np.testing.assert_allclose(alone, whole[:, 57:], rtol=1e-6, atol=1e-4)
    one = fitted.log_importance_ratios(indices=[70], n_samples=4, seed=2)
    np.testing.assert_allclose(one[:, 0], whole[:, 70], rtol=1e-6, atol=1e-4)
    # another seed draws other l as well as other z
    assert not np.allclose(fitted.log_importance_ratios(indices=cells, n_samples=4, seed=3), whole)


def _two_passes(model, indices, batch_size, n_samples, seed, strata=(None,)):
    """decode_samples (per stratum) and log_importance_ratios with the same seed: DE's draws before the one pass."""
    rhos = [torch.cat([rho for _, _, rho in model.decode_samples(indices=indices, batch_size=batch_size,
                                                                 n_samples=n_samples, seed=seed,
                                                                 nn_covariates=stratum)], dim=1) for stratum in strata]
    return rhos, model.log_importance_ratios(indices=indices, n_samples=n_samples, seed=seed, batch_size=batch_size)


def _one_pass(model, indices, batch_size, n_samples, seed, strata=(None,)):
    parts = list(model.decode_samples_with_ratios(indices=indices, batch_size=batch_size, n_samples=n_samples,
                                                  seed=seed, nn_covariates=strata))
    assert np.array_equal(np.concatenate([cells for cells, _, _ in parts]), np.sort(indices))
    rhos = [torch.cat([rhos[i] for _, rhos, _ in parts], dim=1) for i in range(len(strata))]
    return rhos, torch.cat([ratios for _, _, ratios in parts], dim=1).numpy()


@pytest.mark.parametrize("route", ["direct", "traced"])
@pytest.mark.parametrize("batch_size", [None, 37])
def test_one_pass_gives_the_draws_and_ratios_of_the_two_passes(fitted, monkeypatch, batch_size, route):
    """decode_samples_with_ratios (one encoder pass and one decoding per minibatch) gives the rho of decode_samples
    and the ratios of log_importance_ratios with the same seed, per cell whatever the minibatches, both where it
    scores the draws itself and where a model class without direct_elbo has them traced."""
    if route == "traced":
        monkeypatch.setattr("pyro_scmodels.models.evidence.declares_direct_elbo", lambda module: False)
    cells = np.arange(3, 400, 3)  # 133 cells, not in one block of the per-cell noise
    (rho,), ratios = _one_pass(fitted, cells, batch_size, 5, 11)
    (expected_rho,), expected = _two_passes(fitted, cells, batch_size, 5, 11)
    assert ratios.dtype == np.float64 and ratios.shape == (5, len(cells))
    np.testing.assert_allclose(rho.numpy(), expected_rho.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(ratios, expected, rtol=1e-6, atol=0)
    # against the two passes over the whole set at once: the minibatches change no draw (to float32 rounding)
    (_, whole) = _two_passes(fitted, cells, None, 5, 11)
    np.testing.assert_allclose(ratios, whole, rtol=1e-6, atol=1e-4)


def test_one_pass_finds_the_draw_independent_count_terms_once_per_minibatch(fitted, monkeypatch):
    """lgamma(x + theta), lgamma(theta), lgamma(x + 1) and where the counts are do not depend on the draw (theta is held
    at its median): found once per minibatch, not once per draw, and the ratios are still the trace's, to the bit."""
    from pyro_scmodels.distributions import GammaPoissonMean

    found = []
    entries = GammaPoissonMean._count_entries
    monkeypatch.setattr(GammaPoissonMean, "_count_entries", lambda self, *a: found.append(1) or entries(self, *a))
    cells = np.arange(100)
    _, ratios = _one_pass(fitted, cells, 50, 5, 3)
    assert len(found) == 2  # two minibatches of five draws each
    np.testing.assert_array_equal(ratios, fitted.log_importance_ratios(indices=cells, n_samples=5, seed=3,
                                                                       batch_size=50))


def test_one_pass_decodes_every_stratum_and_scores_the_cells_own_covariates(monkeypatch):
    """With strata (batch-corrected DE) rho is decoded under each, as decode_samples decodes it, and the ratios stay
    those of the cells' own covariates."""
    adata = ps.datasets.simulate(n_cells=150, n_genes=30, n_markers_per_type=3, n_responding_genes=3, seed=4)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", nn_conditioning_covariate_keys=["batch"])
    model = ps.RegularizedVI(adata, **SMALL, seed=0)
    model.train(max_epochs=3, **FIT)
    strata = [{"batch": category} for category in sorted(adata.obs["batch"].astype(str).unique())]
    for chosen in (strata[:2], [None, strata[0]]):
        rhos, ratios = _one_pass(model, np.arange(10, 140), 50, 3, 2, chosen)
        expected_rhos, expected = _two_passes(model, np.arange(10, 140), 50, 3, 2, chosen)
        for rho, expected_rho in zip(rhos, expected_rhos, strict=True):
            np.testing.assert_allclose(rho.numpy(), expected_rho.numpy(), rtol=1e-6, atol=0)
        np.testing.assert_allclose(ratios, expected, rtol=1e-6, atol=0)
    assert not np.allclose(rhos[0].numpy(), rhos[1].numpy())  # the strata decode differently


def test_importance_de_is_the_two_pass_de(fitted, monkeypatch):
    """The DE table from the one pass is the one DE gave when it called decode_samples and then
    log_importance_ratios (here put back in the one pass's place)."""
    arguments = dict(groupby="cell_type", group1="type_0", num_samples=6, n_pairs=3000, batch_size=45,
                     weights="importance", seed=4)
    one_pass = _quiet_de(fitted, **arguments)

    def two_passes(adata, indices, batch_size, n_samples, seed, strata, modality=None):
        rhos, ratios = _two_passes(fitted, indices, batch_size, n_samples, seed, strata)
        yield np.asarray(indices), rhos, torch.as_tensor(ratios)

    monkeypatch.setattr(fitted, "decode_samples_with_ratios", two_passes)
    pd.testing.assert_frame_equal(one_pass, _quiet_de(fitted, **arguments), check_exact=False, rtol=1e-6)


def test_importance_with_one_sample_per_cell_is_the_uniform_test(fitted):
    arguments = dict(groupby="cell_type", group1="type_0", num_samples=1, n_pairs=2000)
    uniform = _quiet_de(fitted, **arguments)
    pd.testing.assert_frame_equal(_quiet_de(fitted, **arguments, weights="importance"), uniform)
    pd.testing.assert_frame_equal(_quiet_de(fitted, **arguments, weights=None), uniform)  # None is uniform, as scvi's


def test_importance_weighted_lfc_keeps_the_sign_of_responding_genes(fitted):
    adata, truth = fitted.adata, fitted.adata.var
    record = adata.uns["simulation"]
    responders = adata.obs["cell_type"].isin(record["responding_cell_types"]).to_numpy()
    stimulated = (adata.obs["condition"] == record["stimulated_name"]).to_numpy()
    arguments = dict(idx1=responders & stimulated, idx2=responders & ~stimulated, num_samples=8, n_pairs=4000)
    weighted = _quiet_de(fitted, **arguments, weights="importance")
    uniform = _quiet_de(fitted, **arguments)
    genes = truth.index[truth["responding"]]
    signs = np.sign(weighted.loc[genes, "lfc_mean"]) == np.sign(truth.loc[genes, "true_lfc"])
    assert signs.mean() >= 0.85, weighted.loc[genes, ["lfc_mean"]].join(truth["true_lfc"])
    # the weights are used: the same draws give other group means
    assert not np.allclose(weighted["scale1"].sort_index(), uniform["scale1"].sort_index())
    np.testing.assert_allclose(weighted["scale1"].sort_index(), uniform["scale1"].sort_index(), rtol=0.25)


def _replace_ratios(model, monkeypatch, ratios):
    """Make DE's one pass (``decode_samples_with_ratios``) give its draws with ``ratios(n_samples, n_cells)`` as their
    log ratios; returns the (cells, seed) asked."""
    asked, one_pass = [], model.decode_samples_with_ratios

    def replaced(adata=None, indices=None, batch_size=None, n_samples=1, seed=0, *rest, **options):
        asked.append((np.asarray(indices).copy(), seed))
        for cells, rhos, _ in one_pass(adata, indices, batch_size, n_samples, seed, *rest, **options):
            yield cells, rhos, torch.as_tensor(ratios(n_samples, len(cells)), dtype=torch.float64)

    monkeypatch.setattr(model, "decode_samples_with_ratios", replaced)
    return asked


def _first_draw_only(model, monkeypatch):
    """Make every cell's sample 0 take all its weight (log ratio 0 against -1e9); returns the (cells, seed) asked."""
    def ratios(n_samples, n_cells):
        values = np.full((n_samples, n_cells), -1e9)
        values[0] = 0.0
        return values

    return _replace_ratios(model, monkeypatch, ratios)


def _first_draw_mean(model, cells, seed, strata=(None,)):
    """Mean over the cells (and strata) of sample 0's decoded rho, with the seed differential_expression gives."""
    means = [np.concatenate([rho[0].numpy() for _, _, rho in model.decode_samples(indices=cells, n_samples=4, seed=seed,
                                                                                  nn_covariates=stratum)]).mean(0)
             for stratum in strata]
    return np.mean(means, axis=0)


def test_importance_weights_pick_the_rows_they_weight(fitted, monkeypatch):
    """Weights that put each cell's whole share on its sample 0 make scale1/scale2 the group means of sample 0's
    decoded rho + shared background: the weights reach the rows of the draws they were computed for."""
    asked = _first_draw_only(fitted, monkeypatch)
    types = fitted.adata.obs["cell_type"].to_numpy()
    group1, group2 = np.flatnonzero(types == "type_0"), np.flatnonzero(types == "type_1")
    assert max(len(group1), len(group2)) < 500  # below n_cells: every cell is drawn
    table = _quiet_de(fitted, idx1=group1, idx2=group2, num_samples=4, n_pairs=500, seed=7, weights="importance",
                      all_stats=False).sort_index()
    shared = fitted.shared_background(None)
    shift = 0.0 if shared is None else shared.to_numpy()
    for cells, seed, column in ((group1, 7, "scale1"), (group2, 8, "scale2")):  # group i's seed: seed + 2i + offset
        expected = pd.Series(_first_draw_mean(fitted, cells, seed) + shift, index=fitted.adata.var_names).sort_index()
        np.testing.assert_allclose(table[column], expected, rtol=1e-4, atol=1e-7)
    assert [(c.tolist(), s) for c, s in asked] == [(group1.tolist(), 7), (group2.tolist(), 8)]


def test_importance_weights_are_shared_among_pooled_strata(monkeypatch):
    """batch_correction with disjoint batchid1 / batchid2 pools each group's strata: every stratum decodes the same z,
    so each keeps the weights, divided among the strata."""
    adata = ps.datasets.simulate(n_cells=150, n_genes=30, n_markers_per_type=3, n_responding_genes=3, seed=4)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", nn_conditioning_covariate_keys=["batch"])
    model = ps.RegularizedVI(adata, **SMALL, seed=0)
    model.train(max_epochs=3, **FIT)
    _first_draw_only(model, monkeypatch)
    batches = sorted(adata.obs["batch"].astype(str).unique())
    assert len(batches) >= 3
    first, second = batches[:2], batches[2:]
    cells1, cells2 = np.arange(0, 40), np.arange(60, 130)
    table = _quiet_de(model, idx1=cells1, idx2=cells2, num_samples=4, n_pairs=500, seed=3, weights="importance",
                      batch_correction=True, batchid1=first, batchid2=second, all_stats=False).sort_index()
    for cells, seed, categories, column in ((cells1, 3, first, "scale1"), (cells2, 4, second, "scale2")):
        strata = [{"batch": category} for category in categories]
        expected = _first_draw_mean(model, cells, seed, strata)
        shared = model.shared_background(None)
        expected = pd.Series(expected + (0.0 if shared is None else shared.to_numpy()), index=adata.var_names)
        np.testing.assert_allclose(table[column], expected.sort_index(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("through", ["method", "function"])
def test_collapsed_importance_weights_warn_once_with_the_effective_sample_size(fitted, monkeypatch, through):
    p = row_weights(np.array([[0.0, 0.0], [0.0, -1e9], [0.0, -1e9]]))
    np.testing.assert_allclose(per_cell_effective_sample_size(p, 3), [3.0, 1.0])
    _first_draw_only(fitted, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        de, line = _de_call(fitted, through), inspect.currentframe().f_lineno + 1
        de(groupby="cell_type", group1=["type_0", "type_1"], num_samples=10, n_pairs=500, weights="importance",
           all_stats=False)
    collapsed = [w for w in caught if "effective sample size" in str(w.message)]
    assert len(collapsed) == 1, [str(w.message) for w in caught]  # once per call, over both comparisons
    assert "of 1.0 " in str(collapsed[0].message) and "weights='uniform'" in str(collapsed[0].message)
    assert (collapsed[0].filename, collapsed[0].lineno) == (__file__, line)  # points at the caller
    monkeypatch.undo()
    _replace_ratios(fitted, monkeypatch, lambda n_samples, n_cells: np.zeros((n_samples, n_cells)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted.differential_expression(groupby="cell_type", group1="type_0", num_samples=10, n_pairs=500,
                                       weights="importance", all_stats=False)
    assert not [w for w in caught if "effective sample size" in str(w.message)]


def test_bad_weights_are_refused_before_any_draw(fitted, monkeypatch):
    def no_draws(*args, **kwargs):
        raise AssertionError("posterior draws were made before the argument check")

    monkeypatch.setattr(type(fitted), "decode_samples", no_draws)
    with pytest.raises(ValueError, match=r"weights must be 'uniform' or 'importance', got 'importnace'"):
        fitted.differential_expression(groupby="cell_type", weights="importnace")
    with pytest.raises(TypeError, match="filter_outlier_cells"):
        fitted.differential_expression(groupby="cell_type", filter_outlier_cells="yes")


def test_importance_weights_are_refused_for_the_multimodal_model():
    mdata = ps.datasets.simulate_multiome(n_cells=200, n_genes=80, n_peaks=120, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16)
    with pytest.raises(NotImplementedError, match=r"weights='importance' is not available.*weights='uniform'"):
        model.differential_expression(groupby="cell_type", weights="importance")
    with pytest.raises(NotImplementedError, match="per-modality parts"):
        model.log_importance_ratios(n_samples=2)


# --- outlier cells --------------------------------------------------------------------------------
def test_latent_inliers_drop_planted_far_cells_and_keep_all_when_the_covariance_fails():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(100, 4))
    latent[:5] += 12.0  # five cells far from the bulk
    inside = latent_inliers(latent)
    assert not inside[:5].any()
    assert (~inside).sum() == 10  # a tenth of the group, as sklearn's default contamination
    with pytest.warns(UserWarning, match="could not be estimated.*every cell of it is kept"):
        assert latent_inliers(np.zeros((1, 4))).all()  # a group of one cell: no covariance


def test_filter_outlier_cells_drops_cells_planted_from_another_type(fitted):
    adata = fitted.adata
    types = adata.obs["cell_type"].to_numpy()
    planted = np.flatnonzero(types == "type_3")[:3]  # labelled into type_0's group, but type_3 in the latent space
    group1 = np.concatenate([np.flatnonzero(types == "type_0"), planted])
    group2 = np.flatnonzero(types == "type_1")
    with pytest.warns(UserWarning, match=rf"of {len(group1)} in 'idx1'.*of {len(group2)} in 'idx2'"):
        [(_, _, kept1, kept2)] = filter_outlier_cells(fitted, adata, [("idx1", "idx2", group1, group2)])
    assert not np.isin(planted, kept1).any()
    assert len(group1) - len(kept1) == pytest.approx(0.1 * len(group1), abs=1)
    assert np.isin(kept2, group2).all() and len(kept2) < len(group2)

    arguments = dict(idx1=group1, idx2=group2, num_samples=4, n_pairs=2000)
    with pytest.warns(UserWarning, match="filter_outlier_cells: left out"):
        filtered = fitted.differential_expression(**arguments, filter_outlier_cells=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default filters nothing and says nothing
        default = fitted.differential_expression(**arguments)
    pd.testing.assert_frame_equal(fitted.differential_expression(**arguments, filter_outlier_cells=False), default)
    assert not np.allclose(filtered["lfc_mean"].sort_index(), default["lfc_mean"].sort_index())
    # the observed-count columns keep every cell, as scvi-tools'
    pd.testing.assert_series_equal(filtered["raw_mean1"].sort_index(), default["raw_mean1"].sort_index())


@pytest.mark.parametrize("through", ["method", "function"])
def test_differential_expression_warnings_point_at_the_callers_line(fitted, through):
    """Each warning of differential_expression names the user's file, not a frame inside the package, whether called
    as the model's method or as pyro_scmodels.differential.differential_expression(model, ...): the outlier filter's
    count and its kept-whole group of one cell, the shared cells of idx1 / idx2 and a batch_correction that changes
    nothing (this model's decoder has no covariate)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        de, line = _de_call(fitted, through), inspect.currentframe().f_lineno + 1
        de(idx1=[5], idx2=np.arange(0, 60), num_samples=2, n_pairs=200, all_stats=False, filter_outlier_cells=True,
           batch_correction=True)
    messages = [str(w.message) for w in caught]
    for expected in ("filter_outlier_cells: left out", "could not be estimated", "share 1 cells", "changes nothing"):
        assert any(expected in message for message in messages), (expected, messages)
    assert [(w.filename, w.lineno, str(w.message)[:40]) for w in caught if (w.filename, w.lineno) != (__file__, line)] \
        == []


def test_raw_count_properties_called_directly_warns_at_the_callers_line():
    counts = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw_count_properties(CountMatrix(counts, validate=False, allow_empty_cells=True), np.array([0, 2]),
                             np.array([1]), skip_empty=True)
    assert [(w.filename, str(w.message)[:25]) for w in caught] == [(__file__, "group 2 has no cells with")]
