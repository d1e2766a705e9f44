"""The effect-modifier simulator and the effect metrics: the truth scores perfectly, noise does not."""

import numpy as np
import pytest

import pyro_scmodels as ps
from pyro_scmodels import metrics as M


@pytest.fixture(scope="module")
def modified():
    return ps.datasets.simulate(n_cells=1200, n_genes=150, n_responding_genes=30, seed=3, effect_modifier=1.0)


def test_effect_modifier_scales_the_response_inside_a_type(modified):
    record = modified.uns["simulation"]
    obs = modified.obs
    responders = obs["cell_type"].isin(record["responding_cell_types"]).to_numpy()
    scale = obs["true_response_scale"].to_numpy()
    assert (scale[~responders] == 0).all()
    # the scale follows the first within-type factor, a state visible in the cell's expression
    factor = modified.obsm["true_latent"][:, record["n_cell_types"]]
    for label in record["responding_cell_types"]:
        cells = (obs["cell_type"] == label).to_numpy()
        assert np.corrcoef(scale[cells], factor[cells])[0, 1] > 0.9
        assert scale[cells].max() / scale[cells].min() > 3
    # the truth is the difference of the two stored noise-free log expressions, for every cell
    np.testing.assert_allclose(modified.layers["true_ite"],
                               modified.layers["true_log_stimulated"] - modified.layers["true_log_control"], atol=1e-5)
    # a responding gene's effect grows with the scale across stimulated cells of one type
    gene = np.flatnonzero(modified.var["responding"].to_numpy() & (modified.var["true_lfc"].to_numpy() > 0))[0]
    cells = (obs["cell_type"] == record["responding_cell_types"][0]).to_numpy()
    assert np.corrcoef(scale[cells], modified.layers["true_ite"][cells, gene])[0, 1] > 0.8


def test_without_the_modifier_the_counts_and_design_are_unchanged():
    plain = ps.datasets.simulate(n_cells=300, n_genes=150, n_responding_genes=10, seed=1)
    again = ps.datasets.simulate(n_cells=300, n_genes=150, n_responding_genes=10, seed=1, effect_modifier=0.0)
    assert (plain.X != again.X).nnz == 0
    scale = plain.obs["true_response_scale"]
    assert scale.groupby(plain.obs["cell_type"], observed=True).nunique().max() == 1


def test_effect_modifier_out_of_range_is_named():
    with pytest.raises(ValueError, match="effect_modifier"):
        ps.datasets.simulate(n_cells=100, n_genes=150, effect_modifier=1.5)


def test_truth_scores_perfectly_and_noise_or_shrinkage_does_not(modified):
    truth = modified.layers["true_ite"]
    perfect = M.effect_recovery(modified, truth, low=truth - 0.1, high=truth + 0.1)
    assert perfect == pytest.approx({"per_cell_r": 1.0, "cate_r": 1.0, "false_effect_ratio": 0.0,
                                     "slope": 1.0, "coverage": 1.0})
    shrunk = M.effect_recovery(modified, 0.3 * truth, low=0.3 * truth - 0.01, high=0.3 * truth + 0.01)
    assert shrunk["slope"] == pytest.approx(0.3, abs=1e-6)
    assert shrunk["per_cell_r"] == pytest.approx(1.0)  # correlation does not see shrinkage; slope does
    assert shrunk["coverage"] < 0.2
    # the type-level mean only: perfect CATE, no per-cell information
    labels = modified.obs["cell_type"].astype(str).to_numpy()
    treated = (modified.obs["condition"] == "stimulated").to_numpy()
    type_mean = np.zeros_like(truth)
    for label in np.unique(labels):
        type_mean[labels == label] = truth[(labels == label) & treated].mean(0)
    flat = M.effect_recovery(modified, type_mean)
    assert flat["cate_r"] == pytest.approx(1.0)
    assert flat["per_cell_r"] == 0.0  # constant inside each type: scored 0, not skipped (NaN) nor rounded noise
    # an effect everywhere: the false-effect ratio sees it
    everywhere = np.tile(truth[treated].mean(0), (truth.shape[0], 1))
    assert M.effect_recovery(modified, everywhere)["false_effect_ratio"] > 0.5


def test_oracle_recovers_within_type_variation_but_not_perfectly(modified):
    scores = M.effect_recovery(modified, M.oracle_effect(modified))
    assert 0.3 < scores["per_cell_r"] < 0.9  # count noise caps it
    assert scores["cate_r"] > 0.9


def test_effect_recovery_rejects_a_misshapen_estimate(modified):
    with pytest.raises(ValueError, match="shape"):
        M.effect_recovery(modified, np.zeros((10, 10)))


def test_a_nan_in_the_estimate_is_refused_not_skipped(modified):
    # a (type, gene) pair holding a NaN was skipped as if its truth did not vary: one NaN per poorly estimated type
    # lifted per_cell_r from 0.17 to 0.46, and an estimate NaN on 9 genes of 10 and exact on one scored 1.0
    estimate = np.array(modified.layers["true_ite"], dtype=np.float64)
    estimate[np.flatnonzero((modified.obs["condition"] == "stimulated").to_numpy())[0], 0] = np.nan
    with pytest.raises(ValueError, match=r"estimate \(stimulated cells\) holds 1 NaN or infinite value"):
        M.effect_recovery(modified, estimate)
    with pytest.raises(ValueError, match="NaN"):
        M.per_cell_effect_correlation(estimate, modified.layers["true_ite"], modified.obs["cell_type"].to_numpy(),
                                      modified.uns["simulation"]["responding_cell_types"], [0, 1])
