"""Reference mapping with the batch in the networks (README's integration setup): the query's new batch gets new
input columns in the decoder and the encoders, the only network weights that learn."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels.matching import knn
from pyro_scmodels.nn import SoftplusDecoder
from ._one_thread import one_thread  # noqa: F401  (a module-scoped autouse fixture)

SETUP = dict(layer="counts", batch_key="batch", nn_conditioning_covariate_keys=["batch"], encoder_covariate_keys=["batch"])
# few optimiser steps on few cells: a large learning rate, one minibatch per epoch, no validation pass
FAST = dict(batch_size=256, lr=1e-2, train_size=1.0, early_stopping=False, device="cpu", progress_bar=False, seed=0)
# the networks' weights that read the batch one-hot: (state-dict key, columns of the reference's batches)
NETWORK_WEIGHTS = ("model.decoder.hidden.linears.0.weight", "guide.encoder.hidden.linears.0.weight",
                   "guide.library_encoder.hidden.linears.0.weight")


@pytest.fixture(scope="module")
def data():
    """900 cells x 120 genes, 8 cell types with few markers, 3 batches with strong scaling and ambient differences."""
    return ps.datasets.simulate(n_cells=900, n_genes=120, n_cell_types=8, n_batches=3, n_markers_per_type=6, type_sd=0.4,
                                batch_scaling_sd=0.8, ambient_fraction=0.3, mean_library=500.0, seed=0)


@pytest.fixture(scope="module")
def reference(data):
    adata = data[data.obs["batch"] != "batch_2"].copy()
    ps.RegularizedVI.setup_anndata(adata, **SETUP)
    model = ps.RegularizedVI(adata, n_hidden=64, n_latent=8, seed=0, latent_independence=10.0)
    model.train(max_epochs=30, kl_warmup_epochs=15, **FAST)
    return model


def query_cells(data, as_batch: str | None = None):
    cells = data[data.obs["batch"] == "batch_2"].copy()
    if as_batch is not None:
        cells.obs["batch"] = pd.Categorical([as_batch] * cells.n_obs)
    return cells


@pytest.fixture(scope="module")
def mapped(data, reference):
    """The query (batch_2) mapped with the defaults: its state before and after 40 epochs, and the reference's."""
    before = {k: v.detach().clone() for k, v in reference.module.state_dict().items()}
    query = ps.RegularizedVI.load_query_data(query_cells(data), reference)
    initial = {k: v.detach().clone() for k, v in query.module.state_dict().items()}
    query.train(max_epochs=40, kl_warmup_epochs=None, **FAST)
    return query, initial, before


def label_transfer_accuracy(reference, query, k: int = 15) -> float:
    """Majority vote of the k nearest reference cells (in z) against each query cell's true type."""
    _, neighbours = knn(query.get_latent_representation(), reference.get_latent_representation(), k=k, device="cpu")
    labels = reference.adata.obs["cell_type"].to_numpy()[neighbours]
    voted = [pd.Series(row).mode().iloc[0] for row in labels]
    return float(np.mean(np.asarray(voted) == query.adata.obs["cell_type"].to_numpy()))


def test_a_new_batch_of_the_network_keys_learns_only_its_own_columns(reference, mapped):
    query, initial, before = mapped
    trainable = {n for n, p in query.module.named_parameters() if p.requires_grad}
    assert {"model.decoder.hidden.new_weights.0", "guide.encoder.hidden.new_weights.0",
            "guide.library_encoder.hidden.new_weights.0"} <= trainable
    assert not any(n.endswith(".linears.0.weight") or ".loc." in n for n in trainable)
    after = query.module.state_dict()
    for key in NETWORK_WEIGHTS:
        reference_weight = before[key]
        assert after[key].shape[1] == reference_weight.shape[1] + 1  # one column for batch_2, after the reference's
        assert torch.equal(after[key][:, :-1], reference_weight), key
        assert torch.equal(initial[key][:, :-1], reference_weight), key
        assert not torch.allclose(after[key][:, -1], initial[key][:, -1]), key  # the new column learned
        # it started where the query model's fresh network put it (as scArches): nn.Linear's uniform in +-1/sqrt(fan_in)
        start = initial[key][:, -1]
        assert start.abs().max() <= after[key].shape[1] ** -0.5 and start.std() > 0.2 * after[key].shape[1] ** -0.5, key
    for key, value in before.items():  # everything else of the networks: the reference's, bit for bit
        if key not in NETWORK_WEIGHTS and (".decoder." in key or "encoder." in key):
            assert torch.equal(after[key], value), key
    # the reference model object is unchanged, and keeps its categories and widths
    assert all(torch.equal(v, reference.module.state_dict()[k]) for k, v in before.items())
    assert reference.encoding.categories["batch"] == ["batch_0", "batch_1"]
    assert not any("new_weights" in n for n, _ in reference.module.named_parameters())
    assert query.encoding.categories["batch"] == ["batch_0", "batch_1", "batch_2"]


