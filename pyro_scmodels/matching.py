"""Nearest-neighbour matching of cells into groups with FAISS (SPEC 3.5).

Searches are exact (a flat index, or brute force on a GPU) unless a group is large enough on the CPU
for an approximate inverted-file (IVF) index to pay (:func:`choose_method`), whose recall is logged.

:func:`match_groups` matches every cell into each target group, :func:`weighted_average` averages over matches
and :func:`weighted_moments` also gives their mean square (the spread of an effect's interval).
:func:`~pyro_scmodels.faiss_device.resolve_faiss_device` (re-exported here) decides, for every search, whether faiss
runs on the CPU or a GPU; :mod:`~pyro_scmodels.faiss_device` is the one module that imports faiss."""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import positive_float, positive_int
from .faiss_device import (  # noqa: F401  (public here as well: the device decision's API)
    DEVICES, FAISS_GPU_PACKAGE, GPU_INSTALL_HINT, GPU_MAX_K, GPU_REBUILD_HINT, faiss_gpu_available, faiss_module,
    gpu_search_runs, resolve_faiss_device)
from .ivf_search import IVF_RECALL, ivf_lists, ivf_search, settle_near_ties  # noqa: F401  (ivf_lists, IVF_RECALL: public here)

logger = logging.getLogger("pyro_scmodels.matching")

METHODS = ("auto", "exact", "ivf")
#: ``method="auto"`` switches from an exact to an approximate (IVF) CPU search above this many query x base
#: distance evaluations per group: 1.5e10 is about 150k x 100k cells, a few seconds of exact search on 2 cores.
EXACT_MAX_PAIRS = 1.5e10

_gpu_resources = None  # faiss' GPU scratch memory, allocated at the first GPU search


def _as_points(name: str, x) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array of finite values, or ValueError naming ``name``."""
    with np.errstate(over="ignore"):  # values beyond float32's range become inf, rejected below
        array = np.ascontiguousarray(x, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (cells x dimensions), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return array


def choose_method(method: str, n_query: int, n_base: int, device: str) -> str:
    """``"exact"`` or ``"ivf"``: ``"auto"`` is exact on a GPU and for up to :data:`EXACT_MAX_PAIRS` pairs."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    if method != "auto":
        return method
    return "ivf" if device == "cpu" and float(n_query) * n_base > EXACT_MAX_PAIRS else "exact"


def _centred(points: np.ndarray) -> np.ndarray:
    """``points`` minus their mean, float32: faiss ranks by |x|^2 + |y|^2 - 2 x.y (BLAS), and centring keeps the
    norms, and so the cancellation error, small."""
    return points - points.mean(axis=0, dtype=np.float64).astype(np.float32)


