"""Kernel-weighted sums of each cell's matched rows, as dense arrays: the inner loop of every matched effect.

A cell's matched value in a group is ``sum_j w_j x_j`` over its k matched rows, and the interval also takes
the plain mean and mean square of those rows (:mod:`.effect_intervals`). For sparse expression,
:func:`~pyro_scmodels.matching.weighted_average` forms them as a product of two sparse matrices (a
selector of the matches times the rows), which scipy computes in two passes over every stored entry
of every matched row, k times over, and which the caller then densifies anyway. Here, when it pays, the
matched rows are densified once and the sparse selector multiplies that dense block: no counting pass,
and a simple multiply-add per value. The sums are taken in the same order and the same precision, so
the results are the same numbers; where the dense block would not pay (sparse rows, or far more matched
rows than cells) or would not fit, the sparse product is kept.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..matching import match_selector, weighted_average, weighted_moments

#: how many dense multiply-adds cost as much as one stored entry in scipy's sparse @ sparse (its count
#: pass and its product, ~9.5 ns an entry against ~1 ns a multiply-add, 10^4 cells, k = 20, 2,000
#: genes, 2026-12-06): the dense block is used when its multiply-adds cost less
SPARSE_ENTRY_COST = 8
#: the most values (matched rows x genes kept) in the dense block of matched rows: 2 x a block of
#: 10^4 cells (``WRITE_CHUNK_CELLS``) x 2,000 genes, 160 MB as float32
DENSE_ROWS_MAX_VALUES = 40_000_000
#: values (matched rows x genes) per float64 copy of a slice of that block, for the moments: 64 MB
WIDE_SLICE_VALUES = 1 << 23


def dense_block(values, genes: np.ndarray | None = None) -> np.ndarray:
    """A block of rows as a dense array.

    Parameters
    ----------
    values
        Rows: dense, sparse or a matrix-like with ``todense``.
    genes
        Column positions kept (default all).

    Returns
    -------
    numpy.ndarray
        The rows, dense, of the columns ``genes`` only when given.
    """
    if genes is not None:
        values = values[:, genes]
    return np.asarray(values.todense()) if hasattr(values, "todense") else np.asarray(values)


def matched_mean(values, indices: np.ndarray, weights: np.ndarray, genes: np.ndarray | None = None) -> np.ndarray:
    """Kernel-weighted mean of each query's matched rows, dense, of the columns ``genes`` (default all).

    Parameters
    ----------
    values
        Cells x genes: dense, sparse or a row store (as :func:`~pyro_scmodels.matching.weighted_average`).
    indices, weights
        (queries, k) matched rows and their weights (normalised here).
    genes
        Gene positions kept (default all).

    Returns
    -------
    numpy.ndarray
        (queries, genes), the same numbers as ``weighted_average(values, indices, weights)`` densified.
    """
    block = _dense_rows(values, indices, genes, products=1)
    if block is None:
        return dense_block(weighted_average(values, indices, weights), genes)
    rows, local = block
    return _times(match_selector(local, weights, rows.shape[0], np.result_type(rows.dtype, np.float32)), rows)


def matched_moments(values, indices: np.ndarray, weights: np.ndarray, genes: np.ndarray | None = None):
    """Plain mean and mean square of each query's matched rows (float64) and their kernel-weighted mean, dense.

    Parameters
    ----------
    values, indices, weights, genes
        As for :func:`matched_mean`.

    Returns
    -------
    tuple
        ``(plain_mean, plain_square, mean)``, (queries, genes) arrays: the same numbers as
        ``weighted_moments(values, indices, average_weights=weights)`` densified.
    """
    block = _dense_rows(values, indices, genes, products=3)
    if block is None:
        return tuple(dense_block(v, genes) for v in weighted_moments(values, indices, average_weights=weights))
    rows, local = block
    equal = match_selector(local, None, rows.shape[0], np.float64)
    width = max(1, WIDE_SLICE_VALUES // max(rows.shape[0], 1))
    if width >= rows.shape[1]:
        wide = rows.astype(np.float64)
        plain_mean, plain_square = _times(equal, wide), _times(equal, np.square(wide, out=wide))
    else:  # float64 copies of a slice of columns at a time: the block itself stays in its own (float32) type
        plain_mean, plain_square = np.empty((local.shape[0], rows.shape[1])), np.empty((local.shape[0], rows.shape[1]))
        for start in range(0, rows.shape[1], width):
            wide = rows[:, start:start + width].astype(np.float64)
            plain_mean[:, start:start + width] = _times(equal, wide)
            plain_square[:, start:start + width] = _times(equal, np.square(wide, out=wide))
    mean = _times(match_selector(local, weights, rows.shape[0], np.result_type(rows.dtype, np.float32)), rows)
    return plain_mean, plain_square, mean


def _dense_rows(values, indices, genes, products: int):
    """``(rows, local)``: the matched rows, dense, of the columns kept, and indices into them; None where the
    sparse product is cheaper or the block would not fit, and for other inputs than a CSR matrix or a row store
    with row offsets (a dense ``values`` already gets a sparse x dense product)."""
    offsets = getattr(values, "indptr", None)
    if offsets is None or (sp.issparse(values) and values.format != "csr"):
        return None
    if not sp.issparse(values) and not callable(getattr(values, "rows", None)):
        return None
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer) \
            or indices.min() < 0 or indices.max() >= values.shape[0]:
        return None  # the sparse route raises its error
    matched, local = np.unique(indices, return_inverse=True)
    n_query, k = indices.shape
    n_genes = values.shape[1] if genes is None else len(genes)
    if matched.size * n_genes > DENSE_ROWS_MAX_VALUES:
        return None
    # stored entries of a matched row, about, among the genes kept (from the offsets: no row is read)
    stored = float((offsets[matched + 1] - offsets[matched]).mean()) * n_genes / max(values.shape[1], 1)
    # per product: k multiply-adds per query and gene kept, against k rows' stored entries per query;
    # the block is written once for all the products
    if products * n_query * k * n_genes + matched.size * n_genes >= SPARSE_ENTRY_COST * products * n_query * k * stored:
        return None
    rows = values[matched] if sp.issparse(values) else values.rows(matched)
    # local keeps each query's order of matches, hence the order of the sums
    return dense_block(rows, genes), local.reshape(indices.shape)


def _times(selector: sp.csr_matrix, block: np.ndarray) -> np.ndarray:
    """``selector @ block`` for a dense block: scipy's sparse x dense, which sums each query's matches in order
    (as its sparse x sparse does: the same numbers)."""
    return np.asarray(selector @ np.ascontiguousarray(block))
