"""RegularizedVI as a Pyro model/guide pair (SPEC 1.2 and 1.3).

Read :meth:`RegularizedVIModel.forward` next to the equations::

    lambda_d        ~ Gamma(9, 3)                              dispersion_rate
    u_{d,g}         ~ Exponential(lambda_d),  theta = u^-2     inverse_sqrt_theta
    s_{e,g}         ~ Gamma(1, 100)                            ambient (prior masked by default)
    y_{t,g}         ~ Gamma(200, 200)                          feature_scaling
    w               ~ Exponential(1)                           library_residual_weight
    for each cell n (plate of size N, subsampled):
      z_n           ~ Normal(0, I)                             z (KL scaled by kl_weight)
      l_n           ~ LogNormal(m_p, sqrt(0.5 v_p))            library
      rho_n         = softplus(decoder([z_n, continuous_n], onehot(nn covariates)_n))
      mu_{n,g}      = l_n (rho_{n,g} + sum_e s_{e(n),g}) prod_t y_{t(n),g}
      x_{n,g}       ~ GammaPoisson(theta_{d(n),g}, theta_{d(n),g} / mu_{n,g})   obs
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroParam
from torch.distributions import constraints

from .. import _constants as C
from ..data.counts import POSITIONS_SUFFIX
from ..data.count_positions import CountPositions
from ..distributions import CountTerms, GammaPoissonMean
from ..independence import category_mmd
from ..nn import SoftplusDecoder, Standardiser
from ..priors import (PriorSet, PriorsInUse, RegularizedPriors, check_prior_shapes,
                      refuse_replaced_ambient_prior)
from ..pyro_modules import LocalPyroModule, refuse_outer_plates
from .expected_counts import background, expected_counts, scaling_factor
from .regularizedvi_dims import GLOBAL_SITES, SITE_COVARIATE_ROLES, RegularizedVIDims  # noqa: F401  (their import path)
from .regularizedvi_log_density import RegularizedVILogDensity


class RegularizedVIModel(RegularizedVILogDensity, LocalPyroModule):
    """The generative model p(x, z, l, globals).

    Parameters
    ----------
    dims
        Sizes.
    priors
        The priors (see :class:`~pyro_scmodels.RegularizedPriors`).
    library_prior_loc, library_prior_variance
        m_p (centred) and v_p per library group.
    ambient_shape_prior
        None, or ``(concentration a, shape p (genes), initial amounts (categories))``: then
        ``s_{e,g} ~ Gamma(a, a / (m_e p_g))``, counted in the ELBO, with the amount ``m_e`` per category a
        learned hyperparameter of the model (empirical Bayes) and ``p`` the pooled cells' profile.
    """

    def __init__(self, dims: RegularizedVIDims, priors: RegularizedPriors, library_prior_loc, library_prior_variance,
                 ambient_shape_prior=None):
        super().__init__()
        self.dims = dims
        check_prior_shapes(priors, dims)
        self.priors = PriorSet(priors.distributions())
        self.shaped_ambient = ambient_shape_prior is not None
        # the shaped prior is always counted: it is what places the background's shared part
        self.regularize_ambient = bool(priors.regularize_ambient) or self.shaped_ambient
        self._asked_to_regularize_ambient = bool(priors.regularize_ambient)  # the shaped prior counts it anyway
        if self.shaped_ambient:
            concentration, shape, amounts = ambient_shape_prior
            shape = torch.as_tensor(shape, dtype=torch.float32)
            self.register_buffer("ambient_shape_concentration", torch.tensor(float(concentration)))
            self.register_buffer("ambient_shape", shape / shape.sum())
            # a parameter of the model, not a site: no prior, a point estimate by maximising the ELBO
            self.ambient_amount = PyroParam(torch.as_tensor(amounts, dtype=torch.float32).reshape(-1, 1),
                                            constraint=constraints.positive)
        self.register_buffer("library_prior_loc", torch.as_tensor(library_prior_loc, dtype=torch.float32))
        self.register_buffer(
            "library_prior_scale",
            torch.as_tensor(C.LIBRARY_PRIOR_VARIANCE_FACTOR * library_prior_variance, dtype=torch.float32).sqrt(),
        )
        self.continuous_scaling = Standardiser(dims.n_continuous)  # named as nn.STANDARDISER_NAME
        self.decoder = SoftplusDecoder(
            (dims.n_decoder_latent or dims.n_latent) + dims.n_continuous, dims.n_genes, dims.n_hidden, dims.n_layers,
            dims.n_nn_covariates,
        )

    # --- global sites: one method per site, so a subclass can override one of them -----------
    def sample_dispersion(self, genes: pyro.plate) -> torch.Tensor:
        """lambda_d ~ prior; 1/sqrt(theta_{d,g}) ~ Exponential(lambda_d). Returns theta (groups x genes)."""
        site = self.dims.site
        with pyro.plate(site("dispersion_groups"), self.dims.n_dispersion, dim=-2):
            dispersion_rate = pyro.sample(site("dispersion_rate"), self.priors["dispersion_rate"])
            with genes:
                # containment prior: small 1/sqrt(theta) is likely, which pulls theta towards Poisson
                u = pyro.sample(site("inverse_sqrt_theta"), dist.Exponential(dispersion_rate))
        return u.pow(-2)

    def ambient_prior(self) -> dist.Distribution:
        """The prior of s: ``priors.ambient``, or ``Gamma(a, a / (m_e p_g))`` with the shaped prior."""
        if not self.shaped_ambient:
            return self.priors["ambient"]
        a = self.ambient_shape_concentration
        return dist.Gamma(a, a / (self.ambient_amount * self.ambient_shape))

    def sample_ambient(self, genes: pyro.plate) -> torch.Tensor:
        """s_{e,g} ~ prior (its log-density masked unless ``regularize_ambient`` or the shaped prior)."""
        prior = self.ambient_prior()
        if not self.regularize_ambient:
            # masked in the distribution (log-density 0, draws the prior's), not with poutine.mask: an ELBO with
            # analytic KL terms (TraceMeanField_ELBO) masks a site's KL with the guide's mask, so a handler mask on the
            # model side alone was ignored there; every ELBO reads the masked density as Trace_ELBO does
            prior = prior.mask(False)
        with pyro.plate(self.dims.site("ambient_categories"), self.dims.n_ambient, dim=-2), genes:
            return pyro.sample(self.dims.site("ambient"), prior)

    def sample_feature_scaling(self, genes: pyro.plate) -> torch.Tensor:
        """y_{t,g} ~ prior."""
        with pyro.plate(self.dims.site("scaling_categories"), self.dims.n_scaling, dim=-2), genes:
            return pyro.sample(self.dims.site("feature_scaling"), self.priors["feature_scaling"])

    def sample_library_residual_weight(self) -> torch.Tensor:
        """w ~ prior: the weight of the observed library size in the library guide."""
        return pyro.sample(self.dims.site("library_residual_weight"), self.priors["library_residual_weight"])

    def decoder_weight_log_density(self) -> torch.Tensor | None:
        """log p(decoder weights) relative to its value at 0 (None without a weight prior)."""
        if "decoder_weight" not in self.priors:
            return None
        # the prior enters relative to its density at 0, so the per-cell loss is not swamped
        # by a normalising constant of ~1.7 nats per weight
        prior = self.priors["decoder_weight"]
        weights = list(self.decoder.weights())
        if type(prior) in (dist.Normal, torch.distributions.Normal) and prior.batch_shape == torch.Size():
            # log N(w; m, s) - log N(0; m, s) = -(w^2 - 2 m w) / (2 s^2): two sums over each weight matrix
            # instead of the density's half a dozen passes (and as many backwards) on every training step
            squares = sum(w.square().sum() for w in weights)
            totals = sum(w.sum() for w in weights)
            return -(squares - 2.0 * prior.loc * totals) / (2.0 * prior.scale.square())
        if prior.batch_shape == torch.Size():
            # a prior shared by every weight: its density at 0 is one number (no tensor of zeros to evaluate);
            # it is subtracted per weight, before summing, so float32 sums never hold the large constant
            at_zero = prior.log_prob(weights[0].new_zeros(()))
            return sum((prior.log_prob(w) - at_zero).sum() for w in weights)
        return sum((prior.log_prob(w) - prior.log_prob(torch.zeros_like(w))).sum() for w in weights)

    def decoder_weight_prior(self) -> None:
        """Normal prior on the decoder weights, as a MAP penalty (:meth:`decoder_weight_log_density`)."""
        penalty = self.decoder_weight_log_density()
        if penalty is not None:
            pyro.factor(self.dims.site("decoder_weight_prior"), penalty)

    def global_sites(self) -> dict[str, torch.Tensor]:
        """Sample every global site (outside the cell plate): counted once per dataset."""
        genes = pyro.plate(self.dims.site("genes"), self.dims.n_genes, dim=-1)  # one plate, entered by each site
        theta = self.sample_dispersion(genes)
        ambient = self.sample_ambient(genes) if self.dims.use_ambient else None
        scaling = self.sample_feature_scaling(genes) if self.dims.use_feature_scaling else None
        library_residual_weight = self.sample_library_residual_weight()
        self.decoder_weight_prior()
        return {"theta": theta, "ambient": ambient, "feature_scaling": scaling,
                "library_residual_weight": library_residual_weight}

    @torch.no_grad()
    def global_values(self, medians: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global values this model decodes with, given the guide's medians (keyed without the site suffix).

        A site the model samples takes its median; a value that a subclass's ``sample_<site>`` sets without sampling
        (e.g. a fixed feature scaling) replaces the guide's, which the model never uses (the getters reported the
        guide's untouched value).
        """
        data = {self.dims.site(name): value for name, value in medians.items()}
        with poutine.block():  # a query's own run of the sites: no outer trace sees it
            trace = poutine.trace(poutine.condition(self.global_sites, data=data)).get_trace()
        used = trace.nodes["_RETURN"]["value"]
        values = dict(medians)
        values.update({name: used[name] for name in ("ambient", "feature_scaling") if used.get(name) is not None})
        fixed_w = used.get("library_residual_weight")
        if self.dims.site("library_residual_weight") not in trace.nodes and fixed_w is not None:  # w fixed by a subclass
            values["library_residual_weight"] = torch.as_tensor(fixed_w, dtype=torch.float32)
        theta = used["theta"]
        # theta fixed by a subclass, or derived otherwise than u^-2 from the same sites: u = theta^-1/2 as the model
        # uses it (the getters reported the guide's u^-2)
        if self.dims.site("inverse_sqrt_theta") not in trace.nodes or not torch.allclose(
                theta, medians["inverse_sqrt_theta"].pow(-2), rtol=1e-5):
            values["inverse_sqrt_theta"] = theta.pow(-0.5)
        return values

    def decode(self, z: torch.Tensor, batch: dict, nn_onehot: torch.Tensor | None = None) -> torch.Tensor:
        """Expression rho = softplus(decoder([z, continuous], nn covariates)) of each cell.

        Parameters
        ----------
        z
            Latent states, cells x latent, or samples x cells x latent.
        batch
            The cells' minibatch (continuous covariates and the decoder's one-hot covariates).
        nn_onehot
            Decoder covariates (cells x one-hot width) used instead of the cells' own, e.g. to
            decode every cell as if it came from one batch or condition.

        Returns
        -------
        torch.Tensor
            rho with z's leading shape and genes last.
        """
        continuous = self.continuous_scaling(batch["continuous"]).expand(*z.shape[:-1], -1)
        covariates = batch.get("nn_onehot") if nn_onehot is None else nn_onehot
        return self.decoder(torch.cat([z, continuous], -1), covariates)

    def decompose_mean(self, z: torch.Tensor, batch: dict, global_values: dict, library: torch.Tensor | None = None,
                       nn_onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two parts of the mean mu: the cell's own counts and the ambient background.

        ``mu = l rho y + l s y``: the cell part ``l_n rho_{n,g} prod_t y_{t(n),g}`` and the
        background part ``l_n sum_e s_{e(n),g} prod_t y_{t(n),g}``; with ``dims.ambient_per_droplet``
        the background part is not scaled by ``l_n``. Their sum is the mean of the likelihood in
        :meth:`local_sites` (up to the floor on the mean).

        Parameters
        ----------
        z, batch, nn_onehot
            As in :meth:`decode`.
        global_values
            ``{"ambient": s, "feature_scaling": y}`` (categories x genes, or None for a term the
            modality lacks), e.g. the guide's :meth:`~RegularizedVIGuide.global_medians`.
        library
            l per cell; default 1 (the shares do not depend on it, unless the background is per droplet).

        Returns
        -------
        tuple of torch.Tensor
            ``(cell_part, background_part)``, genes last: the cell part with z's leading shape, the
            background part cells x genes where it does not depend on z (a per-cell or default
            library; it broadcasts against the cell part), and zero when the modality has no ambient
            term.
        """
        rho = self.decode(z, batch, nn_onehot)
        if library is None:
            library = rho.new_ones(rho.shape[-2])
        scaling, index = global_values.get("feature_scaling"), batch["scaling_index"]
        ambient = global_values.get("ambient")
        soup = background(ambient, batch["ambient_index"]) if ambient is not None else torch.zeros_like(rho)
        if self.dims.ambient_per_droplet:  # the background is not scaled by the library
            scaled = scaling_factor(torch.ones_like(library), scaling, index)
            return rho * library.unsqueeze(-1) * scaled, soup * scaled
        factor = scaling_factor(library, scaling, index)
        return rho * factor, soup * factor

    def local_sites(self, z: torch.Tensor, batch: dict, global_values: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Library size and counts of each cell, given z (call inside the cell plate).

        ``mask`` (per cell) drops the terms of cells without counts in this modality.
        """
        site = self.dims.site
        with poutine.mask(mask=True if mask is None else mask):
            library = pyro.sample(site("library"), self.library_prior(batch))
            rho = self.decode(z, batch)
            mu = expected_counts(
                library, rho, global_values["ambient"], global_values["feature_scaling"], batch["ambient_index"],
                batch["scaling_index"], self.dims.ambient_per_droplet,
            )
            pyro.sample(site("obs"), self.count_distribution(mu, global_values["theta"], batch).to_event(1),
                        obs=batch[self.dims.counts_key])
        return mu

    def library_prior(self, batch: dict) -> dist.LogNormal:
        """p(l_n) = LogNormal(m_p, sqrt(0.5 v_p)) of each cell's library group p."""
        p = batch["library_index"]
        return dist.LogNormal(self.library_prior_loc[p], self.library_prior_scale[p])

    def count_distribution(self, mu: torch.Tensor, theta: torch.Tensor, batch: dict) -> GammaPoissonMean:
        """p(x_n | mu_n) = GammaPoisson(theta_{d(n)}, theta_{d(n)} / mu_n), per cell and gene."""
        # written with its mean (see GammaPoissonMean); theta per dispersion group
        return GammaPoissonMean(mu, theta, *self._count_layout(batch))

    def count_terms(self, theta: torch.Tensor, batch: dict) -> CountTerms | None:
        """The terms of log p(x_n | mu_n) of the minibatch's counts that do not depend on mu, at ``theta``
        (:meth:`GammaPoissonMean.count_terms`): computed once for the draws of z that
        :meth:`~pyro_scmodels.models.regularizedvi_log_density.RegularizedVILogDensity.cell_log_joint` scores at the
        same theta. A subclass whose :meth:`count_distribution` is not a ``GammaPoissonMean`` must override this to
        return None (``cell_log_joint`` then computes every term)."""
        return GammaPoissonMean.count_terms(batch[self.dims.counts_key], theta, *self._count_layout(batch))

    def _count_layout(self, batch: dict) -> tuple:
        """The dispersion group of each cell (None with one group) and the positions of the minibatch's counts."""
        group = batch["dispersion_index"] if self.dims.n_dispersion > 1 else None
        # the minibatch says where its stored counts are (read off the sparse rows), when it knows; they hold the
        # tensor they locate and are used for it alone (an entry edited to a plain tuple is a hint not taken)
        positions = batch.get(self.dims.counts_key + POSITIONS_SUFFIX)
        return group, positions if isinstance(positions, CountPositions) else None

    def check_priors(self, where: str = "model.module.model.priors") -> None:
        """Refuse prior buffers edited to a shape their sites cannot take, or to a value their distribution cannot take
        (NaN, infinite, a negative rate; library prior included): run before each training call and save.

        Parameters
        ----------
        where
            How the user reaches these buffers, for the message.

        Raises
        ------
        ValueError
            Naming the prior, its buffers' shape and the site's shape, or the prior, parameter and value.
        """
        self.priors.check_values(where)
        module = where[: -len(".priors")] if where.endswith(".priors") else where
        for name, positive in (("library_prior_loc", False), ("library_prior_scale", True)):
            buffer = getattr(self, name).detach()
            if not bool((torch.isfinite(buffer) & ((buffer > 0) if positive else True)).all()):
                raise ValueError(f"The library prior's buffer {module}.{name} holds {buffer.reshape(-1).tolist()}: it "
                                 f"must be finite{' and positive' if positive else ''}. It was edited after the model "
                                 "was built: fill it with a valid value, or build a new model.")
        in_use = self.prior_settings()
        # warned, not refused: an edit made after the model was built (or a model saved before the refusal) trains as
        # it would have, with the edit unused
        refuse_replaced_ambient_prior(in_use, self.shaped_ambient, where, warn=True)
        try:
            check_prior_shapes(in_use, self.dims)
        except ValueError as error:
            raise ValueError(f"{error} Its buffers in {where} were edited to that shape after the model was "
                             "built.") from None

    def prior_settings(self) -> PriorsInUse:
        """The priors this model samples from now, read back from its buffers (edits of them included).

        Returns
        -------
        RegularizedPriors
            Rebuilds a model with the same priors (``save`` writes it, ``load`` and resuming compare it).
        """
        flag = self._asked_to_regularize_ambient if self.shaped_ambient else bool(self.regularize_ambient)
        in_use = self.priors.distributions()
        in_use.setdefault("decoder_weight", None)  # no decoder-weight prior
        return PriorsInUse(**in_use, regularize_ambient=flag)

    def forward(self, batch: dict, n_obs: int, kl_weight: float = 1.0):
        refuse_outer_plates(self)
        global_values = self.global_sites()
        x = batch[self.dims.counts_key]
        with pyro.plate("cells", n_obs, subsample=batch["index"]):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([x.shape[0], self.dims.n_latent]).to_event(1))
            counts = self.local_sites(z, batch, global_values)
        self.latent_independence_penalty(z, batch, n_obs)
        return counts

    def latent_independence_penalty(self, z: torch.Tensor, batch: dict, n_obs: int) -> None:
        """-lambda N MMD^2(q(z | category), q(z)) summed over the encoder covariates' categories.

        Not part of the generative model: a penalty (``pyro.factor``) on the z drawn from the
        guide, which makes z carry no information on what the encoder is told (module
        :mod:`pyro_scmodels.independence`). Off (lambda = 0) by default.
        """
        penalty = self.latent_independence_log_factor(z, batch, n_obs)
        if penalty is not None:
            pyro.factor(self.dims.site("latent_independence"), penalty)

    def latent_independence_log_factor(self, z: torch.Tensor, batch: dict, n_obs: int) -> torch.Tensor | None:
        """The factor of :meth:`latent_independence_penalty` (None when off or not applicable)."""
        if self.dims.latent_independence <= 0 or batch.get("encoder_codes") is None:
            return None
        if z.dim() != 2:
            # draws of z with a sample dimension (posterior predictive checks): a penalty on training, not
            # a density of the model, so it has nothing to add to a predictive draw
            return None
        # per cell, like the ELBO's data term: the minibatch statistic times the dataset size
        return -self.dims.latent_independence * n_obs * category_mmd(z, batch["encoder_codes"])

    # --- the ELBO without Pyro's tracing (elbo.ELBOLoss checks it against Trace_ELBO) ---------
    # (global_log_density, log_joint and local_log_density: RegularizedVILogDensity; the declaration stays here, as
    # elbo.declares_direct_elbo reads it from the class's own attributes)
    #: this class's :meth:`log_joint` scores exactly the sites of :meth:`forward` (a subclass that
    #: changes the sites trains with Pyro's Trace_ELBO unless it sets this itself)
    direct_elbo = True
