"""The variational distribution of RegularizedVI (SPEC 1.3): amortised for z and l, mean-field for the globals.

Read :meth:`RegularizedVIGuide.forward` next to the model (:mod:`.regularizedvi_module`)::

    q(globals)   point estimates (Delta) or LogNormal factors, one module per site
    q(z_n | x_n) = Normal(encoder(log1p x_n, covariates_n))
    q(l_n | x_n) = LogNormal(w (log total_n - centre) + offset(x_n), scale(x_n))
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from .. import _constants as C
from ..nn import GaussianEncoder, Standardiser
from ..pyro_modules import GUIDE_FAMILIES, LocalPyroModule, PositiveSiteGuide, ProfileAmountGuide, refuse_outer_plates
from .regularizedvi_dims import GLOBAL_SITES, RegularizedVIDims


class RegularizedVIGuide(LocalPyroModule):
    """The variational distribution: amortised for z and l, mean-field for the globals.

    Parameters
    ----------
    dims
        Sizes.
    init
        Initial values: ``ambient`` (categories x genes), ``library_log_total_centre`` (float);
        optionally ``ambient_profile`` (categories x genes): then s = amount x that profile and
        only the amount per category is learned (starting at the total of ``ambient``).
    global_guides
        Guide family per global site: ``"map"`` (default) or ``"lognormal"``.
    dropout_rate, input_dropout_rate
        Encoder dropout after hidden layers and on the input features.
    """

    def __init__(self, dims: RegularizedVIDims, init: dict, global_guides: dict | None = None,
                 dropout_rate: float = 0.1, input_dropout_rate: float = 0.0, with_z_encoder: bool = True):
        super().__init__()
        families = {site: "map" for site in GLOBAL_SITES}
        families.update(global_guides or {})
        unknown = set(families) - set(GLOBAL_SITES)
        if unknown:
            raise ValueError(f"Unknown global site(s) {sorted(unknown)} in global_guides; known: {GLOBAL_SITES}.")
        for site, family in families.items():
            if family not in GUIDE_FAMILIES:
                raise ValueError(f"global_guides[{site!r}] must be one of {GUIDE_FAMILIES}, got {family!r}.")
        self.dims = dims
        n_input = dims.n_genes + dims.n_continuous + dims.n_encoder_covariates
        self.n_input = n_input
        if with_z_encoder:
            self.encoder = GaussianEncoder(n_input, dims.n_latent, dims.n_hidden, dims.n_layers, dropout_rate,
                                           input_dropout_rate, n_dropout_features=dims.n_genes)
        self.library_encoder = GaussianEncoder(n_input, 1, C.LIBRARY_ENCODER_HIDDEN, 1, dropout_rate)
        self.continuous_scaling = Standardiser(dims.n_continuous)  # named as nn.STANDARDISER_NAME
        self.register_buffer("log_total_centre", torch.tensor(float(init["library_log_total_centre"])))
        full = lambda shape, v: torch.full(shape, float(v))  # noqa: E731
        self.dispersion_rate = PositiveSiteGuide(full((dims.n_dispersion, 1), C.INIT_DISPERSION_RATE), families["dispersion_rate"])
        self.inverse_sqrt_theta = PositiveSiteGuide(
            full((dims.n_dispersion, dims.n_genes), C.INIT_THETA**-0.5), "lognormal", C.INIT_DISPERSION_GUIDE_SCALE
        )
        if dims.use_ambient:
            ambient = torch.as_tensor(init["ambient"], dtype=torch.float32)
            if init.get("ambient_profile") is not None:
                if families["ambient"] != "map":
                    raise ValueError("A given ambient profile needs the 'map' guide for 'ambient' (only its amount is learned).")
                # the profile is given (e.g. from empty droplets): only the amount per category is learned
                self.ambient = ProfileAmountGuide(init["ambient_profile"], ambient.sum(-1))
            else:
                self.ambient = PositiveSiteGuide(ambient, families["ambient"])
        if dims.use_feature_scaling:
            self.feature_scaling = PositiveSiteGuide(
                full((dims.n_scaling, dims.n_genes), C.INIT_FEATURE_SCALING), families["feature_scaling"]
            )
        self.library_residual_weight = PositiveSiteGuide(
            torch.tensor(C.INIT_LIBRARY_RESIDUAL_WEIGHT), families["library_residual_weight"]
        )
        #: global sites the model does not sample (a subclass that fixes one): not sampled here either, so that no
        #: guide site goes without a model site (set by build_model_and_guide from a trace of the model)
        self.unsampled_sites = frozenset()
        #: w where a subclass's model fixes it (its ``sample_library_residual_weight`` returns it without sampling);
        #: None: w is sampled, and its guide's median is the point estimate (set by build_model_and_guide)
        self.fixed_library_residual_weight: torch.Tensor | None = None

    def encoder_input(self, batch: dict) -> torch.Tensor:
        """log1p(x), with continuous and encoder covariates appended."""
        parts = [torch.log1p(batch[self.dims.counts_key]), self.continuous_scaling(batch["continuous"])]
        if batch.get("encoder_onehot") is not None:
            parts.append(batch["encoder_onehot"])
        parts = [part for part in parts if part.shape[-1]]
        # without covariates, no concatenation: it would copy the cells x genes input once more
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    # --- posterior queries (no sampling statements: usable outside inference) -----------------
    def z_posterior(self, batch: dict, encoder_input: torch.Tensor | None = None) -> dist.Normal:
        """q(z_n | x_n): the amortised Normal of each cell's latent state (cells x n_latent).

        ``encoder_input`` may be passed when already computed (see :meth:`encoder_input`).
        """
        loc, scale = self.encoder(self.encoder_input(batch) if encoder_input is None else encoder_input)
        return dist.Normal(loc, scale)

    def library_loc(self, batch: dict) -> torch.Tensor:
        """Posterior median of log l_n per cell, at the point estimate (median) of w."""
        return self.log_library_loc(self.encoder_input(batch), batch, self.residual_weight_estimate())[0]

    def residual_weight_estimate(self) -> torch.Tensor:
        """The library residual weight w used outside inference: the value the model fixes, or the guide's median."""
        if self.fixed_library_residual_weight is not None:
            return self.fixed_library_residual_weight.to(self.log_total_centre.device)
        return self.library_residual_weight.median()

    def global_medians(self) -> dict[str, torch.Tensor]:
        """Posterior median (or point estimate) of every global site, by site name (no modality suffix)."""
        # every positive-site guide child, so a subclass's added global site is included too
        return {name: child.median() for name, child in self.named_children() if isinstance(child, PositiveSiteGuide)}

    def global_sites(self) -> torch.Tensor:
        """Guides of the global sites the model samples; returns the library residual weight w."""
        d, site = self.dims, self.dims.site
        sampled = lambda name: name not in self.unsampled_sites  # noqa: E731
        genes = pyro.plate(site("genes"), d.n_genes, dim=-1)
        if sampled("dispersion_rate") or sampled("inverse_sqrt_theta"):
            with pyro.plate(site("dispersion_groups"), d.n_dispersion, dim=-2):
                if sampled("dispersion_rate"):
                    self.dispersion_rate(site("dispersion_rate"))
                if sampled("inverse_sqrt_theta"):
                    with genes:
                        self.inverse_sqrt_theta(site("inverse_sqrt_theta"))
        if d.use_ambient and sampled("ambient"):
            with pyro.plate(site("ambient_categories"), d.n_ambient, dim=-2), genes:
                self.ambient(site("ambient"))
        if d.use_feature_scaling and sampled("feature_scaling"):
            with pyro.plate(site("scaling_categories"), d.n_scaling, dim=-2), genes:
                self.feature_scaling(site("feature_scaling"))
        if sampled("library_residual_weight"):
            return self.library_residual_weight(site("library_residual_weight"))
        return self.residual_weight_estimate()  # the model fixes w: the library guide uses the model's value

    def log_library_loc(self, h: torch.Tensor, batch: dict, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual library guide: w x centred log observed total + a learned correction (loc, scale)."""
        # cells without counts in this modality (masked) get a finite placeholder total of 1
        total = batch[self.dims.counts_key].sum(-1).clamp_min(1.0)
        offset, scale = self.library_encoder(h)
        return w * (total.log() - self.log_total_centre) + offset[..., 0], scale[..., 0]

    def library_posterior(self, h: torch.Tensor, batch: dict, w: torch.Tensor) -> dist.LogNormal:
        """q(l_n | x_n): LogNormal of each cell's library size (see :meth:`log_library_loc`)."""
        return dist.LogNormal(*self.log_library_loc(h, batch, w))

    def library_site(self, h: torch.Tensor, batch: dict, w: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Sample the library size of each cell (call inside the cell plate)."""
        q_library = self.library_posterior(h, batch, w)
        with poutine.mask(mask=True if mask is None else mask):
            pyro.sample(self.dims.site("library"), q_library)

    def forward(self, batch: dict, n_obs: int, kl_weight: float = 1.0):
        refuse_outer_plates(self)
        w = self.global_sites()
        h = self.encoder_input(batch)  # shared by the z and library encoders
        with pyro.plate("cells", n_obs, subsample=batch["index"]):
            q_z = self.z_posterior(batch, h)
            with poutine.scale(scale=kl_weight):
                pyro.sample("z", q_z.to_event(1))
            self.library_site(h, batch, w)
        return q_z.loc

    # --- the ELBO without Pyro's tracing (elbo.ELBOLoss checks it against Trace_ELBO) ---------
    #: this class's :meth:`draw` draws exactly the sites of :meth:`forward`, in the same order
    direct_elbo = True

    def draw(self, batch: dict, n_obs: int, kl_weight: float = 1.0, local_factor: float = 1.0) -> tuple[dict, torch.Tensor]:
        """One draw of every site from q and log q of the draw, each site weighted as ``Trace_ELBO`` weights it.

        The values and the sum that a trace of :meth:`forward` holds (its ``log_prob_sum()``),
        computed without Pyro's effect handlers. The random numbers are drawn in the same order
        as in :meth:`forward`, so the same seed gives the same draw.

        Parameters
        ----------
        batch, n_obs, kl_weight
            As in :meth:`forward`.
        local_factor
            Extra weight of the cell plate's terms (a data-parallel shard).

        Returns
        -------
        tuple
            ``(values, log_q)``: site name (without the modality suffix) -> value, for
            :meth:`~pyro_scmodels.models.regularizedvi_module.RegularizedVIModel.log_joint`, and a scalar.
        """
        values, log_q = self.draw_globals()
        h = self.encoder_input(batch)
        q_z = self.z_posterior(batch, h)
        values["z"] = q_z.rsample()
        cells = local_factor * n_obs / values["z"].shape[0]  # the cell plate's subsampling
        log_q = log_q + kl_weight * cells * q_z.log_prob(values["z"]).sum()
        q_library = self.library_posterior(h, batch, values["library_residual_weight"])
        values["library"] = q_library.rsample()
        return values, log_q + cells * q_library.log_prob(values["library"]).sum()

    def draw_globals(self) -> tuple[dict, torch.Tensor]:
        """The global sites' draws and their log q, in the order of :meth:`global_sites` (see :meth:`draw`)."""
        values, log_q = {}, 0.0
        names = ["dispersion_rate", "inverse_sqrt_theta"] + ["ambient"] * self.dims.use_ambient
        names += ["feature_scaling"] * self.dims.use_feature_scaling + ["library_residual_weight"]
        for name in names:
            values[name], site_log_q = getattr(self, name).draw()
            log_q = log_q + site_log_q
        return values, log_q
