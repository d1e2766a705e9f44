"""Adaptive shrinkage of the matched ITE's cluster-level effects across genes (``estimate_ite(shrink="clusters")``).

The mean matched ITE of a group of similar cells, gene by gene, carries the counting noise of the ~100 cells
that each arm's mean draws on; in genes that do not respond that noise is most of what is estimated. Cells
are clustered in the matching space (Leiden), and within each cluster the genes' mean ITEs are shrunk
together by empirical Bayes (:mod:`pyro_scmodels.shrinkage`): a prior ``median + normal scale mixture``
is fitted across genes with each gene's standard error, and every cell of the cluster is moved by the
cluster's posterior mean minus its raw mean, gene by gene. Differences between cells of one cluster are
kept; only the cluster's level is shrunk.

The cluster's mean ITE is linear in the expression: each arm is a weighted sum of cells' values (the
matched cells' kernel weights, and the cell itself for its own batch and condition with
``factual="observed"``). Its standard error takes each arm's weights and the weighted spread of the cells
they fall on, ``se^2 = sum_arms sum_j W_j^2 s^2``, ``s^2`` taken within each batch (the design fixes each batch's
share): cells shared as matches by many cells of the cluster count as often as they are used, which a spread of
the per-cell ITEs over sqrt(n) ignores.

With an interval, the shrunk ITE's bounds add the cluster mean's posterior variance to the matched interval's
variance (:func:`widened_bounds`).
"""

from __future__ import annotations

from typing import NamedTuple

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from scipy import stats

from .. import _validation as V
from ..matching import knn
from ..shrinkage import fit_normal_mixture
from . import _constants as K
from .counterfactual_design import CounterfactualDesign

#: the ``shrink=`` choices of :meth:`~pyro_scmodels.ndreamer.NDreamer.estimate_ite`
SHRINK_CHOICES = ("clusters",)
#: the stored ITE layers' record of no shrinkage (an h5ad cannot store None)
NO_SHRINK = "none"
#: ``obs`` column of the results that records each cell's cluster when the ITE is shrunk
CLUSTER_KEY = "ite_shrinkage_cluster"
#: Leiden resolution of the clusters (NDreamer's low-resolution pseudo-labels use the same). Measured 2026-12-07
#: on simulate(3000, 500, effect_modifier=1.0), six seeds (benchmarks/RESULTS.md, "NDreamer's CATE r"): 0.25-1.0
#: all reach CATE r >= 0.974; finer clusters have larger standard errors and shrink real effects more (slope)
SHRINK_RESOLUTION = 0.5
#: most cells clustered; above, a random sample is and the others take their nearest sampled cell's cluster
CLUSTER_SAMPLE_CELLS = 50_000
#: cells whose matches are turned into cluster weights at a time (arm_weights)
ARM_BLOCK_CELLS = 100_000
#: fewest cells a cluster needs to be shrunk (the spreads need two cells; smaller clusters keep their ITE)
MIN_CLUSTER_CELLS = 2


def matching_space_clusters(space: np.ndarray, seed: int = 0, resolution: float = SHRINK_RESOLUTION,
                            sample_cells: int = CLUSTER_SAMPLE_CELLS) -> np.ndarray:
    """Leiden clusters of the matching space's 15-nearest-neighbour graph, every condition together.

    The graph's edges are unweighted (a cell and its neighbours, both ways): NDreamer's embedding comes from
    discrete codes, so many cells share one point, and scanpy's gaussian kernel, whose width is a cell's
    distance to its neighbours, left every cell of such data alone in its cluster (nothing shrunk).
    Above ``sample_cells`` cells, a random sample of that many is clustered and every cell takes the cluster of
    its nearest sampled cell: the graph of every cell cost more time and memory than the matching at 10^6 cells
    (benchmarks/RESULTS.md, "Shrunk matched effects: the interval, the scale").

    Parameters
    ----------
    space
        Cells x components: the space the cells are matched in.
    seed, resolution
        The sample's and Leiden's random state, and Leiden's resolution.
    sample_cells
        Most cells clustered by Leiden (>= 3).

    Returns
    -------
    numpy.ndarray
        One integer label per cell (0, 1, ..., each used).
    """
    space = np.asarray(space, dtype=np.float32)
    sample_cells = V.integer("sample_cells", sample_cells, minimum=3)
    if space.shape[0] <= sample_cells:
        return _leiden_clusters(space, seed, resolution)
    sample = np.sort(np.random.default_rng(seed).choice(space.shape[0], sample_cells, replace=False))
    _, nearest = knn(space, space[sample], k=1, device="auto")
    # a sampled cluster may lose every cell to a point it shares with another: labels renumbered 0, 1, ...
    return np.unique(_leiden_clusters(space[sample], seed, resolution)[nearest[:, 0]], return_inverse=True)[1]


