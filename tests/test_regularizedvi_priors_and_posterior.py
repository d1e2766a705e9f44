"""RegularizedVI's priors (buffers that reach the model, edited, read-only, older saves) and its posterior summaries
and predictive draws."""

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_scmodels as ps
from pyro_scmodels import metrics as M

from . import _regularizedvi_small
from ._regularizedvi_small import SMALL

# the shared fixture of tests/_regularizedvi_small.py, bound here for pytest to find
small = _regularizedvi_small.small


def test_priors_are_buffers_and_reach_the_model(small):
    priors = ps.RegularizedPriors(ambient=dist.Gamma(2.0, 50.0), regularize_ambient=True)
    model = ps.RegularizedVI(small, priors=priors, **SMALL)
    state = model.module.state_dict()
    assert state["model.priors.ambient__concentration"].item() == 2.0
    assert state["model.priors.ambient__rate"].item() == 50.0
    assert state["model.priors.dispersion_rate__concentration"].item() == 9.0
    assert state["model.priors.feature_scaling__rate"].item() == 200.0
    prior = model.module.model.priors["ambient"]
    assert isinstance(prior, dist.Gamma) and float(prior.mean) == pytest.approx(0.04)
    # the model keeps its own copy: a later edit of the caller's object changes neither what it trains nor reports
    priors.ambient = dist.Gamma(1.0, 1e6)
    assert float(model.priors.ambient.rate) == 50.0 and float(model.module.model.priors["ambient"].rate) == 50.0
    # what is not a prior of a positive site is refused by name
    for bad, error, message in ((dict(ambient=None), TypeError, "RegularizedPriors.ambient must be a distribution"),
                                (dict(ambient=0.01), TypeError, "RegularizedPriors.ambient must be a distribution"),
                                (dict(feature_scaling=dist.Normal(1.0, 0.1)), ValueError, "over all positive numbers"),
                                # accepted, and training failed once the point estimate left (0.95, 1.05)
                                (dict(feature_scaling=dist.Uniform(0.95, 1.05)), ValueError,
                                 r"over all positive numbers .*Uniform has support Interval"),
                                (dict(regularize_ambient="yes"), TypeError, "regularize_ambient"),
                                # an event dimension gave a raw "Expected value.dim() >= 1" from the support check
                                (dict(dispersion_rate=dist.Gamma(9.0, 3.0).expand([1]).to_event(1)), ValueError,
                                 "must be a univariate distribution")):
        with pytest.raises(error, match=message):
            ps.RegularizedPriors(**bad)
    # a field set after construction is checked when a model is built with it (it trained with a Normal prior on y)
    changed = ps.RegularizedPriors()
    changed.feature_scaling = dist.Normal(0.0, 1.0)
    with pytest.raises(ValueError, match="RegularizedPriors.feature_scaling must be a distribution over all positive"):
        ps.RegularizedVI(small, priors=changed, **SMALL)
    # a prior whose shape does not fit its site is refused when the model is built, not in a trace during training
    transposed = torch.ones(small.n_vars, 2)
    with pytest.raises(ValueError, match=r"RegularizedPriors.ambient has batch shape \(\d+, 2\)"):
        ps.RegularizedVI(small, priors=ps.RegularizedPriors(ambient=dist.Gamma(transposed, transposed)), **SMALL)
    # a per-gene prior is a valid shape: init="prior" starts each gene at its own prior mean (it raised)
    rate = torch.linspace(50.0, 200.0, small.n_vars)
    per_gene = ps.RegularizedVI(small, init="prior", priors=ps.RegularizedPriors(ambient=dist.Gamma(torch.ones_like(rate),
                                                                                                   rate)), **SMALL)
    np.testing.assert_allclose(per_gene.get_ambient_profile().to_numpy()[:, 0], 1 / rate.numpy(), rtol=1e-4)
    # a prior without a finite mean cannot be a starting point (training stopped at its first step)
    with pytest.raises(ValueError, match="HalfCauchy's mean is not finite"):
        ps.RegularizedVI(small, init="prior", priors=ps.RegularizedPriors(ambient=dist.HalfCauchy(torch.tensor(0.01))),
                         **SMALL)


def test_prior_buffers_edited_in_place_are_what_the_model_reports_saves_and_loads(small, tmp_path):
    # the buffers are the hyperparameters the model trains with; model.priors, export and save read the priors
    # object given at construction, so an edit reported the old prior, and a per-gene edit saved a model that failed
    # to load (size mismatch of the buffer)
    model = ps.RegularizedVI(small, **SMALL)
    buffers = model.module.model.priors
    buffers.dispersion_rate__concentration.fill_(4.0)
    buffers.feature_scaling__concentration = torch.full((small.n_vars,), 20.0)
    buffers.feature_scaling__rate = torch.full((small.n_vars,), 20.0)
    assert float(model.priors.dispersion_rate.concentration) == 4.0
    assert model.priors.feature_scaling.concentration.shape == (small.n_vars,)
    model.train(max_epochs=1, batch_size=128, early_stopping=False, device="cpu", progress_bar=False)
    exported = model.export_posterior(small.copy(), num_samples=2)
    assert exported.uns["RegularizedVI"]["settings"]["priors"]["dispersion_rate"]["concentration"] == 4.0
    model.save(str(tmp_path / "m"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "m"), small.copy(), device="cpu")
    np.testing.assert_array_equal(loaded.module.model.priors.feature_scaling__rate.numpy(), np.full(small.n_vars, 20.0))
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation())


