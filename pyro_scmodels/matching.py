"""Nearest-neighbour matching of cells into groups with FAISS (SPEC 3.5); the only module importing faiss.

Searches are exact (a flat index, or brute force on a GPU) unless a group is large enough on the CPU
for an approximate inverted-file (IVF) index to pay (:func:`choose_method`), whose recall is logged.

:func:`match_groups` matches every cell into each target group, :func:`weighted_average` averages over matches.
:func:`resolve_faiss_device` decides, for every search, whether faiss runs on the CPU or a GPU: a decision of its
own, since torch on CUDA does not make faiss able to use it (faiss-cpu, the default install, has no GPU support)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import positive_float, positive_int
from .ivf_search import IVF_RECALL, ivf_lists, ivf_search  # noqa: F401  (ivf_lists, IVF_RECALL: public here)

logger = logging.getLogger("pyro_scmodels.matching")

DEVICES = ("auto", "cpu", "cuda")
#: Largest k that faiss' GPU k-selection supports (``GPU_MAX_SELECTION_K`` in faiss/gpu/utils/DeviceDefs.cuh,
#: CUDA > 9.0): ``faiss.knn_gpu`` and GPU indexes reject larger k.
GPU_MAX_K = 2048
#: The pip package of Meta's faiss GPU build (CUDA 12; PyPI ``faiss-gpu`` >= 1.14.3, same versions as faiss-cpu).
FAISS_GPU_PACKAGE = "faiss-gpu"
GPU_INSTALL_HINT = (f"install the faiss GPU build instead of faiss-cpu (both provide the faiss module): "
                    f"pip uninstall faiss-cpu && pip install {FAISS_GPU_PACKAGE}")
#: A faiss GPU build must hold machine code for the GPU: faiss-gpu-cu12 1.14 has sm_70 and sm_80 only and aborts
#: on an H100 or H200 ("no kernel image is available"); faiss-gpu 1.15.1 has sm_70 to sm_90.
GPU_REBUILD_HINT = (f"install a faiss GPU build with code for this GPU: pip uninstall faiss-gpu-cu12 faiss-cpu && "
                    f"pip install '{FAISS_GPU_PACKAGE}>=1.15.1'")
#: The search :func:`gpu_search_runs` tries in a child process, and how long it may take (CUDA start-up included).
GPU_PROBE = """import numpy as np, faiss
x = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
_, found = faiss.knn_gpu(faiss.StandardGpuResources(), x, x, 1)
assert (found[:, 0] == np.arange(256)).all(), "faiss' GPU search found wrong neighbours"
"""
GPU_PROBE_TIMEOUT_S = 120

METHODS = ("auto", "exact", "ivf")
#: ``method="auto"`` switches from an exact to an approximate (IVF) CPU search above this many query x base
#: distance evaluations per group: 1.5e10 is about 150k x 100k cells, a few seconds of exact search on 2 cores.
EXACT_MAX_PAIRS = 1.5e10

_gpu_resources = None
_cpu_fallback_logged = False  # the "runs on the CPU" message is logged once per process
_gpu_probe = None  # gpu_search_runs' answer, found once per process
_large_k_logged = False  # so is the one for k > GPU_MAX_K


def _faiss():
    """The faiss module, imported on first use, with an ImportError that says what to install."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(f"pyro_scmodels.matching needs faiss: pip install faiss-cpu (or {FAISS_GPU_PACKAGE} for "
                          "CUDA GPUs, instead: only one can be installed).") from error
    return faiss


