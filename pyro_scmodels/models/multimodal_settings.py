"""The per-modality settings of :class:`~pyro_scmodels.RegularizedMultimodalVI`, checked once its modalities are
known (from the MuData's setup), before any block is built."""

from __future__ import annotations

import copy
import functools
import inspect

from .. import _validation as V
from ..data.mudata_registry import per_modality
from ..priors import RegularizedPriors, checked_priors, warn_unused_ambient_prior
from .model_settings import refuse_priors_of_absent_sites

#: the modality names that mark RNA and ATAC: the defaults of ``ambient_modalities`` and ``feature_scaling_modalities``,
#: and (RNA) the modality a query runs on when it names none
RNA_MODALITY, ATAC_MODALITY = "rna", "atac"


def query_modality(modalities: list[str], modality, model_name: str) -> str:
    """The modality a per-modality query of a multimodal model runs on: ``modality``, or by default the RNA one.

    One rule for every query (expression, DE, predictive draws, likelihood parameters, feature correlation, ...),
    whatever the order of the MuData's modalities (a ``.h5mu`` reads back with them sorted, ATAC before RNA).

    Parameters
    ----------
    modalities
        The model's modalities.
    modality
        The modality asked for, or None for the default: ``"rna"`` when the model has it.
    model_name
        The model's class name, for the messages.

    Returns
    -------
    str
        A modality of ``modalities``.

    Raises
    ------
    TypeError
        ``modality`` is data (scvi-tools passes the data first; here the modality comes first).
    ValueError
        ``modality`` is not one of ``modalities``, or is None and the model has no RNA modality.
    """
    if hasattr(modality, "obs"):
        raise TypeError(f"modality= is a {type(modality).__name__}: the modality comes first here (one of "
                        f"{modalities}); pass the data as adata=..., e.g. get_latent_representation(adata=mdata).")
    if modality is None:
        if RNA_MODALITY not in modalities:
            raise ValueError(f"{model_name} has no modality named {RNA_MODALITY!r} (its modalities: {modalities}), so "
                             f"a query has no default modality: pass modality=, e.g. modality={modalities[0]!r}.")
        return RNA_MODALITY
    if modality not in modalities:
        raise ValueError(f"Unknown modality {modality!r}; the model has {modalities}.")
    return modality


def refuse_data_as_modality(cls):
    """Class decorator: each public method of ``cls`` whose first argument is ``modality`` refuses data there.

    scvi-tools' getters take the data first; here the modality comes first, so ``get_library_size(mdata)`` passed the
    MuData as ``modality``. The refusal names the method called and the fix (``adata=mdata, modality=...``, or for a
    method without data ``modality=...``), before any work.
    """
    for name in [n for n in dir(cls) if not n.startswith("_")]:
        method = getattr(cls, name)
        if not inspect.isfunction(method) or list(inspect.signature(method).parameters)[1:2] != ["modality"]:
            continue
        takes_data = "adata" in inspect.signature(method).parameters
        setattr(cls, name, _data_refused(method, name, takes_data))
    return cls


def _data_refused(method, name: str, takes_data: bool):
    @functools.wraps(method)
    def refusing(self, *args, **kwargs):
        if args and hasattr(args[0], "obs"):
            fix = f"{name}(adata=mdata, modality=...)" if takes_data else f"{name}(modality=...): it takes no data"
            raise TypeError(f"{name}'s first argument is the modality (one of {self.modalities}), got a "
                            f"{type(args[0]).__name__}; pass the data by name: {fix}.")
        return method(self, *args, **kwargs)
    return refusing


