"""GammaPoissonMean is Pyro's GammaPoisson(theta, theta / mu), and select_rows is table[index]."""

import pyro.distributions as dist
import pytest
import torch

from pyro_scmodels.distributions import GammaPoissonMean, select_rows


@pytest.mark.parametrize("grouped", [False, True])
def test_log_prob_equals_pyros_gamma_poisson(grouped):
    torch.manual_seed(0)
    mu = torch.rand(6, 9) * 20 + 1e-3
    theta = torch.rand(3 if grouped else 1, 9) * 10 + 0.05
    group = torch.tensor([0, 2, 1, 1, 0, 2]) if grouped else None
    x = torch.poisson(mu * 1.5)
    per_cell = theta[group] if grouped else theta.expand(6, 9)
    expected = dist.GammaPoisson(per_cell, per_cell / mu).log_prob(x)
    torch.testing.assert_close(GammaPoissonMean(mu, theta, group).log_prob(x), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("leading", [(), (4,)])
def test_log_prob_and_gradients_on_mostly_zero_counts(grouped, leading):
    # the lgamma terms are computed only where x > 0: values and gradients must still be Pyro's
    torch.manual_seed(2)
    mu = (torch.rand(*leading, 7, 11) * 3 + 1e-3).requires_grad_()
    theta = (torch.rand(3 if grouped else 1, 11) * 5 + 0.05).requires_grad_()
    group = torch.tensor([0, 2, 1, 1, 0, 2, 2]) if grouped else None
    x = torch.poisson(mu.detach() * 0.3)
    assert 0.2 < (x == 0).float().mean() < 0.95
    ours = GammaPoissonMean(mu, theta, group).log_prob(x)
    ours_grads = torch.autograd.grad(ours.sum(), (mu, theta))
    per_cell = theta[group] if grouped else theta.expand(7, 11)
    expected = dist.GammaPoisson(per_cell, per_cell / mu).log_prob(x)
    expected_grads = torch.autograd.grad(expected.sum(), (mu, theta))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    for got, want in zip(ours_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_log_prob_with_a_theta_per_cell_and_gene():
    # a concentration that is neither per gene nor a grouped table takes the dense form
    torch.manual_seed(3)
    mu, theta = torch.rand(5, 6) * 4 + 0.01, torch.rand(5, 6) * 3 + 0.1
    x = torch.poisson(mu)
    torch.testing.assert_close(GammaPoissonMean(mu, theta).log_prob(x),
                               dist.GammaPoisson(theta, theta / mu).log_prob(x), rtol=1e-5, atol=1e-4)


def test_log_prob_with_draws_of_a_grouped_theta_and_unusual_shapes():
    # shapes outside the sparse form's (theta per gene, or one 2-D grouped table) take the dense form
    torch.manual_seed(4)
    mu = torch.rand(3, 5, 4) * 3 + 0.01
    theta = torch.rand(3, 2, 4) * 4 + 0.1  # three draws of a 2-group table
    group = torch.tensor([0, 1, 1, 0, 1])
    x = torch.poisson(mu * 0.5)
    per_cell = theta[:, group]
    torch.testing.assert_close(GammaPoissonMean(mu, theta, group).log_prob(x),
                               dist.GammaPoisson(per_cell, per_cell / mu).log_prob(x), rtol=1e-5, atol=1e-4)
    column = torch.rand(4, 1) + 0.5  # a theta per cell (4 cells) that happens to match 4 genes in size
    mu2 = torch.rand(4, 4) * 3 + 0.01
    x2 = torch.poisson(mu2)
    torch.testing.assert_close(GammaPoissonMean(mu2, column).log_prob(x2),
                               dist.GammaPoisson(column.expand(4, 4), column / mu2).log_prob(x2), rtol=1e-5, atol=1e-4)
    # a float64 mean with float32 counts and theta keeps float64, as the dense form did
    wide = GammaPoissonMean(mu2.double(), torch.rand(1, 4) + 0.5).log_prob(x2)
    assert wide.dtype == torch.float64


def test_moments_of_samples():
    torch.manual_seed(1)
    mu, theta = torch.tensor([[3.0, 40.0]]), torch.tensor([[2.0, 0.5]])
    draws = GammaPoissonMean(mu.expand(20000, 2), theta).sample()
    torch.testing.assert_close(draws.mean(0), mu[0], rtol=0.05, atol=0.1)
    torch.testing.assert_close(draws.var(0), (mu + mu**2 / theta)[0], rtol=0.1, atol=0.5)


def test_select_rows_is_indexing_with_weights():
    table = torch.randn(4, 5)
    index = torch.tensor([3, 0, 0, 2])
    weights = torch.rand(4)
    torch.testing.assert_close(select_rows(table, index), table[index])
    torch.testing.assert_close(select_rows(table, index, weights), weights[:, None] * table[index])
    torch.testing.assert_close(select_rows(table[:1], index, weights), weights[:, None] * table[:1].expand(4, 5))
