"""Per-cell modality weights of latent_mode="weighted_mean", modality_weights="cell"."""

import numpy as np
import torch

import pyro_scmodels as ps


def _cell_weights(model) -> np.ndarray:
    guide = model.module.guide
    guide.eval()
    with torch.no_grad():
        batches = model._indexed_batches(None, None, 256)
        return torch.cat([guide.modality_weights(*guide.latent(b)[:2]) for _, (b, _) in batches]).numpy()


def _fit(seed: int, epochs: int):
    mdata = ps.datasets.simulate_multiome(n_cells=200, seed=seed)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, modalities=["rna", "atac"], layer="counts",
                                            ambient_covariate_keys=["batch"], feature_scaling_covariate_keys=["batch"])
    model = ps.RegularizedMultimodalVI(mdata, n_latent=5, n_hidden=32, seed=seed, latent_mode="weighted_mean",
                                       modality_weights="cell")
    model.train(max_epochs=epochs, seed=seed, batch_size=100, lr=1e-2, kl_warmup_epochs=3, early_stopping=False,
                device="cpu", progress_bar=False)
    return mdata, model


def test_per_cell_weights_start_equal_and_do_not_saturate():
    # the layer read the raw log1p counts (600 inputs) from a random start: within a few epochs every cell's
    # weights were 0/1 and the joint z lost one modality's information
    mdata, model = _fit(seed=1, epochs=10)
    w = _cell_weights(model)
    assert w.shape == (200, 2) and np.allclose(w.sum(1), 1.0, atol=1e-5)
    saturated = (w < 0.02) | (w > 0.98)
    assert saturated.mean() < 0.1
    assert 0.1 < np.median(w[:, 0]) < 0.9


def test_per_cell_weights_begin_at_equal_weights():
    mdata = ps.datasets.simulate_multiome(n_cells=60, n_genes=75, n_peaks=120, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16, latent_mode="weighted_mean",
                                       modality_weights="cell")
    assert np.allclose(_cell_weights(model), 0.5)


def test_a_save_whose_weight_layer_read_the_encoder_inputs_still_loads(tmp_path):
    # saves before 2026-12-06 23:00 UTC: the layer was Linear(n_encoder_inputs, M); such a save keeps its layer and answers
    mdata = ps.datasets.simulate_multiome(n_cells=60, n_genes=75, n_peaks=120, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16, latent_mode="weighted_mean",
                                       modality_weights="cell")
    model.train(max_epochs=1, batch_size=30, progress_bar=False, device="cpu", early_stopping=False)
    guide = model.module.guide
    n_inputs = sum(guide.block(m).n_input for m in guide.modalities)
    old = torch.nn.Linear(n_inputs, 2)
    with torch.no_grad():
        old.weight.mul_(0.1)
    guide.weight_layer = old
    guide.legacy_weight_input = True
    expected = _cell_weights(model)
    model.save(str(tmp_path / "old"), overwrite=True)
    loaded = ps.RegularizedMultimodalVI.load(str(tmp_path / "old"), mdata, device="cpu")
    assert loaded.module.guide.legacy_weight_input
    assert loaded.module.guide.weight_layer.weight.shape == (2, n_inputs)
    np.testing.assert_allclose(_cell_weights(loaded), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation(), rtol=1e-5,
                               atol=1e-6)