def _distances(query: np.ndarray, base: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Euclidean distances from each query row to the base rows it found, (n_query, k) float32.

    Computed in blocks of about 65k query x neighbour pairs: one (n_query, d) temporary per group cost ~2 s
    per 750k queries in page faults alone."""
    distances = np.empty(indices.shape, dtype=np.float32)
    rows = max(1, 2**16 // max(indices.shape[1], 1))
    for start in range(0, len(query), rows):
        block = slice(start, start + rows)
        difference = query[block, None, :] - base[indices[block]]
        distances[block] = np.sqrt(np.einsum("ijk,ijk->ij", difference, difference))
    return distances


def _search(query: np.ndarray, base: np.ndarray, k: int, device: str, method: str = "exact",
            centred: bool = False, sample_from: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search on validated float32 arrays with k <= len(base) on a device from :func:`resolve_faiss_device`
    (``"cuda"`` needs k <= GPU_MAX_K), exact or approximate (``"ivf"``); Euclidean distances, ascending.
    ``centred``: both arrays are already centred on one common point (:func:`_centred`). ``sample_from``: the
    queries that are not base cells, from which the IVF search draws its recall sample."""
    global _gpu_resources
    faiss = faiss_module()
    if centred:
        xq, xb = query, base
    else:
        centre = base.mean(axis=0, dtype=np.float64).astype(np.float32)
        xq, xb = query - centre, base - centre
    if method == "ivf":
        indices = ivf_search(faiss, xq, xb, k, sample_from=sample_from)
    elif device == "cuda":
        if k > GPU_MAX_K:  # resolve_faiss_device keeps this from happening; faiss' own error is less clear
            raise ValueError(f"k={k} exceeds faiss' GPU limit k={GPU_MAX_K}.")
        if _gpu_resources is None:  # GPU scratch memory: allocated once, reused by every search
            _gpu_resources = faiss.StandardGpuResources()
        _, indices = faiss.knn_gpu(_gpu_resources, xq, xb, k)  # no index: one brute-force pass
    else:
        index = faiss.IndexFlatL2(xb.shape[1])
        index.add(xb)
        _, indices = index.search(xq, k)
    if (indices < 0).any():  # faiss' "no neighbour": read as a position, -1 was the last cell
        raise ValueError(f"faiss found no neighbour for {int((indices < 0).any(axis=1).sum())} queries: their "
                         "distances overflow float32. Rescale the embedding (e.g. standardise its columns).")
    indices = indices.astype(np.int64, copy=False)
    if method != "ivf":  # the IVF search ranks its candidates from their codes and checks its own recall
        indices = settle_near_ties(faiss, xq, xb, indices)
    # the square root magnifies what rounding error is left near 0 (~1e-2 from a cell to itself): recompute
    distances = _distances(xq, xb, indices)
    order = np.argsort(distances, axis=1, kind="stable")  # near-ties may swap after the recomputation
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(indices, order, axis=1)


def knn(query, base, k: int = 1, device: str = "auto", method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """L2 nearest neighbours of each query row among the base rows, in one batched search.

    Parameters
    ----------
    query, base
        (n_query, d) and (n_base >= 1, d) arrays, converted to C-contiguous float32.
    k
        Neighbours per query, clamped to ``n_base`` (a base of one cell gives one). faiss' GPU search
        supports at most :data:`GPU_MAX_K` (2048): beyond, ``device="auto"`` searches on the CPU (same
        exact result) and ``device="cuda"`` raises.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``, resolved by :func:`resolve_faiss_device` (independently of
        torch's device): ``"auto"`` is the GPU when :func:`faiss_gpu_available`, else the CPU, said once
        per process; ``"cuda"`` without a GPU faiss raises a ValueError naming what is missing and the fix.
    method
        ``"exact"``, ``"ivf"`` (approximate: an inverted-file index of :func:`ivf_lists` lists, probed as
        few as reach recall@1 :data:`IVF_RECALL` on a sample of queries; its recall@1
        against an exact search of a sample is logged) or ``"auto"``: exact on a GPU, and on the CPU up
        to :data:`EXACT_MAX_PAIRS` query x base pairs, IVF beyond.

    Returns
    -------
    distances : numpy.ndarray
        (n_query, min(k, n_base)) float32 Euclidean (not squared) distances, ascending per row.
    indices : numpy.ndarray
        (n_query, min(k, n_base)) int64 rows of ``base``; exact ties are broken arbitrarily.

    Raises
    ------
    ValueError
        Arrays not 2-d, of different widths or with non-finite values; empty base; unusable device.
    ImportError
        faiss is not installed.
    """
    k = positive_int("k", k)
    query, base = _as_points("query", query), _as_points("base", base)
    if query.shape[1] != base.shape[1]:
        raise ValueError(f"query and base must have as many columns, got query {query.shape} and base {base.shape}.")
    if base.shape[0] == 0:
        raise ValueError("base is empty: there is no cell to match to.")
    k = min(k, len(base))
    faiss_device = resolve_faiss_device(device, k)
    return _search(query, base, k, faiss_device, choose_method(method, len(query), len(base), faiss_device))


def kernel_weights(distances, bandwidth: float = 1.0) -> np.ndarray:
    """Kernel weights exp(-(d - d_min) / bandwidth) of each query's neighbours, rows summing to 1.

    Parameters
    ----------
    distances
        (n_query, k) Euclidean distances, as returned by :func:`knn`.
    bandwidth
        Positive length scale, in distance units.

    Returns
    -------
    numpy.ndarray
        (n_query, k) float64 weights; the nearest neighbour gets the largest, k = 1 gives 1.
    """
    bandwidth = positive_float("bandwidth", bandwidth)
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 2 or distances.shape[1] == 0 or not np.isfinite(distances).all():
        raise ValueError(f"distances must be a finite 2-d array (queries x k, k >= 1), got shape {distances.shape}.")
    weights = np.exp(-(distances - distances.min(axis=1, keepdims=True)) / bandwidth)  # max term 1: no 0 / 0
    return weights / weights.sum(axis=1, keepdims=True)


class GroupMatches(NamedTuple):
    """Matches of the query cells into one target group: ``indices`` is (n_query, k).

    Distances and kernel weights are computed from the embedding when asked, for the rows asked: stored, with
    k = 20 into 8 groups, each was 0.64 GB at 10^6 cells (the centred embedding they come from, n x d float32, is
    kept instead, one copy for every group). They are the computation the search ends with (the
    distances of the cells found, from the same centred coordinates), and NDreamer's effects came out bit for bit
    the same as with stored ones.
    """
    indices: np.ndarray  # positions in the full cell array (not within the group); int32 below 2^31 cells
    points: np.ndarray  # the centred embedding of every cell, shared by the groups of one match_groups call
    bandwidth: float = 1.0  # of the kernel weights

    @property
    def distances(self) -> np.ndarray:
        """Euclidean distances of every row, ascending per row, (n_query, k) float32."""
        return self.distances_of(slice(None))

    @property
    def weights(self) -> np.ndarray:
        """``kernel_weights(distances, bandwidth)`` of every row as float32 (rows sum to 1)."""
        return self.weights_of(slice(None))

    def distances_of(self, rows) -> np.ndarray:
        """The distances of some rows (cells, as an array of positions or a slice)."""
        return _distances(self.points[rows], self.points, self.indices[rows])

    def weights_of(self, rows) -> np.ndarray:
        """The kernel weights of some rows (cells, as an array of positions or a slice)."""
        return kernel_weights(self.distances_of(rows), self.bandwidth).astype(np.float32)


def match_groups(embedding, groups, target_groups=None, k=1, bandwidth=1.0, device="auto", method="auto") -> dict:
    """Match every cell to its nearest cells within each target group.

    For each target group T: one index over the cells of T (exact, or IVF for large groups on the CPU),
    one batched search of all cells (with k = 1, of the cells outside T: a cell of T is its own nearest).

    Parameters
    ----------
    embedding
        (n_cells, d) coordinates of the cells (e.g. the PCA of the NDreamer embedding).
    groups
        1-d label per cell (e.g. batch x condition); cells labelled NaN/None are queried only.
    target_groups
        Labels to match into; default every label, in order of first appearance.
    k, device, method
        As in :func:`knn`; k is clamped to each group's size (k = 1: causal matching). The device is
        resolved once, by :func:`resolve_faiss_device`, for the largest clamped k; the method per group.
    bandwidth
        Passed to :func:`kernel_weights`.

    Returns
    -------
    dict
        Target label -> :class:`GroupMatches` of (n_cells, min(k, group size)) arrays, row i for cell i
        (a cell of T finds itself, at distance 0, in T).
    """
    k, bandwidth = positive_int("k", k), positive_float("bandwidth", bandwidth)
    points = _as_points("embedding", embedding)
    labels = np.asarray(groups, dtype=object)
    if labels.shape != (points.shape[0],):
        raise ValueError(f"groups must be 1-d with one label per cell ({points.shape[0]}), got shape {labels.shape}.")
    codes, uniques = pd.factorize(labels)  # missing labels get code -1
    code_of = {label: code for code, label in enumerate(uniques)}
    if isinstance(target_groups, str):  # one label, not its characters
        target_groups = [target_groups]
    targets = list(uniques) if target_groups is None else list(target_groups)
    missing = [label for label in targets if label not in code_of]
    if missing:
        raise ValueError(f"target_groups {missing} do not occur in groups.")
    sizes = np.bincount(codes[codes >= 0], minlength=len(uniques))
    faiss_device = resolve_faiss_device(device, min(k, max((sizes[code_of[label]] for label in targets), default=1)))
    position_dtype = np.int32 if len(points) <= np.iinfo(np.int32).max else np.int64
    points = _centred(points)  # once for every group, not a copy per group
    matches = {}
    for label in targets:
        members = np.flatnonzero(codes == code_of[label])
        group_k = min(k, members.size)
        # with one neighbour, a cell of the group is its own nearest (distance 0): only the others are searched
        queries = np.flatnonzero(codes != code_of[label]) if group_k == 1 else np.arange(len(points))
        group_method = choose_method(method, queries.size, members.size, faiss_device)
        local = np.zeros((len(points), group_k), dtype=np.int64)
        local[members] = np.arange(members.size)[:, None]
        if queries.size:  # ordered by distance; the distances themselves are recomputed when asked
            # the IVF recall is measured on cells of other groups: a group's own cells find themselves
            outside = np.flatnonzero(codes[queries] != code_of[label])
            local[queries] = _search(points[queries], points[members], group_k, faiss_device, group_method,
                                     centred=True, sample_from=outside)[1]
        # 32-bit positions only: with k = 10 and 8 groups, 64-bit positions with stored weights were 1.6 KB a cell
        matches[label] = GroupMatches(members[local].astype(position_dtype), points, bandwidth)
    return matches


def weighted_average(values, indices, weights=None):
    """Weighted average, for each query, of the rows of ``values`` it was matched to.

    Parameters
    ----------
    values
        (n_cells, n_genes) dense array or scipy sparse matrix (never densified: only matched rows
        are read), an object whose ``rows(positions)`` returns a sparse matrix of those rows
        (:class:`~pyro_scmodels.ndreamer.count_rows.LogNormalisedCounts`), or a length-n_cells vector.
    indices
        (n_query, k) rows of ``values``, e.g. ``GroupMatches.indices``.
    weights
        (n_query, k) non-negative weights, normalised here to sum to 1 per row; default equal.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix
        (n_query, n_genes) averages, CSR for sparse ``values``; float32 for float32 values, else float64.
    """
    rows, indices = _matched_rows(values, indices, read_rows=False)
    return _product(match_selector(indices, weights, rows.shape[0], np.result_type(rows.dtype, np.float32)), rows)


def weighted_moments(values, indices, weights=None, average_weights=None):
    """Weighted average and weighted mean square, for each query, of the rows it was matched to.

    Only the matched rows are read (once each) and squared, in float64 so that the mean square minus
    the squared mean keeps its digits; for many queries that can be nearly every row, so ask for a
    block of queries at a time.

    Parameters
    ----------
    values, indices, weights
        As for :func:`weighted_average`.
    average_weights
        Other (n_query, k) weights: their weighted average is also returned, from the same read of the
        rows and exactly as :func:`weighted_average` gives it (its precision, its order of sums).

    Returns
    -------
    tuple
        ``(mean, mean_square)``: sum_j w_j x_j and sum_j w_j x_j^2 with the weights normalised per
        row, each of the type :func:`weighted_average` returns; with ``average_weights``,
        ``(mean, mean_square, average)``.
    """
    rows, indices = _matched_rows(values, indices, read_rows=True)
    selector = match_selector(indices, weights, rows.shape[0], np.float64)
    wide = rows.astype(np.float64)
    squares = wide.power(2) if sp.issparse(wide) else np.square(wide)
    moments = _product(selector, wide), _product(selector, squares)
    if average_weights is None:
        return moments
    dtype = np.result_type(rows.dtype, np.float32)
    return (*moments, _product(match_selector(indices, average_weights, rows.shape[0], dtype), rows))


def _matched_rows(values, indices, read_rows: bool):
    """Checked ``(rows, indices)``: ``values`` and indices into it, or, with ``read_rows`` (and always for a
    row store, which has no other access), only the matched rows, read once each, and indices into them."""
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[1] == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a 2-d integer array (queries x k), got {indices.dtype} {indices.shape}.")
    row_store = not sp.issparse(values) and callable(getattr(values, "rows", None))  # e.g. LogNormalisedCounts
    values = values if sp.issparse(values) or row_store else np.asarray(values)
    if indices.size and (indices.min() < 0 or indices.max() >= values.shape[0]):
        raise ValueError(f"indices must lie in [0, {values.shape[0]}) (the rows of values).")
    if not (row_store or read_rows):
        return values, indices
    matched, local = np.unique(indices, return_inverse=True)
    # the map to places among the matched rows keeps each query's order of matches, hence the order of sums
    return (values.rows(matched) if row_store else values[matched]), local.reshape(indices.shape)


def match_selector(indices: np.ndarray, weights, n_rows: int, dtype) -> sp.csr_matrix:
    """The matches as a sparse matrix: ``match_selector(...) @ values`` gives each query's weighted mean of its rows.

    Parameters
    ----------
    indices
        (n_query, k) matched row positions.
    weights
        (n_query, k) non-negative weights with a positive sum per query (normalised here); None: equal weights.
    n_rows
        Rows of the values the matches index.
    dtype
        Type of the stored weights.

    Returns
    -------
    scipy.sparse.csr_matrix
        (n_query, n_rows), row q holding q's normalised weights at its matched rows, in q's order of matches.
    """
    n_query, k = indices.shape
    weights = np.ones(indices.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != indices.shape:
        raise ValueError(f"weights and indices must have the same shape, got {weights.shape} and {indices.shape}.")
    totals = weights.sum(axis=1, keepdims=True)
    if not np.isfinite(weights).all() or (weights < 0).any() or (totals <= 0).any():
        raise ValueError("weights must be finite and non-negative, with a positive sum in every row.")
    return sp.csr_matrix(((weights / totals).astype(dtype).ravel(), indices.ravel(), np.arange(0, n_query * k + 1, k)),
                         shape=(n_query, n_rows))


def _product(selector: sp.csr_matrix, values):
    """``selector @ values`` as CSR for sparse values, else as an array (a vector stays a vector)."""
    result = selector @ values
    return sp.csr_matrix(result) if sp.issparse(result) else np.asarray(result)
