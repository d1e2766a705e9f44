"""The model and guide of one modality's counts, built from the data they will be fitted to (SPEC 1.3).

RegularizedVI builds one pair, RegularizedMultimodalVI one per modality; both take their sizes from the
data (genes, covariate categories) and their initial values from it (the ambient background, the library
prior, the decoder's output bias).
"""

from __future__ import annotations

import numpy as np
import pyro
import torch
from pyro import poutine

from .. import _constants as C
from ..data import CellData
from ..priors import RegularizedPriors
from ..seeding import seeded
from ..non_finite_checks import require_float32_default
from .regularizedvi_dims import GUIDED_GLOBAL_SITES, RegularizedVIDims
from .regularizedvi_guide import RegularizedVIGuide
from .regularizedvi_module import RegularizedVIModel


def build_model_and_guide(data: CellData, priors: RegularizedPriors, n_latent: int, n_hidden: int, n_layers: int, init: str,
                 global_guides: dict | None, dropout_rate: float, input_dropout_rate: float, key: str = "x",
                 site_suffix: str = "", use_ambient: bool = True, use_feature_scaling: bool = True,
                 n_decoder_latent: int | None = None, with_z_encoder: bool = True, latent_independence: float = 0.0,
                 model_class=RegularizedVIModel, guide_class=RegularizedVIGuide, ambient_profile=None,
                 ambient_per_droplet: bool = False, ambient_shape_prior: float | None = None,
                 decoder_gene_scale: bool = False):
    """The model and guide of one modality's counts, with data-driven initial values (SPEC 1.3).

    Used by RegularizedVI (one pair) and RegularizedMultimodalVI (one pair per modality, with
    ``key``, ``site_suffix`` and the joint latent width ``n_decoder_latent``).

    Parameters
    ----------
    data
        The cells (:class:`~pyro_scmodels.data.CellData`); ``key`` names the counts used.
    priors
        The priors of this modality.
    n_latent, n_hidden, n_layers, dropout_rate, input_dropout_rate, global_guides
        Sizes and guide settings, as in :class:`~pyro_scmodels.RegularizedVI`.
    init
        ``"data"``: ambient at 0.2 x the per-category mean normalised expression; ``"prior"``:
        at the prior mean.
    use_ambient, use_feature_scaling
        Whether this modality has the ambient and feature-scaling terms.
    with_z_encoder
        Whether the guide has its own z encoder (not with a joint encoder).
    latent_independence
        Weight of the penalty on the dependence of z on the encoder covariates (0: off).
    model_class, guide_class
        Subclasses to build instead (a modeller's edited model or guide).
    ambient_profile
        None, or a known ambient profile per category (categories x genes, e.g. from empty
        droplets): the background keeps that shape and only its amount is learned.
    ambient_per_droplet
        The background as counts per droplet, not scaled by the library size.
    ambient_shape_prior
        None, or the concentration a of the prior ``s_{e,g} ~ Gamma(a, a / (m_e p_g))`` centred on the
        pooled cells' profile p (the mean normalised expression), with the amounts m_e learned.
    decoder_gene_scale
        The decoder's output scaled per gene by its mean normalised expression (:class:`~pyro_scmodels.nn.SoftplusDecoder`).

    Returns
    -------
    tuple
        ``(model, guide)``.
    """
    require_float32_default()
    matrix = data.modalities[key]
    dims = RegularizedVIDims(
        n_genes=matrix.n_features, n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers,
        n_ambient=data.n_ambient, n_scaling=data.n_scaling, n_dispersion=data.n_dispersion,
        n_library=data.n_library, n_nn_covariates=data.n_nn_covariates,
        n_encoder_covariates=data.n_encoder_covariates, n_continuous=data.n_continuous,
        use_ambient=use_ambient, use_feature_scaling=use_feature_scaling, n_decoder_latent=n_decoder_latent,
        site_suffix=site_suffix, counts_key=key, latent_independence=float(latent_independence),
        ambient_per_droplet=bool(ambient_per_droplet),
    )
    library_loc, library_variance, centre = data.library_prior(key=key)
    if init == "data":
        n_keys = max(1, len(data.encoding.keys.ambient))
        ambient = C.INIT_AMBIENT_FRACTION * data.stacked_normalised_means("ambient_index", data.n_ambient, key) / n_keys
        ambient = np.maximum(ambient, C.INIT_AMBIENT_FLOOR)
    else:
        # the prior's mean, broadcast to categories x genes (a prior may have per-gene or per-category parameters)
        ambient = np.broadcast_to(priors.ambient.mean.detach().cpu().numpy(), (data.n_ambient, matrix.n_features)).copy()
        if not np.isfinite(ambient).all():  # e.g. a HalfCauchy: training would stop at its first step
            raise ValueError(f"init='prior' starts the background at the ambient prior's mean, and "
                             f"{type(priors.ambient).__name__}'s mean is not finite; use init='data' or a prior with a "
                             "finite mean.")
    shape_prior = None
    if ambient_shape_prior is not None and use_ambient:
        # the pooled cells' profile, and amounts that start where the initial s starts
        # (a gene without counts gets the floor the initial s has, so that its prior rate stays finite)
        shape = np.maximum(data.normalised_means(key)[0], C.INIT_AMBIENT_FLOOR)
        shape_prior = (float(ambient_shape_prior), shape, np.asarray(ambient).sum(-1))
    model = model_class(dims, priors, library_loc, library_variance,
                        **({} if shape_prior is None else {"ambient_shape_prior": shape_prior}))
    init_values = {"ambient": ambient, "library_log_total_centre": centre, "ambient_profile": ambient_profile}
    guide = guide_class(dims, init_values, global_guides, dropout_rate, input_dropout_rate, with_z_encoder)
    model.decoder.init_output(torch.as_tensor(data.normalised_means(key)[0], dtype=torch.float32),
                              gene_scaled=decoder_gene_scale)
    for module in (model, guide):  # the continuous covariates standardised as the training cells are
        module.continuous_scaling.fit(data.covariates["continuous"])
    guide.unsampled_sites = unsampled_global_sites(model)
    if "library_residual_weight" in guide.unsampled_sites:  # fixed by a subclass: the library guide uses that value
        guide.fixed_library_residual_weight = fixed_library_residual_weight(model)
    return model, guide