def _torch_sees_cuda() -> bool:
    """Whether torch sees a CUDA GPU (False without torch): what makes a CPU-only faiss worth a warning."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _gpu_problem() -> tuple[str, str] | None:
    """Why faiss cannot search on a GPU here and what to do about it, or None when it can."""
    try:
        faiss = _faiss()
    except ImportError:
        return "faiss is not installed", f"pip install {FAISS_GPU_PACKAGE}"
    # faiss-cpu defines knn_gpu too (a Python wrapper), but not the GPU classes
    if not hasattr(faiss, "StandardGpuResources"):
        return "the installed faiss has no GPU support (faiss-cpu)", GPU_INSTALL_HINT
    if getattr(faiss, "get_num_gpus", lambda: 0)() < 1:
        return ("faiss has GPU support but sees no CUDA device (faiss.get_num_gpus() == 0)",
                "check that a CUDA GPU is visible (CUDA_VISIBLE_DEVICES) and that the driver supports faiss' CUDA")
    runs, failure = gpu_search_runs()
    if not runs:
        return f"faiss' GPU search fails on this GPU ({failure})", GPU_REBUILD_HINT
    return None


def gpu_search_runs() -> tuple[bool, str]:
    """Whether a small faiss GPU search runs and is right here, tried once per process in a child process.

    faiss stops the whole process (abort, not a Python exception) when its GPU code cannot run, for
    example a build without machine code for this GPU. A child process takes that instead of the
    caller's session (a trained model, unsaved results): about a second, once, on machines where faiss
    has GPU support and sees a GPU.

    Returns
    -------
    tuple of (bool, str)
        Whether :data:`GPU_PROBE` ran and found each point itself, and if not the child's last error line.
    """
    global _gpu_probe
    if _gpu_probe is None:
        # the child imports the faiss this process would: same interpreter, same module search path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        try:
            child = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True, env=env,
                                   timeout=GPU_PROBE_TIMEOUT_S)
            lines = [line.strip() for line in child.stderr.splitlines() if line.strip()]
            _gpu_probe = (child.returncode == 0,
                          "" if child.returncode == 0 else (lines[-1] if lines else f"exit status {child.returncode}")[-300:])
        except subprocess.TimeoutExpired:
            _gpu_probe = (False, f"a test search did not finish within {GPU_PROBE_TIMEOUT_S} s")
    return _gpu_probe


def faiss_gpu_available() -> bool:
    """Whether exact searches can run on a GPU.

    Returns
    -------
    bool
        True only if faiss was built with GPU support, ``faiss.get_num_gpus() > 0`` (faiss-gpu
        imports on CPU-only hosts, where ``index_cpu_to_all_gpus`` silently gives an empty index) and a
        small GPU search runs (:func:`gpu_search_runs`).
    """
    return _gpu_problem() is None


def _log_cpu_fallback(problem: str, fix: str) -> None:
    """Say once per process why ``device="auto"`` searches on the CPU: WARNING if torch sees a GPU, else INFO."""
    global _cpu_fallback_logged
    if _cpu_fallback_logged:
        return
    _cpu_fallback_logged = True
    if _torch_sees_cuda():  # a GPU machine whose faiss cannot use it: worth fixing, so say how
        logger.warning("Nearest-neighbour search (matching) runs on the CPU although torch sees a CUDA GPU: %s. "
                       "To match on the GPU, %s.", problem, fix)
    else:
        logger.info("Nearest-neighbour search (matching) runs on the CPU: %s.", problem)


def resolve_faiss_device(device: str = "auto", k: int = 1) -> str:
    """The device of faiss' exact search: decided here, independently of the device torch runs on.

    Parameters
    ----------
    device
        ``"auto"``: ``"cuda"`` when :func:`faiss_gpu_available` (faiss built with GPU support and
        ``faiss.get_num_gpus() > 0``) and ``k <= GPU_MAX_K``, else ``"cpu"``; why it is the CPU is
        logged once per process (logger ``pyro_scmodels.matching``; WARNING with the fix when torch sees a
        CUDA GPU that faiss cannot use, else INFO). ``"cpu"``: always the CPU. ``"cuda"``: the GPU, or an error.
    k
        Neighbours per query that will be searched (after clamping to the base size): faiss' GPU
        k-selection supports at most :data:`GPU_MAX_K`.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda"``.

    Raises
    ------
    ValueError
        ``device`` not in :data:`DEVICES`; ``device="cuda"`` without a usable GPU faiss (the message says
        what is missing and how to install the GPU build) or with ``k > GPU_MAX_K``.
    ImportError
        faiss is not installed.
    """
    global _large_k_logged
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(map(repr, DEVICES))}, got {device!r}.")
    k = positive_int("k", k)
    _faiss()  # no faiss at all: the ImportError saying what to install, whatever the device
    if device == "cpu":
        return "cpu"
    problem = _gpu_problem()
    if device == "cuda" and problem is not None:
        raise ValueError(f"device='cuda' cannot be used: {problem[0]}. To match on the GPU, {problem[1]}; "
                         "or pass device='auto' (the GPU when usable, else the CPU) or device='cpu'.")
    if problem is not None:
        _log_cpu_fallback(*problem)
        return "cpu"
    if k > GPU_MAX_K:
        if device == "cuda":
            raise ValueError(f"device='cuda' cannot search k={k} neighbours: faiss' GPU search supports at most "
                             f"k={GPU_MAX_K}. Pass a smaller k, or device='auto' or 'cpu' (exact on the CPU).")
        if not _large_k_logged:
            logger.info("Nearest-neighbour search runs on the CPU: k=%d exceeds faiss' GPU limit k=%d.", k, GPU_MAX_K)
            _large_k_logged = True
        return "cpu"
    return "cuda"


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


def _search(query: np.ndarray, base: np.ndarray, k: int, device: str,
            method: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Search on validated float32 arrays with k <= len(base) on a device from :func:`resolve_faiss_device`
    (``"cuda"`` needs k <= GPU_MAX_K), exact or approximate (``"ivf"``); Euclidean distances, ascending."""
    global _gpu_resources
    faiss = _faiss()
    # faiss ranks by |x|^2 + |y|^2 - 2 x.y (BLAS): centring keeps the norms, and the cancellation error, small
    centre = base.mean(axis=0, dtype=np.float64).astype(np.float32)
    xq, xb = query - centre, base - centre
    if method == "ivf":
        indices = ivf_search(faiss, xq, xb, k)
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
    # the square root magnifies what rounding error is left near 0 (~1e-2 from a cell to itself): recompute
    indices = indices.astype(np.int64, copy=False)
    distances = np.stack([np.linalg.norm(query - base[indices[:, j]], axis=1) for j in range(k)], axis=1)
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
    """Matches of the query cells into one target group; each array is (n_query, k)."""
    indices: np.ndarray  # positions in the full cell array (not within the group); int32 below 2^31 cells
    distances: np.ndarray  # Euclidean, ascending per row (float32)
    weights: np.ndarray  # kernel_weights(distances) as float32: rows sum to 1


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
    sizes = np.bincount(codes[codes >= 0], minlength=len(uniques))
    faiss_device = resolve_faiss_device(device, min(k, max((sizes[code_of[label]] for label in targets), default=1)))
    position_dtype = np.int32 if len(points) <= np.iinfo(np.int32).max else np.int64
    matches = {}
    for label in targets:
        members = np.flatnonzero(codes == code_of[label])
        group_k = min(k, members.size)
        # with one neighbour, a cell of the group is its own nearest (distance 0): only the others are searched
        queries = np.flatnonzero(codes != code_of[label]) if group_k == 1 else np.arange(len(points))
        group_method = choose_method(method, queries.size, members.size, faiss_device)
        local = np.zeros((len(points), group_k), dtype=np.int64)
        local[members] = np.arange(members.size)[:, None]
        distances = np.zeros((len(points), group_k), dtype=np.float32)
        if queries.size:
            distances[queries], local[queries] = _search(points[queries], points[members], group_k, faiss_device,
                                                         group_method)
        # 32-bit positions and float32 weights: with k = 10 and 8 groups, 64-bit ones were 1.6 KB a cell
        matches[label] = GroupMatches(members[local].astype(position_dtype), distances,
                                      kernel_weights(distances, bandwidth).astype(np.float32))
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
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[1] == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a 2-d integer array (queries x k), got {indices.dtype} {indices.shape}.")
    row_store = not sp.issparse(values) and callable(getattr(values, "rows", None))  # e.g. LogNormalisedCounts
    values = values if sp.issparse(values) or row_store else np.asarray(values)
    n_cells, (n_query, k) = values.shape[0], indices.shape
    if indices.size and (indices.min() < 0 or indices.max() >= n_cells):
        raise ValueError(f"indices must lie in [0, {n_cells}) (the rows of values).")
    weights = np.ones(indices.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != indices.shape:
        raise ValueError(f"weights and indices must have the same shape, got {weights.shape} and {indices.shape}.")
    totals = weights.sum(axis=1, keepdims=True)
    if not np.isfinite(weights).all() or (weights < 0).any() or (totals <= 0).any():
        raise ValueError("weights must be finite and non-negative, with a positive sum in every row.")
    if row_store:  # read the matched rows once, then index them by their place among those rows
        matched, indices = np.unique(indices, return_inverse=True)
        values, n_cells = values.rows(matched), matched.size
    # row q holds q's normalised weights at its matched cells: the product reads only the matched rows
    dtype = np.result_type(values.dtype, np.float32)
    selector = sp.csr_matrix(((weights / totals).astype(dtype).ravel(), indices.ravel(),
                              np.arange(0, n_query * k + 1, k)), shape=(n_query, n_cells))
    result = selector @ values
    return sp.csr_matrix(result) if sp.issparse(result) else np.asarray(result)
