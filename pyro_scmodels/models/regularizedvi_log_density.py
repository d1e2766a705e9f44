"""The log density of :class:`~pyro_scmodels.models.regularizedvi_module.RegularizedVIModel`, without Pyro's tracing.

:class:`RegularizedVILogDensity` is a base of ``RegularizedVIModel``: ``log_joint`` is the same sum as the model
trace's ``log_prob_sum()``, written out site by site, which :class:`~pyro_scmodels.elbo.ELBOLoss` uses in place of
``Trace_ELBO`` (and checks against it). The multimodal model calls ``global_log_density`` and
``local_log_density`` of each block. It uses the model's ``priors``, ``dims``, ``regularize_ambient``,
``ambient_prior``, ``decoder_weight_log_density``, ``library_prior``, ``decode``, ``count_distribution`` and
``latent_independence_log_factor``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from ..distributions import CountTerms
from .expected_counts import expected_counts


class RegularizedVILogDensity:
    """log p of the global sites, of a minibatch and of each cell, as the model's sites score them."""

    def global_log_density(self, values: dict) -> torch.Tensor:
        """log p of the global sites at ``values`` (site name -> value), as :meth:`global_sites` scores them."""
        priors, dims = self.priors, self.dims
        rate = values["dispersion_rate"]
        log_p = priors["dispersion_rate"].log_prob(rate).sum()
        log_p = log_p + dist.Exponential(rate).log_prob(values["inverse_sqrt_theta"]).sum()
        if dims.use_ambient and self.regularize_ambient:  # masked otherwise
            log_p = log_p + self.ambient_prior().log_prob(values["ambient"]).sum()
        if dims.use_feature_scaling:
            log_p = log_p + priors["feature_scaling"].log_prob(values["feature_scaling"]).sum()
        log_p = log_p + priors["library_residual_weight"].log_prob(values["library_residual_weight"]).sum()
        penalty = self.decoder_weight_log_density()
        return log_p if penalty is None else log_p + penalty

    def log_joint(self, values: dict, batch: dict, n_obs: int, kl_weight: float = 1.0,
                  local_factor: float = 1.0) -> torch.Tensor:
        """log p(x, z, l, globals) of a minibatch, each site weighted as ``Trace_ELBO`` weights it.

        The same sum as the model trace's ``log_prob_sum()`` replayed at ``values``, computed without
        Pyro's effect handlers: a cell's terms count ``n_obs / minibatch size`` times (the cell
        plate's subsampling) times ``local_factor`` (a data-parallel shard), and z's prior term is
        also weighted by ``kl_weight``.

        Parameters
        ----------
        values
            Site name (without the modality suffix) -> value: the globals, ``"z"`` and ``"library"``,
            e.g. from :meth:`~pyro_scmodels.models.regularizedvi_guide.RegularizedVIGuide.draw`.
        batch, n_obs, kl_weight
            As in :meth:`forward`.
        local_factor
            Extra weight of the cell plate's terms.

        Returns
        -------
        torch.Tensor
            A scalar.
        """
        z = values["z"]
        cells = local_factor * n_obs / z.shape[0]
        log_p = self.global_log_density(values)
        log_p = log_p + kl_weight * cells * dist.Normal(z.new_zeros(()), 1.0).log_prob(z).sum()
        log_p = log_p + cells * self.local_log_density(z, values, batch).sum()
        penalty = self.latent_independence_log_factor(z, batch, n_obs)
        return log_p if penalty is None else log_p + penalty

    def local_log_density(self, z: torch.Tensor, values: dict, batch: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(l_n) + log p(x_n | z_n, l_n) of each cell (unweighted), 0 where ``mask`` is False.

        The terms of :meth:`local_sites` at the library sizes ``values["library"]`` and the global
        values in ``values`` (:meth:`log_joint`; the multimodal model calls it per modality).
        """
        log_p = self.library_prior(batch).log_prob(values["library"])
        log_p = log_p + self.count_likelihood(z, values, batch).log_prob_sum_genes(batch[self.dims.counts_key])
        # as poutine.mask does: the masked cells' terms are replaced by 0, not multiplied by it
        return log_p if mask is None else torch.where(mask, log_p, log_p.new_zeros(()))

    def count_likelihood(self, z: torch.Tensor, values: dict, batch: dict, rho: torch.Tensor | None = None,
                         theta: torch.Tensor | None = None):
        """p(x_n | z_n, l_n) of each cell: :meth:`count_distribution` at the mean of the library sizes
        ``values["library"]``, the expression ``rho`` (default ``decode(z, batch)``) and the global values in
        ``values``, and at ``theta`` (default ``values["inverse_sqrt_theta"] ** -2``)."""
        mu = expected_counts(values["library"], self.decode(z, batch) if rho is None else rho, values.get("ambient"),
                             values.get("feature_scaling"), batch["ambient_index"], batch["scaling_index"],
                             self.dims.ambient_per_droplet)
        return self.count_distribution(mu, values["inverse_sqrt_theta"].pow(-2) if theta is None else theta, batch)

    def cell_log_joint(self, z: torch.Tensor, values: dict, batch: dict, rho: torch.Tensor | None = None,
                       fixed: CountTerms | None = None) -> torch.Tensor:
        """log p(z_n) + log p(l_n) + log p(x_n | z_n, l_n) of each cell, unweighted, as a trace of the model scores them.

        The per-cell terms of the cell plate's sites (no subsampling or KL weight, no mask) that
        :meth:`~pyro_scmodels.models.evidence.EvidenceQueries.log_importance_ratios` reads off a Pyro trace, from the
        expression ``rho`` already decoded from ``z`` (e.g. for differential expression) instead of decoding it again.

        Parameters
        ----------
        z
            One draw of z per cell, cells x latent.
        values
            The library sizes ``values["library"]`` (per cell) and the global values by site name (without the modality
            suffix), e.g. the guide's medians.
        batch
            The cells' minibatch.
        rho
            ``decode(z, batch)``, when already computed (with the cells' own decoder covariates).
        fixed
            ``count_terms(theta, batch)`` at the theta of ``values`` (``inverse_sqrt_theta ** -2``): the terms of the
            counts that no draw changes (lgamma(x + theta), lgamma(x + 1), where the counts are), computed once per
            minibatch for all its draws. None: computed here. The same value either way.

        Returns
        -------
        torch.Tensor
            One value per cell.
        """
        # the sites' terms in the order of the model's trace (z, library, counts), each as its site scores it (the
        # counts' whole table of terms summed over genes, not log_prob_sum_genes): the sum the trace gives, to the bit
        log_p = dist.Normal(z.new_zeros(()), 1.0).expand(z.shape).to_event(1).log_prob(z)
        log_p = log_p + self.library_prior(batch).log_prob(values["library"])
        counts = self.count_likelihood(z, values, batch, rho, None if fixed is None else fixed.theta)
        given = {} if fixed is None else {"fixed": fixed}  # a subclass's count distribution may not take it
        return log_p + counts.log_prob(batch[self.dims.counts_key], **given).sum(-1)