def fixed_library_residual_weight(model) -> torch.Tensor:
    """The value of w that a subclass's ``sample_library_residual_weight`` fixes (what it returns), checked."""
    with pyro.settings.context(module_local_params=True), torch.no_grad(), seeded(0, "cpu"):
        value = poutine.block(model.global_sites, hide_types=["param"])()["library_residual_weight"]
    if value is None or not torch.is_tensor(torch.as_tensor(value)) or torch.as_tensor(value).numel() != 1:
        raise ValueError(f"{type(model).__name__}.sample_library_residual_weight samples no site, so it fixes w: it must "
                         f"return that value (one positive number, e.g. torch.tensor(0.5)); it returned {value!r}.")
    return torch.as_tensor(value, dtype=torch.float32).detach().reshape(())


def unsampled_global_sites(model) -> frozenset:
    """The guide's global sites (:data:`GUIDED_GLOBAL_SITES`) that ``model.global_sites`` does not sample: those a
    subclass fixes.

    Found by running the model's global sites once from their priors, outside inference.
    """
    # draws from the priors, on a forked random state: building a model leaves the seeded stream as it was
    with pyro.settings.context(module_local_params=True), torch.no_grad(), seeded(0, "cpu"):
        trace = poutine.trace(poutine.block(model.global_sites, hide_types=["param"])).get_trace()
    sampled = {name for name, node in trace.nodes.items() if node["type"] == "sample"}
    return frozenset(name for name in GUIDED_GLOBAL_SITES if model.dims.site(name) not in sampled)
