"""``simulate_multiome``: paired RNA + ATAC counts where each modality sees part of the cell state.

The steps draw from one ``numpy`` generator in a fixed order (hidden states, per-feature
truth, RNA counts, ATAC counts, failed ATAC libraries); keep it, or a seed gives other data.
"""

from __future__ import annotations

import math

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from .. import _validation as V
from ._common import check_float, check_int, gamma_poisson, softmax

RNA_LIBRARY = 1500.0  # mean RNA library size
ATAC_LIBRARY = 800.0  # mean ATAC library size


def _draw_hidden_states(rng, n_cells, n_batches):
    """Balanced ``rna_state`` (3 levels) and ``atac_state`` (2 levels), and a uniform batch."""
    rna_state = rng.permutation(np.arange(n_cells) % 3)
    atac_state = rng.permutation(np.arange(n_cells) % 2)
    batch = rng.integers(n_batches, size=n_cells)
    return rna_state, atac_state, batch


def _draw_feature_truth(rng, n_genes, n_peaks, n_batches):
    """Dispersions of both modalities, the RNA ambient profiles and the ATAC feature scalings.

    ``ambient`` (batches x genes) is in fractions of a cell's RNA library.
    """
    theta_rna = np.exp(rng.uniform(math.log(1.0), math.log(50.0), n_genes))
    theta_atac = np.exp(rng.uniform(math.log(0.5), math.log(10.0), n_peaks))
    ambient = 0.05 * softmax(rng.normal(0.0, 1.0, (n_batches, n_genes)))
    scaling = np.exp(rng.normal(0.0, 0.1, (n_batches, n_peaks)))
    return theta_rna, theta_atac, ambient, scaling


def _state_profiles(rng, n_features, n_levels, n_markers, level):
    """Feature composition of every cell (rows sum to 1) given its state ``level``.

    Per level: a shared baseline, mild noise on every feature and its own marker features.
    """
    log = rng.normal(0.0, 1.0, n_features) + rng.normal(0.0, 0.3, (n_levels, n_features))
    for k in range(n_levels):
        log[k, k * n_markers:(k + 1) * n_markers] += rng.uniform(1.5, 2.5, n_markers)
    return softmax(log)[level]


def _library_counts(rng, fraction, library_mean, theta, scale=1.0, background=0.0):
    """GammaPoisson counts (float32) with log-normal library sizes around ``library_mean``."""
    library = library_mean * np.exp(rng.normal(0.0, 0.3, fraction.shape[0]))
    # this exact expression (and its order of operations) keeps the seeded data unchanged
    mu = library[:, None] * (fraction + background) * scale
    return gamma_poisson(rng, mu, theta[None, :]).astype(np.float32)


def _simulate_rna(rng, rna_state, theta, cell_ambient):
    """RNA counts: 3 states with 25 markers each, plus the cell's batch ambient profile."""
    composition = _state_profiles(rng, theta.size, 3, 25, rna_state)
    rna = _library_counts(rng, composition, RNA_LIBRARY, theta, background=cell_ambient)
    rna[rna.sum(1) == 0, 0] = 1.0  # every cell keeps some RNA
    return rna


def _simulate_atac(rng, atac_state, theta, cell_scaling, missing_fraction):
    """ATAC counts: 2 states with 60 markers each, scaled per batch; some libraries fail.

    Returns the counts (all zero for a failed library) and ``has_atac``.
    """
    composition = _state_profiles(rng, theta.size, 2, 60, atac_state)
    atac = _library_counts(rng, composition, ATAC_LIBRARY, theta, scale=cell_scaling)
    has_atac = rng.random(atac.shape[0]) >= missing_fraction
    atac[~has_atac] = 0.0
    return atac, has_atac


