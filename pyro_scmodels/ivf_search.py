"""Approximate nearest-neighbour search with an inverted-file (IVF) index, for large groups on the CPU.

The caller (:mod:`pyro_scmodels.matching`) passes the faiss module in (:mod:`pyro_scmodels.faiss_device` imports it).
The index has about 4 sqrt(n) k-means lists, holding the cells in half precision; the lists probed per query
are chosen from the data, as the fewest with which a sample of queries finds its exact nearest neighbour often
enough (:data:`IVF_RECALL`).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _blas_distances(faiss):
    """Exact searches of few queries by BLAS: faiss uses it only from ``distance_compute_blas_threshold`` queries
    (128,000 in faiss 1.15) and computes distances one by one below, 5-7x slower for 1,000 queries into 250k cells."""
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


def _exact_search(faiss, xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Exact k nearest rows of ``xb`` for few queries, without an index (no second copy of ``xb``)."""
    with _blas_distances(faiss):
        return faiss.knn(xq, xb, k)[1]


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


def _empty_index(faiss, xb: np.ndarray, n_lists: int):
    """An untrained IVF index for ``xb`` and the width it takes: half-precision codes (faiss' ``QT_fp16``) over
    dimensions padded with zeros to a multiple of :data:`CODE_WIDTH`, or float32 codes if ``xb`` exceeds
    :data:`FP16_MAX_ABS`.

    The scan of the lists reads every probed cell's code and is bound by memory: fp16 codes halve the bytes,
    and faiss decodes them with SIMD only for whole multiples of 8 (AVX2) or 16 (AVX-512) dimensions; with 50
    dimensions unpadded, fp16 was 3.5x slower than float32, padded to 64, 1.5x faster (benchmarks/RESULTS.md).
    The codes only rank candidates: the caller recomputes the distances of those found in float32."""
    if max(xb.max(initial=0.0), -xb.min(initial=0.0)) > FP16_MAX_ABS:
        return faiss.IndexIVFFlat(faiss.IndexFlatL2(xb.shape[1]), xb.shape[1], n_lists), xb.shape[1]
    width = -(-xb.shape[1] // CODE_WIDTH) * CODE_WIDTH
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(width), width, n_lists, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_L2, False)  # codes of the cells, not of their residuals
    return index, width


def ivf_search(faiss, xq: np.ndarray, xb: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
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

    Returns
    -------
    numpy.ndarray
        (n_query, k) int64 rows of ``xb``.

    Notes
    -----

    The lists probed per query are chosen from the data: the fewest (:func:`_probe_ladder`) with which a sample
    of :data:`RECALL_SAMPLE` queries finds its exact nearest neighbour at least :data:`IVF_RECALL` of the time."""
    n_lists = ivf_lists(len(xb))
    index, width = _empty_index(faiss, xb, n_lists)
    # seeded k-means; 5 iterations: 10 took twice as long, and the lists probed and the recall were the same
    index.cp.seed, index.cp.niter = seed, 5
    rng = np.random.default_rng(seed)
    sample = xb if len(xb) <= 40 * n_lists else xb[np.sort(rng.choice(len(xb), 40 * n_lists, replace=False))]
    index.train(_padded(sample, width))
    for start in range(0, len(xb), QUERY_BLOCK):
        index.add(_padded(xb[start:start + QUERY_BLOCK], width))
    recall_sample = rng.choice(len(xq), min(RECALL_SAMPLE, len(xq)), replace=False)
    sampled = xq[recall_sample]
    nearest = _squared_distances(sampled, xb, _exact_search(faiss, sampled, xb, 1)[:, 0])
    for n_probe in _probe_ladder(n_lists):  # searching 1,000 queries per step costs little next to the full search
        index.nprobe = n_probe
        found = index.search(_padded(sampled, width), 1)[1][:, 0]
        # a hit is a cell as near as the exact nearest: another cell at the same distance (a tie) counts
        recall = float(np.mean((found >= 0) & (_squared_distances(sampled, xb, found) <= nearest * (1 + 1e-5) + 1e-12)))
        if recall >= IVF_RECALL:
            break
    else:  # every list probed and still short: the codes lost the neighbours (precision), so search exactly
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
