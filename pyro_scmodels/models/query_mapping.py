"""Mapping a query onto a trained reference, scArches-style (``prepare_query_anndata``, ``load_query_data``).

A reference :class:`~pyro_scmodels.RegularizedVI` was trained on some batches; new cells (the
query) come from batches it has not seen. The query model reuses the reference's setup and
everything it learned. Categories of the technical covariates (ambient, feature-scaling,
dispersion and library-size keys) that the reference has not seen become new levels, learned from
the query. Categories of the keys the networks read (``nn_conditioning_covariate_keys``,
``encoder_covariate_keys``) that the reference has not seen get input columns of their own in those
networks, learned from the query. Every other parameter is the reference's and stays fixed: the
decoder, the encoders (unless asked otherwise) and every global site tied to a reference level.

What the query takes from the reference: :class:`~pyro_scmodels.models.query_reference.Reference`. How the
reference is frozen: :mod:`pyro_scmodels.models.query_freezing`; the networks' new columns:
:mod:`pyro_scmodels.models.query_networks`.

Parameters live in the modules (module-local, not in Pyro's global parameter store), so the
reference and the query never share a parameter through its name.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from .. import _validation as V
from .._stacklevel import user_stacklevel
from ..priors import RegularizedPriors
from ..data import check_var_names, read_setup, refuse_mudata, setup_arguments
from ..data.query_genes import align_genes
from ..data.source_state import state_digest
from ..nn import Standardiser, is_legacy_identity_entry
from ..pyro_modules import PositiveSiteGuide
from .query_freezing import freeze_reference
from .query_networks import extend_networks
from .query_reference import Reference
from .regularizedvi_module import SITE_COVARIATE_ROLES
from .scvi_arguments import refuses_scvi_arguments

logger = logging.getLogger(__name__)

#: buffers of the model indexed by library-size group
LIBRARY_PRIOR_BUFFERS = ("model.library_prior_loc", "model.library_prior_scale")


def prepare_query_anndata(adata, reference, model_class, return_reference_var_names: bool = False, inplace: bool = True,
                          prefix: str | None = None):
    """Reorder the query's genes to the reference's, filling the reference's missing genes with zeros.

    Parameters
    ----------
    adata
        The query AnnData (raw counts, in memory).
    reference
        A trained model of ``model_class``, or the folder it was saved to.
    model_class
        The model class (e.g. :class:`~pyro_scmodels.RegularizedVI`).
    return_reference_var_names
        Only return the reference's gene names; ``adata`` is not touched.
    inplace
        Change ``adata`` itself and return None (as scvi-tools); False returns a new AnnData and
        leaves ``adata`` as it was.
    prefix
        The prefix a reference folder was saved with (``save(..., prefix=)``); None: no prefix.

    Returns
    -------
    None, anndata.AnnData or pandas.Index
        None when ``inplace``; else the aligned AnnData; the gene names with
        ``return_reference_var_names``.

    Notes
    -----
    See :func:`pyro_scmodels.data.query_genes.align_genes` for what happens to ``.var``,
    ``.varm``, ``.varp`` and ``.uns``.
    """
    refuse_mudata(adata, f"{model_class.__name__}.prepare_query_anndata")
    return_reference_var_names = V.boolean("return_reference_var_names", return_reference_var_names)
    inplace = V.boolean("inplace", inplace)
    genes = Reference.resolve(reference, model_class, prefix).var_names
    if return_reference_var_names:
        return genes.copy()
    return align_genes(adata, genes, inplace)


# --- categories and per-level rows ------------------------------------------------------------------
def _query_categories(reference: Reference, observed: dict[str, list[str]]) -> tuple[dict, dict]:
    """Category order of the query model and the categories new to the reference, per key.

    Known categories keep the reference's positions (and so their columns of a network's one-hot); new ones
    follow, in the query's order.
    """
    categories, new = {}, {}
    for key in reference.keys.categorical_keys():
        known = list(reference.categories[key])
        unseen = [c for c in observed[key] if c not in known]
        categories[key], new[key] = known + unseen, unseen
    return categories, {k: v for k, v in new.items() if v}


def _refuse_per_category_priors(reference: Reference, new: dict[str, list[str]]) -> None:
    """Refuse new categories of a key whose site has a prior with one row per category of the reference's.

    The query model was refused with the prior's shape against its site's (which the user never built), without
    saying that it is the query's new categories that the prior has no row for.
    """
    priors = reference.init_params.get("priors")
    if not new or not isinstance(priors, RegularizedPriors):
        return
    keys = reference.keys
    sites = {"dispersion_rate": [keys.dispersion] if keys.dispersion else [], "ambient": keys.ambient,
             "feature_scaling": keys.feature_scaling}
    for name, site_keys in sites.items():
        shape = getattr(priors, name).batch_shape
        grown = [key for key in site_keys if key in new]
        if len(shape) == 2 and shape[0] > 1 and grown:
            raise ValueError(
                f"The reference's prior RegularizedPriors.{name} has one row per category ({shape[0]} rows), and the "
                f"query adds categories {new[grown[0]][:5]} of {grown[0]!r}, which it has no row for. Map the query onto "
                f"a reference whose {name} prior is the same for every category (scalar or per-gene parameters), or "
                "give the query's cells categories the reference knows."
            )


def _reference_rows(reference: Reference, categories: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Per covariate role, the reference row of each row of the query's per-level table (-1: a new level)."""
    rows = {}
    for role, keys in reference.role_keys().items():
        if not keys:
            rows[role] = np.zeros(1, dtype=np.int64)  # one shared level, the reference's
            continue
        parts, offset = [], 0
        for key in keys:
            known = reference.categories[key]
            parts += [offset + known.index(c) if c in known else -1 for c in categories[key]]
            offset += len(known)
        rows[role] = np.asarray(parts, dtype=np.int64)
    return rows


