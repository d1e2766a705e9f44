"""NDreamer input: log-normalised expression of variable genes and pseudo cell-state labels (SPEC 3.1).

The choice of the variable genes is in :mod:`pyro_scmodels.ndreamer.gene_selection` (imported here).
"""

from __future__ import annotations

import logging

import anndata
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from ..data.counts import CountMatrix, stored_x
from .count_rows import LogNormalisedCounts, index_dtype, storage_dtype
from .gene_selection import condition_response, gene_selection_cells, variable_genes  # noqa: F401  (their import path)
from ._constants import (
    LEIDEN_ITERATIONS,
    LEIDEN_MAX_SINGLETON_SHARE,
    LEIDEN_NEIGHBOURS,
    LEIDEN_PCA_COMPONENTS,
    LEIDEN_RESOLUTIONS,
    LOG_CHECK_SAMPLE,
    LOG_DATA_MAX,
    NORMALISED_SUM_TOLERANCE,
    MIN_CELLS_FOR_LEIDEN,
    READ_CHUNK_CELLS,
    TARGET_SUM,
)

logger = logging.getLogger(__name__)
INDEX32_LIMIT = np.iinfo(np.int32).max  # more stored entries than this need 64-bit CSR indices


def is_log_normalised(matrix) -> bool:
    """True when values are not raw counts (non-integer) and small enough to be log-scale."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()
    if values.size == 0:
        return False
    sample = values[: min(values.size, LOG_CHECK_SAMPLE)]
    if (sample < 0).any() or not np.isfinite(sample).all():
        raise ValueError("Expression must be finite and non-negative (raw counts or log-normalised values).")
    return bool(not np.all(sample == np.round(sample)) and sample.max() < LOG_DATA_MAX)


def _refuse_normalised_unlogged(block: sp.csr_matrix, where: str) -> None:
    """Raise when a block judged log-normalised has every cell summing to one value: normalised but not logged (e.g.
    ``sc.pp.normalize_total(adata, target_sum=1)``), used as log values it gave ITEs about 100 times too small. The
    rows of a log-normalised matrix do not share one sum."""
    totals = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    totals = totals[totals > 0]
    if totals.size >= 2 and np.ptp(totals) <= NORMALISED_SUM_TOLERANCE * totals.max():
        raise ValueError(f"{where} looks normalised but not log-transformed: every cell's values sum to "
                         f"{totals[0]:.4g}. NDreamer needs raw counts or log-normalised values; pass the raw counts "
                         "(layer=...), or take the log first (sc.pp.log1p).")


def _refuse_logged_unnormalised(block: sp.csr_matrix, where: str) -> None:
    """Raise when a block judged log-normalised is the log of raw counts (``sc.pp.log1p`` without
    ``normalize_total``): every value's expm1 is a whole number. Its cells keep their sequencing depth, which every
    match and every effect would then carry."""
    values = np.asarray(block.data[:LOG_CHECK_SAMPLE], dtype=np.float64)
    restored = np.expm1(values[values > 0])
    # float32 log1p values give back counts to about 1e-6 of their size
    if restored.size and np.all(np.abs(restored - np.round(restored)) <= 1e-3 + 1e-5 * restored):
        raise ValueError(f"{where} looks like log1p of raw counts, not normalised: every value's expm1 is a whole "
                         "number, so each cell keeps its sequencing depth. Pass the raw counts (layer=...), or "
                         "normalise before the log (sc.pp.normalize_total, then sc.pp.log1p).")


def _stored_entries(source: CountMatrix) -> int | None:
    """Entries stored in the CSR behind ``source`` (read from its indptr), or None if it is not a CSR."""
    if source.disk is not None:
        return int(source.disk.indptr[-1])
    return int(source.matrix.nnz) if sp.isspmatrix_csr(source.matrix) or isinstance(source.matrix, sp.csr_array) else None


def _row_blocks(source: CountMatrix, cells: np.ndarray | None, merged: list[int] | None = None):
    """``(first_row, block)`` for consecutive CSR blocks of the chosen rows (all rows when ``cells`` is None), each
    entry stored once; ``merged[0]`` counts the stored entries summed into others."""
    if cells is None:
        for start, _, block in source.chunks(READ_CHUNK_CELLS):
            yield start, _canonical(block, merged)
        return
    for start in range(0, cells.size, READ_CHUNK_CELLS):
        positions = cells[start : start + READ_CHUNK_CELLS]
        block = source.disk.rows(positions) if source.disk is not None else source.matrix[positions]
        yield start, _canonical(block, merged)


def _canonical(block, merged: list[int] | None = None) -> sp.csr_matrix:
    """A block as CSR with each entry stored once: scipy sums an entry stored twice, but log1p of each part summed
    is not log1p of the sum (7.5 log units off in one cell). Dense float16 is widened: scipy's sparse matrices have no
    float16 (NDreamer failed inside scipy on counts RegularizedVI trains on)."""
    if getattr(block, "dtype", None) == np.float16:
        block = block.astype(np.float32)
    block = sp.csr_matrix(block)
    if not block.has_canonical_format:
        stored = block.nnz
        block.sum_duplicates()
        if merged is not None:
            merged[0] += stored - block.nnz
    return block


def _check_values(block: sp.csr_matrix, first_row: int, where: str, log_input: bool | None) -> None:
    """Raise on NaN, Inf or negative values in a block: the first block's check saw only its first values, and
    a NaN further on failed in the PCA (sklearn's "Input X contains NaN") or, negative, was taken as it was."""
    bad = ~np.isfinite(block.data) | (block.data < 0)
    if bad.any():
        row = first_row + int(np.searchsorted(block.indptr, np.flatnonzero(bad)[0], side="right") - 1)
        value = float(block.data[bad][0])
        kind = {True: "log-normalised values", False: "raw counts", None: "raw counts or log-normalised values"}[log_input]
        raise ValueError(f"{where} holds {value:g} at row {row} of the cells read: NDreamer needs finite, non-negative "
                         f"{kind}. Pass the layer of raw counts (layer=...), or fix those cells.")


def _stack_blocks(blocks, total: int, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
                  merged: list[int] | None = None):
    """Fill ``data``, ``indices`` and ``indptr`` (allocated once for ``total`` entries) from ``(first_row, block)``
    CSR blocks; a list of blocks and then a stacked copy would hold the matrix twice.

    Integer ``data`` is widened (:func:`~pyro_scmodels.ndreamer.count_rows.storage_dtype`) when a block
    holds values it cannot store exactly. ``merged``: the entries stored twice that the blocks summed
    (:func:`_canonical`), which ``total``, read from the store, still counts. Returns the three arrays.
    """
    filled = 0
    for start, block in blocks:
        if filled + block.nnz > total:
            raise ValueError(f"Read more stored entries than counted ({total}); is the file being written?")
        wider = storage_dtype(block.data, data.dtype)
        if wider != data.dtype:  # a count above 65,535, or a non-integer value: widen once
            data = data.astype(wider)
        data[filled : filled + block.nnz] = block.data
        indices[filled : filled + block.nnz] = block.indices
        # each block has 32-bit offsets of its own: widen them before adding the entries already written
        indptr[start + 1 : start + block.shape[0] + 1] = block.indptr[1:].astype(indptr.dtype) + filled
        filled += block.nnz
    expected = total - (merged[0] if merged else 0)
    if filled != expected:  # the store changed under us, or its indptr does not match its data
        raise ValueError(f"Read {filled} stored entries where {expected} were counted; is the file being written?")
    if filled < total:  # entries stored twice were summed: views of the first entries (no second copy)
        data, indices = data[:filled], indices[:filled]
    return data, indices, indptr


def _into_csr(blocks, n_rows: int, n_columns: int, total: int, merged: list[int] | None = None) -> sp.csr_matrix:
    """Stack ``(first_row, block)`` float32 CSR blocks into one CSR (:func:`_stack_blocks`)."""
    index_dtype = np.int32 if max(total, n_columns) < INDEX32_LIMIT else np.int64
    arrays = _stack_blocks(blocks, total, np.empty(total, dtype=np.float32), np.empty(total, dtype=index_dtype),
                           np.zeros(n_rows + 1, dtype=index_dtype), merged)
    return sp.csr_matrix(arrays, shape=(n_rows, n_columns))


def _size_factors(block: sp.csr_matrix, first_row: int, where: str) -> np.ndarray:
    """float32 ``TARGET_SUM / total`` of every cell of a float32 block (totals over every gene)."""
    totals = np.asarray(block.sum(1)).ravel()
    if (totals <= 0).any():
        raise ValueError(f"{int((totals <= 0).sum())} cell(s) have no counts in {where} (first at row "
                         f"{first_row + int(np.flatnonzero(totals <= 0)[0])} of the cells read); remove them first, "
                         "e.g. sc.pp.filter_cells(adata, min_counts=1).")
    return (TARGET_SUM / totals).astype(np.float32)


def _normalised(block, first_row: int, log_input: bool, where: str, keep: np.ndarray | None) -> sp.csr_matrix:
    """One block as float32 CSR: log1p(TARGET_SUM x / total) of counts (totals over every gene), kept columns."""
    block = sp.csr_matrix(block, dtype=np.float32)
    _check_values(block, first_row, where, log_input)
    if not log_input:
        block.data *= np.repeat(_size_factors(block, first_row, where), np.diff(block.indptr))
        np.log1p(block.data, out=block.data)
    return block if keep is None else block[:, keep].tocsr()


def _into_counts(blocks, where: str, keep: np.ndarray | None, n_rows: int, n_columns: int,
                 total: int, merged: list[int] | None = None) -> LogNormalisedCounts:
    """The raw-count ``(first_row, block)`` blocks as :class:`LogNormalisedCounts` (:func:`_stack_blocks`).

    The counts start as uint16 and are widened only when a block needs it, and each cell's size
    factor is that of :func:`_normalised`, so the rows read are exactly its values.
    """
    factors = np.empty(n_rows, dtype=np.float32)

    def kept_counts():
        for start, block in blocks:
            block = sp.csr_matrix(block, dtype=np.float32)
            _check_values(block, start, where, log_input=False)
            factors[start : start + block.shape[0]] = _size_factors(block, start, where)  # over every gene
            yield start, block if keep is None else block[:, keep].tocsr()

    counts, indices, indptr = _stack_blocks(kept_counts(), total, np.empty(total, dtype=np.uint16),
                                            np.empty(total, dtype=index_dtype(n_columns)),
                                            np.zeros(n_rows + 1, dtype=np.int64), merged)
    return LogNormalisedCounts(counts, indices, indptr, factors, n_columns)


def log_normalise(adata: anndata.AnnData, layer: str | None = None, genes=None, cells=None, compact: bool = False):
    """log1p of counts per ``TARGET_SUM`` (raw counts), or the matrix as it is when it already is log-normalised.

    The input is read in blocks of rows, so a backed AnnData (``anndata.read_h5ad(path,
    backed="r")``) never has to fit in memory: the result is the sparse log-normalised matrix of
    the cells and genes asked for, and no dense cells x genes array is made.

    Parameters
    ----------
    adata
        Cells x genes; in memory or backed.
    layer
        Layer holding the counts (or log-normalised values); ``None`` for ``adata.X``.
    genes
        Boolean mask or positions of the genes to keep (default all). Each cell's total is still
        taken over every gene.
    cells
        Positions of the cells to read, increasing (default all).
    compact
        For raw-count input, return :class:`~pyro_scmodels.ndreamer.count_rows.LogNormalisedCounts`
        (the counts and a size factor per cell, 4 bytes per stored entry instead of 8; its rows are
        the same float32 values). Log-normalised input is returned as a CSR either way.

    Returns
    -------
    scipy.sparse.csr_matrix or LogNormalisedCounts
        Cells x genes asked for, float32.
    """
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found; layers: {list(adata.layers.keys())}.")
    source = CountMatrix(stored_x(adata) if layer is None else adata.layers[layer], name=where, validate=False)
    if cells is not None:
        cells = np.asarray(cells, dtype=np.int64)
        if cells.size == 0 or np.any(np.diff(cells) <= 0) or cells[0] < 0 or cells[-1] >= source.n_cells:
            raise ValueError(f"cells must be increasing positions in 0..{source.n_cells - 1}, at least one.")
    keep = None
    if genes is not None:
        keep = np.asarray(genes)
        keep = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
    n_rows = source.n_cells if cells is None else cells.size
    n_columns = source.n_features if keep is None else keep.size
    # raw counts or log values, judged on the first block (its first LOG_CHECK_SAMPLE stored values)
    first_row, first = next(_row_blocks(source, cells))
    first = sp.csr_matrix(first, dtype=np.float32)
    _check_values(first, first_row, where, log_input=None)  # named here, before the type of values is judged
    log_input = is_log_normalised(first)
    if log_input:
        _refuse_normalised_unlogged(first, where)
        _refuse_logged_unnormalised(first, where)
        logger.info("NDreamer: the input looks log-normalised (non-integer values below %g); used as it is.", LOG_DATA_MAX)
    else:
        logger.info("NDreamer: the input looks like raw counts; normalising to %g per cell and taking log1p.", TARGET_SUM)
    total = _stored_entries(source) if cells is None and keep is None else None
    # the store's own count includes entries stored twice, which the blocks sum: they are counted as they go
    merged = [0] if total is not None else None
    if total is None:  # a first pass counts the entries kept (normalising keeps them), to allocate the result once
        total = sum((block if keep is None else block[:, keep]).nnz for _, block in _row_blocks(source, cells))
    if compact and not log_input:
        return _into_counts(_row_blocks(source, cells, merged), where, keep, n_rows, n_columns, total, merged)
    blocks = ((start, _normalised(block, start, log_input, where, keep))
              for start, block in _row_blocks(source, cells, merged))
    return _into_csr(blocks, n_rows, n_columns, total, merged)


def _leiden(frame: anndata.AnnData, resolution: float, seed: int) -> np.ndarray:
    """Leiden labels (0, 1, ...) of ``frame``'s neighbour graph at ``resolution``."""
    sc.tl.leiden(frame, resolution=resolution, key_added="leiden", random_state=seed, flavor="igraph",
                 n_iterations=LEIDEN_ITERATIONS, directed=False)
    return frame.obs["leiden"].astype(int).to_numpy()


def _singleton_share(codes: np.ndarray) -> float:
    """The share of cells that are alone in their label."""
    sizes = np.bincount(codes)
    return float((sizes[codes] == 1).mean())


def pseudo_labels(log_expression: sp.csr_matrix, groups: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Leiden clusters at low and high resolution, found within each batch x condition group.

    Where the high resolution leaves more than ``LEIDEN_MAX_SINGLETON_SHARE`` of a group's cells alone in their
    label (groups of up to a few hundred cells), that group's high-resolution labels are found at a resolution
    halved until it does not (not below the low resolution).

    Returns two integer label vectors (unique across groups), aligned with the cells.
    """
    labels = {resolution: np.zeros(len(groups), dtype=np.int64) for resolution in LEIDEN_RESOLUTIONS}
    offset = {resolution: 0 for resolution in LEIDEN_RESOLUTIONS}
    for group in dict.fromkeys(groups):
        cells = np.flatnonzero(groups == group)
        if len(cells) < MIN_CELLS_FOR_LEIDEN:
            for resolution in LEIDEN_RESOLUTIONS:
                labels[resolution][cells] = offset[resolution]
                offset[resolution] += 1
            continue
        frame = anndata.AnnData(X=log_expression[cells])
        n_components = min(LEIDEN_PCA_COMPONENTS, len(cells) - 1, frame.n_vars - 1)
        sc.pp.pca(frame, n_comps=n_components, random_state=seed)
        # the gaussian kernel avoids compiling umap's numba code (seconds) for a connectivity graph
        sc.pp.neighbors(frame, n_neighbors=min(LEIDEN_NEIGHBOURS, len(cells) - 1), random_state=seed, method="gauss", transformer="sklearn")
        for resolution in LEIDEN_RESOLUTIONS:
            codes = _leiden(frame, resolution, seed)
            used = resolution
            # a small group splits into single cells at the high resolution; halving it (not below the low one)
            # until few cells are alone keeps the triplet term's positives
            while used > LEIDEN_RESOLUTIONS[0] and _singleton_share(codes) > LEIDEN_MAX_SINGLETON_SHARE:
                used = max(used / 2, LEIDEN_RESOLUTIONS[0])
                codes = _leiden(frame, used, seed)
            if used != resolution:
                # str(): numpy's label read np.str_('101|stim') in the message
                logger.info("NDreamer: group '%s' (%d cells) split into single cells at Leiden resolution %g; its "
                            "high-resolution labels use %g.", str(group), len(cells), resolution, used)
            labels[resolution][cells] = codes + offset[resolution]
            offset[resolution] += codes.max() + 1
    return labels[LEIDEN_RESOLUTIONS[0]], labels[LEIDEN_RESOLUTIONS[1]]
