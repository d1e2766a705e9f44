"""Counterfactual matching (SPEC 3.5) on an embedding whose answer is known: the simulator's true cell state."""

import numpy as np
import pytest
import scipy.sparse as sp

import pyro_scmodels as ps
from pyro_scmodels import metrics as M
from pyro_scmodels.ndreamer.cate import CONTROL, TREATED, estimate_cate
from pyro_scmodels.ndreamer import CounterfactualDesign
from pyro_scmodels.ndreamer.effects import estimate_effects, matching_space


@pytest.fixture(scope="module")
def sim():
    adata = ps.datasets.simulate(n_cells=1500, n_genes=200, seed=0)
    counts = adata.layers["counts"]
    totals = np.asarray(counts.sum(1)).ravel()
    log = sp.csr_matrix(sp.diags(1e4 / totals) @ counts)
    log.data = np.log1p(log.data)
    design = CounterfactualDesign(adata.obs["condition"].to_numpy(), "control", adata.obs["batch"].to_numpy())
    return adata, log, design


def _responding(adata):
    types = adata.uns["simulation"]["responding_cell_types"]
    return adata.obs["cell_type"].isin(types).to_numpy(), adata.var["responding"].to_numpy()


@pytest.mark.parametrize("k, bar", [(1, 0.6), (10, 0.75)])
def test_ite_tracks_the_true_effect_with_a_true_embedding(sim, k, bar):
    adata, log, design = sim
    effects = estimate_effects(adata.obsm["true_latent"], log, design, nearest_neighbor=k)
    ite, truth = effects["ite_stimulated"], adata.layers["true_ite"]
    responding_types, responding_genes = _responding(adata)
    assert np.isfinite(ite).all() and ite.shape == truth.shape  # every cell, control cells included
    assert M.pearson(ite[:, responding_genes], truth[:, responding_genes]) >= bar
    # cell types that do not respond: the average effect on responding genes stays near zero
    assert np.abs(ite[~responding_types][:, responding_genes].mean(0)).mean() < 0.15
    assert np.abs(ite[responding_types][:, responding_genes].mean(0)).mean() > 0.6


def test_outputs_follow_the_input_cell_order(sim):
    adata, log, design = sim
    order = np.random.default_rng(1).permutation(adata.n_obs)
    shuffled = CounterfactualDesign(design.condition[order], "control", design.batch[order])
    straight = estimate_effects(adata.obsm["true_latent"], log, design)
    permuted = estimate_effects(adata.obsm["true_latent"][order], log[order], shuffled)
    for layer in straight:
        np.testing.assert_allclose(permuted[layer], straight[layer][order], atol=1e-5)


def test_denoising_mixes_batches_within_each_condition(sim):
    adata, log, design = sim
    effects = estimate_effects(adata.obsm["true_latent"], log, design)
    dense = log.toarray()
    np.testing.assert_allclose(effects["denoised"] + effects["batch_effect"], dense, atol=1e-5)
    for condition in ("control", "stimulated"):
        cells = design.condition == condition
        before = M.knn_entropy(matching_space(dense[cells], 20), design.batch[cells])
        after = M.knn_entropy(matching_space(effects["denoised"][cells], 20), design.batch[cells])
        assert after > before + 0.1


def test_cate_flags_responding_types_only(sim):
    adata, log, design = sim
    effects = estimate_effects(adata.obsm["true_latent"], log, design, nearest_neighbor=10)
    arms = np.where(design.condition == "stimulated", TREATED, CONTROL)
    table = estimate_cate(effects["ite_stimulated"], adata.obs["cell_type"].to_numpy(), adata.var_names, log.toarray(),
                          arms)
    assert set(table.columns) >= {"group", "gene", "mean_ite", "sign_test_p_adj", "z_p_adj"}
    responding = set(adata.uns["simulation"]["responding_cell_types"])
    genes = set(adata.var_names[adata.var["responding"]])
    hits = table[(table["z_p_adj"] < 0.01) & (table["mean_ite"].abs() > 0.3)]
    for group, found in hits.groupby("group"):
        if group in responding:
            assert len(set(found["gene"]) & genes) >= 0.7 * len(genes)
    for group in set(adata.obs["cell_type"].astype(str)) - responding:
        assert (hits["group"] == group).sum() <= 3


