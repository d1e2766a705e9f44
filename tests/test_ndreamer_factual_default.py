"""NDreamer's ``factual="auto"``: a cell's own term from its matched cells with the default network only (where it
was measured to help), its own counts with any other configuration; the choice made is kept and saved."""

from __future__ import annotations

import warnings

import pytest

import pyro_scmodels as ps
from pyro_scmodels.ndreamer import LossWeights, NDreamer, network_preset


@pytest.fixture(scope="module")
def small_sim():
    return ps.datasets.simulate(n_cells=300, n_genes=150, seed=0)


def build(adata, **kwargs) -> NDreamer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NDreamer(adata, "condition", "control", batch_key="batch", layer="counts", device="cpu", **kwargs)


@pytest.mark.parametrize("kwargs, expected", [
    ({}, "matched"),  # the default network and loss weights
    (network_preset("default"), "matched"),
    (network_preset("small"), "observed"),
    ({"loss_weights": LossWeights(independence=1000.0)}, "observed"),  # the SPEC's weight lost the state
    ({"n_codebooks": 16}, "observed"),  # any other size: not measured
    ({**network_preset("small"), "factual": "matched"}, "matched"),  # asked for: kept
    ({"factual": "observed"}, "observed"),
])
def test_auto_takes_matched_for_the_default_network_only(small_sim, kwargs, expected):
    nd = build(small_sim, **kwargs)
    assert nd.settings["factual"] == expected
    assert nd.effects.factual == expected


def test_the_choice_made_is_saved(small_sim, tmp_path):
    nd = build(small_sim)
    nd.save(str(tmp_path / "nd"))
    assert NDreamer.load(str(tmp_path / "nd"), device="cpu").effects.factual == "matched"


def test_an_unknown_factual_names_the_choices(small_sim):
    with pytest.raises(ValueError, match="auto"):
        build(small_sim, factual="own")


def test_from_model_takes_auto_as_matched(small_sim):
    """A model's latent is denoised: from_model's "auto" is its default, "matched"."""
    data = small_sim.copy()
    ps.RegularizedVI.setup_anndata(data, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(data, n_latent=4, n_hidden=16, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, device="cpu", progress_bar=False)
        nd = NDreamer.from_model(model, condition_key="condition", control_name="control", batch_key="batch",
                                 factual="auto", device="cpu")
    assert nd.settings["factual"] == "matched" and nd.effects.factual == "matched"


@pytest.fixture(scope="module")
def small_model():
    adata = ps.datasets.simulate(n_cells=300, n_genes=40, n_markers_per_type=4, n_responding_genes=6, seed=2)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch", nn_conditioning_covariate_keys=["condition"])
    model = ps.RegularizedVI(adata, n_hidden=32, n_latent=4)
    model.train(max_epochs=3, batch_size=64, device="cpu", progress_bar=False)
    return model


def from_model(model, **kwargs) -> NDreamer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu", **kwargs)


def test_setting_factual_on_a_built_ndreamer_gives_what_building_it_so_gives(small_model, tmp_path):
    import numpy as np

    nd = from_model(small_model)
    assert nd.factual == "matched"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matched = nd.estimate_ite(interval=0.9, shrink="clusters").layers["ite_stimulated"].copy()
        nd.estimate_cate("cell_type")
        denoised = nd.decompose_batch_effect().layers["denoised"].copy()
    nd.factual = "observed"
    assert nd.factual == nd.settings["factual"] == nd.effects.factual == "observed"
    # what the other factual made is gone; the denoised expression (observed either way) stays
    assert not [name for name in nd.results.layers if name.startswith("ite_")]
    assert not [key for key in nd.results.uns if key.startswith("cate_") or key == "ite_matching"]
    assert "ite_shrinkage_cluster" not in nd.results.obs
    np.testing.assert_array_equal(nd.results.layers["denoised"], denoised)
    built = from_model(small_model, factual="observed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for shrink in (None, "clusters"):  # the shrinkage's offsets are the new factual's too
            switched = nd.estimate_ite(interval=0.9, shrink=shrink).copy()
            fresh = built.estimate_ite(interval=0.9, shrink=shrink)
            for name in fresh.layers:
                np.testing.assert_allclose(switched.layers[name], fresh.layers[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert np.abs(switched.layers["ite_stimulated"] - matched).max() > 1e-3
    nd.save(str(tmp_path / "nd"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert NDreamer.load(str(tmp_path / "nd"), model=small_model).factual == "observed"
    with pytest.raises(ValueError, match="factual"):
        nd.factual = "auto"


@pytest.mark.parametrize("widen", [True, "hull"])
def test_setting_factual_drops_the_model_bounds_that_the_matched_ite_widened(small_model, widen):
    import numpy as np

    nd = from_model(small_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd.estimate_model_ite(num_samples=4, widen_by_matching=widen)
    before = {name: nd.results.layers[name].copy() for name in nd.results.layers if name.startswith("ite_model_")}
    assert set(before) == {"ite_model_stimulated", "ite_model_stimulated_q05", "ite_model_stimulated_q95"}
    nd.factual = "observed"
    # the posterior mean does not depend on it; True's bounds read the matched ITE of the factual, the hull's the
    # observed value whatever the factual
    kept = {"ite_model_stimulated"} if widen is True else set(before)
    assert {name for name in nd.results.layers if name.startswith("ite_model_")} == kept
    assert ("model_ite_interval" in nd.results.uns) == (widen == "hull")
    for name in kept:
        np.testing.assert_array_equal(nd.results.layers[name], before[name])


def test_a_cate_reads_no_ite_layers_recorded_with_the_other_factual(small_model):
    import numpy as np

    nd = from_model(small_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd.estimate_ite()
        assert nd.results.uns["ite_matching"]["factual"] == "matched"
        fresh = nd.estimate_cate("cell_type")["mean_ite"]
        nd.results.layers["ite_stimulated"] = nd.results.layers["ite_stimulated"] + 5.0
        np.testing.assert_allclose(nd.estimate_cate("cell_type")["mean_ite"] - fresh, 5.0, atol=1e-4)  # read
        del nd.results.uns["ite_matching"]["factual"]  # a record from before factual could change: this one's
        np.testing.assert_allclose(nd.estimate_cate("cell_type")["mean_ite"] - fresh, 5.0, atol=1e-4)
        nd.results.uns["ite_matching"]["factual"] = "observed"  # made with the other: computed again
        np.testing.assert_allclose(nd.estimate_cate("cell_type")["mean_ite"], fresh, atol=1e-5)
