"""The settings a model class is built with, checked before any data is read.

Each function checks the arguments of a model's constructor by name and returns them as the
``init_params`` the model keeps: what :meth:`save` writes and :meth:`load` passes back.
"""

from __future__ import annotations

import copy
import dataclasses

from .. import _validation as V
from ..priors import (RegularizedPriors, checked_priors, edited_fields, refuse_replaced_ambient_prior,
                      warn_unused_ambient_prior)


def shared_settings(n_layers, dropout_rate, global_guides, init: str, seed, saved: bool = False) -> dict:
    """The settings every model class takes, checked: hidden layers, dropout, global guides, init, seed.

    Parameters
    ----------
    n_layers, dropout_rate, global_guides, init, seed
        As for :class:`~pyro_scmodels.RegularizedVI`.
    saved
        The settings of a saved model being loaded: its seed may lie above ``2**32 - 1`` (taken before seeds had one
        range; it seeded only torch, which takes it).

    Returns
    -------
    dict
        The checked values by name.
    """
    V.choice("init", init, ("data", "prior"))
    if global_guides is not None and not isinstance(global_guides, dict):
        raise TypeError(f"global_guides must be a dict of site -> 'map' | 'lognormal', got {global_guides!r}.")
    return dict(n_layers=V.positive_int("n_layers", n_layers), dropout_rate=V.rate("dropout_rate", dropout_rate),
                global_guides=global_guides, init=init,
                seed=(V.non_negative_int if saved else V.seed)("seed", seed))


def regularizedvi_settings(n_hidden, n_latent, n_layers, dropout_rate, input_dropout_rate, priors, global_guides, init,
                           seed, latent_independence, ambient_per_droplet, ambient_shape_prior,
                           ambient_profile, saved: bool = False, decoder_gene_scale: bool = False) -> dict:
    """:class:`~pyro_scmodels.RegularizedVI`'s constructor arguments, checked, as its ``init_params``.

    The options that are off are left out (``latent_independence`` 0, ``ambient_per_droplet`` and
    ``decoder_gene_scale`` False, no ``ambient_shape_prior`` or ``ambient_profile``), so that models saved before they
    existed load unchanged. ``priors`` is the model's own copy: a later edit of the caller's object
    would change what the model reports, not what it trains (its Pyro modules hold the priors as
    buffers).

    Parameters
    ----------
    n_hidden, n_latent, n_layers, dropout_rate, input_dropout_rate, priors, global_guides, init, seed
        As for :class:`~pyro_scmodels.RegularizedVI`.
    latent_independence, ambient_per_droplet, ambient_shape_prior, ambient_profile, decoder_gene_scale
        As for :class:`~pyro_scmodels.RegularizedVI`.
    saved
        The settings of a saved model being loaded (checks added since it was saved warn instead).

    Returns
    -------
    dict
        Keyword arguments that rebuild the model.
    """
    shared = shared_settings(n_layers, dropout_rate, global_guides, init, seed, saved)
    n_hidden, n_latent = V.positive_int("n_hidden", n_hidden), V.positive_int("n_latent", n_latent)
    input_dropout_rate = V.rate("input_dropout_rate", input_dropout_rate)
    if priors is not None:
        checked_priors("priors", priors, saved)
    latent_independence = V.non_negative_float("latent_independence", latent_independence)
    ambient_per_droplet = V.boolean("ambient_per_droplet", ambient_per_droplet)
    decoder_gene_scale = V.boolean("decoder_gene_scale", decoder_gene_scale)
    if ambient_shape_prior is not None:
        ambient_shape_prior = V.positive_float("ambient_shape_prior", ambient_shape_prior)
        if ambient_profile is not None:
            raise ValueError("ambient_shape_prior centres the background's prior on the pooled cells' profile and "
                             "learns every gene; ambient_profile fixes the profile. Pass one of them.")
        if priors is not None:  # a saved model built before this refusal loads, with a warning
            refuse_replaced_ambient_prior(priors, True, warn=saved)
    elif priors is not None and not saved:  # warned once, when the user builds it (not again at each load)
        warn_unused_ambient_prior(priors)
    settings = dict(n_hidden=n_hidden, n_latent=n_latent, n_layers=shared["n_layers"],
                    dropout_rate=shared["dropout_rate"], input_dropout_rate=input_dropout_rate,
                    priors=copy.deepcopy(priors) if priors is not None else RegularizedPriors(),
                    global_guides=global_guides, init=init, seed=shared["seed"])
    optional = dict(latent_independence=(latent_independence, latent_independence > 0),
                    ambient_per_droplet=(True, ambient_per_droplet),
                    decoder_gene_scale=(True, decoder_gene_scale),
                    ambient_shape_prior=(ambient_shape_prior, ambient_shape_prior is not None),
                    ambient_profile=(ambient_profile, ambient_profile is not None))
    settings.update({name: value for name, (value, used) in optional.items() if used})
    return settings


#: the prior fields of a site, and the argument that gives a modality that site
_SITE_FIELDS = {"ambient": (("ambient", "regularize_ambient"), "ambient_modalities"),
                "feature scaling": (("feature_scaling",), "feature_scaling_modalities")}


def refuse_priors_of_absent_sites(priors: dict, per_modality: bool, ambient: list[str], scaling: list[str]) -> None:
    """Refuse an edited prior of :class:`~pyro_scmodels.RegularizedMultimodalVI` that no modality would use (it was
    dropped without a word).

    Parameters
    ----------
    priors
        A :class:`~pyro_scmodels.RegularizedPriors` per modality.
    per_modality
        Whether the user gave them per modality: then each modality's edits must be of sites it has; one object for
        every modality: each edit must be of a site that some modality has.
    ambient, scaling
        The modalities with an ambient term, and with a feature scaling term.

    Raises
    ------
    ValueError
        Naming the prior, the fields edited and the modalities that have the site.
    """
    having = {"ambient": set(ambient), "feature scaling": set(scaling)}
    for site, (names, argument) in _SITE_FIELDS.items():
        for m, modality_priors in priors.items():
            edited = [name for name in edited_fields(modality_priors) if name in names]
            unused = (m not in having[site]) if per_modality else not having[site]
            if edited and unused:
                article = "an" if site[0] in "aeiou" else "a"
                where, who = ((f"priors[{m!r}]", f"modality {m!r} has no") if per_modality
                              else ("priors", f"no modality has {article}"))
                raise ValueError(f"{where} sets {edited}, but {who} {site} term ({argument}={sorted(having[site])}), so "
                                 f"it would be ignored. Add the modality to {argument}, or leave that prior at its default.")
            if not per_modality:
                break  # one object: the same for every modality


def without_absent_sites(priors: RegularizedPriors, has_ambient: bool, has_scaling: bool) -> RegularizedPriors:
    """``priors`` with the fields of the sites a modality lacks at their defaults (the block never uses them).

    One edited object given for every modality is copied into each block; reported back per modality, a block
    without the site would carry the edit, and the model could not be rebuilt from its own ``init_params``.

    Parameters
    ----------
    priors
        One block's priors.
    has_ambient, has_scaling
        Whether the block has the ambient and the feature scaling terms.

    Returns
    -------
    RegularizedPriors
    """
    absent = [name for site, present in (("ambient", has_ambient), ("feature scaling", has_scaling)) if not present
              for name in _SITE_FIELDS[site][0]]
    if not absent:
        return priors
    default = RegularizedPriors()
    return dataclasses.replace(priors, **{name: getattr(default, name) for name in absent})
