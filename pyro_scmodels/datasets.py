"""Simulated single-cell RNA UMI counts with known ground truth.

The generative process matches the likelihood of RegularizedVI::

    mu[n, g] = l[n] * (rho[n, g] + s[b(n), g]) * y[b(n), g]
    x[n, g] ~ GammaPoisson(concentration=theta[g], rate=theta[g] / mu[n, g])

so that fitted parameters (library sizes, ambient profiles, feature scalings,
dispersions, treatment effects) can be compared with the values that generated
the data.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Sequence

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

__all__ = ["simulate"]

CONTROL = "control"
STIMULATED = "stimulated"


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value, minimum: float, *, strict: bool = False,
                 maximum: float = math.inf) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum) and value <= maximum
    if not ok:
        bounds = f"{'>' if strict else '>='} {minimum}"
        if math.isfinite(maximum):
            bounds += f" and <= {maximum}"
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")
    return float(value)


def _resolve_responding_types(responding_cell_types, n_cell_types: int) -> list[int]:
    """Turn ``responding_cell_types`` (None, indices or names) into sorted type indices."""
    if responding_cell_types is None:
        return list(range(math.ceil(n_cell_types / 2)))
    if isinstance(responding_cell_types, (str, Integral)):
        responding_cell_types = [responding_cell_types]
    indices = set()
    for item in responding_cell_types:
        if isinstance(item, str) and item.startswith("type_") and item[5:].isdigit():
            index = int(item[5:])
        elif isinstance(item, Integral) and not isinstance(item, bool):
            index = int(item)
        else:
            index = -1
        if not 0 <= index < n_cell_types:
            raise ValueError(
                "responding_cell_types must contain type indices in "
                f"[0, {n_cell_types}) or names 'type_<i>', got {item!r}"
            )
        indices.add(index)
    return sorted(indices)


def _n_stimulated(rng: np.random.Generator, n: int, fraction: float) -> int:
    """Number of stimulated cells in a group of ``n``, rounded at random without bias."""
    expected = fraction * n
    count = int(math.floor(expected)) + int(rng.random() < expected - math.floor(expected))
    if 0.0 < fraction < 1.0 and n >= 2:
        # keep both conditions present in every (type, batch) group that can hold both
        count = min(max(count, 1), n - 1)
    return count


def _assign_cells(rng, n_cells, n_cell_types, n_batches, stimulated_fraction):
    """Draw cell type, batch and condition so that the three are balanced and independent."""
    cell_type = rng.permutation(np.arange(n_cells) % n_cell_types)
    batch = np.zeros(n_cells, dtype=np.int64)
    stimulated = np.zeros(n_cells, dtype=bool)
    for k in range(n_cell_types):
        members = np.flatnonzero(cell_type == k)
        # cycle through batches from a random start: each type spans every batch
        cycle = (np.arange(members.size) + rng.integers(n_batches)) % n_batches
        batch[members] = rng.permutation(cycle)
        for b in range(n_batches):
            group = rng.permutation(members[batch[members] == b])
            stimulated[group[:_n_stimulated(rng, group.size, stimulated_fraction)]] = True
    return cell_type, batch, stimulated


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _gamma_poisson(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Sample negative binomial counts with mean ``mu`` and inverse dispersion ``theta``."""
    shape = np.broadcast_to(theta, mu.shape)
    return rng.poisson(rng.gamma(shape, mu / shape))


