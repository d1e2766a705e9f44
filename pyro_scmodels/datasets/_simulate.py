"""``simulate``: single-cell RNA counts with cell types, batches, ambient RNA and a stimulus.

``simulate`` runs named steps that all draw from one ``numpy`` generator; the order of the
steps (and of the draws inside each) fixes the data set a seed gives, so keep it.
"""

from __future__ import annotations

import math
from typing import Sequence

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from .. import _validation as V
from ._common import SimulationSettings, check_simulate_arguments, softmax
from ._technical import (
    _check_ambient_fractions, _draw_counts, _set_ambient_fractions, _simulate_batch_effects, _simulate_dispersions,
    _simulate_library_sizes, _simulate_rna_content, _true_ambient_fraction,
)

CONTROL = "control"
STIMULATED = "stimulated"


# --- simulation steps, in the order ``simulate`` calls them ----------------------------------

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


def _choose_marker_and_responding_genes(rng, n_genes, n_cell_types, n_markers, n_responding):
    """Disjoint marker genes per type (``markers[k]``) and the stimulus-responding genes."""
    gene_order = rng.permutation(n_genes)
    markers = gene_order[: n_cell_types * n_markers].reshape(n_cell_types, n_markers)
    # responding genes come from the non-markers first, then markers if too few remain
    responding = np.roll(gene_order, -n_cell_types * n_markers)[:n_responding]
    return markers, responding


def _simulate_expression_programmes(rng, cell_type, markers, n_genes, type_sd, rank):
    """Log expression of every cell type and of every cell in the control condition.

    Returns ``type_log`` (types x genes: gene baseline, per-type deviation and marker boost),
    ``factors`` (cells x ``rank`` within-type factors) and ``log_control`` (cells x genes).
    """
    n_types, n_markers = markers.shape
    # spread of gene means on the log scale: a few abundant genes, many rare ones
    baseline = rng.normal(0.0, 1.3, size=n_genes)
    type_log = baseline + rng.normal(0.0, type_sd, size=(n_types, n_genes))
    for k in range(n_types):
        type_log[k, markers[k]] += rng.uniform(1.5, 3.0, size=n_markers)
    loadings = rng.normal(0.0, 0.25, size=(n_genes, rank))
    factors = rng.normal(0.0, 1.0, size=(cell_type.size, rank))
    log_control = type_log[cell_type] + factors @ loadings.T
    return type_log, factors, log_control


def _simulate_stimulation_effects(rng, responding, n_genes, n_cell_types, responders):
    """Per-gene natural-log fold change (75 % up) and per-type response strength (0 if none)."""
    lfc = np.zeros(n_genes)
    signs = np.where(rng.random(responding.size) < 0.75, 1.0, -1.0)
    lfc[responding] = signs * rng.uniform(1.0, 2.5, size=responding.size)
    strength = np.zeros(n_cell_types)
    strength[responders] = rng.uniform(0.6, 1.0, size=len(responders))
    return lfc, strength


def _response_scale(factors, cell_type, strength, effect_modifier):
    """Each cell's response strength: its type's ``strength`` times ``1 + m * tanh(f[:, 0])``.

    ``f[:, 0]`` is the cell's first within-type factor, a state that also shapes its control
    expression, so the modifier can be read off the cell; ``m = effect_modifier`` in [0, 1]
    sets how much the response varies inside a type (0: not at all). No random draws.
    """
    scale = strength[cell_type].astype(np.float64)
    if effect_modifier > 0.0:
        scale = scale * (1.0 + effect_modifier * np.tanh(factors[:, 0]))
    return scale


def _log_normalised(rho: np.ndarray) -> np.ndarray:
    """``log1p(1e4 * rho / rho.sum())`` per cell: the scale every effect is measured on."""
    return np.log1p(1e4 * rho / rho.sum(axis=1, keepdims=True))


def _apply_stimulation(log_control, cell_type, stimulated, lfc, scale, mean_library):
    """Background-free expression ``rho`` of every cell, and its noise-free log expression.

    Stimulated cells of a responding type get ``log_control + scale * lfc`` (``scale`` per
    cell, 0 in non-responding types). Returns ``rho`` and the log-normalised expression of
    every cell under control and under stimulation; the true effect is their difference.
    No random draws.
    """
    rho_control = mean_library * softmax(log_control)
    rho_stim = rho_control.copy()
    reacts = scale > 0
    rho_stim[reacts] = mean_library * softmax(log_control[reacts] + scale[reacts, None] * lfc)
    rho = np.where(stimulated[:, None], rho_stim, rho_control)
    return rho, _log_normalised(rho_control), _log_normalised(rho_stim)


# --- the AnnData and its ground truth --------------------------------------------------------