def _level_role(key: str, guide) -> str | None:
    """The covariate role indexing the first axis of state-dict entry ``key``; None if not per level."""
    if key in LIBRARY_PRIOR_BUFFERS:
        return "library_size"
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "guide" and isinstance(getattr(guide, parts[1], None), PositiveSiteGuide):
        return SITE_COVARIATE_ROLES.get(parts[1])
    return None


def _transfer_reference_state(module: torch.nn.Module, reference: Reference, rows: dict[str, np.ndarray],
                              extended: dict[str, int]) -> None:
    """Load the reference's parameters into a freshly built query module.

    Per-level tables take the reference's rows for known levels and keep their data-driven
    initial values for new ones; a network weight with columns for new categories (``extended``: key -> how many)
    takes the reference's weight into its other columns; everything else is the reference's.
    """
    fresh = module.state_dict()
    state = {}
    for key, value in fresh.items():
        if key not in reference.state_dict and (Standardiser.is_entry(key) or key.endswith(".output_scale")):
            # a reference saved before the standardiser or the decoder's scale: loading fills them at their identity,
            # as the reference was
            continue
        if key not in reference.state_dict:
            raise ValueError(f"The reference has no {key!r}; it was saved by another version of the model. Retrain it.")
        saved = reference.state_dict[key].to(value.device)
        if key in extended:
            if saved.shape[:-1] != value.shape[:-1] or saved.shape[-1] + extended[key] != value.shape[-1]:
                raise ValueError(f"{key!r} has shape {tuple(saved.shape)} in the reference, which does not fit the query "
                                 f"model's {tuple(value.shape)} less its {extended[key]} columns of new categories.")
            state[key] = saved.clone()  # the network's load hook puts it beside the new columns' initial values
            continue
        role = _level_role(key, module.guide)
        if role is None:
            # a prior's buffer keeps the reference's shape (a per-gene edit beside a scalar partner: PriorSet loads it)
            if saved.shape != value.shape and ".priors." not in key:
                raise ValueError(f"{key!r} has shape {tuple(saved.shape)} in the reference but {tuple(value.shape)} in the query model.")
            state[key] = saved.clone()
            continue
        source = torch.as_tensor(rows[role], device=value.device)
        known = source >= 0
        spliced = value.clone()
        spliced[known] = saved[source[known]]
        if key == "model.library_prior_loc":
            # the query's new groups were centred on the query's mean log total; the library guide
            # keeps the reference's centre, so their prior means are re-expressed relative to it
            spliced[~known] += fresh["guide.log_total_centre"] - reference.state_dict["guide.log_total_centre"].to(value.device)
        state[key] = spliced
    module.load_state_dict(state)


