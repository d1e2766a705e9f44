"""The ELBO without Pyro's tracing (``guide.draw`` + ``model.log_joint``) against Pyro's ``Trace_ELBO``.

Pyro's model and guide define the loss; the direct form is only a faster way to compute it, so it
must give the same loss and the same gradient on the same model, guide, minibatch and random
numbers, in every configuration that changes which terms the loss has.
"""

import warnings

import numpy as np
import pandas as pd
import pyro.distributions as dist
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels.elbo import ELBOLoss
from pyro_scmodels.models.regularizedvi_guide import RegularizedVIGuide
from pyro_scmodels.models.regularizedvi_module import RegularizedVIModel

SMALL = dict(n_hidden=32, n_latent=4)
QUICK = dict(batch_size=64, device="cpu", progress_bar=False)


def small_adata(**setup):
    adata = ps.datasets.simulate(n_cells=300, n_genes=40, n_markers_per_type=4, n_responding_genes=4, seed=3)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", **setup)
    return adata


def _loss_and_gradients(loss_module, form, batch, n_obs, kl_weight, local_factor):
    parameters = list(loss_module.parameters())
    for parameter in parameters:
        parameter.grad = None
    torch.manual_seed(11)  # the same random numbers (dropout, z, l, LogNormal globals) for both forms
    loss = getattr(loss_module, form)(batch, n_obs, kl_weight, local_factor)
    loss.backward()
    return loss.item(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in parameters]


def _pair(adata, **model_kwargs):
    model = ps.RegularizedVI(adata, **SMALL, **model_kwargs)
    data = model._cell_data()
    return ELBOLoss(model.module.model, model.module.guide), data


CONFIGURATIONS = {
    "batch_key (ambient, dispersion, library per batch)": (dict(batch_key="batch"), {}),
    "LogNormal global guides, ambient prior on": (
        dict(batch_key="batch"),
        dict(global_guides={"ambient": "lognormal", "feature_scaling": "lognormal", "dispersion_rate": "lognormal",
                            "library_residual_weight": "lognormal"},
             priors=ps.RegularizedPriors(regularize_ambient=True)),
    ),
    "every covariate key, decoder and encoder covariates, latent independence": (
        dict(ambient_covariate_keys=["batch"], feature_scaling_covariate_keys=["batch", "condition"],
             nn_conditioning_covariate_keys=["condition"], encoder_covariate_keys=["condition"],
             dispersion_key="batch", library_size_key="batch", continuous_covariate_keys=["true_library"]),
        dict(latent_independence=2.0),
    ),
    "no decoder weight prior, one category each": ({}, dict(priors=ps.RegularizedPriors(decoder_weight=None))),
    "background per droplet, shaped ambient prior with learned amounts": (
        dict(batch_key="batch"), dict(ambient_per_droplet=True, ambient_shape_prior=10.0,
                                      global_guides={"ambient": "lognormal"})),
}


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_direct_elbo_equals_trace_elbo_in_loss_and_gradient(name):
    """Same loss and gradient of every parameter as Trace_ELBO, at a KL weight below 1 and a data-parallel shard factor."""
    setup, model_kwargs = CONFIGURATIONS[name]
    loss_module, data = _pair(small_adata(**setup), **model_kwargs)
    assert loss_module.direct
    batch = data.minibatch(np.arange(0, 300, 3)[:50])
    for kl_weight, local_factor in ((0.3, 1.0), (1.0, 0.5)):
        traced, traced_grads = _loss_and_gradients(loss_module, "trace_loss", batch, data.n_cells, kl_weight, local_factor)
        direct, direct_grads = _loss_and_gradients(loss_module, "direct_loss", batch, data.n_cells, kl_weight, local_factor)
        assert direct == pytest.approx(traced, rel=1e-5)
        for (parameter_name, _), g_traced, g_direct in zip(loss_module.named_parameters(), traced_grads, direct_grads):
            scale = g_traced.abs().max().item()
            assert g_traced.abs().max() > 0 or g_direct.abs().max() == 0, parameter_name
            assert (g_direct - g_traced).abs().max().item() <= 1e-4 * max(scale, 1e-6), parameter_name