def _leiden_clusters(space: np.ndarray, seed: int, resolution: float) -> np.ndarray:
    """Leiden labels of every cell of ``space`` (float32), on the unweighted kNN graph."""
    n = space.shape[0]
    if n < 3:
        return np.zeros(n, dtype=np.int64)
    _, neighbours = knn(space, space, k=min(K.LEIDEN_NEIGHBOURS, n - 1) + 1, device="auto")
    rows = np.repeat(np.arange(n), neighbours.shape[1])
    other = rows != neighbours.ravel()  # a cell is no neighbour of itself (with repeated points it need not come first)
    graph = sp.csr_matrix((np.ones(int(other.sum())), (rows[other], neighbours.ravel()[other])), shape=(n, n))
    graph = graph.maximum(graph.T)
    frame = anndata.AnnData(obs=pd.DataFrame(index=np.arange(n).astype(str)))
    sc.tl.leiden(frame, resolution=resolution, adjacency=graph, random_state=seed, flavor="igraph",
                 n_iterations=K.LEIDEN_ITERATIONS, directed=False)
    return frame.obs["leiden"].astype(int).to_numpy().astype(np.int64)


def arm_weights(matches: dict, design: CounterfactualDesign, labels: np.ndarray, condition: str,
                batches: list[str], factual: str) -> sp.csr_matrix:
    """Weight of every cell in each cluster's mean of one arm of the ITE.

    Parameters
    ----------
    matches
        Every cell's matches into every batch x condition group.
    design
        The counterfactual design.
    labels
        Cluster of every cell (0 .. n_clusters - 1).
    condition, batches
        The arm: its condition, averaged over these batches (as :func:`~.effects.effects_of_cells` does).
    factual
        ``"observed"``: a cell of ``condition`` stands for itself in its own batch; ``"matched"``: its matches do.

    Returns
    -------
    scipy.sparse.csr_matrix
        Clusters x cells; row c holds the weights whose sum of expression rows is the mean, over the cells of
        cluster c, of their arm value (each row sums to 1).
    """
    n_clusters, n_cells = int(labels.max()) + 1, len(labels)
    sizes = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    share = 1.0 / (sizes[labels] * len(batches))  # each cell's part in its cluster's mean over the batches
    total = sp.csr_matrix((n_clusters, n_cells))
    for b in batches:
        match = matches[design.group(b, condition)]
        itself = (design.condition == condition) & (design.batch == b) if factual == "observed" else np.zeros(n_cells, bool)
        # a block of cells at a time: the (cluster, matched cell) triplets of every cell at once took ~5 GB at 10^6
        # cells; repeated pairs (a cell matched by many of the cluster's cells) are summed by each conversion
        for start in range(0, n_cells, ARM_BLOCK_CELLS):
            block = np.arange(start, min(start + ARM_BLOCK_CELLS, n_cells))
            weights = match.weights_of(block).astype(np.float64)
            weights /= weights.sum(axis=1, keepdims=True)
            weights[itself[block]] = 0.0
            weights *= share[block, None]
            total = total + sp.csr_matrix(
                (weights.ravel(), (np.repeat(labels[block], weights.shape[1]), match.indices[block].ravel())),
                shape=(n_clusters, n_cells))
        own = np.flatnonzero(itself)
        total = total + sp.csr_matrix((share[own], (labels[own], own)), shape=(n_clusters, n_cells))
    return total


