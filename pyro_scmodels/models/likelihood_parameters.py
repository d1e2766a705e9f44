"""The parameters of p(x | z) per cell and gene, as scvi-tools' ``get_likelihood_parameters`` returns them.

The counts are ``GammaPoisson(theta, theta / mu)`` (a negative binomial with mean ``mu`` and inverse
dispersion ``theta``): ``mu`` is the full mean of the likelihood (the cell's own expression, the ambient
background, the feature scaling and the library size), ``theta`` the dispersion of the cell's group.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _validation as V


def likelihood_parameters(queries, generative, guide, adata=None, indices=None, n_samples: int = 1,
                          give_mean: bool = False, batch_size: int | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
    """``{"mean": mu, "dispersions": theta}`` of one modality's likelihood, per cell and feature.

    Parameters
    ----------
    queries
        The trained user-facing model (:class:`~pyro_scmodels.RegularizedVI` or
        :class:`~pyro_scmodels.RegularizedMultimodalVI`): it runs the posterior of z (the joint z
        of a multimodal model) over minibatches.
    generative, guide
        The Pyro model and guide of the modality (a multimodal model's blocks): the model splits the
        mean (``decompose_mean``), the guide gives the global sites' medians and the library size.
    adata, indices, batch_size
        Cells, as in :meth:`~pyro_scmodels.RegularizedVI.get_latent_representation`.
    n_samples
        1: at the posterior mean of z. More: at that many draws of z from q(z | x).
    give_mean
        With ``n_samples`` > 1: the mean over the draws instead of every draw.
    seed
        Seeds the draws of z (None: fresh draws in every call, from torch's global stream, as in scvi-tools).

    Returns
    -------
    dict
        ``"mean"`` and ``"dispersions"``: cells x features, or ``n_samples`` x cells x features. The library
        size is its posterior median and the global sites (background, scaling, dispersion) their
        posterior medians.
    """
    n_samples = V.positive_int("n_samples", n_samples)
    give_mean = V.boolean("give_mean", give_mean)
    medians = generative.global_values(guide.global_medians())  # a subclass's fixed site as the model uses it
    theta = medians["inverse_sqrt_theta"].pow(-2)  # dispersion groups x genes
    means, dispersions = [], []
    for _, batch, z in queries.posterior_z_batches(adata, indices, batch_size, None if n_samples == 1 else n_samples, seed):
        with torch.no_grad():
            cell, background = generative.decompose_mean(z, batch, medians, library=guide.library_loc(batch).exp())
        mu = cell + background  # the likelihood's mean, its floor included (in the background)
        group = batch["dispersion_index"] if theta.shape[0] > 1 else torch.zeros_like(batch["index"])
        means.append(mu.cpu())
        dispersions.append(theta[group].expand_as(mu).cpu())
    mean, dispersion = torch.cat(means, dim=-2).numpy(), torch.cat(dispersions, dim=-2).numpy()
    if n_samples > 1 and give_mean:
        mean, dispersion = mean.mean(0), dispersion.mean(0)
    return {"mean": mean, "dispersions": dispersion}
