"""The ambient fraction: the share of each cell's expected counts that comes from the background.

With ``mu_{n,g} = l_n (rho_{n,g} + s_{e(n),g}) y_{t(n),g}`` the background part of cell n is
``l_n s_{e(n),g} y_{t(n),g}``, so its share of the cell's expected counts is::

    f_n = sum_g s_{e(n),g} y_{t(n),g} / sum_g (rho_{n,g} + s_{e(n),g}) y_{t(n),g}

(the library size l_n cancels). With the background per droplet (``ambient_per_droplet=True``,
``mu = (l_n rho + s) y``) it does not cancel: ``f_n = sum_g s y / sum_g (l_n rho + s) y``, at the posterior
median of ``l_n``. It is computed from the model's own decomposition of the mean
(:meth:`~pyro_scmodels.RegularizedVIModel.decompose_mean`) at the posterior mean of z and the
point estimates (medians) of the global sites.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import _validation as V
from .._selection import cell_positions
from ..data.counts import CountMatrix
from ..data.covariates import stacked_level_names
from .._labels import names_as_text, stored_column_names

#: columns of the per-category summary
SUMMARY_COLUMNS = ("mean", "median", "q05", "q95", "n_cells")


def ambient_fraction(queries, generative, global_values: dict, adata=None, indices=None,
                     batch_size: int | None = None, library_of=None, summarize_by: str | None = None,
                     modality: str | None = None):
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
    library_of
        None, or a function of a minibatch giving each cell's library size l (needed when the
        background is per droplet, where the share depends on it).
    summarize_by
        None, or an ``.obs`` column: the fractions summarised per category of it (:func:`summarize`),
        the column checked before anything is computed, and ``indices`` then refused if it repeats a cell.
    modality
        Multimodal models: the modality of ``generative``. A cell without counts in it (its likelihood masked)
        has no fraction: NaN, left out of the summary.

    Returns
    -------
    numpy.ndarray or pandas.DataFrame
        One fraction in [0, 1) per chosen cell (NaN for a cell not measured in ``modality``), or the summary table.
    """
    obs = (queries.adata if adata is None else adata).obs
    if summarize_by is not None:
        check_summary_column(obs, summarize_by)
        # a per-cell query may repeat a cell; a summary would count it twice in n_cells and weight the mean by it
        chosen = cell_positions(len(obs), indices)
        repeated = len(chosen) - len(np.unique(chosen))
        if repeated:
            raise ValueError(f"indices repeats {repeated} cell(s): summarize_by counts each cell once. Pass each "
                             "cell once (e.g. indices=np.unique(indices)), or leave summarize_by out for one value per "
                             "index asked for.")
    parts = []
    for _, batch, z in queries.posterior_z_batches(adata, indices, batch_size):
        with torch.no_grad():
            library = None if library_of is None else library_of(batch)
            cell, soup = generative.decompose_mean(z, batch, global_values, library=library)
            soup = soup.sum(-1)
            fraction = soup / (cell.sum(-1) + soup)
            measured = queries.measured_cells(batch, modality)
            if measured is not None:  # a cell without counts in the modality: no fitted background share
                fraction = torch.where(measured, fraction, torch.nan)
            parts.append(fraction.cpu())
    fractions = torch.cat(parts).numpy().astype(np.float64)
    if summarize_by is None:
        return fractions
    return summarize(fractions, obs.iloc[cell_positions(len(obs), indices)], summarize_by)


def check_summary_column(obs: pd.DataFrame, by) -> None:
    """Raise unless ``by`` names a column of ``obs`` (checked before anything is computed)."""
    if not isinstance(by, str):
        raise V.ArgumentTypeError(f"summarize_by must be the name of an .obs column (a str), got {by!r}.")
    V.group_column(obs, by, "summarize_by", complete=True)  # cells without a label were left out of the table


