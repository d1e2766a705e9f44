"""Reference mapping (scArches-style): a reference trained on two batches, a third batch mapped onto it."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
from pyro.infer import Trace_ELBO

import pyro_scmodels as ps
from pyro_scmodels._validation import ArgumentTypeError
from pyro_scmodels.matching import knn
from pyro_scmodels.models.query_freezing import NewLevelsSiteGuide
from ._one_thread import one_thread  # noqa: F401  (a module-scoped autouse fixture)

KEYS = dict(layer="counts", ambient_covariate_keys=["batch"], feature_scaling_covariate_keys=["batch"],
            dispersion_key="batch", library_size_key="batch")
# few optimiser steps on few cells: a large learning rate, one minibatch per epoch, no validation pass
FAST = dict(batch_size=256, lr=1e-2, train_size=1.0, early_stopping=False, device="cpu", progress_bar=False, seed=0)
PER_LEVEL = ("dispersion_rate", "inverse_sqrt_theta", "ambient", "feature_scaling")


@pytest.fixture(scope="module")
def data():
    """450 cells x 100 genes, 5 cell types, 3 batches with strong ambient RNA and gene scaling differences."""
    return ps.datasets.simulate(n_cells=450, n_genes=100, n_cell_types=5, n_batches=3, batch_scaling_sd=0.4,
                                ambient_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def reference(data):
    adata = data[data.obs["batch"] != "batch_2"].copy()
    ps.RegularizedVI.setup_anndata(adata, **KEYS)
    model = ps.RegularizedVI(adata, n_hidden=64, n_latent=8, seed=0)
    # trained for 3 epochs instead, the query's label transfer accuracy is 0.85
    model.train(max_epochs=40, kl_warmup_epochs=20, **FAST)
    return model


def query_cells(data):
    return data[data.obs["batch"] == "batch_2"].copy()


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def label_transfer_accuracy(reference, query, k: int = 15) -> float:
    """Majority vote of the k nearest reference cells (in z) against each query cell's true type."""
    _, neighbours = knn(query.get_latent_representation(), reference.get_latent_representation(), k=k, device="cpu")
    labels = reference.adata.obs["cell_type"].to_numpy()[neighbours]
    voted = [pd.Series(row).mode().iloc[0] for row in labels]
    return float(np.mean(np.asarray(voted) == query.adata.obs["cell_type"].to_numpy()))


def test_query_lands_next_to_its_reference_type_and_the_reference_is_untouched(data, reference):
    before, setup_before, epochs_before = state(reference), reference.adata.uns.copy(), reference.trainer.epoch
    query = ps.RegularizedVI.load_query_data(query_cells(data), reference)
    initial = state(query)
    trainable = {n for n, p in query.module.named_parameters() if p.requires_grad}
    assert trainable == {f"guide.{site}.{p}_unconstrained" for site, p in
                         [("dispersion_rate", "value"), ("inverse_sqrt_theta", "loc"), ("inverse_sqrt_theta", "scale"),
                          ("ambient", "value"), ("feature_scaling", "value")]}
    history = query.train(max_epochs=40, kl_warmup_epochs=None, **FAST)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] - 10.0  # the new levels were learned

    accuracy = label_transfer_accuracy(reference, query)
    assert accuracy >= 0.9, accuracy

    after = state(query)
    for key, value in before.items():
        if key.split(".")[1] in PER_LEVEL:  # levels x genes: the reference's rows come first, then batch_2
            assert torch.equal(after[key][: value.shape[0]], value), key
            assert not torch.equal(after[key][value.shape[0]:], initial[key][value.shape[0]:]), key
        elif key.startswith("model.library_prior"):
            assert torch.equal(after[key][:2], value), key
        else:  # decoder, encoders, priors, library weight: bit-identical to the reference
            assert torch.equal(after[key], value), key
    # the reference model object is unchanged
    assert all(torch.equal(v, reference.module.state_dict()[k]) for k, v in before.items())
    assert reference.adata.uns.keys() == setup_before.keys() and reference.trainer.epoch == epochs_before
    assert reference.encoding.categories["batch"] == ["batch_0", "batch_1"]
    assert list(query.get_ambient_profile().columns) == ["batch_0", "batch_1", "batch_2"]