def test_direct_elbo_with_a_known_ambient_profile():
    """``ambient_profile=`` (amount x profile guide) gives the same loss by both forms."""
    adata = small_adata(batch_key="batch")
    levels = sorted(adata.obs["batch"].unique())
    profile = pd.DataFrame(np.random.default_rng(0).random((adata.n_vars, len(levels))) + 0.1, index=adata.var_names,
                           columns=levels)
    loss_module, data = _pair(adata, ambient_profile=profile)
    batch = data.minibatch(np.arange(40))
    traced, traced_grads = _loss_and_gradients(loss_module, "trace_loss", batch, data.n_cells, 1.0, 1.0)
    direct, direct_grads = _loss_and_gradients(loss_module, "direct_loss", batch, data.n_cells, 1.0, 1.0)
    assert direct == pytest.approx(traced, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(traced_grads, direct_grads))


def test_training_takes_the_direct_form_and_the_same_path_as_trace_elbo(monkeypatch):
    """RegularizedVI trains with the direct form, and a seeded run follows Trace_ELBO's run step for step."""
    adata = small_adata(batch_key="batch")
    histories = {}
    for direct in (True, False):
        model = ps.RegularizedVI(adata, **SMALL)
        monkeypatch.setattr(RegularizedVIModel, "direct_elbo", direct)
        model.train(max_epochs=3, **QUICK)
        assert model.trainer.elbo_loss.direct is direct
        histories[direct] = model.history[["train_loss", "validation_loss"]].to_numpy()
    np.testing.assert_allclose(histories[True], histories[False], rtol=1e-4)


class EditedPrior(RegularizedVIModel):
    """A modeller's edit: a wider feature-scaling prior, written as a changed site."""

    def sample_feature_scaling(self, genes):
        import pyro

        with pyro.plate(self.dims.site("scaling_categories"), self.dims.n_scaling, dim=-2), genes:
            return pyro.sample(self.dims.site("feature_scaling"), dist.Gamma(2.0, 2.0))


class EditedPriorClaimingDirect(EditedPrior):
    direct_elbo = True  # wrong: log_joint still scores the built-in prior


def test_a_subclass_that_changes_a_site_trains_with_trace_elbo():
    """A subclass does not inherit the direct form; one that claims it wrongly is caught on the first call."""
    adata = small_adata(batch_key="batch")
    model = ps.RegularizedVI(adata, **SMALL)
    model.module.model.__class__ = EditedPrior
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train(max_epochs=1, **QUICK)
    assert model.trainer.elbo_loss.direct is False

    model = ps.RegularizedVI(adata, **SMALL)
    model.module.model.__class__ = EditedPriorClaimingDirect
    with pytest.warns(UserWarning, match="Trace_ELBO gives"):
        model.train(max_epochs=1, **QUICK)
    assert model.trainer.elbo_loss.direct is False


def test_the_first_call_check_sees_a_wrong_global_term_at_any_dataset_size():
    """A wrong global prior is a tiny share of a per-cell loss over 10^6 cells; the check compares at the minibatch's size."""
    adata = small_adata(batch_key="batch")
    model = ps.RegularizedVI(adata, **SMALL)
    model.module.model.__class__ = EditedPriorClaimingDirect
    data = model._cell_data()
    loss_module = ELBOLoss(model.module.model, model.module.guide)
    with pytest.warns(UserWarning, match="Trace_ELBO gives"):
        loss_module(data.minibatch(np.arange(64)), 10**6, 1.0)
    assert loss_module.direct is False


class GuideIgnoringKLWeight(RegularizedVIGuide):
    direct_elbo = True  # wrong: its draw leaves out the KL weight of z

    def draw(self, batch, n_obs, kl_weight=1.0, local_factor=1.0):
        return super().draw(batch, n_obs, 1.0, local_factor)


def test_the_first_call_check_sees_a_kl_weight_slip_during_warm_up():
    """The check runs at a KL weight below 1, so a draw that ignores it is caught even when training starts at 1."""
    adata = small_adata(batch_key="batch")
    model = ps.RegularizedVI(adata, **SMALL)
    model.module.guide.__class__ = GuideIgnoringKLWeight
    model.module.model.__class__ = type("SameModel", (RegularizedVIModel,), {"direct_elbo": True})
    data = model._cell_data()
    loss_module = ELBOLoss(model.module.model, model.module.guide)
    with pytest.warns(UserWarning, match="Trace_ELBO gives"):
        loss_module(data.minibatch(np.arange(64)), data.n_cells, 1.0)
    assert loss_module.direct is False


