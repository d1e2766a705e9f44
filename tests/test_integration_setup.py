"""The documented setup for integrating batches (docs/models.md, "Integrating batches").

Strong per-gene multiplicative batch effects (log-sd 0.5) and weak markers, the simulator's hard
case in small, at the default learning rate: with ``batch_key`` alone nothing but z can absorb a per-gene batch effect (feature
scaling is global and the decoder batch-free), so the batches stay apart; with the decoder also
conditioned on the batch (``nn_conditioning_covariate_keys=[batch]``, which also gives each batch
its own feature scaling) they mix and the cell types stay apart.
"""

import numpy as np
import pytest

import pyro_scmodels as ps
from pyro_scmodels import metrics as M


def _latent(setup: dict, seed: int = 0) -> tuple[np.ndarray, object]:
    adata = ps.datasets.simulate(n_cells=900, n_genes=200, n_cell_types=3, n_batches=3, n_markers_per_type=8,
                                 type_sd=0.3, batch_scaling_sd=0.5, stimulated_fraction=0.0, seed=seed)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", **setup)
    model = ps.RegularizedVI(adata, n_hidden=32, n_latent=5, seed=seed)
    model.train(max_epochs=60, batch_size=128, kl_warmup_epochs=10, early_stopping=False, device="cpu",
                progress_bar=False, seed=seed)
    return model.get_latent_representation(), adata


@pytest.fixture(scope="module")
def latents():
    return {name: _latent(setup) for name, setup in {
        "batch_key": {"batch_key": "batch"},
        "integrating": {"batch_key": "batch", "nn_conditioning_covariate_keys": ["batch"]},
    }.items()}


def test_batch_key_alone_leaves_strong_per_gene_batch_effects_in_z(latents):
    z, adata = latents["batch_key"]
    assert M.knn_entropy(z, adata.obs["batch"]) < 0.4  # measured 0.06


def test_decoder_on_batch_mixes_batches_and_keeps_cell_types(latents):
    z, adata = latents["integrating"]
    before, _ = latents["batch_key"]
    mixing = M.knn_entropy(z, adata.obs["batch"])
    assert mixing > 0.7  # measured 0.83
    assert mixing > M.knn_entropy(before, adata.obs["batch"]) + 0.3
    assert M.cluster_ari(z, adata.obs["cell_type"]) > 0.9
