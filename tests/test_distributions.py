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