def test_the_new_columns_place_the_query_cells_by_type(data, reference, mapped):
    # measured on 3 seeds of data and models (0, 1, 2): 0.77, 0.85, 0.74 with the new columns trained; 0.66, 0.78, 0.67
    # with them kept at their initial values (the frozen encoders then give z); 0.65, 0.81, 0.69 with the cells
    # passed off as batch_0 (the reference's columns and technical levels of batch_0)
    query, _, _ = mapped
    accuracy = label_transfer_accuracy(reference, query)
    with pytest.warns(UserWarning, match="nothing is left to train"):
        as_batch_0 = ps.RegularizedVI.load_query_data(query_cells(data, "batch_0"), reference)
    pretended = label_transfer_accuracy(reference, as_batch_0)
    assert accuracy >= 0.68, (accuracy, pretended)
    assert accuracy >= pretended + 0.02, (accuracy, pretended)


def test_a_saved_query_model_with_new_columns_loads_as_a_plain_model(data, reference, mapped, tmp_path):
    query, _, _ = mapped
    latent = query.get_latent_representation()
    query.save(str(tmp_path / "query"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "query"), query_cells(data))
    assert not any("new_weights" in n for n, _ in loaded.module.named_parameters())  # whole-width weights
    np.testing.assert_array_equal(loaded.get_latent_representation(), latent)
    for key in NETWORK_WEIGHTS:
        assert torch.equal(loaded.module.state_dict()[key], query.module.state_dict()[key]), key
    # a whole-width state dict (a checkpoint) loads back into a query model's split layout, new columns included
    again = ps.RegularizedVI.load_query_data(query_cells(data), reference)
    again.module.load_state_dict(loaded.module.state_dict())
    np.testing.assert_array_equal(again.get_latent_representation(), latent)
    assert again.module.guide.encoder.hidden.new_weights["0"].requires_grad
    assert not again.module.guide.encoder.hidden.linears[0].weight.requires_grad


def test_unfrozen_and_fine_tuned_networks_train_their_reference_columns_too(data, reference):
    query = ps.RegularizedVI.load_query_data(query_cells(data), reference, freeze_encoder=False)
    encoder = query.module.guide.encoder.hidden
    assert encoder.linears[0].weight.requires_grad and encoder.new_weights["0"].requires_grad
    assert not query.module.model.decoder.hidden.linears[0].weight.requires_grad
    assert query.module.model.decoder.hidden.new_weights["0"].requires_grad
    query = ps.RegularizedVI.load_query_data(query_cells(data), reference, unfrozen=True)
    assert all(p.requires_grad for p in query.module.parameters())


