"""RegularizedMultimodalVI: paired modalities (e.g. RNA + ATAC) with a joint latent space.

The maths lives in :mod:`.multimodal_module`; each modality is a RegularizedVI block (``build_model_and_guide``),
so priors, guides, covariates and the training loop are the single-modality ones.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .. import _validation as V
from .._stacklevel import user_stacklevel
from ..data import CellData, CovariateEncoding, check_var_names, read_mudata_setup, require_mudata, setup_mudata
from ..data.covariates import warn_if_encoder_keys_leak
from ..priors import RegularizedPriors
from . import ambient as _ambient
from .global_site_tables import ModalitySiteNames
from .likelihood_parameters import likelihood_parameters
from ._base import ModelAndGuide, PyroModelBase
from .model_construction import build_model_and_guide
from .model_settings import shared_settings, without_absent_sites
from .modality_attribution import check_store, modality_attribution
from .multimodal_persistence import MultimodalPersistence
from .multimodal_settings import per_modality_settings, query_modality, refuse_data_as_modality
from .multimodal_module import (LATENT_MODES, WEIGHT_MODES, RegularizedMultimodalVIGuide, RegularizedMultimodalVIModel,
                                has_counts)
from .regularizedvi_guide import RegularizedVIGuide
from .regularizedvi_module import RegularizedVIModel
from .scvi_arguments import MC_SAMPLES, refuse_scvi_arguments, refuses_scvi_arguments
from .unmeasured_categories import warn_categories_without_cells, warn_categories_without_counts
from ..seeding import seeded


@refuse_data_as_modality
class RegularizedMultimodalVI(ModalitySiteNames, MultimodalPersistence, PyroModelBase):
    """RegularizedVI for paired count modalities with a joint latent space.

    Parameters
    ----------
    mdata
        MuData set up with :meth:`setup_mudata`.
    n_hidden, n_latent
        An int, or a dict with one value per modality. In ``"concatenation"`` mode the joint z
        has the modalities' latent blocks in the setup's modality order; the other modes need
        equal sizes.
    n_layers, dropout_rate
        Hidden layers and encoder dropout.
    latent_mode
        ``"concatenation"``, ``"weighted_mean"`` or ``"single_encoder"``.
    modality_weights
        ``weighted_mean`` only: ``"equal"``, ``"universal"`` or ``"cell"``.
    ambient_modalities, feature_scaling_modalities
        Modalities with an ambient background / feature scaling; default ``["rna"]`` and
        ``["atac"]`` (those present).
    priors
        One :class:`~pyro_scmodels.RegularizedPriors` for all modalities, or a dict per modality.
    global_guides, init, seed
        As for :class:`~pyro_scmodels.RegularizedVI`.
    decoder_gene_scale
        Scale each feature's decoder output by its mean normalised expression, as
        ``RegularizedVI(decoder_gene_scale=True)`` does (docs/models.md, "The decoder's scale"): True or False for
        every modality, or a dict with one bool per modality (e.g. ``{"rna": True, "atac": False}``). Each modality
        has its own decoder, and the option was measured on RNA only, so it is given per modality as ``n_hidden``,
        ``n_latent`` and ``priors`` are (one value for all, or a dict); default off for every modality.
    **scvi_arguments
        scvi-tools' ``gene_likelihood``, ``dispersion``, ... raise ``TypeError`` saying what to use instead.
    """

    #: the Pyro modules built; a subclass sets its own (e.g. a block model with an edited site)
    model_class = RegularizedMultimodalVIModel
    guide_class = RegularizedMultimodalVIGuide
    block_model_class = RegularizedVIModel
    block_guide_class = RegularizedVIGuide
    masks_cells_without_counts = True  # a cell without a modality's counts has that modality's terms masked
    importance_ratio_refusal = "its z may be drawn in per-modality parts, which the ratios do not condition on"

    def __init__(self, mdata, n_hidden=128, n_latent=10, n_layers: int = 1, latent_mode: str = "concatenation",
                 modality_weights: str = "equal", ambient_modalities=None, feature_scaling_modalities=None,
                 dropout_rate: float = 0.1, priors=None, global_guides: dict | None = None, init: str = "data",
                 seed: int = 0, decoder_gene_scale=False, _categories: dict | None = None, **scvi_arguments):
        refuse_scvi_arguments(scvi_arguments, "model", type(self).__name__)
        super().__init__()
        latent_mode = V.choice("latent_mode", latent_mode, LATENT_MODES)
        modality_weights = V.choice("modality_weights", modality_weights, WEIGHT_MODES)
        if modality_weights != "equal" and latent_mode != "weighted_mean":
            message = (f"modality_weights={modality_weights!r} weighs the modalities' encoders in "
                       f"latent_mode='weighted_mean' only; latent_mode={latent_mode!r} has no weights to learn.")
            if _categories is None:
                raise ValueError(message)
            warnings.warn(message, UserWarning, stacklevel=user_stacklevel())  # a model saved before the check loads
        shared = shared_settings(n_layers, dropout_rate, global_guides, init, seed, saved=_categories is not None)
        n_layers, dropout_rate, seed = shared["n_layers"], shared["dropout_rate"], shared["seed"]
        self.adata = mdata
        self._setup = setup = read_mudata_setup(mdata)
        self.modalities, self.layers = setup.modalities, setup.layers
        self.keys = setup.keys
        # the encoding fitted at setup; a loaded model's saved categories win (unseen ones then raise)
        self.encoding = setup.encoding(mdata.obs) if _categories is None else CovariateEncoding(self.keys, _categories)
        if _categories is None:  # no penalty keeps encoder-only keys out of z; a subset's setup categories without cells
            warn_if_encoder_keys_leak(self.keys, 0.0)
            warn_categories_without_cells(mdata.obs, self.encoding)
        saved = _categories is not None
        checked = per_modality_settings(self.modalities, n_hidden, n_latent, latent_mode, ambient_modalities,
                                        feature_scaling_modalities, priors, decoder_gene_scale, saved, self.keys)
        hidden, latent, priors = checked["hidden"], checked["latent"], checked["priors"]
        ambient_modalities, scaling_modalities = checked["ambient_modalities"], checked["feature_scaling_modalities"]
        self.var_names = {m: pd.Index(mdata.mod[m].var_names).copy() for m in self.modalities}
        # n_hidden and n_latent as recorded (one value, or the dict in the modalities' order); as given for
        # checkpoints and saves written before (MultimodalPersistence._legacy_settings)
        self._given_sizes = dict(n_hidden=n_hidden, n_latent=n_latent)
        self._init_params = dict(
            n_hidden=checked["n_hidden"], n_latent=checked["n_latent"], n_layers=n_layers, latent_mode=latent_mode,
            modality_weights=modality_weights, ambient_modalities=ambient_modalities,
            feature_scaling_modalities=scaling_modalities, dropout_rate=dropout_rate, priors=priors,
            global_guides=global_guides, init=init, seed=seed,
        )
        if checked["decoder_gene_scale"] is not None:  # left out when off: earlier saves and checkpoints match
            self._init_params["decoder_gene_scale"] = checked["decoder_gene_scale"]
        self.observation_sites = {f"obs_{m}": f"x_{m}" for m in self.modalities}
        self.derived_sites = {f"dispersion_{m}": (f"inverse_sqrt_theta_{m}", lambda u: u.pow(-2)) for m in self.modalities}
        self.latent_mode = latent_mode
        self._data = None
        data = self._cell_data()
        self.unfitted_categories = warn_categories_without_counts(data, self.modalities, ambient_modalities, scaling_modalities)
        joint = sum(latent.values()) if latent_mode == "concatenation" else latent[self.modalities[0]]
        models, guides = {}, {}
        with seeded(seed, "cpu"):  # built on the CPU: no GPU RNG to save (and no CUDA context to start)
            for m in self.modalities:
                models[m], guides[m] = build_model_and_guide(
                    data, priors[m], n_latent=latent[m], n_hidden=hidden[m], n_layers=n_layers, init=init,
                    global_guides=global_guides, dropout_rate=dropout_rate, input_dropout_rate=0.0,
                    key=f"x_{m}", site_suffix=f"_{m}", use_ambient=m in ambient_modalities,
                    use_feature_scaling=m in scaling_modalities, n_decoder_latent=joint,
                    with_z_encoder=latent_mode != "single_encoder",
                    model_class=self.block_model_class, guide_class=self.block_guide_class,
                    decoder_gene_scale=checked["gene_scale"][m],
                )
            model = self.model_class(models, latent, latent_mode)
            guide = self.guide_class(guides, latent, latent_mode, modality_weights, hidden[self.modalities[0]], n_layers,
                                     dropout_rate)
        self.latent_sizes = latent
        self.module = ModelAndGuide(model, guide)

    def _priors_in_use(self) -> dict[str, RegularizedPriors]:
        blocks = {m: self.module.model.block(m) for m in self.modalities}
        return {m: without_absent_sites(block.prior_settings(), block.dims.use_ambient, block.dims.use_feature_scaling)
                for m, block in blocks.items()}

    # --- setup --------------------------------------------------------------------------------
    @classmethod
    def setup_mudata(cls, mdata, modalities=None, layer=None, batch_key=None, ambient_covariate_keys=None,
                     nn_conditioning_covariate_keys=None, feature_scaling_covariate_keys=None, dispersion_key=None,
                     library_size_key=None, encoder_covariate_keys=None, continuous_covariate_keys=None,
                     **scvi_arguments) -> None:
        """Validate ``mdata`` and record the modalities, layers and covariate keys.

        Parameters
        ----------
        mdata
            MuData of raw counts with paired cells; covariates are read from ``mdata.obs``.
        modalities
            Modalities to model, in the order of the latent blocks; default all of ``mdata.mod``.
        layer
            Layer of raw counts: one name for every modality, or a dict per modality; None for ``.X``.
        batch_key, ambient_covariate_keys, ...
            As in :meth:`RegularizedVI.setup_anndata`, shared by all modalities.
        **scvi_arguments
            scvi-tools' ``categorical_covariate_keys``, ``size_factor_key``, ... raise ``TypeError`` saying
            what to use instead.
        """
        refuse_scvi_arguments(scvi_arguments, "setup", f"{cls.__name__}.setup_mudata")
        setup_mudata(
            mdata, modalities, layer, batch_key=batch_key, ambient_covariate_keys=ambient_covariate_keys,
            nn_conditioning_covariate_keys=nn_conditioning_covariate_keys,
            feature_scaling_covariate_keys=feature_scaling_covariate_keys, dispersion_key=dispersion_key,
            library_size_key=library_size_key, encoder_covariate_keys=encoder_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )

    @classmethod
    def load_query_data(cls, *args, **kwargs):
        """Not offered for paired modalities: map RNA with :meth:`RegularizedVI.load_query_data`, or train one model
        on the reference and query cells together."""
        raise NotImplementedError("RegularizedMultimodalVI has no query mapping (scArches) yet: train one model on the "
                                  "reference and the query together, or map the RNA with RegularizedVI.load_query_data.")

    prepare_query_anndata = load_query_data

    def _cell_data(self, adata=None) -> CellData:
        mdata = self.adata if adata is None else adata
        if mdata is self.adata:
            return self._held_cell_data()
        require_mudata(mdata, f"{type(self).__name__} (adata=)")
        for m in self.modalities:
            V.present(m, mdata.mod, "the MuData's modalities (mdata.mod)", "modality")
            check_var_names(self.var_names[m], mdata.mod[m], f"mdata.mod[{m!r}]")
        # new cells: read with the training setup, always validated
        return CellData.from_setup(mdata, encoding=self.encoding, setup=self._setup, validate=True)

    # --- outputs ------------------------------------------------------------------------------
    def default_modality(self, modality: str | None = None) -> str:
        """The modality a per-modality query runs on: ``modality`` (checked), else by default
        the RNA modality (``"rna"``) when the model has one; without one, ``modality=`` is required (ValueError)."""
        return query_modality(self.modalities, modality, type(self).__name__)

    def feature_names(self, modality: str | None = None) -> pd.Index:
        """Names of the features of ``modality`` (default: :meth:`default_modality`)."""
        return self.var_names[self.default_modality(modality)]

    def measured_cells(self, batch: dict, modality: str | None = None):
        """Which cells of a minibatch have counts in ``modality`` (default: :meth:`default_modality`): a boolean per cell."""
        return has_counts(batch, self.module.model.block(self.default_modality(modality)).dims.counts_key)

    def counts_source(self, modality: str | None = None, adata=None) -> tuple:
        """Where the model reads the counts of ``modality`` (default: :meth:`default_modality`): ``(mdata.mod[m], layer)``.

        ``adata``: another MuData with the model's layout (default the training data).
        """
        modality = self.default_modality(modality)
        return (self.adata if adata is None else adata).mod[modality], self.layers.get(modality)

    @refuses_scvi_arguments("query")
    def get_latent_representation(self, modality: str | None = None, adata=None, indices=None,
                                  batch_size: int | None = None, store: bool = False, give_mean: bool = True,
                                  seed: int | None = None, return_dist: bool = False, mc_samples: int = MC_SAMPLES):
        """Posterior mean (or one sample) of the joint z, or of one modality's block / encoder.

        Parameters
        ----------
        modality
            None: the joint z. A modality: its latent block (concatenation) or its own
            encoder's mean (weighted_mean); not available with a single encoder.
        adata, indices, batch_size
            Cells (default the training MuData), minibatch size.
        store
            Also write the result to ``mdata.obsm["X_regularizedmultimodalvi"]`` (or ``..._<modality>``).
        give_mean, seed
            Return the posterior mean; else one posterior sample, seeded by ``seed`` (None: a fresh draw in
            every call, as in :meth:`RegularizedVI.get_latent_representation`).
        return_dist
            Return ``(mean, variance)`` of q(z | x) instead, as scvi-tools does (``store`` is ignored).
        mc_samples
            Taken for scvi-tools' calls and checked, but unused: z is Normal, so its mean is exact.

        Returns
        -------
        numpy.ndarray or tuple
            Cells x latent; with ``return_dist``, a tuple of two such arrays.
        """
        V.positive_int("mc_samples", mc_samples)
        give_mean, return_dist = V.boolean("give_mean", give_mean), V.boolean("return_dist", return_dist)
        check_store(V.boolean("store", store) and not return_dist, indices)
        if modality is not None:
            self.default_modality(modality)
            if self.latent_mode == "single_encoder":
                raise ValueError("latent_mode='single_encoder' has one joint encoder: there is no per-modality latent.")
        if return_dist:
            return self.posterior_z_moments(adata, indices, batch_size, modality=modality)
        if give_mean:
            z = self.posterior_z(adata, indices, batch_size, modality=modality)
        else:
            z = self.posterior_z(adata, indices, batch_size, n_samples=1, seed=seed, modality=modality)[0]
        if store:
            (self.adata if adata is None else adata).obsm["X_regularizedmultimodalvi" + (f"_{modality}" if modality else "")] = z
        return z

    @refuses_scvi_arguments("query")
    def get_normalized_expression(self, modality: str | None = None, adata=None, indices=None, batch_size: int | None = None,
                                  return_numpy: bool | None = None, *, transform_batch=None, gene_list=None,
                                  library_size: str | float | None = None, n_samples: int = 1, return_mean: bool = True,
                                  seed: int | None = None):
        """Background- and scaling-free expression rho of one modality, decoded from the joint z.

        Parameters
        ----------
        modality
            The modality decoded; default: the RNA modality (:meth:`default_modality`).
        adata, indices, batch_size
            Cells (default the training MuData), minibatch size.
        transform_batch, gene_list, library_size, n_samples, return_mean, return_numpy, seed
            As in :meth:`RegularizedVI.get_normalized_expression` (``"latent"`` uses the
            modality's own library size, NaN for a cell without counts in the modality, which has none;
            ``gene_list`` names features of ``modality``).

        Returns
        -------
        pandas.DataFrame or numpy.ndarray
            Cells x features of ``modality``; samples x cells x features when
            ``return_mean=False`` and ``n_samples > 1``.
        """
        modality = self.default_modality(modality)
        return self.normalized_expression(adata, indices, transform_batch, gene_list, library_size, n_samples, batch_size,
                                          return_mean, return_numpy, modality=modality, seed=seed)

    def get_library_size(self, modality: str | None = None, adata=None, indices=None, batch_size: int | None = None) -> np.ndarray:
        """Posterior median of the library size factor of ``modality`` per cell (~1 at a typical cell; NaN for a cell
        without counts in the modality).

        modality: the modality; default: the RNA modality (:meth:`default_modality`)."""
        return self.library_sizes(adata, indices, batch_size, modality=self.default_modality(modality))

    def get_ambient_profile(self, modality: str | None = None) -> pd.DataFrame:
        """Ambient background s of a modality: features x ambient categories.

        modality: a modality of ``ambient_modalities``; default: the RNA modality (:meth:`default_modality`)."""
        modality = self.default_modality(modality)
        if not self.module.guide.block(modality).dims.use_ambient:
            raise ValueError(f"Modality {modality!r} has no ambient background (see ambient_modalities).")
        return self.global_site_table("ambient", modality)

    def get_ambient_fraction(self, modality: str | None = None, adata=None, indices=None, batch_size: int | None = None,
                             summarize_by: str | None = None):
        """Share of each cell's expected counts of a modality that comes from its ambient background.

        As :meth:`RegularizedVI.get_ambient_fraction`, with the joint z decoded by the modality's
        block; ``summarize_by`` names a column of ``mdata.obs``. A cell without counts in the modality (its
        likelihood masked) has NaN, and the summary's statistics and ``n_cells`` are over the measured cells.
        modality: default: the RNA modality (:meth:`default_modality`).
        """
        block = self.default_modality(modality)
        if not self.module.guide.block(block).dims.use_ambient:
            raise ValueError(f"Modality {block!r} has no ambient background (see ambient_modalities).")
        model = self.module.model.block(block)
        return _ambient.ambient_fraction(self, model, model.global_values(self.module.guide.block(block).global_medians()),
                                         adata, indices, batch_size, summarize_by=summarize_by, modality=block)

    def exported_cell_quantities(self, adata=None, batch_size: int | None = None) -> dict:
        """Per-cell results that :meth:`export_posterior` writes to ``.obs``: ``ambient_fraction_<m>`` per ambient modality."""
        return {f"ambient_fraction_{m}": self.get_ambient_fraction(m, adata, batch_size=batch_size)
                for m in self.modalities if self.module.guide.block(m).dims.use_ambient}

    @refuses_scvi_arguments("query")
    def get_likelihood_parameters(self, modality: str | None = None, adata=None, indices=None, n_samples: int = 1,
                                  give_mean: bool = False, batch_size: int | None = None, *, seed: int | None = None) -> dict:
        """Mean and dispersion of one modality's p(x | z) per cell and feature.

        As :meth:`RegularizedVI.get_likelihood_parameters` (scvi-tools' ``get_likelihood_parameters``),
        with the joint z decoded by the modality's block.

        Parameters
        ----------
        modality
            The modality whose likelihood is returned; default: the RNA modality (:meth:`default_modality`).
        adata, indices, batch_size
            As in :meth:`get_latent_representation`.
        n_samples, give_mean
            1: at the posterior mean of the joint z; more: at draws of it, or their mean with
            ``give_mean``.
        seed
            Seeds the draws (None: fresh in every call, as in :meth:`get_latent_representation`).

        Returns
        -------
        dict
            ``"mean"`` (mu, with the modality's background and scaling) and ``"dispersions"`` (theta):
            cells x features, or ``n_samples`` x cells x features.
        """
        modality = self.default_modality(modality)
        return likelihood_parameters(self, self.module.model.block(modality), self.module.guide.block(modality), adata,
                                     indices, n_samples, give_mean, batch_size, seed)

    def get_dispersion(self, modality: str | None = None) -> pd.DataFrame:
        """Dispersion theta of a modality: features x dispersion groups; modality default: the RNA modality
        (:meth:`default_modality`)."""
        return self.global_site_table("dispersion", self.default_modality(modality))

    def get_feature_scaling(self, modality: str = "atac") -> pd.DataFrame:
        """Feature scaling y of a modality: features x scaling categories; modality default: ``"atac"``."""
        if not self.module.guide.block(self.default_modality(modality)).dims.use_feature_scaling:
            raise ValueError(f"Modality {modality!r} has no feature scaling (see feature_scaling_modalities).")
        return self.global_site_table("feature_scaling", modality)

    def get_modality_attribution(self, adata=None, indices=None, batch_size: int | None = None,
                                 store: bool | None = None) -> dict:
        """How much each latent dimension drives each modality's decoder, per cell (SPEC 2).

        For modality m and latent column j: the mean over features of |d rho^(m) / d z_j| at the
        cell's posterior mean z, from exact forward-mode derivatives (``torch.func.jvp``), one
        latent column at a time so memory does not grow with the latent size.

        Returns
        -------
        dict
            ``{modality: {"attribution": cells x latent, "weighted_z": z * attribution}}``, NaN rows for the cells
            without counts in the modality (their z lies where its decoder was never fitted: use ``np.nanmean``); with
            ``store``, also ``mdata.obsm["X_attribution_<m>"]`` and ``["X_weighted_z_<m>"]``. ``store``
            None (default): stored when every cell is asked for; True with ``indices`` is refused.
        """
        return modality_attribution(self, self.module.model, adata, indices, batch_size, store)