def test_model_priors_are_read_only_and_an_older_saved_prior_still_loads(small, tmp_path, monkeypatch):
    model = ps.RegularizedVI(small, **SMALL)
    # model.priors is read back from the buffers: an assignment would change nothing the model does
    with pytest.raises(AttributeError, match="setting ambient would change nothing: edit its buffers"):
        model.priors.ambient = dist.Gamma(2.0, 5.0)
    with pytest.raises(AttributeError, match="assigning it would change nothing"):
        model.priors = ps.RegularizedPriors()
    assert repr(model.priors).startswith("RegularizedPriors(dispersion_rate=Gamma(")
    # a buffer edited outside its constraint is reported, not raised on by the read-back
    model.module.model.priors.ambient__rate.fill_(-1.0)
    assert float(model.priors.ambient.rate) == -1.0
    # a model saved before priors over part of the positive numbers were refused still loads, with a warning
    monkeypatch.setattr(ps.RegularizedPriors, "validate", lambda self, saved=False: self)
    older = ps.RegularizedVI(small, **SMALL, priors=ps.RegularizedPriors(feature_scaling=dist.Uniform(0.5, 2.0)))
    older.save(str(tmp_path / "older"))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="must be a distribution over all positive numbers .*still loads"):
        loaded = ps.RegularizedVI.load(str(tmp_path / "older"), small.copy(), device="cpu")
    assert isinstance(loaded.priors.feature_scaling, dist.Uniform)


def test_sample_posterior_summaries(fitted):
    with pytest.raises(TypeError, match="quantiles must be a sequence of numbers in \\(0, 1\\)"):  # a bare float
        fitted.sample_posterior(num_samples=2, quantiles=0.5)
    # seeded, the summaries repeat and the caller's random state is untouched (two exports differed by up to 1.18)
    state = torch.get_rng_state()
    first, second = (fitted.sample_posterior(num_samples=3, indices=np.arange(20), seed=7) for _ in range(2))
    np.testing.assert_array_equal(first["means"]["z"], second["means"]["z"])
    assert torch.equal(torch.get_rng_state(), state)
    summary = fitted.sample_posterior(num_samples=20, indices=np.arange(200))
    assert set(summary) == {"means", "stds", "q05", "q95"}
    means = summary["means"]
    assert means["z"].shape == (200, 10) and means["library"].shape == (200,)
    assert means["ambient"].shape == (3, 500) and means["inverse_sqrt_theta"].shape == (1, 500)
    assert "cells" not in means and "genes" not in means  # plates are not sites
    assert (summary["q05"]["z"] <= summary["q95"]["z"]).all()
    np.testing.assert_array_equal(summary["stds"]["ambient"], 0.0)  # point estimate
    assert (summary["stds"]["inverse_sqrt_theta"] > 0).all()  # LogNormal guide
    z_mean = fitted.get_latent_representation(indices=np.arange(200))
    # sample means sit within Monte Carlo error of the guide's mean
    within = np.abs(means["z"] - z_mean) < 4.5 * summary["stds"]["z"] / np.sqrt(20)
    assert within.mean() > 0.99


def test_posterior_predictive_reproduces_gene_means(fitted):
    cells = np.arange(0, 3000, 5)
    draws = fitted.posterior_predictive(num_samples=5, indices=cells)
    assert draws.shape == (5, 600, 500)
    assert (draws >= 0).all() and np.all(draws == np.round(draws))
    observed = fitted.adata.layers["counts"][cells].toarray()
    assert M.pearson(np.log1p(draws.mean((0, 1))), np.log1p(observed.mean(0))) > 0.98


@pytest.mark.parametrize("prior", [dist.Normal(0.0, 5.0 ** 0.5), dist.Normal(0.3, 2.0), dist.Laplace(0.3, 2.0),
                                   dist.Normal(torch.zeros(1, 1), 2.0)])
def test_decoder_weight_prior_is_the_log_density_relative_to_zero(small, prior):
    # MAP penalty sum_w [log p(w) - log p(0)]: shared-scalar priors take the one-number shortcut, others not
    model = ps.RegularizedVI(small, priors=ps.RegularizedPriors(decoder_weight=prior), **SMALL)
    generative = model.module.model
    trace = poutine.trace(generative.decoder_weight_prior).get_trace()
    weights = list(generative.decoder.weights())
    expected = sum(float((prior.log_prob(w) - prior.log_prob(torch.zeros_like(w))).sum()) for w in weights)
    if isinstance(prior, dist.Normal) and prior.batch_shape == torch.Size() and float(prior.loc) == 0.0:
        expected_closed = sum(float(-(w ** 2).sum() / (2 * 5.0)) for w in weights)  # -w^2 / (2 sigma^2)
        assert expected == pytest.approx(expected_closed, rel=1e-4)
    site = [name for name in trace.nodes if "decoder_weight_prior" in name][0]
    assert float(trace.nodes[site]["fn"].log_prob(torch.tensor(0.0))) == pytest.approx(expected, rel=1e-5, abs=1e-4)
