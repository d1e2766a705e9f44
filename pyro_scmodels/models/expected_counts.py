"""The mean of the count likelihood: mu = l * (rho + background) * feature scaling, per cell and gene.

Shared by the model's likelihood, its decomposition of the mean (``RegularizedVIModel.decompose_mean``) and the tests
of the ambient terms.
"""

from __future__ import annotations

import torch

from .. import _constants as C
from ..distributions import select_rows


def background(ambient, ambient_index) -> torch.Tensor:
    """sum over ambient keys of s_{e(n),g}: each cell's background before library and scaling (cells x genes)."""
    # the floor on the mean is added to the (small) ambient table, not to every cell and gene
    return sum(select_rows(ambient + C.MEAN_EPS, ambient_index[:, k]) for k in range(ambient_index.shape[1]))


def scaling_factor(library, scaling, scaling_index) -> torch.Tensor:
    """l_n * prod_t y_{t(n),g} per cell and gene (``library`` alone, cells x 1, without scaling)."""
    if scaling is None:
        return library.unsqueeze(-1)
    # l_n * y_{t(n)} in one product: the library size rides in the one-hot selection
    factor = select_rows(scaling, scaling_index[:, 0], weights=library)
    for k in range(1, scaling_index.shape[1]):
        factor = factor * select_rows(scaling, scaling_index[:, k])
    return factor


def expected_counts(library, rho, ambient, scaling, ambient_index, scaling_index, per_droplet: bool = False):
    """mu = l * (rho + sum of ambient profiles) * product of feature scalings, per cell and gene.

    ``ambient`` or ``scaling`` may be None when the modality has no such term. With ``per_droplet`` the background
    is counts per droplet, not scaled by the library: ``mu = (l rho + s) y``.
    """
    if per_droplet and ambient is not None:
        cell = rho * library.unsqueeze(-1)
        return (cell + background(ambient, ambient_index)) * scaling_factor(torch.ones_like(library), scaling, scaling_index)
    rho = rho + (background(ambient, ambient_index) if ambient is not None else C.MEAN_EPS)
    return rho * scaling_factor(library, scaling, scaling_index)
