"""The ambient fraction: the share of each cell's expected counts that comes from the background.

With ``mu_{n,g} = l_n (rho_{n,g} + s_{e(n),g}) y_{t(n),g}`` the background part of cell n is
``l_n s_{e(n),g} y_{t(n),g}``, so its share of the cell's expected counts is::

    f_n = sum_g s_{e(n),g} y_{t(n),g} / sum_g (rho_{n,g} + s_{e(n),g}) y_{t(n),g}

(the library size l_n cancels). It is computed from the model's own decomposition of the mean
(:meth:`~pyro_scmodels.RegularizedVIModel.decompose_mean`) at the posterior mean of z and the
point estimates (medians) of the global sites.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import _validation as V

#: columns of the per-category summary
SUMMARY_COLUMNS = ("mean", "median", "q05", "q95", "n_cells")


def ambient_fraction(queries, generative, global_values: dict, adata=None, indices=None,
                     batch_size: int | None = None) -> np.ndarray:
    """Per cell, the share of the expected counts that comes from the ambient background.

    Parameters
    ----------
    queries
        The user-facing model (a :class:`~pyro_scmodels.models.posterior_queries.PosteriorQueries`):
        it runs the posterior of z over minibatches.
    generative
        The Pyro model (one modality's block) whose ``decompose_mean`` splits the mean.
    global_values
        Point estimates of that block's global sites (``ambient``, ``feature_scaling``).
    adata, indices, batch_size
        Cells, as in :meth:`~pyro_scmodels.RegularizedVI.get_latent_representation`.

    Returns
    -------
    numpy.ndarray
        One fraction in [0, 1) per chosen cell.
    """
    generative = generative.eval()
    parts = []
    for _, batch, z in queries.posterior_z_batches(adata, indices, batch_size):
        with torch.no_grad():
            cell, soup = generative.decompose_mean(z, batch, global_values)
            soup = soup.sum(-1)
            parts.append((soup / (cell.sum(-1) + soup)).cpu())
    return torch.cat(parts).numpy().astype(np.float64)


def check_summary_column(obs: pd.DataFrame, by) -> None:
    """Raise unless ``by`` names a column of ``obs`` (checked before anything is computed)."""
    if not isinstance(by, str):
        raise V.ArgumentTypeError(f"summarize_by must be the name of an .obs column (a str), got {by!r}.")
    V.present(by, obs.columns, "adata.obs", "column")


def summarize(fractions: np.ndarray, obs: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean, median, 5 % and 95 % quantiles and number of cells of ``fractions`` per category of ``obs[by]``.

    Parameters
    ----------
    fractions
        One value per row of ``obs``.
    obs
        The cells' ``.obs`` table.
    by
        The column to group by (an ambient covariate key gives the per-category summary).

    Returns
    -------
    pandas.DataFrame
        One row per category present (in category order), columns :data:`SUMMARY_COLUMNS`.
    """
    check_summary_column(obs, by)
    groups = pd.Series(fractions, index=obs.index).groupby(obs[by].to_numpy(), observed=True, sort=True)
    table = pd.DataFrame({
        "mean": groups.mean(), "median": groups.median(), "q05": groups.quantile(0.05),
        "q95": groups.quantile(0.95), "n_cells": groups.size(),
    })
    categories = obs[by].cat.categories if isinstance(obs[by].dtype, pd.CategoricalDtype) else None
    if categories is not None:
        table = table.reindex([c for c in categories if c in table.index])
    table.index.name = by
    return table
