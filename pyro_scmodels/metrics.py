"""Measures of what a model recovered: used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy import stats
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors


def pearson(a, b) -> float:
    """Pearson correlation of two flattened arrays."""
    return float(stats.pearsonr(np.ravel(a), np.ravel(b))[0])


def spearman(a, b) -> float:
    """Spearman rank correlation of two flattened arrays."""
    return float(stats.spearmanr(np.ravel(a), np.ravel(b))[0])


def log_normalised_pca(counts, n_components: int = 20, target_sum: float = 1e4, seed: int = 0) -> np.ndarray:
    """PCA of log1p(counts per ``target_sum``): the baseline every latent space is compared with."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(counts.sum(1)).ravel()
    normalised = sp.diags(target_sum / np.maximum(totals, 1)) @ counts
    normalised.data = np.log1p(normalised.data)
    dense = normalised.toarray()
    n_components = min(n_components, min(dense.shape) - 1)
    return PCA(n_components=n_components, random_state=seed).fit_transform(dense)


def cluster_ari(embedding: np.ndarray, labels, n_clusters: int | None = None, seed: int = 0) -> float:
    """Adjusted Rand index between k-means clusters of ``embedding`` and ``labels``.

    ``n_clusters`` defaults to the number of distinct labels.
    """
    labels = np.asarray(labels)
    k = n_clusters or len(np.unique(labels))
    predicted = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embedding)
    return float(adjusted_rand_score(labels, predicted))


def knn_entropy(embedding: np.ndarray, labels, k: int = 30) -> float:
    """Mean entropy of ``labels`` among each cell's ``k`` nearest neighbours, over log(n labels).

    1 means labels are perfectly mixed in every neighbourhood (given equal label sizes); 0
    means every neighbourhood holds one label. Used for batch mixing (high is good) and
    cell-type separation (low is good).
    """
    labels = np.asarray(labels)
    categories, codes = np.unique(labels, return_inverse=True)
    if len(categories) < 2:
        raise ValueError("knn_entropy needs at least two distinct labels.")
    k = min(k, len(labels) - 1)
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding, return_distance=False)[:, 1:]
    counts = np.stack([(codes[neighbours] == c).sum(1) for c in range(len(categories))], axis=1) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(counts > 0, counts * np.log(counts), 0.0), axis=1)
    return float(entropy.mean() / np.log(len(categories)))