def test_design_errors():
    with pytest.raises(ValueError, match="control_name 'ctrl' is not a condition"):
        CounterfactualDesign(np.array(["a", "b"]), "ctrl")
    with pytest.raises(ValueError, match="nothing to compare"):
        CounterfactualDesign(np.array(["ctrl", "ctrl"]), "ctrl")
    with pytest.raises(ValueError, match="batch has 1 labels"):
        CounterfactualDesign(np.array(["ctrl", "x"]), "ctrl", np.array(["b"]))


@pytest.mark.parametrize("seed", [0, 1])
def test_cate_tests_hold_their_level_where_nothing_responds(seed):
    # the ITEs share their matched cells, so their spread over sqrt(n) understated the mean's standard error: both
    # tests rejected 50-83 % of true nulls on placebo splits (real control cells; this simulator)
    adata = ps.datasets.simulate(n_cells=1500, n_genes=150, n_responding_genes=0, seed=seed)
    counts = adata.layers["counts"]
    log = sp.csr_matrix(sp.diags(1e4 / np.asarray(counts.sum(1)).ravel()) @ counts)
    log.data = np.log1p(log.data)
    design = CounterfactualDesign(adata.obs["condition"].to_numpy(), "control", adata.obs["batch"].to_numpy())
    effects = estimate_effects(adata.obsm["true_latent"], log, design, nearest_neighbor=20)
    arms = np.where(design.condition == "stimulated", TREATED, CONTROL)
    table = estimate_cate(effects["ite_stimulated"], adata.obs["cell_type"].to_numpy(), adata.var_names,
                          log.toarray(), arms)
    expressed = table["mean_ite"].abs() > 0  # genes with counts in the group
    for test in ("z_p", "sign_test_p"):
        rejected = (table.loc[expressed, test] < 0.05).mean()
        assert rejected <= 0.10, (test, rejected)
        assert (table.loc[expressed, f"{test}_adj"] < 0.1).mean() <= 0.02, test


def test_cate_standard_error_is_the_two_arms_difference_of_means(monkeypatch):
    from pyro_scmodels.ndreamer import cate
    from scipy import stats

    rng = np.random.default_rng(3)
    ite = rng.normal(0.2, 1.0, size=(3000, 4)).astype(np.float32)
    observed = rng.gamma(2.0, size=(3000, 4)).astype(np.float32)
    arms = rng.choice([cate.TREATED, cate.CONTROL, cate.OTHER], 3000, p=[0.3, 0.6, 0.1])
    table = estimate_cate(ite, np.zeros(3000), list("abcd"), observed, arms)
    t, c = observed[arms == cate.TREATED].astype(float), observed[arms == cate.CONTROL].astype(float)
    se = np.sqrt(t.var(0, ddof=1) / len(t) + c.var(0, ddof=1) / len(c))
    np.testing.assert_allclose(table["mean_ite"], ite.astype(float).mean(0), rtol=1e-6)
    np.testing.assert_allclose(table["z"], ite.astype(float).mean(0) / se, rtol=1e-6)
    np.testing.assert_allclose(table["z_p"], 2 * stats.norm.sf(np.abs(table["z"])), rtol=1e-9)
    # summed a few rows at a time: the same table
    monkeypatch.setattr(cate, "ADD_ROWS", 7)
    np.testing.assert_allclose(estimate_cate(ite, np.zeros(3000), list("abcd"), observed, arms)[["z", "sign_test_p"]],
                               table[["z", "sign_test_p"]], rtol=1e-9)
    # sparse observed rows (what NDreamer passes: its counts' rows) are densified in those parts: the same table
    np.testing.assert_allclose(estimate_cate(ite, np.zeros(3000), list("abcd"), sp.csr_matrix(observed), arms)[["z"]],
                               table[["z"]], rtol=1e-9)