# --- the query model --------------------------------------------------------------------------------
def _check_query(adata, reference: Reference) -> None:
    """The query has the reference's genes, count layer and covariate columns (checked before any work)."""
    try:
        check_var_names(reference.var_names, adata)
    except ValueError as err:
        raise ValueError(f"{err} Or call prepare_query_anndata(adata, reference) first, or pass "
                         "inplace_subset_query_vars=True, to reorder and zero-pad them.") from None
    if reference.layer is not None:
        V.present(reference.layer, adata.layers, "the query's adata.layers (the reference reads its counts there)", "layer")
    for key in [*reference.keys.categorical_keys(), *reference.keys.continuous]:
        V.present(key, adata.obs.columns, "the query's adata.obs (the reference was set up with it)", "column")


def load_query_data(model_class, adata, reference, inplace_subset_query_vars: bool = False, freeze_encoder: bool = True,
                    freeze_decoder: bool = True, freeze_dropout: bool = False, unfrozen: bool = False,
                    prefix: str | None = None):
    """A model of the query cells built on a trained reference (see :meth:`RegularizedVI.load_query_data`).

    Parameters
    ----------
    model_class
        The model class (e.g. :class:`~pyro_scmodels.RegularizedVI`).
    adata
        The query AnnData (raw counts); it is set up here with the reference's layer and keys.
    reference
        A trained model of ``model_class``, or the folder it was saved to. It is not changed.
    inplace_subset_query_vars
        First reorder and zero-pad the query's genes in place (:func:`prepare_query_anndata`).
    freeze_encoder
        Keep the reference's z and library encoders fixed (False: fine-tune them on the query). Their input
        columns for new categories of ``encoder_covariate_keys`` learn either way.
    freeze_decoder
        Keep the reference's decoder fixed (its columns for new categories learn either way).
    freeze_dropout
        Turn dropout off in the query model's encoders.
    unfrozen
        Train every parameter, reference levels included (the other ``freeze_*`` are ignored).
    prefix
        The prefix a reference folder was saved with (``save(..., prefix=)``); None: no prefix.

    Returns
    -------
    RegularizedVI
        The query model, not yet trained on the query: call ``train()``.
    """
    refuse_mudata(adata, f"{model_class.__name__}.load_query_data")
    reference = Reference.resolve(reference, model_class, prefix)
    flags = {name: V.boolean(name, value) for name, value in (
        ("inplace_subset_query_vars", inplace_subset_query_vars), ("freeze_encoder", freeze_encoder),
        ("freeze_decoder", freeze_decoder), ("freeze_dropout", freeze_dropout), ("unfrozen", unfrozen))}
    if not reference.is_trained:
        raise ValueError("The reference model has not been trained; train it (reference.train()) before mapping a query onto it.")
    if reference.init_params.get("ambient_shape_prior") is not None:
        # its amounts per ambient category are parameters of the model, which the freezing of reference levels
        # does not know yet
        raise ValueError("Mapping a query onto a reference trained with ambient_shape_prior is not supported; train the "
                         "reference without it, or train one model on the reference and query cells together.")
    if flags["inplace_subset_query_vars"]:
        align_genes(adata, reference.var_names, inplace=True)
    _check_query(adata, reference)
    model_class.setup_anndata(adata, layer=reference.layer, **setup_arguments(reference.keys.to_dict()))  # validates the counts
    categories, new = _query_categories(reference, read_setup(adata).categories)
    _refuse_per_category_priors(reference, new)
    init_params = dict(reference.init_params)
    if flags["freeze_dropout"]:
        init_params.update(dropout_rate=0.0, input_dropout_rate=0.0)
    # the reference's categories first, then the new ones: the constructor's hook for saved categories
    model = model_class(adata, **init_params, _categories=categories)
    rows = _reference_rows(reference, categories)
    # networks reading a key with new categories: the new categories' columns become parameters of their own
    extended = extend_networks(model.module, reference, categories, new)
    _transfer_reference_state(model.module, reference, rows, extended)
    if not flags["unfrozen"]:
        freeze_reference(model.module, rows, flags["freeze_encoder"], flags["freeze_decoder"])
    frozen = "nothing" if flags["unfrozen"] else ", ".join(
        ["reference rows"] + [part for part in ("encoder", "decoder") if flags[f"freeze_{part}"]]
        + (["reference columns of the networks"] if extended else []))
    model.query_reference = (f"reference {state_digest(reference.state_dict, skip=is_legacy_identity_entry)}; "
                             f"frozen: {frozen}; dropout "
                             f"{'off' if flags['freeze_dropout'] else 'as the reference'}")
    logger.info("Query mapped onto the reference; new levels learned from the query: %s.", new or "none")
    if not any(p.requires_grad for p in model.module.parameters()):
        warnings.warn(
            "The query has no category new to the reference and the encoders and decoder are frozen: nothing is left to "
            "train. The query model is ready to use as is (pass freeze_encoder=False to fine-tune the encoders).",
            stacklevel=user_stacklevel(),
        )
        model.is_trained = True
    return model


