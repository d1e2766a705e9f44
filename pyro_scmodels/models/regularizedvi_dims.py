"""Sizes and site names of a RegularizedVI model/guide pair (shared by the model, the guide and the queries)."""

from __future__ import annotations

from dataclasses import dataclass

GLOBAL_SITES = ("dispersion_rate", "ambient", "feature_scaling", "library_residual_weight")
#: every global site the guide samples (``GLOBAL_SITES``, whose guide family may be chosen, and the per-gene
#: overdispersion, always LogNormal)
GUIDED_GLOBAL_SITES = ("dispersion_rate", "inverse_sqrt_theta", "ambient", "feature_scaling", "library_residual_weight")
#: the covariate role (a field of ``CovariateKeys``) whose categories index the first axis of
#: each per-gene global site; used to name the categories in tables and exports
SITE_COVARIATE_ROLES = {
    "ambient": "ambient", "feature_scaling": "feature_scaling", "inverse_sqrt_theta": "dispersion",
    "dispersion": "dispersion", "dispersion_rate": "dispersion",
}


@dataclass
class RegularizedVIDims:
    """Sizes of a RegularizedVI module."""

    n_genes: int
    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    n_ambient: int = 1  # stacked ambient categories (sum over ambient keys)
    n_scaling: int = 1  # stacked feature-scaling categories
    n_dispersion: int = 1  # dispersion groups
    n_library: int = 1  # library-prior groups
    n_nn_covariates: int = 0  # one-hot width injected into the decoder
    n_encoder_covariates: int = 0  # one-hot width given to the encoders
    n_continuous: int = 0
    use_ambient: bool = True  # additive ambient background (s)
    use_feature_scaling: bool = True  # multiplicative feature scaling (y)
    n_decoder_latent: int | None = None  # width of the z the decoder reads (default n_latent)
    site_suffix: str = ""  # appended to every site and plate name of this modality ("_rna")
    counts_key: str = "x"  # the minibatch entry holding this modality's counts
    latent_independence: float = 0.0  # weight of the MMD penalty on z across encoder-covariate categories
    ambient_per_droplet: bool = False  # the background as counts per droplet, not scaled by l_n (mu = (l rho + s) y)

    def site(self, name: str) -> str:
        """Name of a site of this modality."""
        return name + self.site_suffix