def test_gradient_reaches_only_the_new_levels(data, reference):
    query = ps.RegularizedVI.load_query_data(query_cells(data), reference)
    assert isinstance(query.module.guide.ambient, NewLevelsSiteGuide)
    _, (batch, n_obs) = next(query.minibatches(indices=np.arange(64)))
    Trace_ELBO().differentiable_loss(query.module.model, query.module.guide, batch, n_obs).backward()
    for name, parameter in query.module.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    # the table the guide samples: reference rows exactly the reference's, the new row learnable
    table = query.module.guide.ambient.table("value")
    assert torch.equal(table[:2].detach(), reference.module.guide.ambient.value.detach()) and table.requires_grad
    # the new library group's prior mean: the query's mean log total, centred as the reference's groups are
    log_total = np.log(np.asarray(query.adata.layers["counts"].sum(1)).ravel()).mean()
    expected = log_total - reference.module.guide.log_total_centre.item()
    assert query.module.model.library_prior_loc[2].item() == pytest.approx(expected, abs=1e-5)


def test_fine_tuned_encoder_keeps_the_decoder(data, reference):
    query = ps.RegularizedVI.load_query_data(query_cells(data), reference, freeze_encoder=False, freeze_dropout=True)
    assert query.init_params["dropout_rate"] == 0.0
    query.train(max_epochs=10, kl_warmup_epochs=None, **FAST)
    ref, after = reference.module.state_dict(), query.module.state_dict()
    assert not torch.equal(after["guide.encoder.loc.weight"], ref["guide.encoder.loc.weight"])
    assert all(torch.equal(after[k], ref[k]) for k in ref if k.startswith("model.decoder"))
    assert label_transfer_accuracy(reference, query) >= 0.9


def test_reference_from_a_folder_and_a_saved_query_model(data, reference, tmp_path):
    reference.save(str(tmp_path / "reference"))
    from_model = ps.RegularizedVI.load_query_data(query_cells(data), reference)
    # scvi-tools' keyword name (reference_model=) as well as its position
    from_folder = ps.RegularizedVI.load_query_data(query_cells(data), reference_model=str(tmp_path / "reference"))
    assert list(ps.RegularizedVI.prepare_query_anndata(query_cells(data), reference_model=reference,
                                                       return_reference_var_names=True)) == list(reference.adata.var_names)
    assert all(torch.equal(v, from_folder.module.state_dict()[k]) for k, v in from_model.module.state_dict().items())

    from_model.train(max_epochs=5, kl_warmup_epochs=None, **FAST)
    from_model.save(str(tmp_path / "query"))
    cells = query_cells(data)
    loaded = ps.RegularizedVI.load(str(tmp_path / "query"), cells)  # an ordinary model over the extended categories
    assert loaded.encoding.categories["batch"] == ["batch_0", "batch_1", "batch_2"]
    pd.testing.assert_frame_equal(loaded.get_ambient_profile(), from_model.get_ambient_profile())
    np.testing.assert_array_equal(loaded.get_latent_representation(), from_model.get_latent_representation())
    # a whole-table state dict loads back into the frozen layout (checkpoint resume)
    from_folder.module.load_state_dict(from_model.module.state_dict())
    assert torch.equal(from_folder.module.guide.ambient.median(), from_model.module.guide.ambient.median())