# --- the methods a model class offers (scvi-tools' ArchesMixin) ---------------------------------
class QueryMappingMixin:
    """``prepare_query_anndata`` and ``load_query_data`` as classmethods of a model class, as in scvi-tools."""

    @classmethod
    def prepare_query_anndata(cls, adata, reference_model, return_reference_var_names: bool = False, inplace: bool = True,
                              *, prefix: str | None = None):
        """Reorder the query's genes to the reference's; genes it lacks are filled with zeros (with a warning).

        Parameters
        ----------
        adata
            The query AnnData.
        reference_model
            A trained model, or the folder it was saved to (scvi-tools' name and position).
        return_reference_var_names
            Only return the reference's gene names.
        inplace
            Change ``adata`` and return None (as scvi-tools); False returns a new AnnData.
        prefix
            The prefix ``reference_model``'s folder was saved with (``save(dir_path, prefix=...)``); None: no prefix.
            Not in scvi-tools, whose reference folder is read without one.

        Returns
        -------
        None, anndata.AnnData or pandas.Index
            See :func:`pyro_scmodels.models.query_mapping.prepare_query_anndata`.
        """
        return prepare_query_anndata(adata, reference_model, cls, return_reference_var_names, inplace, prefix)

    @classmethod
    @refuses_scvi_arguments("query_mapping")
    def load_query_data(cls, adata, reference_model, inplace_subset_query_vars: bool = False, freeze_encoder: bool = True,
                        freeze_decoder: bool = True, freeze_dropout: bool = False, unfrozen: bool = False, *,
                        prefix: str | None = None) -> "QueryMappingMixin":
        """A model of new cells (the query) built on a trained reference, for ``train()`` on the query.

        The query is set up with the reference's layer and keys. Categories of the ambient,
        feature-scaling, dispersion and library-size keys that the reference has not seen become
        new levels, learned from the query; known categories keep the reference's values. A new
        category of a decoder-conditioning or encoder key gets input columns of its own in the
        networks that read it (scArches), learned from the query. The decoder's and encoders'
        reference weights and every global tied to a reference level stay fixed.

        Parameters
        ----------
        adata
            The query AnnData: raw counts, the reference's genes (see :meth:`prepare_query_anndata`).
        reference_model
            A trained model, or the folder it was saved to; it is not changed (scvi-tools' name and position).
        inplace_subset_query_vars
            First align the query's genes in place, as :meth:`prepare_query_anndata` does.
        freeze_encoder, freeze_decoder
            Keep the reference's encoders (z and library) / decoder fixed; their columns for new categories learn
            either way.
        freeze_dropout
            Turn dropout off in the query model's encoders.
        unfrozen
            Train every parameter, reference levels included.
        prefix
            The prefix ``reference_model``'s folder was saved with (``reference.save(dir_path, prefix=...)``): the
            file read is ``f"{prefix}model.pt"``. None: no prefix. Not in scvi-tools, whose ``load_query_data``
            reads a reference folder without one (there, a prefixed reference is loaded first and passed as a model).

        Returns
        -------
        RegularizedVI
            The query model (see :func:`pyro_scmodels.models.query_mapping.load_query_data`).
        """
        return load_query_data(cls, adata, reference_model, inplace_subset_query_vars, freeze_encoder, freeze_decoder,
                               freeze_dropout, unfrozen, prefix)