def summarize(fractions: np.ndarray, obs: pd.DataFrame, by: str) -> pd.DataFrame:
    """Mean, median, 5 % and 95 % quantiles and number of cells of ``fractions`` per category of ``obs[by]``.

    Parameters
    ----------
    fractions
        One value per row of ``obs``; a NaN (a cell not measured in the modality) is left out, of ``n_cells`` too.
    obs
        The cells' ``.obs`` table.
    by
        The column to group by (an ambient covariate key gives the per-category summary).

    Returns
    -------
    pandas.DataFrame
        One row per category present (in category order), columns :data:`SUMMARY_COLUMNS`; a category whose
        cells all have NaN has ``n_cells`` 0 and NaN statistics.
    """
    check_summary_column(obs, by)
    groups = pd.Series(fractions, index=obs.index).groupby(obs[by].to_numpy(), observed=True, sort=True)
    table = pd.DataFrame({
        "mean": groups.mean(), "median": groups.median(), "q05": groups.quantile(0.05),
        "q95": groups.quantile(0.95), "n_cells": groups.count(),
    })
    categories = obs[by].cat.categories if isinstance(obs[by].dtype, pd.CategoricalDtype) else None
    if categories is not None:
        table = table.reindex([c for c in categories if c in table.index])
    table.index.name = by
    return table


def check_droplets(droplets, var_names: pd.Index, categories: dict[str, list[str]]) -> None:
    """Raise unless the empty droplets can give each ambient category's profile over the data's genes.

    Checked before a model is built (the CLI's ``fit --empty-droplets``), with messages that say what the droplets
    lack.

    Parameters
    ----------
    droplets
        AnnData of empty droplets.
    var_names
        The data's genes, each of which needs a column in ``droplets``.
    categories
        ``{ambient key: the data's categories}``: each key needs an ``.obs`` column of ``droplets``, and each
        category at least one droplet.

    Raises
    ------
    ValueError
        No droplets, or repeated gene names.
    KeyError
        Genes, an ambient key's column, or a category's droplets missing (named).
    """
    if droplets.n_obs == 0:
        raise ValueError("the file holds no droplets; give the raw matrix's barcodes without a cell.")
    _check_unique_genes(droplets)
    missing = names_as_text(var_names).difference(names_as_text(droplets.var_names))
    if len(missing):
        raise KeyError(f"the droplets lack {len(missing)} of the data's {len(var_names)} genes, e.g. {list(missing[:5])}; "
                       "write the empty droplets with every gene of the data (its var_names).")
    absent = [key for key in categories if key not in droplets.obs.columns]
    if absent:
        raise KeyError(f"the droplets have no obs column {absent}: each droplet needs its ambient category, in the "
                       f"column the data uses (ambient keys {list(categories)}).")
    for key, levels in categories.items():
        found = set(droplets.obs[key].dropna().astype(str))
        without = [c for c in levels if c not in found]
        if without:
            raise KeyError(f"there is no droplet of {key} {without}; each ambient category needs its own empty droplets "
                           "(from the same channel).")


def _check_unique_genes(droplets) -> None:
    names = names_as_text(droplets.var_names)
    if not names.is_unique:
        repeated = list(names[names.duplicated()].unique()[:5])
        raise ValueError(f"the droplets have repeated gene names, e.g. {repeated}; give each gene one column (as the "
                         "data has), e.g. by summing the repeated columns.")