def _weighted_moments(weights: sp.csr_matrix, expression) -> tuple[np.ndarray, np.ndarray]:
    """``weights @ x`` and ``weights @ x^2`` (clusters x genes, float64), reading the expression a block of rows at
    a time (never a cells x genes dense array)."""
    n_clusters, n_genes = weights.shape[0], expression.shape[1]
    first, second = np.zeros((n_clusters, n_genes)), np.zeros((n_clusters, n_genes))
    weights = sp.csc_matrix(weights)  # columns sliced a block at a time: a CSR slice reads every row
    used = np.flatnonzero(np.diff(weights.indptr) > 0)
    for start in range(0, used.size, K.READ_CHUNK_CELLS):
        block = used[start : start + K.READ_CHUNK_CELLS]
        rows = expression[block]
        rows = sp.csr_matrix(rows, dtype=np.float64) if sp.issparse(rows) else np.asarray(rows, dtype=np.float64)
        part = weights[:, block]
        first += np.asarray((part @ rows).todense() if sp.issparse(rows) else part @ rows)
        squared = rows.multiply(rows) if sp.issparse(rows) else rows ** 2
        second += np.asarray((part @ squared).todense() if sp.issparse(squared) else part @ squared)
    return first, second


def cluster_effects(expression, treated: sp.csr_matrix, control: sp.csr_matrix,
                    strata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's mean ITE per gene and its standard error, from the two arms' weights.

    Parameters
    ----------
    expression
        Log-normalised expression (cells x genes): dense, sparse or row store.
    treated, control
        :func:`arm_weights` of the two arms.
    strata
        One label per cell (its batch), or None: each arm's weight on a stratum is fixed by the design (its
        batches count equally), so its variance is taken within each stratum and summed. Pooled over batches,
        the spread also held the batches' differences of level, which are no sampling noise: with a strong
        batch effect that inflated the standard error (benchmarks/RESULTS.md, "Shrinkage's standard error:
        batches pooled or apart").

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Clusters x genes: the mean ITE, and its standard error ``sqrt(sum_arms sum_strata sum_j W_j^2 s^2)``,
        ``s^2`` the stratum's weighted variance of the arm's cells (corrected for the weights' effective size).
    """
    effect, variance = 0.0, 0.0
    labels = np.zeros(treated.shape[1], dtype=np.int64) if strata is None else pd.factorize(np.asarray(strata))[0]
    for sign, weights in ((1.0, treated), (-1.0, control)):
        for stratum in np.unique(labels):
            part = sp.csr_matrix(weights.multiply((labels == stratum)[None, :]))
            part.eliminate_zeros()  # the other strata's entries, kept as zeros, would be read as used columns
            total = np.asarray(part.sum(axis=1))  # clusters x 1: the stratum's share of the arm's mean
            first, second = _weighted_moments(part, expression)
            scale = np.where(total > 0, total, 1.0)
            mean, mean_square = first / scale, second / scale
            squared_weights = np.asarray(part.multiply(part).sum(axis=1)) / scale ** 2  # sum of the normalised w^2
            # the weighted variance's small-sample correction 1 / (1 - sum w^2) (one cell: no spread, and no correction)
            correction = 1.0 / np.maximum(1.0 - squared_weights, 1e-12)
            spread = np.maximum(mean_square - mean ** 2, 0.0) * np.where(squared_weights < 1.0, correction, 0.0)
            effect = effect + sign * first
            variance = variance + total ** 2 * squared_weights * spread
    return effect, np.sqrt(variance)


class ClusterShrinkage(NamedTuple):
    """Per cluster and gene (clusters x genes, float32): what shrinkage adds to the ITE of the cluster's cells, the
    posterior sd of the cluster's mean ITE, and the standard error of its unshrunk mean; per cluster, whether it was
    shrunk (a cluster too small to shrink keeps its cells' ITE and matched bounds)."""

    offset: np.ndarray
    posterior_sd: np.ndarray
    standard_error: np.ndarray
    shrunk: np.ndarray


def shrinkage_offsets(expression, matches: dict, design: CounterfactualDesign, labels: np.ndarray, treatment: str,
                      factual: str = "observed") -> ClusterShrinkage:
    """What shrinkage adds to the ITE of ``treatment`` of each cluster's cells, per gene.

    Parameters
    ----------
    expression
        Log-normalised expression of every cell (cells x genes).
    matches, design
        The matches of every cell into every group, and the design.
    labels
        Cluster of every cell (0 .. n_clusters - 1).
    treatment
        The treatment whose ITE is shrunk.
    factual
        As in :func:`~.effects.effects_of_cells`.

    Returns
    -------
    ClusterShrinkage
        Clusters x genes, float32: ``offset``, per cluster the posterior mean of its mean ITE (prior: the median over
        genes plus a normal scale mixture fitted across genes) minus that mean; ``posterior_sd``, that mean's
        posterior sd; ``standard_error``, the raw mean's. Clusters of fewer than ``MIN_CLUSTER_CELLS`` cells are not
        shrunk: offset 0, posterior sd equal to the standard error. Genes with no spread (standard error 0): all 0.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(design.condition),) or labels.min() < 0:
        raise ValueError(f"labels must hold one cluster (>= 0) per cell, {len(design.condition)} in all; got shape "
                         f"{labels.shape}.")
    # the ITE's two arms, over the batches holding both (each over its own when none does: a saved, confounded design)
    arms = [arm_weights(matches, design, labels, arm, design.ite_batches(treatment, arm), factual)
            for arm in (treatment, design.control_name)]
    effect, standard_error = cluster_effects(expression, *arms, strata=design.batch)
    offsets, posterior_sd = np.zeros_like(effect), standard_error.copy()
    shrunk = np.bincount(labels, minlength=effect.shape[0]) >= MIN_CLUSTER_CELLS
    for cluster in np.flatnonzero(shrunk):
        beta, se = effect[cluster], standard_error[cluster]
        if not (se > 0).any():
            continue
        # the median, not 0: a responding cluster's genes share a shift (composition, depth) that is no noise
        prior = fit_normal_mixture(beta, se, centre=float(np.median(beta)))
        posterior = prior.posterior(beta, se)
        offsets[cluster], posterior_sd[cluster] = posterior.mean - beta, posterior.sd
    return ClusterShrinkage(*(a.astype(np.float32) for a in (offsets, posterior_sd, standard_error)), shrunk)


def interval_dof(matches: dict, design: CounterfactualDesign, treatment: str) -> int:
    """Degrees of freedom of the matched interval of ``treatment``'s ITE: the fewest matched cells, less one, in the
    groups its two arms draw on (as :func:`~.effects.effects_of_cells` takes them)."""
    return min(matches[design.group(b, arm)].indices.shape[1] - 1
               for arm in (treatment, design.control_name) for b in design.ite_batches(treatment, arm))


def widened_bounds(estimate: np.ndarray, low: np.ndarray, high: np.ndarray, posterior_sd: np.ndarray, dof: int,
                   level: float, shrunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shrunk ITE's interval: the matched interval's variance plus the cluster mean's posterior variance.

    The matched bounds are ``ite -/+ t sqrt(v)`` (:func:`~.effect_intervals.interval_bounds`, ``t`` the Student t
    quantile of ``level`` at ``dof``); the shrunk bounds are ``shrunk ite -/+ t sqrt(v + sd^2)``, ``sd`` the posterior
    sd of the cell's cluster's mean ITE. ``v`` already holds the sampling noise of the cluster's raw mean, which the
    posterior sd holds too: counted twice, on purpose (dropping it from ``v`` covered less on the simulator,
    benchmarks/RESULTS.md, "Shrunk matched effects: the interval"). A cell whose cluster was not shrunk (fewer than
    ``MIN_CLUSTER_CELLS`` cells) keeps its ITE and so its matched bounds.

    Parameters
    ----------
    estimate
        The shrunk ITE (cells x genes).
    low, high
        The matched (unshrunk) bounds of the same entries.
    posterior_sd
        The posterior sd of each entry's cluster mean (cells x genes).
    dof, level
        The matched interval's degrees of freedom (:func:`interval_dof`) and level.
    shrunk
        One boolean per row (cell): whether its cluster was shrunk (False: the matched bounds are returned).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The low and high bounds, float32.
    """
    t = stats.t.ppf(0.5 + level / 2, max(dof, 1))
    half = np.sqrt(((high - low) / 2.0) ** 2 + (t * posterior_sd) ** 2)
    kept = ~np.asarray(shrunk, dtype=bool)[:, None]
    # the unshrunk rows take the matched bounds themselves (rebuilt from their half-width they could move by rounding)
    return (np.where(kept, low, estimate - half).astype(np.float32),
            np.where(kept, high, estimate + half).astype(np.float32))
