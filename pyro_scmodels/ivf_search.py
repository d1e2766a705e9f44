"""Approximate nearest-neighbour search with an inverted-file (IVF) index, for large groups on the CPU.

The caller (:mod:`pyro_scmodels.matching`, the one module that imports faiss) passes the faiss module in.
The index has about 4 sqrt(n) k-means lists; the lists probed per query are chosen from the data, as the
fewest with which a sample of queries finds its exact nearest neighbour often enough (:data:`IVF_RECALL`).
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


def ivf_search(faiss, xq: np.ndarray, xb: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Approximate search with an inverted-file index (k-means cells, exact distances inside them).

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
    quantizer = faiss.IndexFlatL2(xb.shape[1])
    index = faiss.IndexIVFFlat(quantizer, xb.shape[1], n_lists)
    index.cp.seed, index.cp.niter = seed, 10  # seeded k-means; 10 iterations suffice for coarse cells
    rng = np.random.default_rng(seed)
    sample = xb if len(xb) <= 40 * n_lists else xb[np.sort(rng.choice(len(xb), 40 * n_lists, replace=False))]
    index.train(sample)
    index.add(xb)
    recall_sample = rng.choice(len(xq), min(RECALL_SAMPLE, len(xq)), replace=False)
    truth = _exact_search(faiss, xq[recall_sample], xb, 1)[:, 0]
    for n_probe in _probe_ladder(n_lists):  # searching 1,000 queries per step costs little next to the full search
        index.nprobe = n_probe
        recall = float(np.mean(index.search(xq[recall_sample], 1)[1][:, 0] == truth))
        if recall >= IVF_RECALL:
            break
    _, indices = index.search(xq, k)
    # a query whose probed lists hold fewer than k cells gets -1: those few are searched exactly
    short = np.flatnonzero((indices < 0).any(axis=1))
    if short.size:
        indices[short] = _exact_search(faiss, xq[short], xb, k)
    logger.info("Approximate matching (IVF, %d lists, %d probed) of %d cells into %d: recall@1 %.3f on %d sampled "
                "cells (method='exact' for an exact search).", n_lists, n_probe, len(xq), len(xb), recall, len(recall_sample))
    return indices
