"""Empty droplets of a simulated dataset: counts drawn from each batch's true background only."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd


def simulate_empty_droplets(adata, n_droplets: int = 100, seed: int = 1) -> anndata.AnnData:
    """Droplets without a cell for a dataset from :func:`simulate`: Poisson counts of each batch's true
    background (``varm["true_ambient"]``) at a log-normal droplet size, as CellBender and SoupX read them.

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
    rng = np.random.default_rng(seed)
    soup = np.asarray(adata.varm["true_ambient"]).T
    counts = np.concatenate([rng.poisson(soup[b] * rng.lognormal(0.0, 0.3, size=(n_droplets, 1)))
                             for b in range(soup.shape[0])])
    obs = pd.DataFrame({"batch": np.repeat(adata.obs["batch"].cat.categories, n_droplets)},
                       index=[f"empty_{i}" for i in range(counts.shape[0])])
    return anndata.AnnData(X=counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=adata.var_names))
