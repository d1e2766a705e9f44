"""Which latent dimensions drive each modality's decoder, per cell (SPEC 2).

For modality m and latent column j: the mean over features of |d rho^(m) / d z_j| at the cell's
posterior mean z, from exact forward-mode derivatives (``torch.func.jvp``), one latent column at a
time so that memory does not grow with the latent size. A cell without counts in m (whose likelihood the model
masks) has no attribution for m: its row is NaN.
"""

from __future__ import annotations

import torch

from .. import _validation as V


def check_store(store: bool, indices) -> None:
    """``store`` writes one row per cell of the MuData: with ``indices`` it could not (it failed after the work)."""
    if store and indices is not None:
        raise ValueError("store=True writes a row for every cell of the MuData (its obsm); with indices it cannot. "
                         "Pass indices=None, or keep the returned array yourself.")


def modality_attribution(queries, generative, adata=None, indices=None, batch_size: int | None = None,
                         store: bool | None = None) -> dict:
    """Per cell, how much each latent dimension drives each modality's decoder.

    Parameters
    ----------
    queries
        The user-facing multimodal model: its ``modalities`` and the posterior of z over minibatches.
    generative
        Its Pyro model, whose ``decode(z, batch, modality=m)`` gives rho of modality m.
    adata, indices, batch_size
        Cells, as in :meth:`~pyro_scmodels.RegularizedMultimodalVI.get_latent_representation`.
    store
        Write ``obsm["X_attribution_<m>"]`` and ``obsm["X_weighted_z_<m>"]``; None: when every cell is
        asked for. True with ``indices`` is refused before any work.

    Returns
    -------
    dict
        ``{modality: {"attribution": cells x latent, "weighted_z": z * attribution}}``; NaN rows for the cells
        without counts in the modality (their likelihood is masked). Average with ``np.nanmean``.
    """
    store = indices is None if store is None else V.boolean("store", store)
    check_store(store, indices)
    model = generative  # in evaluation mode while the posterior_z_batches run
    parts = {m: [] for m in queries.modalities}
    latents = []
    for _, batch, z in queries.posterior_z_batches(adata, indices, batch_size):
        latents.append(z)
        for m in queries.modalities:
            decode = lambda latent, m=m: model.decode(latent, batch, modality=m)  # noqa: E731
            columns = []
            for j in range(z.shape[-1]):
                tangent = torch.zeros_like(z)
                tangent[:, j] = 1.0
                _, derivative = torch.func.jvp(decode, (z,), (tangent,))
                columns.append(derivative.abs().mean(-1).detach())
            attribution = torch.stack(columns, -1)
            measured = queries.measured_cells(batch, m)
            if measured is not None:
                # a cell without counts in m: its z lies where m's decoder was never fitted (and is steep there,
                # 36-48x the measured cells' attributions), so it has none, as its reconstruction loss of m has none
                attribution = torch.where(measured.unsqueeze(-1), attribution, torch.nan)
            parts[m].append(attribution)
    z = torch.cat(latents).cpu().numpy()
    result = {}
    target = queries.adata if adata is None else adata
    for m in queries.modalities:
        attribution = torch.cat(parts[m]).cpu().numpy()
        result[m] = {"attribution": attribution, "weighted_z": z * attribution}
        if store:
            target.obsm[f"X_attribution_{m}"] = attribution
            target.obsm[f"X_weighted_z_{m}"] = z * attribution
    return result

