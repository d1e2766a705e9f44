"""Empty droplets of a simulated dataset: counts drawn from each batch's true background only (as its cells hold it)."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd

from .. import _validation as V


def simulate_empty_droplets(adata, n_droplets: int = 100, seed: int = 1) -> anndata.AnnData:
    """Droplets without a cell for a dataset from :func:`simulate`: Poisson counts of each batch's true
    background at a log-normal droplet size, as CellBender and SoupX read them. The background is the one a
    typical cell of the batch holds: ``varm["true_ambient"]`` times the batch's gene scaling
    (``varm["true_feature_scaling"]``) and depth (``exp`` of ``uns["simulation"]["batch_depth_offset"]``).

    Parameters
    ----------
    adata
        Output of :func:`simulate` (needs ``varm["true_ambient"]`` and a categorical ``obs["batch"]``).
    n_droplets, seed
        Droplets per batch; seed of the draws.

    Returns
    -------
    anndata.AnnData
        ``n_batches * n_droplets`` droplets x the same genes, with ``obs["batch"]``.
    """
    if "true_ambient" not in adata.varm:
        raise KeyError("adata.varm['true_ambient'] not found: pass an AnnData made by pyro_scmodels.datasets.simulate.")
    rng = np.random.default_rng(V.seed("seed", seed))
    soup = np.asarray(adata.varm["true_ambient"]).T
    # the background a typical cell of the batch carries: s_b times the batch's gene scaling y_b and its depth
    # (the library factor's median, exp of the batch's offset), as in the cells' mean l (rho + s) y; without them the
    # droplets held 0.7-1.2 times the cells' background, and its profile without the scaling
    if "true_feature_scaling" in adata.varm:
        soup = soup * np.asarray(adata.varm["true_feature_scaling"]).T
    offsets = adata.uns.get("simulation", {}).get("batch_depth_offset")
    if offsets is not None:
        soup = soup * np.exp(np.asarray(offsets, dtype=float))[:, None]
    counts = np.concatenate([rng.poisson(soup[b] * rng.lognormal(0.0, 0.3, size=(n_droplets, 1)))
                             for b in range(soup.shape[0])])
    # one soup per simulated batch, in the simulation's order (a subset of the cells may have dropped a batch's
    # category, but varm keeps every batch's soup)
    names = [str(b) for b in adata.uns.get("simulation", {}).get("batches", adata.obs["batch"].cat.categories)]
    if len(names) != soup.shape[0]:
        raise ValueError(f"adata.varm['true_ambient'] has {soup.shape[0]} batches but the batch names are {names}; "
                         "pass the AnnData that datasets.simulate returned (or a subset of its cells).")
    labels = pd.Categorical(np.repeat(np.asarray(names, dtype=object), n_droplets), categories=names)
    obs = pd.DataFrame({"batch": labels}, index=[f"empty_{i}" for i in range(counts.shape[0])])
    return anndata.AnnData(X=counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=adata.var_names))