def _obs_table(s: SimulationSettings, cell_type, batch, stimulated, library) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cell_type, _type_names(s)),
            "batch": pd.Categorical.from_codes(batch, _batch_names(s)),
            "condition": pd.Categorical.from_codes(stimulated.astype(np.int64),
                                                   [CONTROL, STIMULATED]),
            "true_library": library,
        },
        index=[f"cell_{n}" for n in range(s.n_cells)],
    )


def _var_table(s: SimulationSettings, markers, responding, theta, lfc) -> pd.DataFrame:
    marker_of = np.full(s.n_genes, "", dtype=object)
    for k, name in enumerate(_type_names(s)):
        marker_of[markers[k]] = name
    is_responding = np.zeros(s.n_genes, dtype=bool)
    is_responding[responding] = True
    return pd.DataFrame(
        {"true_theta": theta, "true_lfc": lfc, "is_marker": marker_of != "",
         "marker_of": marker_of, "responding": is_responding},
        index=[f"gene_{g}" for g in range(s.n_genes)],
    )


def _simulation_record(s: SimulationSettings, strength, depth_offset) -> dict:
    """Settings, drawn per-type and per-batch truths and key names for ``uns["simulation"]``."""
    type_names = _type_names(s)
    record = {
        "n_cells": s.n_cells, "n_genes": s.n_genes, "n_cell_types": s.n_cell_types,
        "n_batches": s.n_batches, "n_markers_per_type": s.n_markers_per_type,
        "within_type_rank": s.within_type_rank, "type_sd": s.type_sd,
        "stimulated_fraction": s.stimulated_fraction,
        "n_responding_genes": s.n_responding_genes, "ambient_fraction": s.ambient_fraction,
        "batch_scaling_sd": s.batch_scaling_sd, "mean_library": s.mean_library,
        "library_sd": s.library_sd, "theta_range": list(s.theta_range),
        "batches": _batch_names(s), "cell_types": type_names,
        "responding_cell_types": [type_names[k] for k in s.responders],
        "response_strength": [float(strength[k]) for k in s.responders],
        "batch_depth_offset": [float(v) for v in depth_offset],
        "control_name": CONTROL, "stimulated_name": STIMULATED,
        "condition_key": "condition", "batch_key": "batch", "cell_type_key": "cell_type",
    }
    if s.seed is not None:  # h5ad cannot store None
        record["seed"] = s.seed
    return record


def _type_names(s: SimulationSettings) -> list[str]:
    return [f"type_{k}" for k in range(s.n_cell_types)]


def _batch_names(s: SimulationSettings) -> list[str]:
    return [f"batch_{b}" for b in range(s.n_batches)]


