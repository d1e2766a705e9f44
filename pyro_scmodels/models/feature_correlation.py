"""Correlation between features of counts drawn from the posterior, as scvi-tools' ``get_feature_correlation_matrix``.

For each cell, z is drawn from q(z | x) and decoded to rho; counts are drawn at a fixed library
size from the model's own likelihood, ``GammaPoisson(theta, theta / mu)`` with
``mu = rna_size_factor * rho / sum(rho)``. The draws of every cell are pooled and the features
correlated over them; with several categories of ``transform_batch``, one matrix per category, averaged.
A multimodal model's cells without counts in the modality (whose likelihood it masks) are left out.
Technical terms that
rho leaves out (background, feature scaling, library size) do not enter the correlation.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyro.distributions as dist
import torch
from scipy.stats import rankdata

from .. import _validation as V
from .._stacklevel import user_stacklevel
from .expression import transform_covariates
from .scvi_arguments import refuses_scvi_arguments
from ..seeding import rng_devices, seed_or_fresh

CORRELATION_TYPES = ("spearman", "pearson")
#: scvi-tools' defaults of ``get_feature_correlation_matrix``
N_SAMPLES = 10
RNA_SIZE_FACTOR = 1000


def _dispersion_of(model, modality) -> torch.Tensor:
    """theta of each dispersion group: groups x features, on the model's device."""
    table = model.global_site_table("dispersion", modality)
    return torch.as_tensor(table.to_numpy().T, dtype=torch.float32, device=model.device)


class FeatureCorrelationQueries:
    """``get_feature_correlation_matrix`` on any model of this package.

    Needs of the model class: ``decode_samples``, ``global_site_table``, ``feature_names``,
    ``default_modality``, ``device`` and the decoder-conditioning keys that ``transform_batch`` reads.
    """

    @refuses_scvi_arguments("query")
    def get_feature_correlation_matrix(self, adata=None, indices=None, n_samples: int = N_SAMPLES,
                                       batch_size: int | None = None, rna_size_factor: float = RNA_SIZE_FACTOR,
                                       transform_batch=None, correlation_type: str = "spearman", *,
                                       modality: str | None = None, seed: int | None = None) -> pd.DataFrame:
        """Feature-feature correlation of counts drawn from the posterior at a fixed library size.

        Parameters
        ----------
        adata, indices, batch_size
            Cells (default every cell of the training data) and cells per minibatch.
        n_samples
            Draws of z, and of counts, per cell.
        rna_size_factor
            The library size the counts are drawn at (scvi-tools' default, 1,000).
        transform_batch
            None: each cell's own decoder covariates. A category of the decoder-conditioning key, a
            list of them, or ``{key: category}``: the cells are decoded as each, one correlation matrix
            is made per category and the matrices are averaged (as scvi-tools does), so the correlation
            is free of that covariate.
        correlation_type
            ``"spearman"`` (ranks; scvi-tools' default) or ``"pearson"``.
        modality
            Multimodal models: the modality (default: the RNA modality, see ``default_modality``). The cells without counts in it are left
            out, with a warning (the model masks their likelihood, so their decoded features are a guess from
            the other modalities); asking only for such cells raises ``ValueError``.
        seed
            Seeds the draws of z and of the counts (None: fresh draws in every call, from torch's global
            stream, as in scvi-tools).

        Returns
        -------
        pandas.DataFrame
            Features x features, indexed by the feature names in the model's order. A feature
            whose draws are all equal (e.g. all zero) has NaN correlations, as in numpy.

        Notes
        -----
        The draws of one category are held at once: cells x ``n_samples`` rows by the features, as
        float32. Pass ``indices`` for large data.
        """
        n_samples = V.positive_int("n_samples", n_samples)
        rna_size_factor = V.positive_float("rna_size_factor", rna_size_factor)
        correlation_type = V.choice("correlation_type", correlation_type, CORRELATION_TYPES)
        seed = seed_or_fresh(V.optional(V.seed, "seed", seed))
        modality = self.default_modality(modality)
        settings = transform_covariates(self, transform_batch)
        theta = _dispersion_of(self, modality)
        matrices = []
        with torch.random.fork_rng(devices=rng_devices(self.device)):
            for covariates in settings:
                # the count draws, seeded afresh per category (decode_samples seeds z itself): a list's matrix is
                # the mean of the matrices of its categories asked one at a time
                torch.manual_seed(seed)
                draws, n_asked = [], 0
                for _, batch, rho in self.decode_samples(adata, indices, batch_size, n_samples, seed, covariates,
                                                         modality):
                    group = batch["dispersion_index"] if theta.shape[0] > 1 else torch.zeros_like(batch["index"])
                    n_asked += group.shape[0]
                    measured = self.measured_cells(batch, modality)
                    if measured is not None:
                        # a cell without counts in the modality has its likelihood masked: its decoded rho is the
                        # model's guess from the other modalities, nearly one point, and would weaken every correlation
                        rho, group = rho[..., measured, :], group[measured]
                    with torch.no_grad():
                        mu = rho / rho.sum(-1, keepdim=True) * rna_size_factor
                        counts = dist.GammaPoisson(theta[group], theta[group] / mu).sample()
                    draws.append(counts.reshape(-1, counts.shape[-1]).cpu().numpy())
                draws = np.concatenate(draws)
                if not matrices:
                    _check_measured(draws.shape[0] // n_samples, n_asked, modality)
                matrices.append(_correlation(draws, correlation_type))
        # one matrix per category, averaged (as scvi-tools does): pooling the categories' draws added the
        # covariance between categories, so two features that both move with the batch looked correlated
        correlation = np.mean(matrices, axis=0)
        names = self.feature_names(modality)
        return pd.DataFrame(correlation, index=names, columns=names)


def _check_measured(n_measured: int, n_asked: int, modality) -> None:
    """Refuse when none of the cells asked for has counts in ``modality``; say how many were left out."""
    if n_measured == 0:
        raise ValueError(f"get_feature_correlation_matrix: none of the {n_asked} cells asked for has counts in modality "
                         f"{modality!r}, so the model has nothing of that modality to correlate for them; pass "
                         "indices= of cells measured in it, or another modality=.")
    if n_measured < n_asked:
        warnings.warn(f"get_feature_correlation_matrix: {n_asked - n_measured} of the {n_asked} cells have no counts "
                      f"in modality {modality!r} (their likelihood is masked, their decoded {modality!r} is the model's "
                      "guess from the other modalities); they are left out of the correlation.", UserWarning,
                      stacklevel=user_stacklevel())


def _correlation(data: np.ndarray, correlation_type: str) -> np.ndarray:
    """Features x features correlation of ``data`` (draws x features); Spearman's on its ranks."""
    if correlation_type == "spearman":
        data = rankdata(data, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant feature: NaN, as numpy gives it
        return np.corrcoef(data, rowvar=False)
