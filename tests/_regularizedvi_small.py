"""What the RegularizedVI behaviour tests share: small data set up with a batch key, a small model and quick
training settings."""

import pytest

import pyro_scmodels as ps


SMALL = dict(n_hidden=32, n_latent=4)
QUICK = dict(batch_size=64, device="cpu", progress_bar=False, kl_warmup_epochs=2)


@pytest.fixture
def small():
    adata = ps.datasets.simulate(n_cells=200, n_genes=40, n_markers_per_type=4, n_responding_genes=4, seed=3)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return adata
