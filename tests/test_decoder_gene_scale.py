"""The decoder's output scaled per gene (``decoder_gene_scale=True``): a stimulation response inside a cell type is
represented (the plain softplus decoder at the default learning rate missed it), and the scale is saved, loaded and
absent from models saved before it existed."""

import numpy as np
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels.nn import SoftplusDecoder, is_legacy_identity_entry


def _response_slopes(adata, model) -> tuple[float, float]:
    """Slope and correlation of the model's log2 fold change (stimulated / control, per-cell normalised expression)
    on the simulator's true one in the first responding cell type; the slope over the responding genes."""
    cell_type = list(adata.uns["simulation"]["responding_cell_types"])[0]

    def log2_fold_change(values):
        values = np.asarray(values, dtype=np.float64)
        values = values / values.sum(1, keepdims=True)
        in_type = (adata.obs["cell_type"] == cell_type).to_numpy()
        stimulated = in_type & (adata.obs["condition"] == "stimulated").to_numpy()
        return np.log2(values[stimulated].mean(0)) - np.log2(values[in_type & ~stimulated].mean(0))

    truth = adata.layers["true_rho"]
    truth = log2_fold_change(truth.toarray() if hasattr(truth, "toarray") else truth)
    estimate = log2_fold_change(model.get_normalized_expression(return_numpy=True))
    responding = adata.var["responding"].to_numpy().astype(bool)
    return float(np.polyfit(truth[responding], estimate[responding], 1)[0]), float(np.corrcoef(estimate, truth)[0, 1])


@pytest.fixture(scope="module")
def stimulated():
    adata = ps.datasets.simulate(n_cells=600, n_genes=80, n_cell_types=3, n_batches=2, n_markers_per_type=6,
                                 n_responding_genes=12, seed=1)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return adata


def test_the_gene_scaled_decoder_represents_a_response_inside_a_cell_type(stimulated):
    # measured here (600 cells, 150 epochs): slope 0.90, r 0.95 scaled; 0.05 and 0.45 with the plain softplus
    model = ps.RegularizedVI(stimulated, n_latent=8, n_hidden=64, decoder_gene_scale=True)
    model.train(max_epochs=150, batch_size=256, kl_warmup_epochs=20, progress_bar=False)
    slope, r = _response_slopes(stimulated, model)
    assert 0.7 < slope < 1.3 and r > 0.9, (slope, r)
    means = torch.as_tensor(model.adata.layers["counts"].sum(0)).reshape(-1)
    scale = model.module.model.decoder.output_scale
    assert scale.shape == (stimulated.n_vars,) and not torch.all(scale == 1)
    assert float(np.corrcoef(scale.numpy(), means.numpy())[0, 1]) > 0.9  # the genes' own levels
    assert "decoder_gene_scale" in repr(model)


def test_the_scale_is_saved_and_a_decoder_saved_without_it_loads_as_the_plain_softplus(stimulated, tmp_path):
    model = ps.RegularizedVI(stimulated, n_latent=4, n_hidden=16, decoder_gene_scale=True)
    model.train(max_epochs=2, batch_size=256, progress_bar=False)
    model.save(str(tmp_path / "scaled"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "scaled"), adata=stimulated)
    assert loaded.init_params["decoder_gene_scale"] is True
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    np.testing.assert_allclose(loaded.get_normalized_expression(return_numpy=True),
                               model.get_normalized_expression(return_numpy=True), rtol=1e-6)
    # the default is SPEC 1.2's decoder: scale 1, and its settings do not name the option (older saves load as they were)
    plain = ps.RegularizedVI(stimulated, n_latent=4, n_hidden=16)
    assert torch.all(plain.module.model.decoder.output_scale == 1) and "decoder_gene_scale" not in plain.init_params
    # a decoder saved before the scale existed: loaded with scale 1, the same output, and the same digest entries
    decoder = SoftplusDecoder(3, 5, n_hidden=4)
    state = {k: v for k, v in decoder.state_dict().items() if k != "output_scale"}
    fresh = SoftplusDecoder(3, 5, n_hidden=4)
    fresh.init_output(torch.full((5,), 2.0), gene_scaled=True)
    fresh.load_state_dict(state)
    z = torch.randn(7, 3)
    torch.testing.assert_close(fresh(z), decoder(z))
    assert is_legacy_identity_entry("decoder.output_scale", torch.ones(5))
    assert not is_legacy_identity_entry("decoder.output_scale", torch.full((5,), 2.0))
