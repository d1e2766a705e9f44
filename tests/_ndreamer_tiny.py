"""What the NDreamer life-cycle tests share: a tiny network, tiny simulated data and the copy of a network's
weights."""

import os
import warnings

import anndata
import numpy as np
import pytest

import pyro_scmodels as ps
from pyro_scmodels.ndreamer import NDreamer


TINY = dict(n_codebooks=4, codebook_size=16, codebook_dim=4, embedding_dim=32, z_dim=8, encoder_hidden=(32, 16),
            decoder_hidden=(16, 32), batch_size=64, device="cpu")


@pytest.fixture(scope="module")
def tiny_adata():
    return ps.datasets.simulate(n_cells=300, n_genes=60, n_markers_per_type=4, n_responding_genes=6, seed=5)


@pytest.fixture(scope="module")
def tiny_model(tiny_adata):
    """A RegularizedVI of three epochs on ``tiny_adata``, the condition in its decoder (for ``NDreamer.from_model``)."""
    adata = tiny_adata.copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", nn_conditioning_covariate_keys=["condition"])
    model = ps.RegularizedVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=3, batch_size=128, early_stopping=False, device="cpu", progress_bar=False)
    return model


def tiny_nd(adata, **kwargs) -> NDreamer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NDreamer(adata, "condition", "control", batch_key="batch", layer="counts", **{**TINY, **kwargs})


def nd_state(nd: NDreamer) -> dict:
    return {k: v.clone() for k, v in nd.network.state_dict().items()}


def save_with_one_arm_batches(nd: NDreamer, folder: str) -> None:
    """Save ``nd`` to ``folder``, then relabel the saved cells into its three batches so that each holds one arm only:
    a confounded design, as saved before the confounding checks."""
    nd.save(folder)
    path = os.path.join(folder, "results.h5ad")
    results = anndata.read_h5ad(path)
    control = (results.obs["condition"] == "control").to_numpy()
    controls = np.where(np.arange(results.n_obs) % 2 == 0, "batch_0", "batch_1")
    results.obs["batch"] = np.where(control, controls, "batch_2")
    results.write_h5ad(path)
