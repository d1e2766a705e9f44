"""RegularizedVI: the user-facing class (AnnData in, results out).

The maths lives in :mod:`.regularizedvi_module`; this class sets up the data, builds the
model/guide pair with data-driven initial values, and returns results as arrays and
DataFrames aligned with the AnnData. Its save and load: :mod:`.regularizedvi_persistence`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import _validation as V
from ..data import CellData, CovariateEncoding, check_var_names, read_setup, refuse_mudata, setup_anndata
from ..data.counts import EmptyCellsError
from ..data.covariates import warn_if_encoder_keys_leak
from ..priors import RegularizedPriors
from . import ambient as _ambient
from .ambient import AmbientQueries
from ._base import ModelAndGuide, PyroModelBase
from .likelihood_parameters import likelihood_parameters
from .model_construction import build_model_and_guide
from .model_settings import regularizedvi_settings
from .query_mapping import QueryMappingMixin
from .regularizedvi_guide import RegularizedVIGuide
from .regularizedvi_module import RegularizedVIModel
from .regularizedvi_persistence import RegularizedVIPersistence
from .scvi_arguments import MC_SAMPLES, refuse_scvi_arguments, refuses_scvi_arguments
from .unmeasured_categories import warn_categories_without_cells


class RegularizedVI(QueryMappingMixin, AmbientQueries, RegularizedVIPersistence, PyroModelBase):
    """scVI with an ambient background, feature scaling and a containment prior on dispersion.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata`.
    n_hidden, n_latent, n_layers
        Width of hidden layers, latent dimensions, hidden layers (encoder and decoder).
    dropout_rate
        Encoder dropout after each hidden layer.
    input_dropout_rate
        Probability of masking each gene of the encoder input (0: off).
    priors
        A :class:`~pyro_scmodels.RegularizedPriors`; default the SPEC priors. The model keeps its own
        copy (the buffers of its Pyro modules, e.g. ``model.module.model.priors.ambient__rate``): later edits
        of the object passed change nothing; edits of the buffers are trained with, and :attr:`priors` reads
        them back.
    global_guides
        Guide family per global site, e.g. ``{"ambient": "lognormal"}``; default point
        estimates (``"map"``) for ``dispersion_rate``, ``ambient``, ``feature_scaling`` and
        ``library_residual_weight``.
    init
        ``"data"``: ambient starts at 0.2 x the per-category mean normalised expression;
        ``"prior"``: at the prior mean.
    ambient_profile
        A known ambient profile (genes x ambient categories DataFrame, e.g. from empty droplets
        with :func:`pyro_scmodels.models.ambient.profile_from_droplets`): the background keeps
        that shape and only its amount per category is learned. Default None: s is learned
        gene by gene.
    latent_independence
        Weight lambda of a penalty ``lambda N MMD^2`` that makes the posterior of z the same in
        every category of each ``encoder_covariate_keys`` column (module
        :mod:`pyro_scmodels.independence`); 0 (default) is off. Told a covariate, the encoder can
        still write it into z; for model-based counterfactuals (``NDreamer.from_model``, the
        basal-state design) use 10, which on the simulator kept the decoded effect unshrunk
        whatever the network width (docs/ndreamer_model_route.md).
    ambient_per_droplet
        False (default, the SPEC's and regularizedvi's mean ``mu = l (rho + s) y``): the background
        grows with the cell's library size, so its share is about the same for every cell of a
        category. True: ``mu = (l rho + s) y``, the background is counts per droplet (as CellBender
        models it), a cell with more RNA carries a smaller share, and the split between rho and s is
        informed by how counts grow with l (docs/ambient.md, "The background per droplet").
    ambient_shape_prior
        None (default), or a concentration a > 0: the prior ``s_{e,g} ~ Gamma(a, a / (m_e p_g))`` is
        counted, centred on the pooled cells' profile p (mean normalised expression) at an amount m_e
        per ambient category that is learned (a point estimate, no prior). Every gene's s is still
        learned; the prior places the part of the background that the likelihood cannot tell from
        rho (docs/ambient.md; with ``ambient_per_droplet=True``, a = 3 recovered the simulator's shares best
        of 1, 3, 10 and 30). Not with ``ambient_profile``.
    decoder_gene_scale
        False (default, SPEC 1.2): ``rho = softplus(W h + b)``, the bias starting at softplus^-1 of each gene's mean
        normalised expression. True: ``rho_g = m_g softplus(W h + b)_g / log 2`` with m_g that mean (a buffer) and
        the bias starting at 0, so that the decoder's output moves in units of each gene's own level. On the
        simulator a 3-fold stimulation response inside a cell type, which the plain softplus decoder did not
        represent at the default learning rate (slope of the model's fold change on the truth 0.01-0.06), was
        recovered (1.0-1.2; docs/models.md, "The decoder's scale").
    seed
        Seeds the initial network weights.
    **scvi_arguments
        scvi-tools' ``gene_likelihood``, ``dispersion``, ``latent_distribution``, ... raise ``TypeError``
        saying what this model does instead.

    Examples
    --------
    >>> RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    >>> model = RegularizedVI(adata)
    >>> model.train()
    >>> adata.obsm["X_regularizedvi"] = model.get_latent_representation()
    """

    model_class = RegularizedVIModel
    guide_class = RegularizedVIGuide
    derived_sites = {"dispersion": ("inverse_sqrt_theta", lambda u: u.pow(-2))}

    def __init__(self, adata, n_hidden: int = 128, n_latent: int = 10, n_layers: int = 1, dropout_rate: float = 0.1,
                 input_dropout_rate: float = 0.0, priors: RegularizedPriors | None = None, global_guides: dict | None = None,
                 init: str = "data", seed: int = 0, ambient_profile: pd.DataFrame | None = None,
                 latent_independence: float = 0.0, ambient_per_droplet: bool = False,
                 ambient_shape_prior: float | None = None, decoder_gene_scale: bool = False,
                 _categories: dict | None = None, **scvi_arguments):
        refuse_scvi_arguments(scvi_arguments, "model", type(self).__name__)
        refuse_mudata(adata, type(self).__name__)  # it said the data were not set up
        super().__init__()
        self._init_params = regularizedvi_settings(
            n_hidden, n_latent, n_layers, dropout_rate, input_dropout_rate, priors, global_guides, init, seed,
            latent_independence, ambient_per_droplet, ambient_shape_prior, ambient_profile, saved=_categories is not None,
            decoder_gene_scale=decoder_gene_scale)
        settings = {**self._init_params}
        priors = settings.pop("priors")
        self.adata = adata
        self._setup = read_setup(adata)
        self.layer, self.keys = self._setup.layer, self._setup.keys
        if settings.get("latent_independence", 0) > 0 and not self.keys.encoder:
            raise ValueError(f"latent_independence={latent_independence:g} makes z independent of the encoder covariates, "
                             "but the model was set up without any: pass encoder_covariate_keys=[...] (e.g. the "
                             "condition) to setup_anndata, or leave latent_independence at 0.")
        if _categories is None:  # built anew (a loaded model said so when it was built)
            warn_if_encoder_keys_leak(self.keys, settings.get("latent_independence", 0.0))
        # the encoding fitted at setup; a loaded model's saved categories win (unseen ones then raise)
        self.encoding = self._setup.encoding(adata.obs) if _categories is None else CovariateEncoding(self.keys, _categories)
        if _categories is None:
            warn_categories_without_cells(adata.obs, self.encoding)
        self.var_names = pd.Index(adata.var_names).copy()
        if ambient_profile is not None:
            settings["ambient_profile"] = _ambient.profile_matrix(ambient_profile, self.var_names,
                                                                  self.encoding.level_names(list(self.keys.ambient or [])))
        self._data = None
        data = self._cell_data()
        with torch.random.fork_rng(devices=[]):  # built on the CPU: no GPU RNG to save (and no CUDA context to start)
            torch.manual_seed(settings.pop("seed"))
            model, guide = build_model_and_guide(data, priors, model_class=self.model_class,
                                                 guide_class=self.guide_class, **settings)
        self.dims = model.dims
        self.module = ModelAndGuide(model, guide)

    def _priors_in_use(self) -> RegularizedPriors:
        return self.module.model.prior_settings()

    # --- setup --------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(cls, adata, layer: str | None = None, batch_key: str | None = None,
                      ambient_covariate_keys: list[str] | None = None,
                      nn_conditioning_covariate_keys: list[str] | None = None,
                      feature_scaling_covariate_keys: list[str] | None = None, dispersion_key: str | None = None,
                      library_size_key: str | None = None, encoder_covariate_keys: list[str] | None = None,
                      continuous_covariate_keys: list[str] | None = None, **scvi_arguments) -> None:
        """Validate ``adata`` and record which layer and ``.obs`` columns the model reads.

        Parameters
        ----------
        adata
            AnnData of raw counts (cells x genes).
        layer
            Layer holding the raw counts; None for ``adata.X``.
        batch_key
            Shortcut: ``ambient_covariate_keys=[batch_key]``, ``dispersion_key=batch_key``,
            ``library_size_key=batch_key``. It clashes only with those three keys (``ValueError``
            naming the clash) and combines with every other key, e.g. with
            ``nn_conditioning_covariate_keys=["donor"]``. Unlike scvi-tools' one ``batch_key``,
            each technical effect has its own purpose-specific key here. To integrate batches, add
            ``nn_conditioning_covariate_keys=[batch_key]``: with ``batch_key`` alone the decoder is
            batch-free and the feature scaling global, so a per-gene batch effect stays in z
            (docs/models.md, "Integrating batches").
        ambient_covariate_keys
            Columns whose categories each get an additive ambient profile.
        nn_conditioning_covariate_keys
            Columns injected (one-hot) into every decoder hidden layer.
        feature_scaling_covariate_keys
            Columns whose categories each get a multiplicative per-gene factor (multiplied
            across keys). Default (None): the ``nn_conditioning_covariate_keys`` when those are
            given, as in the public regularizedvi; otherwise, and with ``[]``, a single factor
            for all cells.
        dispersion_key
            Column whose categories each get their own dispersion theta and rate lambda.
        library_size_key
            Column whose categories each get their own library-size prior.
        encoder_covariate_keys
            Columns given (one-hot) to the encoders. A key the decoder does not see can leak
            into z (a warning says so). A key also in ``nn_conditioning_covariate_keys`` is the
            basal-state design: told the key, the encoder can leave its effect out of z and the
            decoder adds it back; the model-based counterfactual
            (:meth:`~pyro_scmodels.NDreamer.estimate_model_ite`) needs the condition there.
        continuous_covariate_keys
            Numeric columns appended to the encoder input and to z for the decoder, each standardised by
            the mean and standard deviation over the model's cells (kept with the model: a loaded or query
            model standardises its cells the same way).
        **scvi_arguments
            scvi-tools' ``categorical_covariate_keys``, ``size_factor_key`` or ``labels_key`` raise
            ``TypeError`` saying what to use instead.
        """
        refuse_scvi_arguments(scvi_arguments, "setup", f"{cls.__name__}.setup_anndata")
        setup_anndata(
            adata, layer, batch_key=batch_key, ambient_covariate_keys=ambient_covariate_keys,
            nn_conditioning_covariate_keys=nn_conditioning_covariate_keys,
            feature_scaling_covariate_keys=feature_scaling_covariate_keys, dispersion_key=dispersion_key,
            library_size_key=library_size_key, encoder_covariate_keys=encoder_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )

    def _cell_data(self, adata=None) -> CellData:
        if adata is None or adata is self.adata:
            return self._held_cell_data()
        refuse_mudata(adata, f"{type(self).__name__} (adata=)")  # it failed deep in the setup ("'NoneType' is not iterable")
        if not hasattr(adata, "obs") or not hasattr(adata, "var_names"):
            raise TypeError(f"adata= must be an AnnData, got a {type(adata).__name__}.")
        check_var_names(self.var_names, adata)
        try:  # new cells: read with the training setup, always validated
            return CellData.from_setup(adata, encoding=self.encoding, setup=self._setup, validate=True)
        except EmptyCellsError as error:
            names = ", ".join(map(repr, adata.obs_names[error.rows[:3]])) + (", ..." if len(error.rows) > 3 else "")
            raise ValueError(
                f"The adata passed to this query has {len(error.rows)} cell(s) with zero total counts in {error.name} "
                f"({names}; rows {error.rows[:3].tolist()}{', ...' if len(error.rows) > 3 else ''}): the model cannot "
                f"place a cell without counts. Pass the cells with counts, e.g. adata=adata[np.asarray("
                f"{error.name}.sum(axis=1)).ravel() > 0].") from None

    # --- outputs ------------------------------------------------------------------------------
    @refuses_scvi_arguments("query")
    def get_latent_representation(self, adata=None, indices=None, give_mean: bool = True,
                                  mc_samples: int = MC_SAMPLES, batch_size: int | None = None, return_dist: bool = False,
                                  seed: int | None = None):
        """Posterior mean (or one sample) of z per cell, or the mean and variance of q(z | x).

        Parameters
        ----------
        adata
            AnnData with the model's genes and known categories; default the training data.
        indices
            Cells to use (integer positions or a boolean mask); default all.
        give_mean
            Return the posterior mean; else one posterior sample.
        mc_samples
            Taken for scvi-tools' calls (same position) and checked, but unused: z is Normal, so its
            posterior mean is exact (scvi-tools samples only for its log-normal latent).
        batch_size
            Cells per minibatch.
        return_dist
            Return ``(mean, variance)`` of q(z | x), as scvi-tools does.
        seed
            Seeds the sample when ``give_mean=False``: the same seed gives each cell the same draw. None (the
            default): a fresh draw in every call, from torch's global stream, as in scvi-tools
            (``torch.manual_seed`` repeats it).

        Returns
        -------
        numpy.ndarray or tuple
            Cells x ``n_latent``; with ``return_dist``, a tuple of two such arrays.
        """
        V.positive_int("mc_samples", mc_samples)
        give_mean, return_dist = V.boolean("give_mean", give_mean), V.boolean("return_dist", return_dist)
        if return_dist:
            return self.posterior_z_moments(adata, indices, batch_size)
        if give_mean:
            return self.posterior_z(adata, indices, batch_size)
        return self.posterior_z(adata, indices, batch_size, n_samples=1, seed=seed)[0]

    def get_library_size(self, adata=None, indices=None, batch_size: int | None = None) -> np.ndarray:
        """Posterior median of the library size factor l per cell.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_latent_representation`.

        Returns
        -------
        numpy.ndarray
            One value per cell, relative to a typical cell (~1).
        """
        return self.library_sizes(adata, indices, batch_size)

    @refuses_scvi_arguments("query")
    def get_normalized_expression(
        self, adata=None, indices=None, transform_batch=None, gene_list=None, library_size: str | float | None = None,
        n_samples: int = 1, batch_size: int | None = None, return_mean: bool = True, return_numpy: bool | None = None,
        seed: int | None = None,
    ):
        """Background-free, scaling-free expression rho = softplus(decoder(z)) per cell and gene.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_latent_representation`.
        transform_batch
            Decode every cell as if it had this category of the decoder-conditioning key
            (``nn_conditioning_covariate_keys``); a list of categories averages over them (at a number
            ``library_size``, the rescaled decodings are averaged, as scvi-tools does); a dict
            ``{key: category}`` when several keys condition the decoder (a list of such dicts averages
            over them; a list whose entries switch different keys is refused). Only those keys enter
            rho: the ambient, scaling, dispersion and library-size groups are left out of rho
            anyway, so with an unconditioned decoder this changes nothing (and warns).
        gene_list
            Return only these genes (rescaling by ``library_size`` still uses every gene).
        library_size
            None (default): rho itself, counts at a typical library size. ``"latent"``: rho times
            the cell's inferred library size. A number: rho rescaled to sum to it per cell.
            scvi-tools' default is ``library_size=1`` (proportions summing to 1); pass it for that.
        n_samples
            Posterior samples of z to decode (1: decode the posterior mean, where scvi-tools
            decodes one sample).
        return_mean
            Average over the samples; ``False`` with ``n_samples > 1`` returns every sample.
        return_numpy
            Return an array instead of a DataFrame.
        seed
            Seeds the samples of z when ``n_samples > 1`` (None, the default: fresh draws in every call,
            as for :meth:`get_latent_representation`).

        Returns
        -------
        pandas.DataFrame or numpy.ndarray
            Cells x genes; ``n_samples`` x cells x genes (an array) when ``return_mean=False``
            and ``n_samples > 1``, as in scvi-tools.
        """
        return self.normalized_expression(adata, indices, transform_batch, gene_list, library_size, n_samples, batch_size,
                                          return_mean, return_numpy, seed=seed)

    @refuses_scvi_arguments("query")
    def get_likelihood_parameters(self, adata=None, indices=None, n_samples: int = 1, give_mean: bool = False,
                                  batch_size: int | None = None, *, seed: int | None = None) -> dict:
        """Mean and dispersion of p(x | z) per cell and gene, as scvi-tools' ``get_likelihood_parameters``.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_latent_representation`.
        n_samples, give_mean
            1: at the posterior mean of z (as :meth:`get_normalized_expression`); more: at draws of z
            (fresh in every call, as in scvi-tools), or their mean with ``give_mean``
            (:func:`~pyro_scmodels.models.likelihood_parameters.likelihood_parameters`).
        seed
            Seeds the draws: the same seed gives each cell the same draws (None: fresh in every call).

        Returns
        -------
        dict
            ``"mean"`` (mu, background and scaling included) and ``"dispersions"`` (theta).
        """
        return likelihood_parameters(self, self.module.model, self.module.guide, adata, indices, n_samples, give_mean,
                                     batch_size, seed)

    def get_dispersion(self) -> pd.DataFrame:
        """Dispersion theta = u^-2 (posterior median; large theta is near Poisson).

        Returns
        -------
        pandas.DataFrame
            Genes x dispersion groups.
        """
        return self.global_site_table("dispersion")

    def get_feature_scaling(self) -> pd.DataFrame:
        """Feature scaling y (posterior median), a multiplicative per-gene factor.

        Returns
        -------
        pandas.DataFrame
            Genes x scaling categories (``"all"`` without scaling keys).
        """
        return self.global_site_table("feature_scaling")
