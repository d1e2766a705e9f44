"""The model and guide used with Pyro's own tools: conditioning, other ELBOs, sliced minibatches.

Each must give what Pyro's definitions give, not what the package's fast paths assume about its own training."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_scmodels as ps

SMALL = dict(n_hidden=16, n_latent=3)


@pytest.fixture
def small():
    adata = ps.datasets.simulate(n_cells=160, n_genes=40, n_markers_per_type=4, n_responding_genes=4, seed=5)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return adata


def _first_batch(model, n_cells: int = 32):
    for _, (batch, n_obs) in model.minibatches(indices=np.arange(n_cells), batch_size=n_cells):
        return batch, n_obs


def _obs_log_prob(trace) -> float:
    """The traced obs site's log p, without the subsampling scale (n_obs / minibatch cells)."""
    trace.compute_log_prob()
    site = trace.nodes["obs"]
    return float(site["log_prob_sum"].detach()) / float(site["scale"])


def _pyro_obs_log_prob(trace, value) -> float:
    """log p(value) under Pyro's GammaPoisson with the traced obs site's mean and concentration (float64)."""
    fn = trace.nodes["obs"]["fn"].base_dist
    mu, theta = fn.mean.detach().double(), fn.concentration.detach().double()
    return float(dist.GammaPoisson(theta, theta / mu).log_prob(value.double()).sum())


def test_counts_conditioned_on_are_scored_as_pyros_gamma_poisson(small):
    # the minibatch's positions of its non-zero counts scored any counts of its shape: other cells' counts given
    # through poutine.condition, or put in place of batch["x"], had their non-zeros elsewhere scored as zeros
    model = ps.RegularizedVI(small, **SMALL)
    batch, n_obs = _first_batch(model)
    other = torch.roll(batch["x"], 1, 0)
    pyro.set_rng_seed(0)
    conditioned = poutine.trace(poutine.condition(model.module.model, data={"obs": other})).get_trace(batch, n_obs)
    # float32 sums against float64: a few 1e-5 apart; the positions' error was a few per cent
    assert _obs_log_prob(conditioned) == pytest.approx(_pyro_obs_log_prob(conditioned, other), rel=1e-4)
    replaced = dict(batch, x=other)
    pyro.set_rng_seed(0)
    trace = poutine.trace(model.module.model).get_trace(replaced, n_obs)
    assert _obs_log_prob(trace) == pytest.approx(_pyro_obs_log_prob(trace, other), rel=1e-4)


def test_a_minibatch_sliced_to_fewer_cells_is_scored(small):
    # slicing the batch's tensors (not the positions tuple) raised a bare IndexError from the positions of 32 cells
    model = ps.RegularizedVI(small, **SMALL)
    batch, n_obs = _first_batch(model)
    sliced = {k: (v[:10] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 32 else v) for k, v in batch.items()}
    trace = poutine.trace(model.module.model).get_trace(sliced, n_obs)
    assert _obs_log_prob(trace) == pytest.approx(_pyro_obs_log_prob(trace, sliced["x"]), rel=1e-4)


def _loss_per_cell(model, elbo, batch, n_obs) -> float:
    pyro.set_rng_seed(0)
    with torch.no_grad():
        return elbo.loss(model.module.model, model.module.guide, batch, n_obs) / n_obs


@pytest.mark.parametrize("regularize_ambient", [False, True])
def test_every_elbo_counts_the_ambient_prior_as_trace_elbo_does(small, regularize_ambient):
    # TraceMeanField_ELBO takes a point estimate's KL analytically (-log p) and masks it with the guide site's mask:
    # the ambient prior, masked on the model side only, was counted (389 against 521 nats per cell, probe p27)
    priors = ps.RegularizedPriors(regularize_ambient=regularize_ambient)
    model = ps.RegularizedVI(small, priors=priors, **SMALL)
    model.module.eval()
    batch, n_obs = _first_batch(model, 64)
    ambient = model.module.guide.global_medians()["ambient"]
    prior_term = float(-model.module.model.priors["ambient"].log_prob(ambient).sum()) / n_obs
    assert abs(prior_term) > 5.0  # what the old miscount added, per cell: well above the Monte Carlo noise below
    trace = _loss_per_cell(model, pyro.infer.Trace_ELBO(num_particles=50), batch, n_obs)
    mean_field = _loss_per_cell(model, pyro.infer.TraceMeanField_ELBO(num_particles=50), batch, n_obs)
    # the z and library KLs: analytic in one, sampled in the other
    assert mean_field == pytest.approx(trace, abs=0.5)


def test_point_estimate_sites_are_summarised_exactly(small):
    # the float32 mean of 50 equal draws drifted by an ulp: means_ambient < q05_ambient in 177 entries of an export,
    # and the dispersion rate's sd came out 1.2e-7
    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=1, batch_size=64, device="cpu", progress_bar=False, early_stopping=False)
    exported = model.export_posterior(small.copy(), num_samples=50, seed=0)
    assert {"ambient", "feature_scaling", "dispersion_rate"} <= set(model.point_estimate_sites)
    summaries = model.sample_posterior(num_samples=50, seed=0)
    medians = model.module.guide.global_medians()
    for site in model.point_estimate_sites:
        mean = summaries["means"][site]
        assert (summaries["stds"][site] == 0).all(), site
        assert (summaries["q05"][site] == mean).all() and (summaries["q95"][site] == mean).all(), site
        # each its own array: editing the mean in place must not move the quantiles
        assert not np.shares_memory(mean, summaries["q05"][site]) and not np.shares_memory(mean, summaries["q95"][site])
        if site in medians:
            np.testing.assert_array_equal(mean, medians[site].numpy())
    for key in exported.varm:
        if key.startswith("means_"):
            site = key[len("means_"):]
            mean, low, high = (exported.varm[f"{k}_{site}"].to_numpy() for k in ("means", "q05", "q95"))
            assert (low <= mean).all() and (mean <= high).all(), site


def test_forward_hooks_on_the_hidden_linear_layers_fire(small):
    """PyTorch users hook submodules (activations, feature attribution): the first nn.Linear of the encoder's and of the
    decoder's hidden stack is called as a module, so its hooks see (and may change) what the model computes."""
    model = ps.RegularizedVI(small, **SMALL, n_layers=2, seed=0)
    seen = {}
    encoder_first = model.module.guide.encoder.hidden.linears[0]
    decoder_first = model.module.model.decoder.hidden.linears[0]
    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, tuple(output.shape))  # returns None: the output is left as it is
        return hook

    handles = [module.register_forward_hook(record(name))
               for name, module in (("encoder", encoder_first), ("decoder", decoder_first),
                                    ("decoder, second layer", model.module.model.decoder.hidden.linears[1]))]
    latent = model.get_latent_representation(indices=np.arange(10))
    model.get_normalized_expression(indices=np.arange(10))
    for handle in handles:
        handle.remove()
    assert seen == {"encoder": (10, 16), "decoder": (10, 16), "decoder, second layer": (10, 16)}
    # a hook that replaces the output is what the model then uses
    handle = encoder_first.register_forward_hook(lambda module, args, output: output * 0.0)
    zeroed = model.get_latent_representation(indices=np.arange(10))
    handle.remove()
    assert not np.allclose(zeroed, latent) and np.allclose(zeroed, zeroed[0])  # every cell the same latent
    np.testing.assert_array_equal(model.get_latent_representation(indices=np.arange(10)), latent)
