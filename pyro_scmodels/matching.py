"""Exact nearest-neighbour matching of cells into groups with FAISS (SPEC 3.5); the only module importing faiss.

:func:`match_groups` matches every cell into each target group, :func:`weighted_average` averages over matches."""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import positive_float, positive_int

logger = logging.getLogger("pyro_scmodels.matching")
_gpu_resources = None
_cpu_fallback_logged = False


def _faiss():
    """The faiss module, imported on first use, with an ImportError that says what to install."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError("pyro_scmodels.matching needs faiss: pip install faiss-cpu (or faiss-gpu for CUDA, "
                          "instead: only one can be installed).") from error
    return faiss


def _gpu_problem() -> str | None:
    """Why faiss cannot search on a GPU here, or None when it can."""
    try:
        faiss = _faiss()
    except ImportError:
        return "faiss is not installed"
    # faiss-cpu defines knn_gpu too (a Python wrapper), but not the GPU classes
    if not hasattr(faiss, "StandardGpuResources"):
        return "the installed faiss has no GPU support (faiss-cpu; install faiss-gpu instead)"
    if getattr(faiss, "get_num_gpus", lambda: 0)() < 1:
        return "faiss has GPU support but sees no CUDA device (faiss.get_num_gpus() == 0)"
    return None


def faiss_gpu_available() -> bool:
    """Whether exact searches can run on a GPU.

    Returns
    -------
    bool
        True only if faiss was built with GPU support and ``faiss.get_num_gpus() > 0`` (faiss-gpu
        imports on CPU-only hosts, where ``index_cpu_to_all_gpus`` silently gives an empty index).
    """
    return _gpu_problem() is None


def _use_gpu(device: str) -> bool:
    """Resolve ``device`` (see :func:`knn`) to True for the GPU, False for the CPU."""
    global _cpu_fallback_logged
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', got {device!r}.")
    if device == "cpu":
        return False
    problem = _gpu_problem()
    if device == "cuda" and problem is not None:
        raise ValueError(f"device='cuda' cannot be used: {problem}.")
    if problem is not None and not _cpu_fallback_logged:
        logger.info("Nearest-neighbour search runs on the CPU: %s.", problem)
        _cpu_fallback_logged = True
    return problem is None


def _as_points(name: str, x) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array of finite values, or ValueError naming ``name``."""
    with np.errstate(over="ignore"):  # values beyond float32's range become inf, rejected below
        array = np.ascontiguousarray(x, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (cells x dimensions), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return array


def _search(query: np.ndarray, base: np.ndarray, k: int, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact search on validated float32 arrays with k <= len(base); Euclidean distances, ascending."""
    global _gpu_resources
    faiss = _faiss()
    # faiss ranks by |x|^2 + |y|^2 - 2 x.y (BLAS): centring keeps the norms, and the cancellation error, small
    centre = base.mean(axis=0, dtype=np.float64).astype(np.float32)
    xq, xb = query - centre, base - centre
    if gpu:
        if _gpu_resources is None:  # GPU scratch memory: allocated once, reused by every search
            _gpu_resources = faiss.StandardGpuResources()
        _, indices = faiss.knn_gpu(_gpu_resources, xq, xb, k)  # no index: one brute-force pass
    else:
        index = faiss.IndexFlatL2(xb.shape[1])
        index.add(xb)
        _, indices = index.search(xq, k)
    # the square root magnifies what rounding error is left near 0 (~1e-2 from a cell to itself): recompute
    indices = indices.astype(np.int64, copy=False)
    distances = np.stack([np.linalg.norm(query - base[indices[:, j]], axis=1) for j in range(k)], axis=1)
    order = np.argsort(distances, axis=1, kind="stable")  # near-ties may swap after the recomputation
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(indices, order, axis=1)


def knn(query, base, k: int = 1, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 nearest neighbours of each query row among the base rows, in one batched search.

    Parameters
    ----------
    query, base
        (n_query, d) and (n_base >= 1, d) arrays, converted to C-contiguous float32.
    k
        Neighbours per query, clamped to ``n_base`` (a base of one cell gives one); at most 2048 on a GPU.
    device
        ``"auto"``: the GPU when :func:`faiss_gpu_available`, else the CPU (logged once, INFO, logger
        ``pyro_scmodels.matching``); ``"cpu"``; ``"cuda"``: the GPU, or ValueError saying what is missing.

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
    """
    k = positive_int("k", k)
    query, base = _as_points("query", query), _as_points("base", base)
    if query.shape[1] != base.shape[1]:
        raise ValueError(f"query and base must have as many columns, got query {query.shape} and base {base.shape}.")
    if base.shape[0] == 0:
        raise ValueError("base is empty: there is no cell to match to.")
    return _search(query, base, min(k, len(base)), _use_gpu(device))


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
    """Matches of the query cells into one target group; each array is (n_query, k)."""
    indices: np.ndarray  # positions in the full cell array (not within the group)
    distances: np.ndarray  # Euclidean, ascending per row
    weights: np.ndarray  # kernel_weights(distances): rows sum to 1


def match_groups(embedding, groups, target_groups=None, k=1, bandwidth=1.0, device="auto") -> dict:
    """Match every cell to its nearest cells within each target group.

    For each target group T: one exact index over the cells of T, one batched search of all cells.

    Parameters
    ----------
    embedding
        (n_cells, d) coordinates of the cells (e.g. the PCA of the NDreamer embedding).
    groups
        1-d label per cell (e.g. batch x condition); cells labelled NaN/None are queried only.
    target_groups
        Labels to match into; default every label, in order of first appearance.
    k, device
        As in :func:`knn`; k is clamped to each group's size (k = 1: causal matching).
    bandwidth
        Passed to :func:`kernel_weights`.

    Returns
    -------
    dict
        Target label -> :class:`GroupMatches` of (n_cells, min(k, group size)) arrays, row i for cell i
        (a cell of T finds itself, at distance 0, in T).
    """
    k = positive_int("k", k)
    points = _as_points("embedding", embedding)
    labels = np.asarray(groups, dtype=object)
    if labels.shape != (points.shape[0],):
        raise ValueError(f"groups must be 1-d with one label per cell ({points.shape[0]}), got shape {labels.shape}.")
    codes, uniques = pd.factorize(labels)  # missing labels get code -1
    code_of = {label: code for code, label in enumerate(uniques)}
    targets = list(uniques) if target_groups is None else list(target_groups)
    missing = [label for label in targets if label not in code_of]
    if missing:
        raise ValueError(f"target_groups {missing} do not occur in groups.")
    gpu, matches = _use_gpu(device), {}
    for label in targets:
        members = np.flatnonzero(codes == code_of[label])
        distances, local = _search(points, points[members], min(k, members.size), gpu)
        matches[label] = GroupMatches(members[local], distances, kernel_weights(distances, bandwidth))
    return matches


def weighted_average(values, indices, weights=None):
    """Weighted average, for each query, of the rows of ``values`` it was matched to.

    Parameters
    ----------
    values
        (n_cells, n_genes) dense array or scipy sparse matrix (never densified: only matched rows
        are read), or a length-n_cells vector.
    indices
        (n_query, k) rows of ``values``, e.g. ``GroupMatches.indices``.
    weights
        (n_query, k) non-negative weights, normalised here to sum to 1 per row; default equal.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix
        (n_query, n_genes) averages, CSR for sparse ``values``; float32 for float32 values, else float64.
    """
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[1] == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a 2-d integer array (queries x k), got {indices.dtype} {indices.shape}.")
    values = values if sp.issparse(values) else np.asarray(values)
    n_cells, (n_query, k) = values.shape[0], indices.shape
    if indices.size and (indices.min() < 0 or indices.max() >= n_cells):
        raise ValueError(f"indices must lie in [0, {n_cells}) (the rows of values).")
    weights = np.ones(indices.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != indices.shape:
        raise ValueError(f"weights and indices must have the same shape, got {weights.shape} and {indices.shape}.")
    totals = weights.sum(axis=1, keepdims=True)
    if not np.isfinite(weights).all() or (weights < 0).any() or (totals <= 0).any():
        raise ValueError("weights must be finite and non-negative, with a positive sum in every row.")
    # row q holds q's normalised weights at its matched cells: the product reads only the matched rows
    dtype = np.result_type(values.dtype, np.float32)
    selector = sp.csr_matrix(((weights / totals).astype(dtype).ravel(), indices.ravel(),
                              np.arange(0, n_query * k + 1, k)), shape=(n_query, n_cells))
    result = selector @ values
    return sp.csr_matrix(result) if sp.issparse(result) else np.asarray(result)