def simulate(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_cell_types: int = 5,
    n_batches: int = 3,
    n_markers_per_type: int = 20,
    within_type_rank: int = 2,
    type_sd: float = 0.5,
    stimulated_fraction: float = 0.5,
    n_responding_genes: int = 40,
    responding_cell_types: Sequence[int | str] | None = None,
    ambient_fraction: float = 0.1,
    batch_scaling_sd: float = 0.2,
    mean_library: float = 2000.0,
    library_sd: float = 0.3,
    theta_range: tuple[float, float] = (0.5, 50.0),
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate single-cell UMI counts with cell types, batches, ambient RNA and a stimulus.

    Counts follow ``x[n, g] ~ GammaPoisson(theta[g], theta[g] / mu[n, g])`` with
    ``mu[n, g] = l[n] * (rho[n, g] + s[b, g]) * y[b, g]`` where ``b`` is the batch of
    cell ``n``: ``rho`` is the background-free expression (rows sum to
    ``mean_library``), ``s`` the ambient profile of the batch, ``y`` a per-batch
    gene scaling and ``l`` a library size factor.

    Parameters
    ----------
    n_cells, n_genes : int
        Size of the count matrix.
    n_cell_types : int
        Number of discrete cell types, assigned in (shuffled) equal proportions.
    n_batches : int
        Number of batches; every cell type is spread evenly across batches.
    n_markers_per_type : int
        Marker genes per type (disjoint across types), up-regulated by a factor
        of ``exp(U(1.5, 3))`` in their type.
    within_type_rank : int
        Rank of the continuous within-type variation of log expression.
    type_sd : float
        Standard deviation of every gene's per-type log-expression deviation (on top of the
        markers): cell types differ in many genes, not only in their markers, which is also
        what lets a model tell ambient RNA from expression.
    stimulated_fraction : float
        Fraction of stimulated cells in [0, 1], balanced over type and batch.
    n_responding_genes : int
        Genes whose expression changes on stimulation (chosen outside the
        markers where possible); 75 % go up, with natural-log fold changes of
        magnitude ``U(1, 2.5)`` scaled by a per-type strength in ``U(0.6, 1)``.
    responding_cell_types : sequence of int or str, optional
        Types (indices or names ``"type_<i>"``) that respond to stimulation.
        Defaults to the first ``ceil(n_cell_types / 2)`` types.
    ambient_fraction : float
        Size of the ambient profile ``s`` relative to ``mean_library``.
    batch_scaling_sd : float
        Standard deviation of ``log y``.
    mean_library : float
        Sum of each cell's ``rho`` (expected counts before ambient and scaling).
    library_sd : float
        Standard deviation of ``log l`` around the batch depth offset.
    theta_range : tuple of float
        ``(low, high)`` with ``0 < low <= high``; ``theta`` is log-uniform on it.
    seed : int
        Seed of the ``numpy`` random generator; the same seed gives the same data.

    Returns
    -------
    anndata.AnnData
        Cells x genes; ``X`` and ``layers["counts"]`` hold raw counts (CSR,
        float32). Ground truth lives in ``obs["true_library"]``,
        ``var[["true_theta", "true_lfc", "is_marker", "marker_of", "responding"]]``,
        ``varm["true_ambient"]``, ``varm["true_feature_scaling"]`` (genes x
        batches), ``obsm["true_latent"]`` (type one-hot then within-type
        factors), ``layers["true_rho"]`` and ``layers["true_ite"]`` (stimulated
        minus control ``log1p(1e4 * rho / rho.sum())`` for every cell). Settings
        and key names are in ``uns["simulation"]``.

    Raises
    ------
    ValueError
        If an argument is out of range; the message names the argument.
    """
    n_cells = _check_int("n_cells", n_cells, 1)
    n_genes = _check_int("n_genes", n_genes, 1)
    n_types = _check_int("n_cell_types", n_cell_types, 1)
    n_batches = _check_int("n_batches", n_batches, 1)
    n_markers = _check_int("n_markers_per_type", n_markers_per_type, 0)
    rank = _check_int("within_type_rank", within_type_rank, 0)
    type_sd = _check_float("type_sd", type_sd, 0.0)
    n_responding = _check_int("n_responding_genes", n_responding_genes, 0)
    if n_types * n_markers > n_genes:
        raise ValueError(
            f"n_cell_types * n_markers_per_type = {n_types * n_markers} exceeds "
            f"n_genes = {n_genes}"
        )
    if n_responding > n_genes:
        raise ValueError(f"n_responding_genes = {n_responding} exceeds n_genes = {n_genes}")
    stimulated_fraction = _check_float("stimulated_fraction", stimulated_fraction, 0.0,
                                       maximum=1.0)
    ambient_fraction = _check_float("ambient_fraction", ambient_fraction, 0.0)
    batch_scaling_sd = _check_float("batch_scaling_sd", batch_scaling_sd, 0.0)
    mean_library = _check_float("mean_library", mean_library, 0.0, strict=True)
    library_sd = _check_float("library_sd", library_sd, 0.0)
    try:
        theta_low, theta_high = (float(t) for t in theta_range)
        valid_theta = 0.0 < theta_low <= theta_high < math.inf
    except (TypeError, ValueError):
        valid_theta = False
    if not valid_theta:
        raise ValueError(f"theta_range must be (low, high) with 0 < low <= high, got {theta_range!r}")
    if seed is not None:
        seed = _check_int("seed", seed, 0)
    responders = _resolve_responding_types(responding_cell_types, n_types)

    rng = np.random.default_rng(seed)
    type_names = [f"type_{k}" for k in range(n_types)]
    batch_names = [f"batch_{b}" for b in range(n_batches)]

    # 1. cell states: type, batch, condition, within-type factors
    cell_type, batch, stimulated = _assign_cells(rng, n_cells, n_types, n_batches,
                                                 stimulated_fraction)
    gene_order = rng.permutation(n_genes)
    markers = gene_order[: n_types * n_markers].reshape(n_types, n_markers)
    # responding genes come from the non-markers first, then markers if too few remain
    responding = np.roll(gene_order, -n_types * n_markers)[:n_responding]

    # spread of gene means on the log scale: a few abundant genes, many rare ones
    baseline = rng.normal(0.0, 1.3, size=n_genes)
    type_log = baseline + rng.normal(0.0, type_sd, size=(n_types, n_genes))
    for k in range(n_types):
        type_log[k, markers[k]] += rng.uniform(1.5, 3.0, size=n_markers)
    loadings = rng.normal(0.0, 0.25, size=(n_genes, rank))
    factors = rng.normal(0.0, 1.0, size=(n_cells, rank))
    log_control = type_log[cell_type] + factors @ loadings.T

    # 2. stimulation: per-gene log fold change times per-type strength
    lfc = np.zeros(n_genes)
    signs = np.where(rng.random(n_responding) < 0.75, 1.0, -1.0)
    lfc[responding] = signs * rng.uniform(1.0, 2.5, size=n_responding)
    strength = np.zeros(n_types)
    strength[responders] = rng.uniform(0.6, 1.0, size=len(responders))

    rho_control = mean_library * _softmax(log_control)
    rho_stim = rho_control.copy()
    reacts = strength[cell_type] > 0
    rho_stim[reacts] = mean_library * _softmax(
        log_control[reacts] + strength[cell_type[reacts], None] * lfc
    )
    rho = np.where(stimulated[:, None], rho_stim, rho_control)
    # rows of rho already sum to mean_library, so rho / mean_library is the composition
    ite = np.zeros((n_cells, n_genes))
    ite[reacts] = (np.log1p(1e4 * rho_stim[reacts] / mean_library)
                   - np.log1p(1e4 * rho_control[reacts] / mean_library))

    # 3. batches: feature scaling and distinct ambient profiles
    feature_scaling = np.exp(rng.normal(0.0, batch_scaling_sd, size=(n_batches, n_genes)))
    mixture = rng.dirichlet(np.ones(n_types), size=n_batches)
    soup = (mixture @ _softmax(type_log)) * rng.lognormal(0.0, 1.0, size=(n_batches, n_genes))
    ambient = ambient_fraction * mean_library * soup / soup.sum(axis=1, keepdims=True)

    # 4-5. library size factors and dispersions
    depth_offset = rng.uniform(-0.3, 0.3, size=n_batches)
    library = np.exp(rng.normal(depth_offset[batch], library_sd))
    theta = np.exp(rng.uniform(math.log(theta_low), math.log(theta_high), size=n_genes))

    # 6. counts; cells with no counts are redrawn, and after 10 failures their
    # library factor is doubled (and recorded) so the loop always ends
    expression = (rho + ambient[batch]) * feature_scaling[batch]
    counts = _gamma_poisson(rng, library[:, None] * expression, theta)
    for attempt in range(200):
        empty = np.flatnonzero(counts.sum(axis=1) == 0)
        if empty.size == 0:
            break
        if attempt >= 10:
            library[empty] *= 2.0
        counts[empty] = _gamma_poisson(rng, library[empty, None] * expression[empty], theta)
    assert (counts.sum(axis=1) > 0).all(), "simulate: some cells have zero total count"

    x = sparse.csr_matrix(counts.astype(np.float32))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cell_type, type_names),
            "batch": pd.Categorical.from_codes(batch, batch_names),
            "condition": pd.Categorical.from_codes(stimulated.astype(np.int64),
                                                   [CONTROL, STIMULATED]),
            "true_library": library,
        },
        index=[f"cell_{n}" for n in range(n_cells)],
    )
    marker_of = np.full(n_genes, "", dtype=object)
    for k in range(n_types):
        marker_of[markers[k]] = type_names[k]
    is_responding = np.zeros(n_genes, dtype=bool)
    is_responding[responding] = True
    var = pd.DataFrame(
        {
            "true_theta": theta,
            "true_lfc": lfc,
            "is_marker": marker_of != "",
            "marker_of": marker_of,
            "responding": is_responding,
        },
        index=[f"gene_{g}" for g in range(n_genes)],
    )
    settings = {
        "n_cells": n_cells, "n_genes": n_genes, "n_cell_types": n_types,
        "n_batches": n_batches, "n_markers_per_type": n_markers,
        "within_type_rank": rank, "type_sd": type_sd, "stimulated_fraction": stimulated_fraction,
        "n_responding_genes": n_responding, "ambient_fraction": ambient_fraction,
        "batch_scaling_sd": batch_scaling_sd, "mean_library": mean_library,
        "library_sd": library_sd, "theta_range": [theta_low, theta_high],
        "batches": batch_names, "cell_types": type_names,
        "responding_cell_types": [type_names[k] for k in responders],
        "response_strength": [float(strength[k]) for k in responders],
        "batch_depth_offset": [float(v) for v in depth_offset],
        "control_name": CONTROL, "stimulated_name": STIMULATED,
        "condition_key": "condition", "batch_key": "batch", "cell_type_key": "cell_type",
    }
    if seed is not None:  # h5ad cannot store None
        settings["seed"] = seed

    adata = anndata.AnnData(X=x, obs=obs, var=var)
    adata.layers["counts"] = x.copy()
    adata.layers["true_rho"] = rho.astype(np.float32)
    adata.layers["true_ite"] = ite.astype(np.float32)
    adata.obsm["true_latent"] = np.hstack(
        [np.eye(n_types)[cell_type], factors]
    ).astype(np.float32)
    adata.varm["true_ambient"] = ambient.T.copy()
    adata.varm["true_feature_scaling"] = feature_scaling.T.copy()
    adata.uns["simulation"] = settings
    return adata


def simulate_multiome(n_cells: int = 1200, n_genes: int = 200, n_peaks: int = 400, n_batches: int = 2,
                      atac_missing_fraction: float = 0.0, seed: int = 0):
    """Simulate paired RNA + ATAC counts where each modality sees only part of the cell state.

    Cells have two hidden factors: ``rna_state`` (3 levels) drives RNA only and ``atac_state``
    (2 levels) drives ATAC only; the 6 combinations are the cell types. RNA alone separates 3
    groups, ATAC alone 2, and only both together resolve all 6. Both modalities follow the
    RegularizedVI likelihood: RNA with a per-batch ambient profile, ATAC with a per-batch
    feature scaling, each with its own dispersions and library sizes.

    Parameters
    ----------
    n_cells, n_genes, n_peaks
        Sizes (genes need at least 75 and peaks 120 for the marker features).
    n_batches
        Batches (``obs["batch"]``).
    atac_missing_fraction
        Fraction of cells whose ATAC counts are all zero (a failed library), in ``obs["has_atac"]``.
    seed
        Seed of the numpy generator.

    Returns
    -------
    mudata.MuData
        Modalities ``"rna"`` and ``"atac"`` (raw counts, CSR float32, also in ``layers["counts"]``);
        ``obs``: ``cell_type``, ``rna_state``, ``atac_state``, ``batch``, ``has_atac``; truth in
        each modality's ``var["true_theta"]`` and ``varm`` (``true_ambient`` for RNA,
        ``true_feature_scaling`` for ATAC).
    """
    import mudata

    n_cells = _check_int("n_cells", n_cells, 12)
    n_genes = _check_int("n_genes", n_genes, 75)
    n_peaks = _check_int("n_peaks", n_peaks, 120)
    n_batches = _check_int("n_batches", n_batches, 1)
    atac_missing_fraction = _check_float("atac_missing_fraction", atac_missing_fraction, 0.0, maximum=0.5)
    rng = np.random.default_rng(seed)
    rna_state = rng.permutation(np.arange(n_cells) % 3)
    atac_state = rng.permutation(np.arange(n_cells) % 2)
    batch = rng.integers(n_batches, size=n_cells)

    def profiles(n_features, n_levels, n_markers, level):
        # per level: a shared baseline, mild noise on every feature, and its own marker features
        log = rng.normal(0.0, 1.0, n_features) + rng.normal(0.0, 0.3, (n_levels, n_features))
        for k in range(n_levels):
            log[k, k * n_markers:(k + 1) * n_markers] += rng.uniform(1.5, 2.5, n_markers)
        return _softmax(log)[level]

    def counts(fraction, library_mean, theta, scale=1.0, background=0.0):
        library = library_mean * np.exp(rng.normal(0.0, 0.3, n_cells))
        mu = library[:, None] * (fraction + background) * scale
        return _gamma_poisson(rng, mu, theta[None, :]).astype(np.float32)

    theta_rna = np.exp(rng.uniform(math.log(1.0), math.log(50.0), n_genes))
    theta_atac = np.exp(rng.uniform(math.log(0.5), math.log(10.0), n_peaks))
    soup = _softmax(rng.normal(0.0, 1.0, (n_batches, n_genes)))
    ambient = 0.05 * soup  # fractions of a cell's RNA library
    scaling = np.exp(rng.normal(0.0, 0.1, (n_batches, n_peaks)))
    rna = counts(profiles(n_genes, 3, 25, rna_state), 1500.0, theta_rna, background=ambient[batch])
    atac = counts(profiles(n_peaks, 2, 60, atac_state), 800.0, theta_atac, scale=scaling[batch])
    rna[rna.sum(1) == 0, 0] = 1.0  # every cell keeps some RNA
    has_atac = rng.random(n_cells) >= atac_missing_fraction
    atac[~has_atac] = 0.0

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{3 * b + a}" for a, b in zip(rna_state, atac_state)]),
            "rna_state": pd.Categorical([f"rna_{a}" for a in rna_state]),
            "atac_state": pd.Categorical([f"atac_{b}" for b in atac_state]),
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
            "has_atac": has_atac,
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    modalities = {}
    for name, x, theta, prefix in (("rna", rna, theta_rna, "gene"), ("atac", atac, theta_atac, "peak")):
        matrix = sparse.csr_matrix(x)
        adata = anndata.AnnData(X=matrix, obs=pd.DataFrame(index=obs.index),
                                var=pd.DataFrame({"true_theta": theta}, index=[f"{prefix}_{i}" for i in range(x.shape[1])]))
        adata.layers["counts"] = matrix.copy()
        modalities[name] = adata
    modalities["rna"].varm["true_ambient"] = (1500.0 * ambient).T.copy()
    modalities["atac"].varm["true_feature_scaling"] = scaling.T.copy()
    mdata = mudata.MuData(modalities)
    for column in obs.columns:
        mdata.obs[column] = obs[column].to_numpy()
    mdata.uns["simulation"] = {"n_cells": n_cells, "n_genes": n_genes, "n_peaks": n_peaks, "n_batches": n_batches,
                               "atac_missing_fraction": atac_missing_fraction, "seed": seed}
    return mdata