def test_prepare_query_anndata_reorders_and_pads(data, reference, tmp_path):
    cells = query_cells(data)
    genes = list(reference.var_names)
    rng = np.random.default_rng(0)
    kept = [genes[i] for i in rng.permutation(len(genes))[5:]]  # 5 reference genes missing, the rest shuffled
    query = cells[:, kept].copy()
    query.obsm["embedding"] = np.ones((query.n_obs, 2))
    query.obsp["graph"] = sp.identity(query.n_obs, format="csr")
    query.raw = query.copy()
    original = query.copy()
    with pytest.warns(UserWarning, match="5 of the reference's 100 genes are missing"):
        aligned = ps.RegularizedVI.prepare_query_anndata(query, reference, inplace=False)
    assert list(query.var_names) == kept  # inplace=False leaves the input alone
    # also after the copy is edited in place: its cell-indexed fields shared the input's arrays
    aligned.obsm["embedding"][:] = 0
    aligned.obsp["graph"].data[:] = 0
    aligned.raw.X.data[:] = 0
    assert query.obsm["embedding"].min() == 1 and query.obsp["graph"].sum() == query.n_obs
    assert query.raw.X.sum() == original.raw.X.sum() > 0
    assert list(aligned.var_names) == genes and sp.issparse(aligned.layers["counts"])
    missing = [g for g in genes if g not in kept]
    assert aligned[:, missing].layers["counts"].sum() == 0
    np.testing.assert_array_equal(aligned[:, kept].layers["counts"].toarray(), original.layers["counts"].toarray())
    # the padded genes' .var rows keep their columns' types: a bool column with NaN could not be written
    assert aligned.var["is_marker"].dtype == bool and not aligned.var.loc[missing, "is_marker"].any()
    aligned.write_h5ad(tmp_path / "aligned.h5ad")

    with pytest.warns(UserWarning, match="filled with zeros"):
        assert ps.RegularizedVI.prepare_query_anndata(query, reference) is None  # scvi-tools' default: in place
    assert list(query.var_names) == genes
    assert list(ps.RegularizedVI.prepare_query_anndata(query, reference, return_reference_var_names=True)) == genes
    with pytest.warns(UserWarning, match="filled with zeros"):
        mapped = ps.RegularizedVI.load_query_data(original, reference, inplace_subset_query_vars=True)
    assert list(mapped.var_names) == genes


def test_clear_errors_before_any_work(data, reference):
    cells = query_cells(data)
    with pytest.raises(ArgumentTypeError, match="reference must be a trained RegularizedVI"):
        ps.RegularizedVI.load_query_data(cells, object())
    untrained = ps.RegularizedVI(reference.adata, n_hidden=8, n_latent=2)
    with pytest.raises(ValueError, match="has not been trained"):
        ps.RegularizedVI.load_query_data(cells, untrained)
    with pytest.raises(ValueError, match="prepare_query_anndata"):
        ps.RegularizedVI.load_query_data(cells[:, ::-1].copy(), reference)
    no_batch = cells.copy()
    del no_batch.obs["batch"]
    with pytest.raises(KeyError, match="'batch' not found in the query's adata.obs"):
        ps.RegularizedVI.load_query_data(no_batch, reference)
    scaled = cells.copy()
    scaled.layers["counts"] = scaled.layers["counts"] * 0.5
    with pytest.raises(ValueError, match="non-integer"):
        ps.RegularizedVI.load_query_data(scaled, reference)
    with pytest.raises(FileNotFoundError, match="No saved model"):
        ps.RegularizedVI.load_query_data(cells, "/nonexistent/folder")


def test_unseen_decoder_covariate_gets_a_column_and_known_batches_need_no_training(data):
    adata = data[data.obs["batch"] != "batch_2"].copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", ambient_covariate_keys=["batch"],
                                   nn_conditioning_covariate_keys=["batch"])
    model = ps.RegularizedVI(adata, n_hidden=8, n_latent=2)
    model.train(max_epochs=1, **FAST)
    # the decoder reads batch_2 through a column of its own (tests/test_query_networks.py)
    new = ps.RegularizedVI.load_query_data(query_cells(data), model)
    assert new.module.model.decoder.hidden.new_weights["0"].shape == (8, 1)
    known = data[data.obs["batch"] == "batch_1"].copy()
    with pytest.warns(UserWarning, match="nothing is left to train"):
        query = ps.RegularizedVI.load_query_data(known, model)
    assert query.is_trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained model: no "not trained" warning
        np.testing.assert_allclose(query.get_latent_representation(), model.get_latent_representation(known), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="nothing to train"):  # it failed inside torch's backward
        query.train(max_epochs=1, **FAST)


