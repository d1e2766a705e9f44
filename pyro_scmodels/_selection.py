"""The cells and genes a user asks a getter for (scvi-tools' ``indices=`` and ``gene_list=``), as positions.

One reading for every getter of the package: the Pyro models' and NDreamer's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class SelectionError(IndexError, KeyError, ValueError):
    """A bad ``indices`` or ``gene_list``: an ``IndexError``/``KeyError`` as the getters always raised, and a
    ``ValueError`` (a bad argument value)."""

    def __str__(self) -> str:  # a KeyError would show its message quoted
        return str(self.args[0]) if self.args else ""


def cell_positions(n_cells: int, indices, names=None, what: str = "the data") -> np.ndarray:
    """``indices`` as integer cell positions, checked.

    Parameters
    ----------
    n_cells
        Cells there are.
    indices
        None (every cell), integer positions, a boolean mask over all cells, or (with ``names``) cell names.
    names
        The cells' names (``obs_names``), to accept names.
    what
        What holds the cells, for the error message.

    Returns
    -------
    numpy.ndarray
        int64 positions, in the order asked for.
    """
    if indices is None:
        return np.arange(n_cells)
    chosen = np.asarray(indices)
    if chosen.ndim != 1:
        raise SelectionError(f"indices must be 1-d (positions, a boolean mask or cell names), got shape {chosen.shape}.")
    if chosen.dtype == bool:
        if chosen.size != n_cells:
            raise SelectionError(f"indices is a boolean mask of {chosen.size} values; {what} hold {n_cells} cells.")
        return np.flatnonzero(chosen)
    if chosen.size == 0 or np.issubdtype(chosen.dtype, np.integer):
        if chosen.size and (chosen.min() < 0 or chosen.max() >= n_cells):
            raise SelectionError(f"indices must be cell positions in [0, {n_cells}), got {chosen.min()} to {chosen.max()}.")
        return chosen.astype(np.int64)
    if names is None:
        raise SelectionError(f"indices must be integer positions or a boolean mask, got {chosen.dtype} values.")
    positions = pd.Index(names).get_indexer(chosen.astype(str))
    if (positions < 0).any():
        raise SelectionError(f"indices: {list(chosen[positions < 0][:5])} are not cells of {what} (obs_names).")
    return positions.astype(np.int64)


def gene_positions(names, gene_list, what: str = "the model", hint: str = "") -> np.ndarray | None:
    """``gene_list`` as gene positions (None when it is None, meaning every gene).

    Parameters
    ----------
    names
        The genes there are.
    gene_list
        A gene name or names.
    what, hint
        What holds the genes, and a sentence on what to do, for the error message.

    Returns
    -------
    numpy.ndarray or None
        int64 positions, in the order asked for.
    """
    if gene_list is None:
        return None
    wanted = [gene_list] if isinstance(gene_list, str) else list(gene_list)
    kinds = np.asarray(wanted).dtype.kind if len(wanted) else "U"
    if kinds in "biu" and not pd.Index(names).isin(wanted).any():
        # positions or a mask, as indices= takes for cells: gene_list takes names, as in scvi-tools
        given = "a boolean mask" if kinds == "b" else "integer positions"
        raise SelectionError(f"gene_list takes gene names (as in scvi-tools); got {given}. Pass the names, e.g. "
                             f"gene_list=genes[mask] with the {len(names)} genes of {what}.")
    positions = pd.Index(names).get_indexer(wanted)
    if (positions < 0).any():
        missing = [g for g, p in zip(wanted, positions) if p < 0]
        raise SelectionError(f"gene_list names {len(missing)} feature(s) not among the {len(names)} genes of {what}: "
                             f"{missing[:5]}.{' ' + hint if hint else ''}")
    return positions.astype(np.int64)
