"""Continuous covariates: standardised as the model's own cells were, in training, saves, loads and queries; models
and references saved before the standardiser keep them raw."""

import numpy as np
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels.data.source_state import state_digest
from pyro_scmodels.ndreamer.attached_model import model_digest
from pyro_scmodels.nn import Standardiser

from . import _regularizedvi_small
from ._regularizedvi_small import QUICK, SMALL

# the shared fixture of tests/_regularizedvi_small.py, bound here for pytest to find
small = _regularizedvi_small.small


def test_continuous_covariates_are_standardised_as_the_models_cells_were(small, tmp_path):
    # they entered raw: a column on a scale of tens (a percentage) outweighed the log counts in the layer-normalised
    # hidden units, and the latent lost the cell types (silhouette 0.59 -> -0.03 on a probe's data)
    rng = np.random.default_rng(0)
    small.obs["pct"] = rng.uniform(0, 100, small.n_obs)
    small.obs["pct_shifted"] = 7.0 * small.obs["pct"] - 300.0  # the same information on another scale
    latents, models = [], []
    for key in ("pct", "pct_shifted"):
        adata = small.copy()
        ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch", continuous_covariate_keys=[key])
        model = ps.RegularizedVI(adata, seed=0, **SMALL)
        model.train(max_epochs=2, **QUICK)
        latents.append(model.get_latent_representation())
        models.append(model)
    np.testing.assert_allclose(latents[0], latents[1], atol=2e-4)  # raw, the two latents differed
    scaling = models[0].module.guide.continuous_scaling
    assert float(scaling.loc) == pytest.approx(small.obs["pct"].mean(), rel=1e-5)
    assert float(scaling.scale) == pytest.approx(small.obs["pct"].std(ddof=0), rel=1e-5)
    # saved and loaded, and a query of other cells, standardise as the model's own cells were
    models[0].save(str(tmp_path / "m"))
    query = small[:80].copy()
    query.obs["pct"] = query.obs["pct"] / 2
    loaded = ps.RegularizedVI.load(str(tmp_path / "m"), models[0].adata.copy(), device="cpu")
    np.testing.assert_allclose(loaded.get_latent_representation(), latents[0], atol=1e-6)
    mapped = ps.RegularizedVI.load_query_data(query, models[0])
    for module in (mapped.module.model, mapped.module.guide):
        assert float(module.continuous_scaling.loc) == float(scaling.loc)
    # a model saved before the standardisation took the covariates raw, and loads so
    state = {k: v for k, v in models[0].module.state_dict().items() if "continuous_scaling" not in k}
    models[0].module.load_state_dict(state)
    assert float(models[0].module.guide.continuous_scaling.loc) == 0.0
    assert float(models[0].module.model.continuous_scaling.scale) == 1.0


def test_an_identity_standardiser_leaves_a_models_digest_as_before_and_an_old_reference_maps(small, tmp_path):
    # the standardiser's buffers changed every model's digest: an NDreamer.from_model saved before refused its own
    # model on load ("the model's parameters differ")
    model = ps.RegularizedVI(small, **SMALL)
    state = model.module.state_dict()
    # a model saved before the standardiser and the decoder's scale (their buffers at identity) keeps its digest
    without = {k: v for k, v in state.items() if "continuous_scaling" not in k and not k.endswith("output_scale")}
    assert len(without) < len(state) and model_digest(model) == state_digest(without)
    shifted = dict(state, **{"guide.continuous_scaling.loc": torch.ones(1)})
    assert state_digest(shifted, skip=Standardiser.is_identity_entry) != state_digest(without)
    # a reference saved before (no standardiser in its state) maps a query, which takes its covariates raw
    adata = small.copy()
    adata.obs["pct"] = np.random.default_rng(1).uniform(0, 100, adata.n_obs)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch", continuous_covariate_keys=["pct"])
    reference = ps.RegularizedVI(adata, **SMALL)
    reference.train(max_epochs=1, **QUICK)
    reference.save(str(tmp_path / "ref"))
    payload = torch.load(tmp_path / "ref" / "model.pt", weights_only=False)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items()
                             if "continuous_scaling" not in k and not k.endswith("output_scale")}
    torch.save(payload, tmp_path / "ref" / "model.pt")
    query = ps.RegularizedVI.load_query_data(adata[:60].copy(), str(tmp_path / "ref"))
    assert float(query.module.guide.continuous_scaling.loc) == 0.0
    assert float(query.module.model.continuous_scaling.scale) == 1.0
    assert bool((query.module.model.decoder.output_scale == 1).all())  # the plain softplus, as the reference was