def test_a_reference_with_a_known_ambient_profile_learns_only_the_new_levels_amount(data, tmp_path):
    """ambient_profile= on the reference (profiles for the query's batch too): the query learns only that amount."""
    adata = data[data.obs["batch"] != "batch_2"].copy()
    ps.RegularizedVI.setup_anndata(adata, **KEYS)
    levels = sorted(data.obs["batch"].unique())
    profile = pd.DataFrame(np.random.default_rng(1).random((data.n_vars, len(levels))) + 0.1, index=data.var_names,
                           columns=levels)
    reference = ps.RegularizedVI(adata, n_hidden=32, n_latent=4, seed=0, ambient_profile=profile)
    reference.train(max_epochs=3, **FAST)
    query = ps.RegularizedVI.load_query_data(query_cells(data), reference)
    before = query.module.guide.ambient.median().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # among others: the direct ELBO agrees with Trace_ELBO
        query.train(max_epochs=5, **FAST)
    after = query.module.guide.ambient.median()
    new = query.encoding.categories["batch"].index("batch_2")
    known = [i for i in range(len(levels)) if i != new]
    reference_levels = [reference.encoding.categories["batch"].index(query.encoding.categories["batch"][i]) for i in known]
    # the reference levels' backgrounds are the reference's, bit for bit
    assert torch.equal(after[known], reference.module.guide.ambient.median()[reference_levels])
    assert torch.equal(after[known], before[known])
    assert not torch.allclose(after[new], before[new])  # the new level's amount learned
    # every level keeps its given profile: amount x profile, each row proportional to the given one
    given = torch.as_tensor(profile[query.encoding.categories["batch"]].to_numpy().T, dtype=after.dtype)
    ratio = after / given
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)
    query.save(str(tmp_path / "query"))
    with pytest.warns(UserWarning, match="optimiser moments"):  # saved for the new rows only, loaded as whole tables
        loaded = ps.RegularizedVI.load(str(tmp_path / "query"), query_cells(data))
    assert torch.allclose(loaded.module.guide.ambient.median(), after)
    loaded.train(max_epochs=1, **FAST)  # an ordinary model now: it trains on, with fresh Adam moments
    assert np.isfinite(loaded.history["train_loss"]).all()


def test_a_prior_with_a_row_per_reference_category_is_named_for_new_query_categories(data):
    # it was refused with the prior's shape against the query model's site, a model the user never built
    adata = data[data.obs["batch"] != "batch_2"].copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    per_batch = ps.RegularizedPriors(dispersion_rate=dist.Gamma(torch.tensor([[9.0], [4.0]]), torch.tensor([[3.0], [1.0]])))
    model = ps.RegularizedVI(adata, n_hidden=8, n_latent=2, priors=per_batch)
    model.train(max_epochs=1, **FAST)
    with pytest.raises(ValueError, match=r"prior RegularizedPriors.dispersion_rate has one row per category \(2 rows\), "
                                         r"and the query adds categories \['batch_2'\] of 'batch'"):
        ps.RegularizedVI.load_query_data(query_cells(data), model)
    ps.RegularizedVI.load_query_data(data[data.obs["batch"] == "batch_1"].copy(), model)  # known categories: fine