def profile_from_droplets(adata, groupby: str | list[str] | None = None, layer: str | None = None,
                          pseudocount: float = 0.5) -> pd.DataFrame:
    """The ambient profile of each category, from the counts of empty droplets.

    Parameters
    ----------
    adata
        Counts of droplets without a cell (e.g. barcodes of a raw 10x matrix with few UMIs),
        with the model's genes.
    groupby
        ``.obs`` column naming each droplet's ambient category (e.g. the batch), or a list of
        columns, one per ambient key of the model; None: one profile (column ``"all"``).
    layer
        Layer with the counts; None for ``.X``.
    pseudocount
        Added to every gene's summed count, so that no gene has a background of exactly 0.

    Returns
    -------
    pandas.DataFrame
        Genes x categories, each column summing to 1; pass it as ``ambient_profile``. With
        several ``groupby`` columns, the columns are named ``"key=category"``, as the model names
        its stacked categories (``get_ambient_profile()``), and each key's profiles are measured
        over all droplets (the model adds the backgrounds of a cell's categories). A category
        without droplets has no column, so a model given the profile names it as missing.

    Raises
    ------
    KeyError
        ``layer`` or a ``groupby`` column is absent.
    ValueError
        No droplets, repeated gene names, a ``groupby`` column has droplets without a category (NaN), or a
        category's droplets hold no counts.
    """
    if layer is not None:
        V.present(layer, adata.layers, "adata.layers", "layer")
    counts = adata.X if layer is None else adata.layers[layer]
    pseudocount = V.non_negative_float("pseudocount", pseudocount)
    if adata.n_obs == 0:
        raise ValueError("adata holds no droplets; give the empty droplets' counts (e.g. a raw matrix's barcodes "
                         "without a cell).")
    _check_unique_genes(adata)  # a profile with a gene twice would not line up with the model's genes
    # raw counts (finite, non-negative integers); a droplet without counts is fine
    CountMatrix(counts, name="the droplets' " + ("X" if layer is None else f"layers[{layer!r}]"), allow_empty_cells=True)
    keys = [] if groupby is None else [groupby] if isinstance(groupby, str) else list(groupby)
    columns = {}
    for key in keys:
        # labels 1 and "1" of one column would be one category here and two in a model's setup
        V.group_column(adata.obs, key, "groupby", "adata.obs")
        if adata.obs[key].isna().any():
            raise ValueError(f"adata.obs[{key!r}] has no category for {int(adata.obs[key].isna().sum())} droplets; give "
                             "every droplet its ambient category, or drop those droplets.")
        # labels as strings, as the models record categories; a category without a droplet gets no column (not a
        # flat profile), so that a model given the profile names it as missing
        columns[key] = adata.obs[key].astype(str).astype("category")
    labels = [column.cat.codes.to_numpy() for column in columns.values()] or [np.zeros(adata.n_obs, dtype=int)]
    sums = [np.stack([np.asarray(counts[codes == k].sum(axis=0)).ravel() for k in range(codes.max() + 1)], axis=1)
            for codes in labels]
    sums = np.concatenate(sums, axis=1).astype(np.float64)
    names = stacked_level_names({key: list(column.cat.categories) for key, column in columns.items()})
    empty = [name for name, total in zip(names, sums.sum(0)) if total <= 0]
    if empty:  # the pseudocount alone would make a flat profile
        raise ValueError(f"The droplets of {empty} hold no counts at all, so they measure no background; check the "
                         "file (the raw matrix's counts, in .X or the layer given).")
    sums = sums + pseudocount
    return pd.DataFrame(sums / sums.sum(0, keepdims=True), index=adata.var_names, columns=names)


