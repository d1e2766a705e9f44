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


# --- treatment effects against a simulator's truth --------------------------------------------

def _as_dense(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, dtype=np.float64)


def per_cell_effect_correlation(estimate, truth, cell_type, responding_types, genes) -> float:
    """How well per-cell effects are recovered inside responding cell types.

    For every responding type and every gene in ``genes``, the Pearson correlation across the
    given cells of that type between estimated and true effect; the mean over (type, gene)
    pairs. This measures the within-type variation only (an effect modifier), not the type
    level, which :func:`cate_correlation` measures. Pairs whose true effect does not vary are
    skipped; a pair whose estimate does not vary scores 0 (it holds no per-cell information).

    Parameters
    ----------
    estimate, truth
        Cells x genes effects on the same scale (e.g. the treated cells only).
    cell_type
        One label per cell.
    responding_types
        Labels of the types that respond.
    genes
        Boolean mask or indices of the genes scored (usually the responding genes).

    Returns
    -------
    float
        Mean correlation; NaN when no (type, gene) pair has a varying truth.

    Raises
    ------
    ValueError
        ``estimate`` holds NaN or infinite values (a pair holding one was skipped, which raised the score).
    """
    estimate, truth = _finite("estimate", _as_dense(estimate)), _as_dense(truth)
    cell_type = np.asarray(cell_type)
    genes = np.flatnonzero(genes) if np.asarray(genes).dtype == bool else np.asarray(genes)
    values = []
    for label in responding_types:
        cells = cell_type == label
        if cells.sum() < 3:
            continue
        e, t = estimate[cells][:, genes], truth[cells][:, genes]
        e, t = e - e.mean(0), t - t.mean(0)
        varies = t.std(0) > 1e-6
        # an estimate constant in the type (up to rounding) correlates with nothing: 0, not skipped
        informative = e.std(0) > 1e-9 * np.maximum(np.abs(estimate[cells][:, genes]).max(0), 1.0)
        scale = np.sqrt((e ** 2).sum(0) * (t ** 2).sum(0))
        r = np.zeros(len(genes))
        r[informative & varies] = (e * t).sum(0)[informative & varies] / scale[informative & varies]
        values.extend(r[varies].tolist())
    return float(np.mean(values)) if values else float("nan")


