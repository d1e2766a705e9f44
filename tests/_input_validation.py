"""What the input-validation tests share: tiny simulated data (a fresh AnnData per test) and the model size."""

import pytest

from pyro_scmodels.datasets import simulate


N_CELLS, N_GENES = 60, 30
SMALL_MODEL = dict(n_hidden=8, n_latent=2)


def simulate_small(seed=0):
    return simulate(n_cells=N_CELLS, n_genes=N_GENES, n_cell_types=2, n_batches=2,
                    n_markers_per_type=3, n_responding_genes=5, seed=seed)


@pytest.fixture
def adata():
    """A fresh AnnData per test: raw counts (CSR float32) in .X and layers['counts']."""
    return simulate_small()