def test_a_new_category_between_another_keys_columns(data, tmp_path):
    # one-hot over ["batch", "condition"]: batch_0, batch_1, batch_2 (new), control, stimulated; the new column sits
    # between the reference's columns, which keep their meaning
    adata = data[data.obs["batch"] != "batch_2"].copy()
    keys = ["batch", "condition"]
    ps.RegularizedVI.setup_anndata(adata, layer="counts", ambient_covariate_keys=["batch"],
                                   nn_conditioning_covariate_keys=keys, encoder_covariate_keys=keys)
    model = ps.RegularizedVI(adata, n_hidden=16, n_latent=4, seed=0)
    model.train(max_epochs=3, **FAST)
    query = ps.RegularizedVI.load_query_data(data[data.obs["batch"] != "batch_0"].copy(), model)
    query.train(max_epochs=3, kl_warmup_epochs=None, **FAST)
    before, after = model.module.state_dict(), query.module.state_dict()
    for key in NETWORK_WEIGHTS:
        start = before[key].shape[1] - 4  # where the one-hot begins in the layer's input
        kept = [*range(start + 2), start + 3, start + 4]
        assert torch.equal(after[key][:, kept], before[key]), key
    assert torch.equal(after["model.decoder.hidden.linears.0.weight"][:, -3],
                       query.module.model.decoder.hidden.new_weights["0"][:, 0].detach())
    # a batch the reference knows goes through the reference's columns: its latent is the reference's
    known = data[data.obs["batch"] == "batch_1"].copy()
    np.testing.assert_allclose(query.get_latent_representation(known), model.get_latent_representation(known),
                               rtol=1e-5, atol=1e-6)
    query.save(str(tmp_path / "query"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "query"), query.adata.copy())
    np.testing.assert_array_equal(loaded.get_latent_representation(), query.get_latent_representation())
    again = ps.RegularizedVI.load_query_data(query.adata.copy(), model)  # a checkpoint back into the split layout
    again.module.load_state_dict(query.module.state_dict())
    np.testing.assert_array_equal(again.get_latent_representation(), query.get_latent_representation())


def test_two_hidden_layers_each_take_the_new_batch_and_keep_the_reference_outputs(data):
    """With n_layers=2 the decoder's batch one-hot enters both hidden layers: each gets a column of its own for the
    query's new batch (after the reference's columns, which stay frozen), the query model gives the reference's
    latent and expression on the reference's cells, before and after training, and the new columns learn."""
    adata = data[data.obs["batch"] != "batch_2"].copy()
    ps.RegularizedVI.setup_anndata(adata, **SETUP)
    reference = ps.RegularizedVI(adata, n_hidden=16, n_latent=4, n_layers=2, seed=0)
    reference.train(max_epochs=3, **FAST)
    before = {k: v.detach().clone() for k, v in reference.module.state_dict().items()}
    query = ps.RegularizedVI.load_query_data(query_cells(data), reference)
    assert sorted(query.module.model.decoder.hidden.new_weights) == ["0", "1"]
    initial = {k: v.detach().clone() for k, v in query.module.state_dict().items()}

    def assert_reference_outputs():
        np.testing.assert_allclose(query.get_latent_representation(adata), reference.get_latent_representation(adata),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(query.get_normalized_expression(adata=adata, return_numpy=True),
                                   reference.get_normalized_expression(adata=adata, return_numpy=True), rtol=1e-5,
                                   atol=1e-8)

    assert_reference_outputs()
    history = query.train(max_epochs=10, kl_warmup_epochs=None, **FAST)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    after = query.module.state_dict()
    for layer in ("0", "1"):
        key = f"model.decoder.hidden.linears.{layer}.weight"
        assert after[key].shape[1] == before[key].shape[1] + 1, key  # batch_2, after the reference's columns
        assert torch.equal(after[key][:, :-1], before[key]), key
        assert not torch.allclose(after[key][:, -1], initial[key][:, -1]), key  # the new column learned
    assert_reference_outputs()


class _FixedWidthDecoder(SoftplusDecoder):
    """A subclass's decoder that cannot take columns for new categories."""

    extend_covariates = None


class _FixedWidthModel(ps.RegularizedVIModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoder.__class__ = _FixedWidthDecoder


class _FixedWidthVI(ps.RegularizedVI):
    model_class = _FixedWidthModel


def test_a_network_that_cannot_take_new_columns_is_named_with_the_key_and_option(data):
    adata = data[data.obs["batch"] != "batch_2"].copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", ambient_covariate_keys=["batch"],
                                   nn_conditioning_covariate_keys=["batch"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _FixedWidthVI(adata, n_hidden=8, n_latent=2)
        model.train(max_epochs=1, **FAST)
    with pytest.raises(ValueError, match=r"categories \['batch_2'\] of 'batch', one of the reference's "
                                         r"nn_conditioning_covariate_keys.*_FixedWidthDecoder"):
        _FixedWidthVI.load_query_data(query_cells(data), model)
    with pytest.warns(UserWarning, match="nothing is left to train"):  # known categories: fine
        _FixedWidthVI.load_query_data(data[data.obs["batch"] == "batch_1"].copy(), model)