# --- public entry point ----------------------------------------------------------------------

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
    ambient_fractions: Sequence[float] | None = None,
    ambient_fraction_sd: float = 0.3,
    effect_modifier: float = 0.0,
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
    ambient_fractions : sequence of float, optional
        One share of background counts per batch, each in [0, 1), e.g.
        ``(0.03, 0.08, 0.15, 0.25)``: batch b's ambient profile is scaled so that a cell of
        typical RNA content has ``ambient_fractions[b]`` of its expected counts from the
        background (this replaces ``ambient_fraction``). Each cell's RNA content (its ``rho``)
        is multiplied by a log-normal factor with log-sd ``ambient_fraction_sd``, so the share
        varies from cell to cell. The true share per cell is in
        ``obs["true_ambient_fraction"]``, each batch's profile (summing to 1) in
        ``uns["true_ambient_profile"]`` (genes x batches). Without it, nothing changes.
    ambient_fraction_sd : float
        Log-sd of the per-cell RNA content (only with ``ambient_fractions``).
    effect_modifier : float
        In [0, 1]: how much a continuous state inside each cell type scales the response.
        A responding cell's fold changes are multiplied by ``1 + effect_modifier *
        tanh(f1)``, where ``f1`` is its first within-type factor (``obsm["true_latent"]``
        column ``n_cell_types``), a state that also shapes its control expression. 0 (the
        default) gives every cell of a type the same response strength; 1 spreads it over
        (0, 2) times the type's strength. The per-cell strength is in
        ``obs["true_response_scale"]``. No extra random draws: the counts of a seed change
        only through the response.

    Returns
    -------
    anndata.AnnData
        Cells x genes; ``X`` and ``layers["counts"]`` hold raw counts (CSR,
        float32). Ground truth lives in ``obs["true_library"]``,
        ``var[["true_theta", "true_lfc", "is_marker", "marker_of", "responding"]]``,
        ``varm["true_ambient"]``, ``varm["true_feature_scaling"]`` (genes x
        batches), ``obsm["true_latent"]`` (type one-hot then within-type
        factors), ``layers["true_rho"]`` and ``layers["true_ite"]`` (stimulated
        minus control ``log1p(1e4 * rho / rho.sum())`` for every cell, stimulated or not),
        with its two terms, the noise-free log expression of every cell under control and
        under stimulation, in ``layers["true_log_control"]`` and
        ``layers["true_log_stimulated"]``, and ``obs["true_response_scale"]``. Settings
        and key names are in ``uns["simulation"]``.

    Raises
    ------
    ValueError
        If an argument is out of range; the message names the argument.
    """
    s = check_simulate_arguments(
        n_cells=n_cells, n_genes=n_genes, n_cell_types=n_cell_types, n_batches=n_batches,
        n_markers_per_type=n_markers_per_type, within_type_rank=within_type_rank,
        type_sd=type_sd, stimulated_fraction=stimulated_fraction,
        n_responding_genes=n_responding_genes, responding_cell_types=responding_cell_types,
        ambient_fraction=ambient_fraction, batch_scaling_sd=batch_scaling_sd,
        mean_library=mean_library, library_sd=library_sd, theta_range=theta_range, seed=seed,
    )
    fractions = _check_ambient_fractions(ambient_fractions, s.n_batches)
    content_sd = V.number("ambient_fraction_sd", ambient_fraction_sd, 0.0)
    modifier = V.number("effect_modifier", effect_modifier, 0.0, 1.0)
    rng = np.random.default_rng(s.seed)
    # every step draws from ``rng``: their order (and the order inside each) fixes the data
    cell_type, batch, stimulated = _assign_cells(rng, s.n_cells, s.n_cell_types, s.n_batches,
                                                 s.stimulated_fraction)
    markers, responding = _choose_marker_and_responding_genes(
        rng, s.n_genes, s.n_cell_types, s.n_markers_per_type, s.n_responding_genes)
    type_log, factors, log_control = _simulate_expression_programmes(
        rng, cell_type, markers, s.n_genes, s.type_sd, s.within_type_rank)
    lfc, strength = _simulate_stimulation_effects(rng, responding, s.n_genes, s.n_cell_types,
                                                  s.responders)
    scale = _response_scale(factors, cell_type, strength, modifier)
    rho, log_control_true, log_stimulated_true = _apply_stimulation(
        log_control, cell_type, stimulated, lfc, scale, s.mean_library)
    feature_scaling, ambient = _simulate_batch_effects(
        rng, type_log, s.n_batches, s.batch_scaling_sd, s.ambient_fraction, s.mean_library)
    depth_offset, library = _simulate_library_sizes(rng, batch, s.n_batches, s.library_sd)
    theta = _simulate_dispersions(rng, s.n_genes, s.theta_range)
    if fractions is not None:  # drawn last, so the draws above match a run without the option
        ambient = _set_ambient_fractions(ambient, fractions, s.mean_library)
        rho = rho * _simulate_rna_content(rng, s.n_cells, content_sd)[:, None]
    expression = (rho + ambient[batch]) * feature_scaling[batch]  # mu / l
    counts, library = _draw_counts(rng, library, expression, theta)

    x = sparse.csr_matrix(counts.astype(np.float32))
    adata = anndata.AnnData(X=x, obs=_obs_table(s, cell_type, batch, stimulated, library),
                            var=_var_table(s, markers, responding, theta, lfc))
    adata.layers["counts"] = x.copy()
    adata.layers["true_rho"] = rho.astype(np.float32)
    adata.layers["true_ite"] = (log_stimulated_true - log_control_true).astype(np.float32)
    adata.layers["true_log_control"] = log_control_true.astype(np.float32)
    adata.layers["true_log_stimulated"] = log_stimulated_true.astype(np.float32)
    adata.obs["true_response_scale"] = scale
    adata.obsm["true_latent"] = np.hstack(
        [np.eye(s.n_cell_types)[cell_type], factors]).astype(np.float32)
    adata.varm["true_ambient"] = ambient.T.copy()
    adata.varm["true_feature_scaling"] = feature_scaling.T.copy()
    adata.uns["simulation"] = _simulation_record(s, strength, depth_offset)
    adata.uns["simulation"]["effect_modifier"] = modifier
    if fractions is not None:
        adata.obs["true_ambient_fraction"] = _true_ambient_fraction(rho, ambient, feature_scaling, batch)
        adata.uns["true_ambient_profile"] = (ambient / ambient.sum(axis=1, keepdims=True)).T.copy()
        adata.uns["simulation"].update(ambient_fractions=[float(f) for f in fractions],
                                       ambient_fraction_sd=content_sd)
    return adata
