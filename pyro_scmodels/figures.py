"""Figures the command line writes next to its results: where a person would rather look than read.

- :func:`plot_latent`: a 2-D view of a latent space (PCA, or UMAP on request), coloured by each
  of a few ``.obs`` columns (batch, cell type).
- :func:`plot_training_curve`: the training (and validation) loss per epoch.
- :func:`plot_ite_heatmap`: the mean per-cell treatment effect of the top genes in each group.

Figures are built as :class:`matplotlib.figure.Figure` objects, without pyplot, so that no backend
is switched in the user's session; each is written atomically (a temporary name, renamed when complete).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import _validation as V
from ._atomic import atomic_path

logger = logging.getLogger(__name__)

MAX_CELLS_SHOWN = 20_000  # a random subset beyond this keeps the plot light and legible
MAX_CATEGORIES_COLOURED = 20


def figure_path(name: str, value) -> str:
    """``value``, a figure file to write, checked before the work that makes the figure: its folder exists and its
    extension names a format matplotlib writes (the format is taken from it).

    Parameters
    ----------
    name
        The argument, for the message.
    value
        The path.

    Returns
    -------
    str
        The path.

    Raises
    ------
    ValueError
        No extension, or one matplotlib does not write (the message lists those it does).
    """
    from matplotlib.backend_bases import FigureCanvasBase

    path = V.output_path(name, value)
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension not in formats:
        raise ValueError(f"{name} {path}: the figure's format comes from its extension, and "
                         f"{'it has none' if not extension else repr(extension) + ' is not one matplotlib writes'}; "
                         f"use one of {sorted(formats)}.")
    return path


def _save(figure, path: str) -> str:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, bbox_inches="tight")
    return path


def two_dimensional_view(latent: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, str]:
    """The first two principal components of the latent, or a UMAP of its kNN graph (scanpy).

    PCA is the default: it takes milliseconds, where UMAP's first call compiles for tens of seconds.
    A UMAP that fails falls back to PCA (logged).

    Returns
    -------
    tuple
        Cells x 2 coordinates and the method's name (``"UMAP"`` or ``"PCA"``).
    """
    latent = np.asarray(latent, dtype=np.float32)
    if method == "umap" and latent.shape[0] > 30 and latent.shape[1] > 2:
        try:
            import anndata
            import scanpy as sc

            view = anndata.AnnData(np.zeros((latent.shape[0], 0), dtype=np.float32), obsm={"X": latent})
            sc.pp.neighbors(view, use_rep="X", random_state=seed)
            sc.tl.umap(view, random_state=seed)
            return view.obsm["X_umap"], "UMAP"
        except Exception as err:  # noqa: BLE001 - a figure must never cost the results
            logger.info("UMAP failed (%s); the figure shows the first two principal components.", err)
    centred = latent - latent.mean(0)
    if latent.shape[1] <= 2:
        return np.pad(centred, ((0, 0), (0, 2 - latent.shape[1]))), "latent"
    _, _, vt = np.linalg.svd(centred[: min(len(centred), 50_000)], full_matrices=False)
    return centred @ vt[:2].T, "PCA"


OTHER_LABEL = "other"


def colour_groups(values) -> list[tuple[str, np.ndarray]] | None:
    """How :func:`plot_latent` colours a column: None for real numbers (a colour scale), else ``(label, cells)`` pairs.

    Text, booleans, a pandas categorical, and numbers that are all whole and take at most
    :data:`MAX_CATEGORIES_COLOURED` values are categories; other numbers (a QC score, a count of genes) go on a
    colour scale. The :data:`MAX_CATEGORIES_COLOURED` largest categories each get a colour (a categorical's in its
    own order, numbers and numeric text such as Leiden's clusters in numeric order, other text sorted); the cells of
    the others are drawn in grey as one group labelled
    ``"other (N categories)"``, first, so that every cell is drawn.

    Parameters
    ----------
    values
        One value per cell (a pandas Series keeps a categorical's dtype).

    Returns
    -------
    list of (str, numpy.ndarray) or None
        Labels and boolean masks that together cover every cell once.
    """
    categorical = isinstance(getattr(values, "dtype", None), pd.CategoricalDtype)
    order = [str(c) for c in values.cat.categories] if categorical else None
    values = np.asarray(values)
    numeric = values.dtype.kind in "iuf" and not categorical
    if numeric:
        distinct = pd.unique(values[~np.isnan(values)]) if values.dtype.kind == "f" else pd.unique(values)
        whole = all(float(v).is_integer() for v in distinct)
        if not whole or len(distinct) > MAX_CATEGORIES_COLOURED:
            return None
    labels = pd.Series(values).astype(str)
    counts = labels.value_counts(sort=True)
    kept = list(counts.index[:MAX_CATEGORIES_COLOURED])
    if order is not None:  # a categorical: its own order of categories
        coloured = [name for name in order if name in kept] + sorted(set(kept) - set(order))
    elif numeric or all(_is_number(label) for label in kept):  # numbers, or text such as Leiden's "0", "1", ..., "11"
        coloured = [kept[i] for i in np.argsort([float(label) for label in kept], kind="stable")]  # "nan" last
    else:
        coloured = sorted(kept)
    groups = [(name, (labels == name).to_numpy()) for name in coloured]
    rest = ~labels.isin(coloured).to_numpy()
    if rest.any():
        groups.insert(0, (f"{OTHER_LABEL} ({counts.size - len(coloured)} categories)", rest))
    return groups


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def category_colours(n: int) -> list:
    """``n`` distinct colours: matplotlib's ``tab10`` for up to 10 categories, ``tab20`` for up to 20."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if n <= 10 else "tab20"]
    if n > palette.N:
        raise ValueError(f"{n} categories; at most {palette.N} distinct colours.")
    return [palette(i) for i in range(n)]


def draw_groups(ax, coordinates: np.ndarray, groups: list[tuple[str, np.ndarray]]) -> None:
    """Scatter each group of :func:`colour_groups` in its own colour (the "other" group in grey), with a legend."""
    named = [name for name, _ in groups if not name.startswith(OTHER_LABEL)]
    colours = dict(zip(named, category_colours(len(named))))
    for name, chosen in groups:
        colour = colours.get(name, "lightgrey")
        ax.scatter(coordinates[chosen, 0], coordinates[chosen, 1], s=3, alpha=0.6, label=name, color=colour)
    ax.legend(markerscale=4, fontsize=7, loc="best", frameon=False)


def plot_latent(latent: np.ndarray, obs: pd.DataFrame, colour_by: list[str], path: str, title: str = "latent",
                method: str = "pca", seed: int = 0) -> str:
    """Scatter plots of a 2-D view of ``latent``, one panel per column of ``obs`` in ``colour_by``.

    Parameters
    ----------
    latent
        Cells x dimensions.
    obs
        Per-cell table holding the ``colour_by`` columns.
    colour_by
        Columns to colour by (missing ones are skipped); categorical columns get a legend.
    path
        PNG file to write.
    title, method, seed
        Figure title; ``"pca"`` or ``"umap"`` (see :func:`two_dimensional_view`); seed of the UMAP
        and of the subsample.

    Returns
    -------
    str
        ``path``.
    """
    rng = np.random.default_rng(seed)
    shown = np.sort(rng.choice(len(latent), MAX_CELLS_SHOWN, replace=False)) if len(latent) > MAX_CELLS_SHOWN else slice(None)
    coordinates, method = two_dimensional_view(np.asarray(latent)[shown], method, seed)
    columns = [c for c in colour_by if c in obs.columns] or [None]
    figure = Figure(figsize=(5.2 * len(columns), 4.6))
    axes = figure.subplots(1, len(columns), squeeze=False)
    for ax, column in zip(axes[0], columns):
        if column is None:
            ax.scatter(coordinates[:, 0], coordinates[:, 1], s=3, alpha=0.6)
        else:
            groups = colour_groups(obs[column].iloc[shown])
            if groups is None:  # real numbers: a colour scale
                points = ax.scatter(coordinates[:, 0], coordinates[:, 1], s=3, alpha=0.6,
                                    c=np.asarray(obs[column], dtype=float)[shown], cmap="viridis")
                figure.colorbar(points, ax=ax)
            else:
                draw_groups(ax, coordinates, groups)
            ax.set_title(f"coloured by {column}")
        ax.set(xlabel=f"{method} 1", ylabel=f"{method} 2", xticks=[], yticks=[])
    figure.suptitle(f"{title} ({method})")
    return _save(figure, path)


def plot_training_curve(history: pd.DataFrame, path: str) -> str:
    """Loss per epoch: every column of ``history`` whose name ends in ``loss`` (train and validation).

    Returns
    -------
    str
        ``path``.
    """
    figure = Figure(figsize=(5.5, 3.8))
    ax = figure.subplots()
    for column in [c for c in history.columns if str(c).endswith("loss")]:
        values = pd.to_numeric(history[column], errors="coerce")
        if values.notna().any():
            ax.plot(history.index, values, label=str(column).replace("_", " "))
    ax.set(xlabel="epoch", ylabel="loss (negative ELBO per cell)", title="training curve")
    ax.legend(frameon=False)
    return _save(figure, path)


def plot_ite_heatmap(ite: np.ndarray, genes, groups, path: str, n_top: int = 5, condition: str = "") -> str:
    """Heatmap of the mean ITE per group for each group's ``n_top`` genes of largest absolute mean ITE.

    Parameters
    ----------
    ite
        Cells x genes per-cell treatment effects.
    genes
        Gene names (columns of ``ite``).
    groups
        Group label per cell (e.g. cell type).
    path, n_top, condition
        PNG file to write; genes per group; the condition, for the title.

    Returns
    -------
    str
        ``path``.
    """
    groups = np.asarray(groups).astype(str)
    names = list(dict.fromkeys(sorted(groups)))
    means = np.stack([np.asarray(ite[groups == g]).mean(0) for g in names])
    top = list(dict.fromkeys(int(j) for row in np.abs(means) for j in np.argsort(-row)[:n_top]))
    values = means[:, top]
    limit = float(np.abs(values).max()) or 1.0
    figure = Figure(figsize=(max(4.0, 0.35 * len(top) + 2), max(2.5, 0.4 * len(names) + 1.5)))
    ax = figure.subplots()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(top)), [str(np.asarray(genes)[j]) for j in top], rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    figure.colorbar(image, ax=ax, label="mean ITE (log expression)")
    ax.set_title(f"per-cell effects of {condition}, top {n_top} genes per group" if condition else "per-cell effects")
    return _save(figure, path)
