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
