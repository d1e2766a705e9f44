"""NDreamer input: log-normalised expression of variable genes and pseudo cell-state labels (SPEC 3.1)."""

from __future__ import annotations

import logging
import warnings

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from ..data.counts import CountMatrix, stored_x
from .count_rows import LogNormalisedCounts, index_dtype, storage_dtype
from ._constants import (
    HVG_MAX_CELLS,
    HVG_MIN_CELLS_PER_GROUP,
    LEIDEN_ITERATIONS,
    LEIDEN_NEIGHBOURS,
    LEIDEN_PCA_COMPONENTS,
    LEIDEN_RESOLUTIONS,
    LOG_CHECK_SAMPLE,
    LOG_DATA_MAX,
    MIN_CELLS_FOR_LEIDEN,
    READ_CHUNK_CELLS,
    RESPONSE_GENE_SHARE,
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


def condition_response(log_expression: sp.csr_matrix, batch: np.ndarray, condition: np.ndarray,
                       control_name: str) -> np.ndarray:
    """How strongly each gene responds to the condition, measured within batches.

    For every treatment ``t`` and every batch holding both ``t`` and the control, the difference of
    mean log expression ``mean_t - mean_control``; these are averaged over the batches (so a
    response must be consistent, and differences between batches never count) and the largest
    absolute value over the treatments is the gene's score. When no batch holds both, the
    difference is taken over all cells.

    Parameters
    ----------
    log_expression
        Cells x genes, log-normalised.
    batch, condition
        Batch and condition label of every cell.
    control_name
        The control condition.

    Returns
    -------
    numpy.ndarray
        One non-negative score per gene (log scale: 1 is an e-fold change of ``1 + expression``).
    """
    batch, condition = np.asarray(batch).astype(str), np.asarray(condition).astype(str)
    mean = lambda cells: np.asarray(log_expression[np.flatnonzero(cells)].mean(0)).ravel()  # noqa: E731
    score = np.zeros(log_expression.shape[1])
    for treatment in dict.fromkeys(condition[condition != control_name]):
        differences = [mean((batch == b) & (condition == treatment)) - mean((batch == b) & (condition == control_name))
                       for b in dict.fromkeys(batch)
                       if ((batch == b) & (condition == treatment)).any() and ((batch == b) & (condition == control_name)).any()]
        if not differences:
            differences = [mean(condition == treatment) - mean(condition == control_name)]
        score = np.maximum(score, np.abs(np.mean(differences, axis=0)))
    return score


def gene_selection_cells(groups: np.ndarray, max_cells: int = HVG_MAX_CELLS,
                         min_per_group: int = HVG_MIN_CELLS_PER_GROUP, seed: int = 0) -> np.ndarray | None:
    """The cells the variable genes are chosen on: all (None) up to ``max_cells``, else a seeded sample.

    Each group (batch x condition) gives cells in proportion to its size, and at least
    ``min(size, min_per_group)``, so that small groups still count in the within-batch
    condition response and the per-batch dispersions.

    Parameters
    ----------
    groups
        Group label of every cell.
    max_cells, min_per_group
        Size of the sample; fewest cells taken from a group.
    seed
        Seed of the sample.

    Returns
    -------
    numpy.ndarray or None
        Increasing cell positions, or None for every cell.
    """
    groups = np.asarray(groups)
    if groups.size <= max_cells:
        return None
    rng = np.random.default_rng(seed)
    share = max_cells / groups.size
    chosen = []
    for name in np.unique(groups):
        members = np.flatnonzero(groups == name)
        take = min(members.size, max(int(round(share * members.size)), min_per_group))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))


def variable_genes(log_expression: sp.csr_matrix, genes, batch: np.ndarray, condition: np.ndarray,
                   control_name: str, num_hvg: int, response_share: float = RESPONSE_GENE_SHARE) -> np.ndarray:
    """Boolean mask of ``num_hvg`` genes: those that respond to the condition, then the most variable.

    First the ``ceil(response_share * num_hvg)`` genes with the largest
    :func:`condition_response` (within-batch difference between conditions), then the most
    variable genes (scanpy, seurat flavour, per batch with the conditions pooled) until
    ``num_hvg`` genes are chosen. All genes when there are no more than ``num_hvg``.

    Why both parts. Variability judged inside each batch x condition group cannot see a
    response: a gene that every stimulated cell switches on is not variable among stimulated
    cells. On the Kang IFN-beta data (1975 cells, 6998 genes) at ``num_hvg=2000``, HVGs per
    batch x condition group keep ISG15 but drop IFI6, IFIT1 and IFIT3, and HVGs on the pooled
    data still drop those three (they are highly expressed, and seurat dispersions are
    normalised within mean bins); ranked by the within-batch condition difference they are the
    top four genes. The variable part keeps the genes that describe the cell states.

    Parameters
    ----------
    log_expression
        Cells x genes, log-normalised.
    genes
        Gene names (for scanpy).
    batch, condition, control_name
        Batch and condition of every cell, and the control condition.
    num_hvg
        Genes kept.
    response_share
        Share of ``num_hvg`` given to the condition-responding genes, in [0, 1].

    Returns
    -------
    numpy.ndarray
        Boolean mask over the genes.
    """
    if not 0.0 <= response_share <= 1.0:
        raise ValueError(f"response_share must be in [0, 1], got {response_share}.")
    n_genes = len(genes)
    if n_genes <= num_hvg:
        return np.ones(n_genes, dtype=bool)
    n_response = int(np.ceil(response_share * num_hvg))
    # stable sort: ties (e.g. genes zero everywhere) keep gene order, so the choice is deterministic
    chosen = list(np.argsort(-condition_response(log_expression, batch, condition, control_name), kind="stable")[:n_response])
    # a text index: anndata warns ("Transforming to str index") on the default integer one
    cells = pd.Index(np.arange(len(batch)).astype(str))
    frame = anndata.AnnData(X=log_expression, obs=pd.DataFrame({"batch": pd.Categorical(np.asarray(batch).astype(str))},
                                                              index=cells),
                            var=pd.DataFrame(index=pd.Index(genes).astype(str)))
    batch_key = "batch" if frame.obs["batch"].nunique() > 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(frame, n_top_genes=num_hvg, flavor="seurat", batch_key=batch_key)
    var = frame.var.reset_index(drop=True)
    # scanpy's own ranking: in more batches first, then by normalised dispersion
    keys = ["highly_variable_nbatches", "dispersions_norm"] if batch_key else ["dispersions_norm"]
    ranked = var.assign(dispersions_norm=var["dispersions_norm"].fillna(-np.inf)).sort_values(keys, ascending=False, kind="stable").index
    taken = set(chosen)
    for gene in ranked:
        if len(chosen) >= num_hvg:
            break
        if gene not in taken:
            chosen.append(gene)
            taken.add(gene)
    mask = np.zeros(n_genes, dtype=bool)
    mask[chosen] = True
    return mask


def pseudo_labels(log_expression: sp.csr_matrix, groups: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Leiden clusters at low and high resolution, found within each batch x condition group.

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
            sc.tl.leiden(frame, resolution=resolution, key_added="leiden", random_state=seed, flavor="igraph",
                         n_iterations=LEIDEN_ITERATIONS, directed=False)
            codes = frame.obs["leiden"].astype(int).to_numpy()
            labels[resolution][cells] = codes + offset[resolution]
            offset[resolution] += codes.max() + 1
    return labels[LEIDEN_RESOLUTIONS[0]], labels[LEIDEN_RESOLUTIONS[1]]