def per_modality_settings(modalities: list[str], n_hidden, n_latent, latent_mode: str, ambient_modalities,
                          feature_scaling_modalities, priors, decoder_gene_scale, saved: bool, keys=None) -> dict:
    """The settings given per modality, checked and spelt out for every modality.

    Parameters
    ----------
    modalities
        The modelled modalities, in the setup's order.
    n_hidden, n_latent, latent_mode, ambient_modalities, feature_scaling_modalities, priors, decoder_gene_scale
        As for :class:`~pyro_scmodels.RegularizedMultimodalVI` (``latent_mode`` already checked).
    saved
        The settings of a saved model being loaded: a dict naming modalities the model lacks, and checks added since
        it was saved, warn instead of raising.
    keys
        The setup's :class:`~pyro_scmodels.data.covariates.CovariateKeys`: ambient or feature-scaling keys with a
        default ``ambient_modalities`` / ``feature_scaling_modalities`` that names none of ``modalities`` are refused
        (None: not checked).

    Returns
    -------
    dict
        ``hidden``, ``latent``, ``priors`` and ``gene_scale``: ``{modality: value}``; ``ambient_modalities`` and
        ``feature_scaling_modalities``: lists; ``n_hidden``, ``n_latent`` and ``decoder_gene_scale``: the values
        recorded in ``init_params`` (:func:`recorded`), ``decoder_gene_scale`` None when no modality has the scale
        (left out there, so that models saved before the option existed load and resume unchanged).

    Raises
    ------
    ValueError
        A dict without an entry for a modality or naming one the model lacks; unequal ``n_latent`` outside
        ``"concatenation"``; unknown modalities in ``ambient_modalities`` or ``feature_scaling_modalities``; an edited
        prior of a site no modality has; ambient or feature-scaling keys set up while the default
        ``ambient_modalities`` (``["rna"]``) or ``feature_scaling_modalities`` (``["atac"]``) names none of the
        modalities (e.g. modalities named ``"gex"`` and ``"peaks"``): the keys would silently be unused.
    TypeError
        ``n_hidden`` or ``n_latent`` not a positive int, ``decoder_gene_scale`` not True or False.
    """
    hidden = per_modality("n_hidden", n_hidden, modalities, V.positive_int, saved)
    latent = per_modality("n_latent", n_latent, modalities, V.positive_int, saved)
    if latent_mode != "concatenation" and len(set(latent.values())) > 1:
        raise ValueError(f"latent_mode={latent_mode!r} needs the same n_latent for every modality, got {latent}.")
    ambient = [m for m in (RNA_MODALITY,) if m in modalities] if ambient_modalities is None else list(ambient_modalities)
    scaling = ([m for m in (ATAC_MODALITY,) if m in modalities] if feature_scaling_modalities is None
               else list(feature_scaling_modalities))
    if keys is not None and not saved:
        refuse_unused_keys(modalities, keys, ambient_modalities is None and not ambient,
                           feature_scaling_modalities is None and not scaling)
    for name, chosen in (("ambient_modalities", ambient), ("feature_scaling_modalities", scaling)):
        unknown = sorted(set(chosen) - set(modalities))
        if unknown:
            raise ValueError(f"{name} names unknown modalities {unknown}; known: {modalities}.")
    given_per_modality = isinstance(priors, dict)
    priors = copy.deepcopy(priors) if priors is not None else RegularizedPriors()  # the model's own copy
    priors = per_modality("priors", priors, modalities, lambda name, value: checked_priors(name, value, saved),
                          loading=saved)
    if not saved:  # a model saved before this check still loads
        refuse_priors_of_absent_sites(priors, given_per_modality, ambient, scaling)
        # once per object the user gave: per modality with an ambient term, or once for the one shared object
        for m in (ambient if given_per_modality else ambient[:1]):
            warn_unused_ambient_prior(priors[m], f"priors[{m!r}]" if given_per_modality else "priors")
    gene_scale = per_modality("decoder_gene_scale", decoder_gene_scale, modalities, V.boolean, saved)
    return dict(hidden=hidden, latent=latent, priors=priors, gene_scale=gene_scale, ambient_modalities=ambient,
                feature_scaling_modalities=scaling, n_hidden=recorded(hidden), n_latent=recorded(latent),
                decoder_gene_scale=recorded(gene_scale) if any(gene_scale.values()) else None)


def recorded(values: dict):
    """A per-modality setting as the model records it: the one value when every modality has it, else the dict.

    A dict of equal values and that value build the same model, so they are one setting: a checkpoint or save of one
    resumes and loads with the other, and a dict is recorded in the modalities' order (``{"atac": 8, "rna": 16}`` and
    ``{"rna": 16, "atac": 8}`` are one setting too).

    Parameters
    ----------
    values
        ``{modality: checked value}``, as :func:`~pyro_scmodels.data.mudata_registry.per_modality` returns it.

    Returns
    -------
    object
        The value shared by every modality, or ``values`` (a copy) where they differ.
    """
    first = next(iter(values.values()))
    return first if all(type(v) is type(first) and v == first for v in values.values()) else dict(values)


def refuse_unused_keys(modalities: list[str], keys, ambient_unmatched: bool, scaling_unmatched: bool) -> None:
    """Refuse ambient / feature-scaling keys that no modality would use because the default modalities are absent.

    Parameters
    ----------
    modalities
        The model's modalities.
    keys
        The setup's covariate keys (``keys.ambient``, ``keys.feature_scaling``).
    ambient_unmatched, scaling_unmatched
        ``ambient_modalities`` / ``feature_scaling_modalities`` was left at its default, which names none of
        ``modalities``.

    Raises
    ------
    ValueError
        Naming the keys, the modalities and the argument to pass.
    """
    for unmatched, set_up, argument, default, setup_argument, example in (
            (ambient_unmatched, keys.ambient, "ambient_modalities", RNA_MODALITY,
             "ambient_covariate_keys (or batch_key)", modalities[0]),
            (scaling_unmatched, keys.feature_scaling, "feature_scaling_modalities", ATAC_MODALITY,
             "feature_scaling_covariate_keys (or nn_conditioning_covariate_keys, its default)", modalities[-1])):
        if unmatched and set_up:
            raise ValueError(
                f"The setup has {setup_argument} {list(set_up)}, but {argument} defaults to [{default!r}], which is "
                f"none of the model's modalities {modalities}: those keys would be used by no modality. Name the "
                f"modalities that get them, e.g. {argument}=[{example!r}], or pass {argument}=[] for none.")