def profile_matrix(profile, var_names: pd.Index, levels: list[str]) -> np.ndarray:
    """A user's ambient profile as a (categories x genes) array in the model's order, rows summing to 1.

    ``profile`` is a genes x categories DataFrame (columns named like the columns of
    ``get_ambient_profile()``, or as ``fit``'s results and ``export_posterior`` store them, ``/`` as ``%2F``; a single column not named after a category, such as ``profile_from_droplets``'s
    ``"all"``, is used for every category), or a Series of one profile for every category.
    """
    if isinstance(profile, pd.Series):
        profile = profile.to_frame("all")
    if not isinstance(profile, pd.DataFrame):
        raise V.ArgumentTypeError(
            f"ambient_profile must be a genes x categories pandas DataFrame (see profile_from_droplets), got {type(profile).__name__}.")
    # names as text, rows and columns: a profile read from a file names the genes (and categories) "7" where the
    # data has 7, and the models record categories as text
    # one column named other than a category (as given: pd.DataFrame(vector, index=genes) names it 0) is every
    # category's profile, also where the categories are "0", "1", ...
    one_for_all = profile.shape[1] == 1 and profile.columns[0] not in levels
    profile = profile.set_axis(names_as_text(profile.index), axis=0).set_axis(names_as_text(profile.columns), axis=1)
    # a table from fit's results or export_posterior names the categories as stored ("/" as "%2F"): every one so
    # named and not every one as it is means that table, read back (the mapping renames all at once, not in a chain)
    stored = list(stored_column_names(pd.DataFrame(columns=levels)).columns)
    if stored != levels and set(stored) <= set(profile.columns) and not set(levels) <= set(profile.columns):
        profile = profile.rename(columns=dict(zip(stored, levels)))
    for axis, names in (("rows", profile.index), ("columns", profile.columns)):
        if not names.is_unique:
            repeated = list(names[names.duplicated()].unique()[:5])
            raise ValueError(f"ambient_profile has repeated {axis} {repeated} (names compared as text: 7 and '7' are "
                             "one name); give each gene one row and each category one column.")
    genes = names_as_text(var_names)
    missing = genes.difference(profile.index)
    if len(missing):
        raise KeyError(f"ambient_profile has no row for {len(missing)} of the model's genes, e.g. {list(missing[:5])}; "
                       "give one row per gene of adata.var_names (names compared as text).")
    profile = profile.loc[genes]
    if one_for_all:
        profile = pd.DataFrame(np.repeat(profile.to_numpy(), len(levels), axis=1), index=profile.index, columns=levels)
    unknown = [c for c in levels if c not in profile.columns]
    if unknown:
        raise KeyError(f"ambient_profile has no column for the ambient categories {unknown}; its columns are "
                       f"{list(map(str, profile.columns))} (one column named e.g. 'all' is used for every category).")
    values = profile[levels].to_numpy(dtype=np.float64).T
    if not np.isfinite(values).all() or (values < 0).any() or (values.sum(1) <= 0).any():
        raise ValueError("ambient_profile must be finite and non-negative, with a positive sum per category.")
    return values / values.sum(1, keepdims=True)


class AmbientQueries:
    """The ambient queries of a single-modality model (mixed into :class:`~pyro_scmodels.RegularizedVI`).

    Needs of the model class: ``module`` (its Pyro model and guide), ``dims`` and the posterior queries
    (``global_site_table``, ``posterior_z_batches``).
    """

    def get_ambient_profile(self) -> pd.DataFrame:
        """Ambient background s (posterior median), in counts at a typical library size.

        Returns
        -------
        pandas.DataFrame
            Genes x ambient categories (``"all"`` without ambient keys).
        """
        return self.global_site_table("ambient")

    def get_ambient_fraction(self, adata=None, indices=None, batch_size: int | None = None, summarize_by: str | None = None):
        """Share of each cell's expected counts that comes from the ambient background.

        ``f_n = sum_g s_{e(n),g} y_{t(n),g} / sum_g (rho_{n,g} + s_{e(n),g}) y_{t(n),g}``, from the
        model's decomposition of the mean (:meth:`RegularizedVIModel.decompose_mean`) at the
        posterior mean of z and the point estimates of s and y; with ``ambient_per_droplet=True``,
        ``rho`` is multiplied by the cell's library size l_n (posterior median).

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`~pyro_scmodels.RegularizedVI.get_latent_representation`.
        summarize_by
            None: one value per cell. An ``.obs`` column (e.g. the ambient covariate key):
            a summary per category of that column (``indices`` must then name each cell once).

        Returns
        -------
        numpy.ndarray or pandas.DataFrame
            Per cell, or per category with columns ``mean``, ``median``, ``q05``, ``q95``, ``n_cells``.
        """
        guide = self.module.guide
        # per droplet, the share depends on the cell's library size: its posterior median
        library_of = (lambda batch: guide.library_loc(batch).exp()) if self.dims.ambient_per_droplet else None
        return ambient_fraction(self, self.module.model, self.module.model.global_values(guide.global_medians()), adata,
                                indices, batch_size,
                                library_of=library_of, summarize_by=summarize_by)

    def exported_cell_quantities(self, adata=None, batch_size: int | None = None) -> dict:
        """Per-cell results that :meth:`export_posterior` writes to ``.obs``: the ambient fraction."""
        return {"ambient_fraction": self.get_ambient_fraction(adata, batch_size=batch_size)}
