"""Predictive draws of the counts from a fitted model, streamed over minibatches.

The draws behind the posterior and prior predictive checks (:mod:`pyro_scmodels.criticism`):
``pyro.infer.Predictive`` on the model with its observations removed, the latent sites drawn
from the guide (posterior) or from their priors (prior), one minibatch in memory at a time.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import torch
from pyro import poutine

from . import _validation as V
from ._stacklevel import user_stacklevel
from .pyro_modules import evaluating
from .seeding import seeded


@torch.no_grad()
def predictive_batches(model, num_samples: int = 1, adata=None, indices=None, batch_size: int | None = None,
                       prior: bool = False):
    """Predictive draws of the counts, one minibatch at a time (``pyro.infer.Predictive``).

    Parameters
    ----------
    model
        A fitted model of this package (``RegularizedVI`` or ``RegularizedMultimodalVI``).
    num_samples
        Draws per cell.
    adata, indices, batch_size
        Which cells, in minibatches of ``batch_size``.
    prior
        Draw from the prior predictive (every latent site from its prior, the networks as
        they are) instead of the posterior predictive.

    Yields
    ------
    tuple
        ``(cell_indices, {site: (observed, draws)})``: for each observation site, the observed
        counts (cells x features) and the draws (``num_samples`` x cells x features), as numpy
        arrays. Only one minibatch of draws is in memory at a time.
    """
    num_samples = V.positive_int("num_samples", num_samples)
    if not prior:
        model.check_trained()
    sites = model.observation_sites
    draw = pyro.infer.Predictive(
        poutine.uncondition(model.module.model), guide=None if prior else model.module.guide,
        num_samples=num_samples, return_sites=list(sites),
    )
    with evaluating(model.module):  # no dropout while it runs, and the modules' own modes back afterwards
        for cells, (batch, n_obs) in model.minibatches(adata, indices, batch_size):
            draws = draw(batch, n_obs)
            # numpy copies (not views of torch memory), so their size is visible to numpy's tracing
            yield cells, {
                site: (batch[key].cpu().numpy().copy(),
                       draws[site].reshape(num_samples, *batch[key].shape).cpu().numpy().copy())
                for site, key in sites.items()
            }


def posterior_predictive(model, num_samples: int = 1, adata=None, indices=None, batch_size: int | None = None,
                         modality: str | None = None, features=None, seed: int | None = None):
    """Counts drawn from the posterior predictive distribution.

    Parameters
    ----------
    model, num_samples, adata, indices, batch_size
        As in :func:`predictive_batches`.
    modality
        Multimodal models: the modality whose counts are returned; None returns a dict with
        every modality.
    features
        None (every feature), or the columns to keep (positions, or a slice), taken a minibatch at a
        time so that only they are held.
    seed
        Seed of the draws (torch's random state is restored after); None draws from the current stream.

    Returns
    -------
    numpy.ndarray or dict
        ``num_samples`` x cells x features (dense: pick ``indices`` for large data, or stream
        with :func:`predictive_batches`); a dict of those per modality for a multimodal model
        without ``modality``.
    """
    seed = V.optional(V.seed, "seed", seed)
    # each observation site belongs to one modality (None for a single-modality model)
    sites = {site: model.site_modality(site) for site in model.observation_sites}
    if modality is not None:
        chosen = [site for site, owner in sites.items() if owner == modality]
        if not chosen:
            known = [owner for owner in sites.values() if owner is not None]
            raise ValueError(f"Unknown modality {modality!r}; the model observes {known or list(sites)}.")
        sites = {site: sites[site] for site in chosen}
    parts = {site: [] for site in sites}
    unmeasured = dict.fromkeys(sites, 0)
    with seeded(seed, model.device):
        for _, draws in predictive_batches(model, num_samples, adata, indices, batch_size):
            for site in sites:
                parts[site].append(draws[site][1] if features is None else draws[site][1][:, :, features])
                if sites[site] is not None:  # a modality's cells without counts: no counts, not an empty measurement
                    unmeasured[site] += int((draws[site][0].sum(axis=1) == 0).sum())
    for site, n in unmeasured.items():
        if n:
            # their likelihood is masked in training: the draws decode z with a stand-in library, not an imputation
            warnings.warn(f"{n} of the cells drawn have no counts in modality {sites[site]!r}: their draws come from a "
                          "stand-in library size, far below a measured cell's, and are not an imputation of that "
                          "modality. Leave them out (indices=), or compare expression "
                          f"(get_normalized_expression(modality={sites[site]!r})).", UserWarning,
                          stacklevel=user_stacklevel())
    arrays = {site: np.concatenate(values, axis=1) for site, values in parts.items()}
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    return {sites[site]: values for site, values in arrays.items()}
