"""Approximate nearest-neighbour search with an inverted-file (IVF) index, for large groups on the CPU.

The caller (:mod:`pyro_scmodels.matching`) passes the faiss module in (:mod:`pyro_scmodels.faiss_device` imports it).
The index has about 4 sqrt(n) k-means lists, holding the cells in half precision; the lists probed per query
are chosen from the data, as the fewest with which a sample of queries finds its exact nearest neighbour often
enough (:data:`IVF_RECALL`).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger("pyro_scmodels.matching")

RECALL_SAMPLE = 1000  # queries whose exact nearest neighbour sets (and logs) the approximate search's probes
#: Recall@1 on the sample that picks the probes: 2.9 binomial sd (0.007 on 1,000 queries) above the 0.95 asked
#: for, so that the recall of the whole search stays above 0.95 (0.96 gave 0.949 on half of 10^6 cells' groups)
IVF_RECALL = 0.97
CODE_WIDTH = 16  # the index's dimensions are padded to a multiple of this (see _empty_index)
FP16_MAX_ABS = 1e4  # beyond, coordinates lose too much in half precision (largest fp16: 65504): float32 codes
QUERY_BLOCK = 131_072  # rows added or searched per call
#: the recall's reference: a query whose float32 rounding slack exceeds this share of its nearest squared distance
#: (float32 cannot rank its neighbours) is searched in float64, in blocks of this many base rows (1,000 queries x
#: 4,096 rows: 32 MiB)
NEAREST_SLACK = 0.25
NEAREST_BLOCK = 4096
#: the exact search's resolution: a query whose float32 rounding slack exceeds this share of its k-th squared distance
#: is searched again by direct differences (:func:`settle_near_ties`); swaps within it are ties at 0.1 %
EXACT_SLACK = 1e-3


def ivf_lists(n_base: int) -> int:
    """Inverted lists of the approximate index for a base of ``n_base`` cells.

    Parameters
    ----------
    n_base
        Cells in the base searched.

    Returns
    -------
    int
        About 4 sqrt(n) lists (faiss' guideline), at most n / 39 (so that k-means has 39 cells per list).
    """
    return int(np.clip(min(4 * np.sqrt(n_base), n_base // 39), 1, 65536))


def _probe_ladder(n_lists: int):
    """Lists probed per query, tried in turn: 4, 6, 8, 12, 16, 22, 32, ... (x sqrt 2 steps), ending at every list."""
    step = 0
    while (probe := 2 * round(2 * 2 ** (step / 2))) < n_lists:
        yield probe
        step += 1
    yield n_lists  # every list: an exact search


def _exact_search(faiss, xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Exact k nearest rows of ``xb`` by directly computed distances, without an index (no second copy of ``xb``).

    faiss computes the differences one pair at a time below its BLAS switch (``distance_compute_blas_threshold``,
    compared with queries x dimensions), and ranks by |x|^2 + |y|^2 - 2 x.y in float32 above it, which rounding
    reorders when the cells lie far from the centre next to their neighbour distances (clusters at +-3000: 99 % of
    first neighbours wrong after the fallback below): the queries go in blocks under the switch. With fewer queries
    than threads and a large base, faiss 1.15 splits the base over threads in the BLAS form whatever the switch: such
    calls run on one thread. Used for the few queries whose probed lists hold fewer than k cells, and for the
    fallback when the index misses."""
    block = max(1, (faiss.cvar.distance_compute_blas_threshold - 1) // max(xq.shape[1], 1))
    threads = faiss.omp_get_max_threads()
    parts = []
    for start in range(0, len(xq), block):
        chunk = xq[start:start + block]
        if len(chunk) < threads:
            faiss.omp_set_num_threads(1)
        try:
            parts.append(faiss.knn(chunk, xb, k)[1])
        finally:
            faiss.omp_set_num_threads(threads)
    return np.concatenate(parts) if parts else np.empty((0, k), dtype=np.int64)


def settle_near_ties(faiss, xq: np.ndarray, xb: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The rows of an exact search by faiss' BLAS form (``IndexFlatL2`` or ``knn_gpu``), with the queries whose
    neighbours float32 could not rank searched again by direct differences.

    The BLAS form |x|^2 + |y|^2 - 2 x.y rounds to about eps (|x|^2 + |y|^2): for cells far from the centre next to
    their neighbour distances it returns near-ties, and farther cells, in the wrong order (clusters at +-400 with unit
    spread, 20,000 queries: all three neighbours right for 62 % of queries). Where a query's slack
    (:func:`_rounding_slack`) exceeds :data:`EXACT_SLACK` of its k-th squared distance (not 0: nothing is nearer than
    a duplicate), its neighbours are taken from :func:`_exact_search` instead; elsewhere nothing changes (a typical
    latent: no query; 200,000 cells in 2 dimensions: most queries, 1.8x the search's time; benchmarks/RESULTS.md).

    Parameters
    ----------
    faiss
        The faiss module.
    xq, xb
        The centred float32 queries and base that were searched.
    indices
        (n_query, k) int64 rows found.

    Returns
    -------
    numpy.ndarray
        The rows, re-searched where needed (a new array only then).
    """
    if len(xq) == 0:
        return indices
    kth = np.empty(len(xq))
    slack = np.empty(len(xq))
    for start in range(0, len(xq), QUERY_BLOCK):  # float64 copies of a block at a time
        block = slice(start, start + QUERY_BLOCK)
        q = xq[block].astype(np.float64)
        kth[block] = _squared_distances(q, xb, indices[block, -1])
        slack[block] = _rounding_slack(q, kth[block], float(np.finfo(np.float32).eps))
    # against each query's own k-th distance (a dense group next to a sparse one has its own scale); at 0 nothing
    # can be nearer (a cell that is its own neighbour, duplicates)
    unsettled = np.flatnonzero((kth > 0) & (slack > EXACT_SLACK * kth))
    if unsettled.size:
        logger.info("The exact search re-ranked %d of %d queries by direct differences: float32's BLAS form could not "
                    "rank their neighbours (cells far from the centre next to their neighbour distances).",
                    unsettled.size, len(xq))
        indices = indices.copy()
        indices[unsettled] = _exact_search(faiss, xq[unsettled], xb, indices.shape[1])
    return indices


def _rounding_slack(q: np.ndarray, nearest: np.ndarray, eps: float) -> np.ndarray:
    """How much nearer than ``nearest`` (squared) a cell may be and still rank behind the one found, when squared
    distances are formed as |x|^2 + |y|^2 - 2 x.y with unit round-off ``eps``: ``4 eps (|q|^2 + |y|^2)``, with
    |y| <= |q| + sqrt(nearest) for any nearer cell y.

    The typical rounding, not its worst case ((2 d + 4) eps (...)): a slack too small only counts a few hits as
    misses, which probes more lists (the safe side); one too large would count misses as hits (7 % of the squared
    distance in a dense 10-dimensional latent with the worst case)."""
    norms = np.einsum("ij,ij->i", q, q)
    reach = (np.sqrt(norms) + np.sqrt(nearest)) ** 2
    return 4.0 * eps * (norms + reach)


def _nearest_squared(faiss, xq: np.ndarray, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The squared distance from each query to its nearest row of ``xb``, and its slack: the reference the recall
    is measured against (a hit is a cell within ``distance + slack``).

    faiss' BLAS finds the nearest by |x|^2 + |y|^2 - 2 x.y in float32 (1,000 queries x 250k cells in 0.05 s at 10
    dimensions), whose rounding can pick a far cell for cells far from the centre (the recall then passed any index:
    1.000 measured, 0.785 true). The cell it finds has its distance recomputed from the differences; no cell is nearer
    by more than the slack (:func:`_rounding_slack`), and a cell found within it counts as a hit (a tie at float32's
    resolution). Where the slack exceeds :data:`NEAREST_SLACK` of the distance (float32 cannot rank those cells), the
    query is searched in float64, with float64's slack."""
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1  # BLAS for few queries too (faiss would compare pair by pair)
    try:
        found = faiss.knn(xq, xb, 1)[1][:, 0]
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved
    q = xq.astype(np.float64)
    nearest = _squared_distances(q, xb, found)
    slack = _rounding_slack(q, nearest, float(np.finfo(np.float32).eps))
    unsettled = np.flatnonzero(slack > NEAREST_SLACK * nearest)
    if unsettled.size:
        rows = _nearest_rows_float64(q[unsettled], xb)
        nearest[unsettled] = _squared_distances(q[unsettled], xb, rows)  # recomputed from the differences
        slack[unsettled] = _rounding_slack(q[unsettled], nearest[unsettled], float(np.finfo(np.float64).eps))
    return nearest, slack


def _nearest_rows_float64(q: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """The nearest row of ``xb`` to each query by float64 BLAS, in blocks of :data:`NEAREST_BLOCK` rows."""
    q_norms = np.einsum("ij,ij->i", q, q)
    nearest, rows = np.full(len(q), np.inf), np.zeros(len(q), dtype=np.int64)
    for start in range(0, len(xb), NEAREST_BLOCK):
        b = xb[start:start + NEAREST_BLOCK].astype(np.float64)
        squared = q_norms[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2.0 * (q @ b.T)
        best = squared.argmin(axis=1)
        value = squared[np.arange(len(q)), best]
        better = value < nearest
        nearest[better], rows[better] = value[better], start + best[better]
    return rows


def _padded(x: np.ndarray, width: int) -> np.ndarray:
    """``x`` with zero columns up to ``width`` (distances unchanged), C-contiguous float32."""
    if x.shape[1] == width:
        return x
    padded = np.zeros((len(x), width), dtype=np.float32)
    padded[:, :x.shape[1]] = x
    return padded


def _squared_distances(xq: np.ndarray, xb: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance from each query to the base row found for it (rows of -1 give inf)."""
    difference = xq - xb[np.maximum(rows, 0)]
    return np.where(rows >= 0, np.einsum("ij,ij->i", difference, difference), np.inf)


def _empty_index(faiss, xb: np.ndarray, n_lists: int, half_precision: bool = True):
    """An untrained IVF index for ``xb`` and the width it takes: half-precision codes (faiss' ``QT_fp16``) over
    dimensions padded with zeros to a multiple of :data:`CODE_WIDTH`, or float32 codes if ``xb`` exceeds
    :data:`FP16_MAX_ABS` or ``half_precision`` is False.

    The scan of the lists reads every probed cell's code and is bound by memory: fp16 codes halve the bytes,
    and faiss decodes them with SIMD only for whole multiples of 8 (AVX2) or 16 (AVX-512) dimensions; with 50
    dimensions unpadded, fp16 was 3.5x slower than float32, padded to 64, 1.5x faster (benchmarks/RESULTS.md).
    The codes only rank candidates: the caller recomputes the distances of those found in float32."""
    if not half_precision or max(xb.max(initial=0.0), -xb.min(initial=0.0)) > FP16_MAX_ABS:
        return faiss.IndexIVFFlat(faiss.IndexFlatL2(xb.shape[1]), xb.shape[1], n_lists), xb.shape[1]
    width = -(-xb.shape[1] // CODE_WIDTH) * CODE_WIDTH
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(width), width, n_lists, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_L2, False)  # codes of the cells, not of their residuals
    return index, width


def ivf_search(faiss, xq: np.ndarray, xb: np.ndarray, k: int, seed: int = 0,
               sample_from: np.ndarray | None = None, half_precision: bool = True) -> np.ndarray:
    """Approximate search with an inverted-file index (k-means cells, searched in half precision).

    Parameters
    ----------
    faiss
        The faiss module.
    xq, xb
        Centred C-contiguous float32 queries (n_query, d) and base (n_base, d).
    k
        Neighbours per query, at most ``n_base``.
    seed
        Seed of the k-means training sample and of the recall sample.
    sample_from
        Rows of ``xq`` the recall sample is drawn from (default all): queries that are not cells of ``xb``, which
        find themselves and would lift the measured recall (a group of 80 % of the queries: 0.974 measured, 0.886
        for the others).
    half_precision
        Half-precision codes (the default, where the coordinates allow); if they miss with every list probed, the
        search is repeated with float32 codes, and only then made exact.

    Returns
    -------
    numpy.ndarray
        (n_query, k) int64 rows of ``xb``.

    Notes
    -----

    The lists probed per query are chosen from the data: the fewest (:func:`_probe_ladder`) with which a sample
    of :data:`RECALL_SAMPLE` queries finds its exact nearest neighbour at least :data:`IVF_RECALL` of the time."""
    n_lists = ivf_lists(len(xb))
    index, width = _empty_index(faiss, xb, n_lists, half_precision)
    # seeded k-means; 5 iterations: 10 took twice as long, and the lists probed and the recall were the same
    index.cp.seed, index.cp.niter = seed, 5
    rng = np.random.default_rng(seed)
    sample = xb if len(xb) <= 40 * n_lists else xb[np.sort(rng.choice(len(xb), 40 * n_lists, replace=False))]
    index.train(_padded(sample, width))
    for start in range(0, len(xb), QUERY_BLOCK):
        index.add(_padded(xb[start:start + QUERY_BLOCK], width))
    eligible = np.arange(len(xq)) if sample_from is None or len(sample_from) == 0 else np.asarray(sample_from)
    recall_sample = rng.choice(eligible, min(RECALL_SAMPLE, len(eligible)), replace=False)
    sampled = xq[recall_sample]
    nearest, slack = _nearest_squared(faiss, sampled, xb)
    for n_probe in _probe_ladder(n_lists):  # searching 1,000 queries per step costs little next to the full search
        index.nprobe = n_probe
        found = index.search(_padded(sampled, width), 1)[1][:, 0]
        # a hit is a cell as near as the exact nearest: another cell at the same distance (a tie) counts
        # (the found cells' distances in float64, as the reference's)
        recall = float(np.mean((found >= 0) & (_squared_distances(sampled.astype(np.float64), xb, found)
                                               <= nearest * (1 + 1e-5) + slack + 1e-12)))
        if recall >= IVF_RECALL:
            break
    else:  # every list probed and still short: the codes lost the neighbours (precision)
        if isinstance(index, faiss.IndexIVFScalarQuantizer):
            # half-precision codes are coarse next to the neighbour distances of cells far from the centre (at 1,000,
            # fp16 steps are 0.5): float32 codes before an exact search
            logger.info("The half-precision IVF codes missed %.1f %% of sampled nearest neighbours with every list "
                        "probed; trying float32 codes.", 100 * (1 - recall))
            del index  # not two indexes in memory at once
            return ivf_search(faiss, xq, xb, k, seed, sample_from, half_precision=False)
        logger.warning("The approximate (IVF) search missed %.1f %% of sampled nearest neighbours with every list "
                       "probed; searching exactly instead.", 100 * (1 - recall))
        return _exact_search(faiss, xq, xb, k)
    indices = np.empty((len(xq), k), dtype=np.int64)
    for start in range(0, len(xq), QUERY_BLOCK):  # blocks: one padded copy of a block, not of every query
        indices[start:start + QUERY_BLOCK] = index.search(_padded(xq[start:start + QUERY_BLOCK], width), k)[1]
    # a query whose probed lists hold fewer than k cells gets -1: those few are searched exactly
    short = np.flatnonzero((indices < 0).any(axis=1))
    if short.size:
        indices[short] = _exact_search(faiss, xq[short], xb, k)
    logger.info("Approximate matching (IVF, %d lists, %d probed) of %d cells into %d: recall@1 %.3f on %d sampled "
                "cells (method='exact' for an exact search).", n_lists, n_probe, len(xq), len(xb), recall, len(recall_sample))
    return indices