def _assemble_mudata(obs, rna, atac, theta_rna, theta_atac, ambient, scaling):
    """MuData with modalities ``rna`` and ``atac``, shared ``obs`` and truth in ``var``/``varm``."""
    import mudata

    modalities = {}
    for name, x, theta, prefix in (("rna", rna, theta_rna, "gene"),
                                   ("atac", atac, theta_atac, "peak")):
        matrix = sparse.csr_matrix(x)
        var = pd.DataFrame({"true_theta": theta},
                           index=[f"{prefix}_{i}" for i in range(x.shape[1])])
        adata = anndata.AnnData(X=matrix, obs=pd.DataFrame(index=obs.index), var=var)
        adata.layers["counts"] = matrix.copy()
        modalities[name] = adata
    # ambient is stored in counts (fractions times the mean library), batches as columns
    modalities["rna"].varm["true_ambient"] = (RNA_LIBRARY * ambient).T.copy()
    modalities["atac"].varm["true_feature_scaling"] = scaling.T.copy()
    mdata = mudata.MuData(modalities)
    for column in obs.columns:
        mdata.obs[column] = obs[column].to_numpy()
    return mdata


def simulate_multiome(n_cells: int = 1200, n_genes: int = 200, n_peaks: int = 400,
                      n_batches: int = 2, atac_missing_fraction: float = 0.0, seed: int = 0):
    """Simulate paired RNA + ATAC counts where each modality sees only part of the cell state.

    Cells have two hidden factors: ``rna_state`` (3 levels) drives RNA only and ``atac_state``
    (2 levels) drives ATAC only; the 6 combinations are the cell types. RNA alone separates 3
    groups, ATAC alone 2, and only both together resolve all 6. Both modalities follow the
    RegularizedVI likelihood: RNA with a per-batch ambient profile, ATAC with a per-batch
    feature scaling, each with its own dispersions and library sizes.

    Parameters
    ----------
    n_cells, n_genes, n_peaks : int
        Sizes (genes need at least 75 and peaks 120 for the marker features).
    n_batches : int
        Batches (``obs["batch"]``).
    atac_missing_fraction : float
        Fraction of cells whose ATAC counts are all zero (a failed library), in ``obs["has_atac"]``.
    seed : int
        Seed of the numpy generator.

    Returns
    -------
    mudata.MuData
        Modalities ``"rna"`` and ``"atac"`` (raw counts, CSR float32, also in ``layers["counts"]``);
        ``obs``: ``cell_type``, ``rna_state``, ``atac_state``, ``batch``, ``has_atac``; truth in
        each modality's ``var["true_theta"]`` and ``varm`` (``true_ambient`` for RNA,
        ``true_feature_scaling`` for ATAC).

    Raises
    ------
    ValueError
        If an argument is out of range; the message names the argument.
    """
    n_cells = check_int("n_cells", n_cells, 12)
    n_genes = check_int("n_genes", n_genes, 75)
    n_peaks = check_int("n_peaks", n_peaks, 120)
    n_batches = check_int("n_batches", n_batches, 1)
    atac_missing_fraction = check_float("atac_missing_fraction", atac_missing_fraction, 0.0,
                                        maximum=0.5)
    rng = np.random.default_rng(V.seed("seed", seed))
    rna_state, atac_state, batch = _draw_hidden_states(rng, n_cells, n_batches)
    theta_rna, theta_atac, ambient, scaling = _draw_feature_truth(rng, n_genes, n_peaks, n_batches)
    rna = _simulate_rna(rng, rna_state, theta_rna, ambient[batch])
    atac, has_atac = _simulate_atac(rng, atac_state, theta_atac, scaling[batch],
                                    atac_missing_fraction)

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
    mdata = _assemble_mudata(obs, rna, atac, theta_rna, theta_atac, ambient, scaling)
    mdata.uns["simulation"] = {"n_cells": n_cells, "n_genes": n_genes, "n_peaks": n_peaks,
                               "n_batches": n_batches,
                               "atac_missing_fraction": atac_missing_fraction, "seed": seed}
    return mdata
