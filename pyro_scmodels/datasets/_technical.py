"""The technical side of ``simulate``: batch scaling and ambient RNA, RNA content, library sizes,
dispersions and the count draw. Each step draws from the generator it is given, in the order
``simulate`` calls it (see :mod:`._simulate`)."""

from __future__ import annotations

import math

import numpy as np

from .. import _validation as V
from ._common import gamma_poisson, softmax


def _simulate_batch_effects(rng, type_log, n_batches, batch_scaling_sd, ambient_fraction,
                            mean_library):
    """Per-batch multiplicative gene scaling ``y`` and ambient profile ``s`` (batches x genes).

    Each batch's ambient RNA is a random mixture of the cell types' compositions times
    log-normal gene noise, so the profiles differ between batches; every row of ``s`` sums to
    ``ambient_fraction * mean_library``.
    """
    n_types, n_genes = type_log.shape
    feature_scaling = np.exp(rng.normal(0.0, batch_scaling_sd, size=(n_batches, n_genes)))
    mixture = rng.dirichlet(np.ones(n_types), size=n_batches)
    soup = (mixture @ softmax(type_log)) * rng.lognormal(0.0, 1.0, size=(n_batches, n_genes))
    ambient = ambient_fraction * mean_library * soup / soup.sum(axis=1, keepdims=True)
    return feature_scaling, ambient


def _set_ambient_fractions(ambient, fractions, mean_library):
    """Rescale each batch's ambient profile so that it makes ``fractions[b]`` of a typical cell's counts.

    A cell whose ``rho`` sums to ``mean_library`` then has a background share of
    ``s_b.sum() / (mean_library + s_b.sum()) = fractions[b]`` (before feature scaling). No draws.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    totals = fractions / (1.0 - fractions) * mean_library
    return ambient / ambient.sum(axis=1, keepdims=True) * totals[:, None]


def _simulate_rna_content(rng, n_cells, sd):
    """Per-cell RNA content ``c`` (log-normal, median 1): the cell's own counts scale with it, the
    background does not, so cells with less RNA carry a larger ambient share."""
    return np.exp(rng.normal(0.0, sd, size=n_cells))


def _true_ambient_fraction(rho, ambient, feature_scaling, batch):
    """Share of each cell's expected counts from the background: sum s y / sum (rho + s) y."""
    soup = (ambient[batch] * feature_scaling[batch]).sum(axis=1)
    return soup / ((rho * feature_scaling[batch]).sum(axis=1) + soup)


def _simulate_library_sizes(rng, batch, n_batches, library_sd):
    """Per-batch depth offsets and log-normal library size factors ``l`` around them."""
    depth_offset = rng.uniform(-0.3, 0.3, size=n_batches)
    library = np.exp(rng.normal(depth_offset[batch], library_sd))
    return depth_offset, library


def _simulate_dispersions(rng, n_genes, theta_range):
    """Per-gene inverse dispersion ``theta``, log-uniform on ``theta_range``."""
    low, high = theta_range
    return np.exp(rng.uniform(math.log(low), math.log(high), size=n_genes))


def _draw_counts(rng, library, expression, theta):
    """GammaPoisson counts with mean ``library[:, None] * expression``; no cell is left empty.

    Cells with no counts are redrawn, and after 10 failures their library factor is doubled
    so the loop always ends. Returns the counts and the library factors actually used.
    """
    library = library.copy()
    counts = gamma_poisson(rng, library[:, None] * expression, theta)
    for attempt in range(200):
        empty = np.flatnonzero(counts.sum(axis=1) == 0)
        if empty.size == 0:
            break
        if attempt >= 10:
            library[empty] *= 2.0
        counts[empty] = gamma_poisson(rng, library[empty, None] * expression[empty], theta)
    assert (counts.sum(axis=1) > 0).all(), "simulate: some cells have zero total count"
    return counts, library


def _check_ambient_fractions(fractions, n_batches: int) -> list[float] | None:
    """None, or one share in [0, 1) per batch (the message names the argument)."""
    if fractions is None:
        return None
    if isinstance(fractions, (str, bytes)) or not hasattr(fractions, "__len__"):
        raise V.ArgumentTypeError(f"ambient_fractions must be a sequence of one number per batch, got {fractions!r}.")
    if len(fractions) != n_batches:
        raise ValueError(f"ambient_fractions needs one value per batch (n_batches={n_batches}), got {len(fractions)}.")
    return [V.number(f"ambient_fractions[{b}]", f, 0.0, 1.0, strict_maximum=True) for b, f in enumerate(fractions)]