def test_direct_elbo_in_eval_mode_and_for_a_query_mapped_onto_a_reference():
    """Eval mode (no dropout: the validation loss), and a query whose reference levels are frozen buffers."""
    adata = small_adata(batch_key="batch")
    reference = adata[adata.obs["batch"] != "batch_2"].copy()
    ps.RegularizedVI.setup_anndata(reference, layer="counts", batch_key="batch")
    trained = ps.RegularizedVI(reference, **SMALL)
    trained.train(max_epochs=2, **QUICK)
    query = ps.RegularizedVI.load_query_data(adata[adata.obs["batch"] == "batch_2"].copy(), trained)
    for model in (trained, query):
        loss_module = ELBOLoss(model.module.model, model.module.guide)
        assert loss_module.direct
        data = model._cell_data()
        batch = data.minibatch(np.arange(40))
        for training in (True, False):
            model.module.model.train(training)
            model.module.guide.train(training)
            traced, traced_grads = _loss_and_gradients(loss_module, "trace_loss", batch, data.n_cells, 0.7, 1.0)
            direct, direct_grads = _loss_and_gradients(loss_module, "direct_loss", batch, data.n_cells, 0.7, 1.0)
            assert direct == pytest.approx(traced, rel=1e-5)
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(traced_grads, direct_grads))
            assert any(g.abs().sum() > 0 for g in direct_grads)


MULTIMODAL_MODES = [("concatenation", "equal", False), ("weighted_mean", "equal", False),
                    ("weighted_mean", "universal", False), ("weighted_mean", "cell", False),
                    ("single_encoder", "equal", False), ("concatenation", "equal", True)]


@pytest.mark.parametrize("latent_mode, weights, rich", MULTIMODAL_MODES)
def test_multimodal_direct_elbo_equals_trace_elbo(latent_mode, weights, rich):
    """Every latent mode, with cells that lack one modality's counts (their terms masked), at a KL weight below 1.

    ``rich``: dispersion, library and scaling per batch, LogNormal global guides and the ambient prior on.
    """
    mdata = ps.datasets.simulate_multiome(n_cells=120, n_genes=80, n_peaks=120, seed=0)
    keys = dict(ambient_covariate_keys=["batch"])
    if rich:
        keys.update(dispersion_key="batch", library_size_key="batch", feature_scaling_covariate_keys=["batch"])
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", **keys)
    options = dict(global_guides={"ambient": "lognormal", "dispersion_rate": "lognormal"},
                   priors=ps.RegularizedPriors(regularize_ambient=True)) if rich else {}
    model = ps.RegularizedMultimodalVI(mdata, n_hidden=16, n_latent=4, latent_mode=latent_mode, modality_weights=weights,
                                       **options)
    loss_module = ELBOLoss(model.module.model, model.module.guide)
    assert loss_module.direct
    data = model._cell_data()
    batch = data.minibatch(np.arange(40))
    counts_keys = [key for key in batch if key.startswith("x_") and not key.endswith("_positions")]
    assert len(counts_keys) == 2
    batch[counts_keys[1]][:6] = 0  # six cells without counts in the second modality
    for kl_weight, local_factor in ((0.4, 1.0), (1.0, 0.5)):
        traced, traced_grads = _loss_and_gradients(loss_module, "trace_loss", batch, data.n_cells, kl_weight, local_factor)
        direct, direct_grads = _loss_and_gradients(loss_module, "direct_loss", batch, data.n_cells, kl_weight, local_factor)
        assert direct == pytest.approx(traced, rel=1e-5)
        for (name, _), g_traced, g_direct in zip(loss_module.named_parameters(), traced_grads, direct_grads):
            assert (g_direct - g_traced).abs().max().item() <= 1e-4 * max(g_traced.abs().max().item(), 1e-6), name
        assert sum(int(g.abs().sum() > 0) for g in direct_grads) > len(direct_grads) // 2


def test_an_edited_multimodal_block_makes_the_loss_trace_elbo():
    """The multimodal classes declare the direct form, but a block of an edited class takes it away."""
    mdata = ps.datasets.simulate_multiome(n_cells=120, n_genes=80, n_peaks=120, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", ambient_covariate_keys=["batch"])
    model = ps.RegularizedMultimodalVI(mdata, n_hidden=16, n_latent=4)
    assert ELBOLoss(model.module.model, model.module.guide).direct
    block = model.module.model.block(model.module.model.modalities[0])
    block.__class__ = EditedPrior
    assert not ELBOLoss(model.module.model, model.module.guide).direct


def test_multimodal_training_takes_the_direct_form():
    mdata = ps.datasets.simulate_multiome(n_cells=120, n_genes=80, n_peaks=120, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", ambient_covariate_keys=["batch"])
    model = ps.RegularizedMultimodalVI(mdata, n_hidden=16, n_latent=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the first-call check agrees
        model.train(max_epochs=2, **QUICK)
    assert model.trainer.elbo_loss.direct is True
