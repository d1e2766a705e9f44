"""Count distributions in the parameterisation the models use."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution


class GammaPoissonMean(dist.GammaPoisson):
    """``GammaPoisson(concentration=theta, rate=theta / mu)``, parameterised by its mean ``mu``.

    The same distribution as Pyro's ``GammaPoisson`` (negative binomial with mean ``mu`` and
    variance ``mu + mu^2 / theta``); only ``log_prob`` is written differently::

        log p(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
                   + theta log(theta / (theta + mu)) + x log(mu / (theta + mu))

    Parameters are kept unbroadcast, so terms that depend on ``theta`` alone are computed
    once per gene rather than once per cell and gene, and the gradient needs one ``digamma``
    over the minibatch instead of three.

    Parameters
    ----------
    mean
        Mean mu (positive).
    concentration
        Inverse overdispersion theta (positive); any shape that broadcasts with ``mean``.
    """

    def __init__(self, mean: torch.Tensor, concentration: torch.Tensor, validate_args=None):
        self._mu = mean
        self._theta = concentration
        batch_shape = torch.broadcast_shapes(mean.shape, concentration.shape)
        TorchDistribution.__init__(self, batch_shape, validate_args=validate_args)

    @property
    def concentration(self) -> torch.Tensor:
        return self._theta.expand(self.batch_shape)

    @property
    def rate(self) -> torch.Tensor:
        return (self._theta / self._mu).expand(self.batch_shape)

    @property
    def _gamma(self) -> dist.Gamma:  # used by GammaPoisson.sample
        return dist.Gamma(self.concentration, self.rate, validate_args=False)

    @property
    def mean(self) -> torch.Tensor:
        return self._mu.expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        return (self._mu + self._mu.pow(2) / self._theta).expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GammaPoissonMean, _instance)
        batch_shape = torch.Size(batch_shape)
        new._mu = self._mu.expand(batch_shape)
        new._theta = self._theta
        TorchDistribution.__init__(new, batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        theta, mu = self._theta, self._mu
        log_theta_plus_mu = torch.log(theta + mu)
        with torch.no_grad():
            log_factorial = torch.lgamma(value + 1)  # a constant of the data
        return (
            torch.lgamma(value + theta)
            - (torch.lgamma(theta) - theta * theta.log())  # per-gene terms, before broadcasting
            - (value + theta) * log_theta_plus_mu
            + value * mu.log()
            - log_factorial
        )
