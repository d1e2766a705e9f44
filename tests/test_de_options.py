"""scvi-tools' options of differential expression: ``batchid1``/``batchid2`` and ``delta=None``."""

import numpy as np
import pytest

from . import _scvi_api

# the shared fixtures of tests/_scvi_api.py (the same model and data), bound here for pytest to find
model = _scvi_api.model
untrained = _scvi_api.untrained


def test_batchid1_and_batchid2_decode_each_group_as_the_categories_named(model):
    def de(**kwargs):
        return model.differential_expression(groupby="cell_type", group1="type_0", batch_correction=True, num_samples=3,
                                             n_cells=40, **kwargs)

    every = de()
    as_control = de(batchid1="control", batchid2=["control"])
    as_stimulated = de(batchid1=["stimulated"], batchid2="stimulated")
    # disjoint: case decoded as stimulated, control as control (the same cells and draws as above)
    across = de(batchid1=["stimulated"], batchid2=["control"])
    genes = every.index
    for column, same_as in (("scale1", as_stimulated), ("scale2", as_control)):
        np.testing.assert_allclose(across.loc[genes, column], same_as.loc[genes, column], rtol=1e-6)
    # both categories: each group's mean over its two equal strata
    both = (as_control.loc[genes, "scale2"] + as_stimulated.loc[genes, "scale2"]) / 2
    np.testing.assert_allclose(every["scale2"], both, rtol=1e-5)
    assert not np.allclose(as_control.loc[genes, "scale1"], as_stimulated.loc[genes, "scale1"])
    with pytest.raises(ValueError, match=r"share \['control'\] but differ"):
        de(batchid1=["control", "stimulated"], batchid2=["control"])
    with pytest.raises(ValueError, match=r"\['treated'\] not among the categories of 'condition'"):
        de(batchid1=["treated"])
    with pytest.raises(ValueError, match="needs batch_correction=True"):
        model.differential_expression(groupby="cell_type", group1="type_0", batchid1=["control"], num_samples=2,
                                      n_cells=10)


def test_batchid_on_a_decoder_without_covariates_says_there_are_no_categories(untrained):
    with pytest.warns(UserWarning, match="changes nothing"), pytest.raises(ValueError, match="conditioned on no covariate"):
        untrained.differential_expression(groupby="cell_type", group1="type_0", batch_correction=True,
                                          batchid1=["batch_0"], num_samples=2, n_cells=10)


def test_delta_none_is_estimated_from_the_lfc_means_and_reported():
    from pyro_scmodels.differential_statistics import change_test, estimate_delta

    rng = np.random.default_rng(0)
    means = np.concatenate([rng.normal(-2, 0.1, 30), rng.normal(0, 0.1, 200), rng.normal(2, 0.1, 30)])
    assert estimate_delta(means) == pytest.approx(1.2, abs=0.02)  # 0.6 x the outer modes' mean size
    assert estimate_delta(rng.normal(0, 0.01, 100)) == 0.1  # the floor
    first = rng.normal(0, 0.2, (200, len(means))) + means
    table = change_test(first, rng.normal(0, 0.2, (200, len(means))), [f"g{i}" for i in range(len(means))], None,
                        rng=np.random.default_rng(1))
    delta = table["delta"].iloc[0]
    assert (table["delta"] == delta).all() and delta == pytest.approx(1.2, abs=0.05)
    assert delta == estimate_delta(table.loc[[f"g{i}" for i in range(len(means))], "lfc_mean"].to_numpy())
    assert table["proba_de"].loc["g0"] > 0.9 and table["proba_de"].loc["g100"] < 0.1
    with pytest.raises(ValueError, match="Pass a number"):
        estimate_delta(np.array([0.1, np.nan, 0.3]))


def test_delta_none_through_the_model(model):
    from pyro_scmodels.differential_statistics import estimate_delta

    table = model.differential_expression(groupby="cell_type", group1="type_0", delta=None, num_samples=3, n_cells=40)
    delta = table["delta"].iloc[0]
    assert table["delta"].nunique() == 1
    assert delta == estimate_delta(table.loc[list(model.var_names), "lfc_mean"].to_numpy())
    assert (table["proba_de"] == 0).sum() < len(table)  # the probabilities were computed with it
    assert list(table.columns[:8]) == ["proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts",
                                       "delta", "lfc_mean"]