def test_a_subclassed_reference_is_mapped_with_its_own_class(data):
    # RegularizedVI.load_query_data(query, subclass_model) built the plain model: the edited site took its default
    class FixedScalingModel(ps.RegularizedVIModel):
        def sample_feature_scaling(self, genes):
            return torch.ones(self.dims.n_scaling, self.dims.n_genes) * 1.5

    class FixedScalingVI(ps.RegularizedVI):
        model_class = FixedScalingModel

    adata = data[data.obs["batch"] != "batch_2"].copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pyro: the guide's feature scaling is not in the model
        reference = FixedScalingVI(adata, n_hidden=8, n_latent=2)
        reference.train(max_epochs=1, **FAST)
        with pytest.raises(ValueError, match="reference is a FixedScalingVI, whose Pyro model and guide are "
                                             "FixedScalingModel / RegularizedVIGuide"):
            ps.RegularizedVI.load_query_data(query_cells(data), reference)
        query = FixedScalingVI.load_query_data(query_cells(data), reference)
    assert type(query.module.model) is FixedScalingModel
    # the getters report the site as the model uses it, not the guide's untouched value (1.0): a likelihood mean 1.5
    # times too small, and get_feature_scaling at 1
    np.testing.assert_allclose(reference.get_feature_scaling().to_numpy(), 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean = reference.get_likelihood_parameters(indices=np.arange(20))["mean"]
        cell, background = (part.detach().numpy() for part in _decomposed(reference, np.arange(20)))
    np.testing.assert_allclose(mean, cell + background, rtol=1e-5)


def _decomposed(model, cells):
    """rho and s of some cells at the posterior mean of z, times the model's own fixed feature scaling (1.5)."""
    batch, n_obs = next(model._batches(indices=cells))
    z = torch.as_tensor(model.get_latent_representation(indices=cells))
    values = model.module.model.global_values(model.module.guide.global_medians())
    library = model.module.guide.library_loc(batch).exp()
    with torch.no_grad():
        return model.module.model.decompose_mean(z, batch, values, library=library)


def test_a_query_checkpoint_resumes_only_onto_a_query_of_the_same_reference_and_freezing(data, reference, tmp_path):
    # mapped again onto a retrained reference, the query resumed its checkpoint: the decoder and encoders were the old
    # reference's (from the checkpoint) and the tables' reference rows the new one's, a latent of neither
    checkpoint = str(tmp_path / "ck")
    fit = dict(max_epochs=1, batch_size=128, device="cpu", progress_bar=False, early_stopping=False)
    first = ps.RegularizedVI.load_query_data(query_cells(data), reference)
    first.train(checkpoint_dir=checkpoint, **fit)
    retrained = ps.RegularizedVI.load(_saved(reference, tmp_path), reference.adata.copy(), device="cpu")
    with torch.no_grad():
        next(retrained.module.model.decoder.parameters()).add_(0.01)  # as another training would change it
    for other in (ps.RegularizedVI.load_query_data(query_cells(data), retrained),
                  ps.RegularizedVI.load_query_data(query_cells(data), reference, freeze_encoder=False)):
        with pytest.raises(ValueError, match="query reference differ"):
            other.train(checkpoint_dir=checkpoint, **fit)
    # the same reference and freezing resumes, also from a saved and loaded query model
    again = ps.RegularizedVI.load_query_data(query_cells(data), reference)
    again.train(checkpoint_dir=checkpoint, **{**fit, "max_epochs": 2})
    assert len(again.history) == 2 and again.query_reference == first.query_reference
    again.save(str(tmp_path / "query"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "query"), query_cells(data), device="cpu")
    assert loaded.query_reference == first.query_reference and reference.query_reference is None


def _saved(model, tmp_path) -> str:
    path = str(tmp_path / "reference")
    model.save(path, overwrite=True)
    return path


def test_a_backed_query_with_other_genes_is_told_how_to_align_it_on_disk(data, reference, tmp_path):
    # the only advice was "Load it with adata.to_memory()", which a query larger than memory cannot follow
    import anndata
    from anndata.experimental import concat_on_disk

    genes = list(reference.var_names)
    path = str(tmp_path / "query.h5ad")
    cells = query_cells(data)[:, genes[::-1][:90]]  # 10 genes missing, the rest reversed
    # sparse counts only: concat_on_disk joins dense arrays (the simulator's truths) through dask, not installed here
    anndata.AnnData(cells.X, obs=cells.obs, var=cells.var[[]], layers={"counts": cells.layers["counts"]}).write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match=r"anndata\.experimental\.concat_on_disk") as refused:
        ps.RegularizedVI.prepare_query_anndata(backed, reference)
    assert path in str(refused.value) and "adata.to_memory()" in str(refused.value)
    # the route it gives: blocks of cells aligned in memory, joined on disk, the same as the whole query aligned
    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in range(0, backed.n_obs, 60):
            part = backed[start:start + 60].to_memory()
            ps.RegularizedVI.prepare_query_anndata(part, reference)
            parts.append(str(tmp_path / f"part_{start}.h5ad"))
            part.write_h5ad(parts[-1])
        concat_on_disk(parts, str(tmp_path / "aligned.h5ad"))
        whole = ps.RegularizedVI.prepare_query_anndata(anndata.read_h5ad(path), reference, inplace=False)
    aligned = anndata.read_h5ad(tmp_path / "aligned.h5ad", backed="r")
    assert list(aligned.var_names) == genes and list(aligned.obs_names) == list(whole.obs_names)
    np.testing.assert_array_equal(aligned.layers["counts"].toarray(), whole.layers["counts"].toarray())
    assert ps.RegularizedVI.load_query_data(aligned, reference).adata is aligned