def _finite(name: str, values: np.ndarray) -> np.ndarray:
    """``values``, or a ValueError naming how many entries are NaN or infinite."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{name} holds {int(bad.sum())} NaN or infinite value(s) (first at row, column "
                         f"{tuple(int(i) for i in np.argwhere(bad)[0])}); score a finite estimate.")
    return values


def group_mean_effects(effects, groups) -> tuple[np.ndarray, np.ndarray]:
    """Mean effect per group (the CATE): ``(labels, groups x genes array)``."""
    effects, groups = _as_dense(effects), np.asarray(groups)
    labels = np.unique(groups)
    return labels, np.stack([effects[groups == label].mean(0) for label in labels])


def cate_correlation(estimate, truth, cell_type, responding_types) -> float:
    """Pearson correlation of estimated and true mean effects, over responding types x all genes."""
    cell_type = np.asarray(cell_type)
    keep = np.isin(cell_type, list(responding_types))
    _, estimated = group_mean_effects(_as_dense(estimate)[keep], cell_type[keep])
    _, true = group_mean_effects(_as_dense(truth)[keep], cell_type[keep])
    return pearson(estimated, true)


def false_effect_ratio(estimate, truth, cell_type, responding_types, genes) -> float:
    """Effect found where there is none, relative to the true effect.

    The mean absolute estimated CATE of the non-responding types on ``genes``, divided by the
    mean absolute true CATE of the responding types on the same genes. 0 is perfect.
    """
    cell_type = np.asarray(cell_type)
    genes = np.flatnonzero(genes) if np.asarray(genes).dtype == bool else np.asarray(genes)
    responding = np.isin(cell_type, list(responding_types))
    if responding.all() or not responding.any():
        raise ValueError("false_effect_ratio needs both responding and non-responding cell types.")
    _, false = group_mean_effects(_as_dense(estimate)[~responding][:, genes], cell_type[~responding])
    _, true = group_mean_effects(_as_dense(truth)[responding][:, genes], cell_type[responding])
    return float(np.abs(false).mean() / np.abs(true).mean())


def effect_slope(estimate, truth) -> float:
    """Least-squares slope of the estimate on the truth (1: unbiased in scale; below 1: shrunk)."""
    e, t = np.ravel(_as_dense(estimate)), np.ravel(_as_dense(truth))
    t_centred = t - t.mean()
    return float((t_centred * (e - e.mean())).sum() / (t_centred ** 2).sum())


def interval_coverage(low, high, truth) -> float:
    """Share of true values inside ``[low, high]``."""
    low, high, truth = _as_dense(low), _as_dense(high), _as_dense(truth)
    return float(((low <= truth) & (truth <= high)).mean())


def effect_recovery(adata, estimate, genes=None, low=None, high=None) -> dict[str, float]:
    """Every effect metric of an estimate against the truth of :func:`pyro_scmodels.datasets.simulate`.

    Scored on the stimulated cells: per-cell correlation inside responding types (responding
    genes), CATE correlation, false-effect ratio (responding genes), slope of estimate on
    truth (responding cells x responding genes) and, with ``low`` / ``high``, the coverage of
    the interval on the same entries.

    Parameters
    ----------
    adata
        The simulated AnnData (cells in its order).
    estimate
        Cells x genes estimated effect of the stimulus.
    genes
        Names of the genes in ``estimate``'s columns; all of ``adata``'s genes by default.
    low, high
        Optional interval bounds, shaped like ``estimate``.

    Returns
    -------
    dict
        ``per_cell_r``, ``cate_r``, ``false_effect_ratio``, ``slope`` and optionally ``coverage``.
    """
    record = adata.uns["simulation"]
    sub = adata if genes is None else adata[:, list(genes)]
    treated = (adata.obs[record["condition_key"]] == record["stimulated_name"]).to_numpy()
    cell_type = adata.obs[record["cell_type_key"]].astype(str).to_numpy()[treated]
    responders = list(record["responding_cell_types"])
    responding_genes = sub.var["responding"].to_numpy()
    truth = _as_dense(sub.layers["true_ite"])[treated]
    estimate = _as_dense(estimate)
    if estimate.shape != sub.shape:
        raise ValueError(f"estimate has shape {estimate.shape}; expected {sub.shape} (cells x genes).")
    estimate = _finite("estimate (stimulated cells)", estimate[treated])  # the control rows are not scored
    in_responders = np.isin(cell_type, responders)
    block = np.ix_(in_responders, responding_genes)
    result = {
        "per_cell_r": per_cell_effect_correlation(estimate, truth, cell_type, responders, responding_genes),
        "cate_r": cate_correlation(estimate, truth, cell_type, responders),
        "false_effect_ratio": false_effect_ratio(estimate, truth, cell_type, responders, responding_genes),
        "slope": effect_slope(estimate[block], truth[block]),
    }
    if low is not None and high is not None:
        result["coverage"] = interval_coverage(_as_dense(low)[treated][block], _as_dense(high)[treated][block],
                                               truth[block])
    return result


def oracle_effect(adata, genes=None, target_sum: float = 1e4) -> np.ndarray:
    """The oracle's per-cell effect: observed log expression minus the true type x batch control mean.

    It knows every cell's true type and batch (which no method does) and subtracts the mean
    ``log1p`` normalised expression of the control cells of the same type and batch. Only the
    stimulated cells' rows are meaningful (control cells get their deviation from the mean).
    """
    record = adata.uns["simulation"]
    sub = adata if genes is None else adata[:, list(genes)]
    counts = sp.csr_matrix(sub.layers["counts"] if "counts" in sub.layers else sub.X, dtype=np.float64)
    totals = np.asarray(adata.layers["counts"].sum(1) if "counts" in adata.layers else adata.X.sum(1)).ravel()
    logged = np.log1p((sp.diags(target_sum / np.maximum(totals, 1)) @ counts).toarray())
    group = (adata.obs[record["cell_type_key"]].astype(str) + "|" + adata.obs[record["batch_key"]].astype(str)).to_numpy()
    control = (adata.obs[record["condition_key"]] == record["control_name"]).to_numpy()
    effect = np.zeros_like(logged)
    for label in np.unique(group):
        members = group == label
        effect[members] = logged[members] - logged[members & control].mean(0)
    return effect
