"""What the scvi-tools API tests share: small simulated data, the model size and training settings, a model
trained once per module and an untrained one per test."""

import pytest

import pyro_scmodels as ps


FIT = dict(batch_size=64, lr=1e-2, kl_warmup_epochs=2, early_stopping=False, device="cpu", progress_bar=False)
SMALL = dict(n_latent=4, n_hidden=32)


def simulate_small(seed=0):
    return ps.datasets.simulate(n_cells=300, n_genes=50, n_markers_per_type=5, n_responding_genes=5, seed=seed)


@pytest.fixture(scope="module")
def model():
    """batch_key with a decoder conditioned on the condition: the combination scvi-tools users ask for."""
    adata = simulate_small()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch", nn_conditioning_covariate_keys=["condition"])
    fitted = ps.RegularizedVI(adata, **SMALL)
    fitted.train(max_epochs=6, check_val_every_n_epoch=2, **FIT)
    return fitted


@pytest.fixture
def untrained():
    adata = simulate_small()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return ps.RegularizedVI(adata, **SMALL)
