"""The posterior queries every result is built on: the guide's z_posterior, library_loc and
global_medians, the model's decode, and the user classes' posterior_z and decode_samples."""

import numpy as np
import pyro.distributions as dist
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels.ndreamer.model_effects import model_counterfactual_ite

FIT = dict(batch_size=128, lr=1e-2, kl_warmup_epochs=3, early_stopping=False, device="cpu", progress_bar=False)


@pytest.fixture(scope="module")
def conditioned():
    """A small RegularizedVI whose decoder is conditioned on the stimulation."""
    adata = ps.datasets.simulate(n_cells=400, n_genes=60, n_markers_per_type=6, n_responding_genes=8, seed=3)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", ambient_covariate_keys=["batch"],
                                   nn_conditioning_covariate_keys=["condition"], library_size_key="batch")
    model = ps.RegularizedVI(adata, n_latent=4, n_hidden=32)
    model.train(max_epochs=8, **FIT)
    return model


@pytest.fixture(scope="module")
def multimodal():
    mdata = ps.datasets.simulate_multiome(n_cells=300, n_genes=80, n_peaks=120, seed=1)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", ambient_covariate_keys=["batch"])
    model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=32)
    model.train(max_epochs=5, **FIT)
    return model


def _first_batch(model, n=16):
    return next(model._batches(indices=np.arange(n)))[0]


def test_guide_and_model_answer_queries_without_inference(conditioned):
    batch = _first_batch(conditioned)
    guide, module = conditioned.module.guide, conditioned.module.model
    q_z = guide.z_posterior(batch)
    assert isinstance(q_z, dist.Normal) and q_z.loc.shape == (16, 4) and (q_z.scale > 0).all()
    assert guide.library_loc(batch).shape == (16,)
    medians = guide.global_medians()
    assert {"ambient", "feature_scaling", "inverse_sqrt_theta", "dispersion_rate", "library_residual_weight"} <= set(medians)
    assert (medians["ambient"] > 0).all()
    rho = module.decode(q_z.loc, batch)
    assert rho.shape == (16, 60) and (rho > 0).all()
    # an explicit one-hot replaces the cells' own decoder covariates
    flipped = 1.0 - batch["nn_onehot"]
    assert not torch.allclose(module.decode(q_z.loc, batch, nn_onehot=flipped), rho)


def test_posterior_z_mean_and_seeded_samples(conditioned):
    mean = conditioned.posterior_z()
    np.testing.assert_array_equal(mean, conditioned.get_latent_representation())
    draws = conditioned.posterior_z(n_samples=3, seed=7)
    assert draws.shape == (3, 400, 4)
    np.testing.assert_array_equal(draws, conditioned.posterior_z(n_samples=3, seed=7))
    assert not np.allclose(draws, conditioned.posterior_z(n_samples=3, seed=8))
    # the draws scatter around the mean (a posterior, not a point)
    assert np.abs(draws.mean(0) - mean).mean() < np.abs(draws - mean).mean()
    one = conditioned.get_latent_representation(give_mean=False, seed=7)
    np.testing.assert_array_equal(one, conditioned.get_latent_representation(give_mean=False, seed=7))
    np.testing.assert_allclose(one, conditioned.posterior_z(n_samples=1, seed=7)[0])
    # a cell's draws are its own: the same whichever other cells are asked for, in whatever order and minibatches
    cells = [399, 5, 17, 5, 0]
    part = conditioned.posterior_z(indices=cells, n_samples=3, seed=7, batch_size=2)
    np.testing.assert_allclose(part, draws[:, cells], rtol=1e-5, atol=1e-6)
    # and independent between cells (not one draw shared by a block)
    assert abs(np.corrcoef((draws - mean)[0, :, 0], (draws - mean)[0, :, 1])[0, 1]) < 0.2
    assert np.abs(np.corrcoef((draws - mean)[0, :200, 0], (draws - mean)[0, 200:, 0])[0, 1]) < 0.2


def test_seeded_normalized_expression_is_reproducible(conditioned):
    first = conditioned.get_normalized_expression(n_samples=4, seed=1, return_numpy=True)
    np.testing.assert_array_equal(first, conditioned.get_normalized_expression(n_samples=4, seed=1, return_numpy=True))
    at_mean = conditioned.get_normalized_expression(return_numpy=True)
    assert first.shape == at_mean.shape and not np.allclose(first, at_mean)


def test_decode_samples_switches_the_condition(conditioned):
    adata = conditioned.adata
    control = (adata.obs["condition"] == "control").to_numpy()
    # cells decoded "as control" equal their own decoding when they are controls
    (_, _, own), = list(conditioned.decode_samples(indices=np.flatnonzero(control)[:20]))
    (_, _, as_control), = list(conditioned.decode_samples(indices=np.flatnonzero(control)[:20],
                                                          nn_covariates={"condition": "control"}))
    torch.testing.assert_close(own, as_control)
    (_, _, as_stimulated), = list(conditioned.decode_samples(indices=np.flatnonzero(control)[:20],
                                                             nn_covariates={"condition": "stimulated"}))
    assert not torch.allclose(own, as_stimulated)
    with pytest.raises(ValueError, match="not a decoder-conditioning key"):
        next(conditioned.decode_samples(nn_covariates={"batch": "batch_0"}))
    with pytest.raises(ValueError, match="'typo' is not a category of 'condition'"):
        next(conditioned.decode_samples(nn_covariates={"condition": "typo"}))


def test_feature_scaling_of_switched_categories_multiplies_their_y():
    """A key that both conditions the decoder and scales genes (here with batch as a second scaling
    key): the model answers the y of any categories, and decode_samples can switch it with rho."""
    adata = ps.datasets.simulate(n_cells=200, n_genes=40, n_markers_per_type=4, n_responding_genes=6, seed=4)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", nn_conditioning_covariate_keys=["condition"],
                                   feature_scaling_covariate_keys=["batch", "condition"])
    model = ps.RegularizedVI(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=3, batch_size=100, lr=5e-2, early_stopping=False, device="cpu", progress_bar=False)
    table = model.get_feature_scaling()
    assert "condition=stimulated" in table and "batch=batch_1" in table
    y = model.feature_scaling_of({"condition": "stimulated"}).numpy()
    np.testing.assert_allclose(y, table["condition=stimulated"].to_numpy(), rtol=1e-6)
    both = model.feature_scaling_of({"batch": "batch_1", "condition": "control"}).numpy()
    np.testing.assert_allclose(both, (table["batch=batch_1"] * table["condition=control"]).to_numpy(), rtol=1e-5)
    assert not np.allclose(y, model.feature_scaling_of({"condition": "control"}).numpy(), rtol=1e-4)
    assert model.feature_scaling_of(None) is None and model.feature_scaling_of({}) is None
    with pytest.raises(ValueError, match="'typo' is not a category of 'condition'"):
        model.feature_scaling_of({"condition": "typo"})
    with pytest.raises(KeyError, match="conditon"):
        model.feature_scaling_of({"conditon": "control"})
    cells = np.arange(10)
    switch = {"condition": "stimulated"}
    (_, _, rho), = list(model.decode_samples(indices=cells, n_samples=2, seed=1, nn_covariates=switch))
    (_, _, scaled), = list(model.decode_samples(indices=cells, n_samples=2, seed=1, nn_covariates=switch,
                                                with_scaling=True))
    torch.testing.assert_close(scaled, rho * torch.as_tensor(y))


def test_feature_scaling_of_a_key_that_does_not_scale_is_none(conditioned):
    assert "batch" in conditioned.encoding.categories and "batch" not in list(conditioned.keys.feature_scaling)
    assert conditioned.feature_scaling_of({"batch": "batch_0"}) is None


def test_model_ite_decodes_one_z_under_both_conditions(conditioned):
    # the same seeded draws serve both decodings: an effect of a condition on itself is exactly 0
    both = model_counterfactual_ite(conditioned, "condition", "control", ["control", "stimulated"],
                                    num_samples=5, seed=2)
    same, effect = both["control"], both["stimulated"]
    assert np.abs(same["mean"]).max() == 0.0 and np.abs(same["q95"]).max() == 0.0
    assert np.abs(effect["mean"]).max() > 0
    # one treatment alone gives what it gives among several (the control decoded once for all)
    again = model_counterfactual_ite(conditioned, "condition", "control", "stimulated", num_samples=5, seed=2)
    np.testing.assert_array_equal(effect["mean"], again["stimulated"]["mean"])
    assert (effect["q05"] <= effect["mean"] + 1e-6).all() and (effect["mean"] <= effect["q95"] + 1e-6).all()


def test_multimodal_guide_answers_joint_and_per_modality_queries(multimodal):
    batch = _first_batch(multimodal)
    guide = multimodal.module.guide
    joint = guide.z_posterior(batch)
    assert joint.loc.shape == (16, 6)
    torch.testing.assert_close(joint.loc[:, :3], guide.z_posterior(batch, modality="rna").loc)
    assert set(guide.global_medians()) >= {"ambient_rna", "inverse_sqrt_theta_atac", "feature_scaling_atac"}
    rho = multimodal.module.model.decode(joint.loc, batch)
    assert set(rho) == {"rna", "atac"} and rho["atac"].shape == (16, 120)
    assert multimodal.get_library_size("atac").shape == (300,)
    latent = multimodal.get_normalized_expression("rna", library_size="latent", return_numpy=True)
    plain = multimodal.get_normalized_expression("rna", return_numpy=True)
    np.testing.assert_allclose(latent, plain * multimodal.get_library_size("rna")[:, None], rtol=1e-5)
    averaged = multimodal.get_normalized_expression("rna", n_samples=3, seed=0, return_numpy=True)
    assert averaged.shape == plain.shape and not np.allclose(averaged, plain)


def test_differential_expression_on_the_multimodal_model(multimodal):
    mdata = multimodal.adata
    groups = mdata.obs["cell_type"].astype(str)
    first = sorted(groups.unique())[0]
    table = multimodal.differential_expression("cell_type", first, modality="atac", num_samples=5, n_cells=60)
    assert len(table) == 120 and table.index.isin(mdata.mod["atac"].var_names).all()
    assert table["proba_de"].between(0, 1).all()
    rna = multimodal.differential_expression("cell_type", first, num_samples=5, n_cells=60)
    assert len(rna) == 80  # the first modality by default
    with pytest.raises(ValueError, match="Unknown modality"):
        multimodal.differential_expression("cell_type", first, modality="protein")


def test_posterior_predictive_on_the_multimodal_model(multimodal):
    indices = np.arange(40)
    draws = multimodal.posterior_predictive(num_samples=2, indices=indices)
    assert set(draws) == {"rna", "atac"}
    assert draws["rna"].shape == (2, 40, 80) and draws["atac"].shape == (2, 40, 120)
    assert (draws["atac"] >= 0).all() and np.all(draws["rna"] == np.round(draws["rna"]))
    only = multimodal.posterior_predictive(num_samples=1, indices=indices, modality="atac")
    assert only.shape == (1, 40, 120)
    # the draws follow the data: per-feature predictive means track the observed means
    observed = np.asarray(mdata_counts(multimodal, "rna")[:40].sum(0)).ravel()
    predicted = draws["rna"].mean(0).sum(0)
    assert np.corrcoef(np.log1p(observed), np.log1p(predicted))[0, 1] > 0.7


def mdata_counts(model, modality):
    table = model.adata.mod[modality]
    return table.layers["counts"].toarray() if hasattr(table.layers["counts"], "toarray") else table.layers["counts"]


def test_split_indices_are_public(conditioned):
    train, validation = conditioned.train_indices, conditioned.validation_indices
    assert len(train) + len(validation) == 400 and not set(train) & set(validation)


def test_multimodal_queries_default_to_the_first_modality(multimodal):
    np.testing.assert_allclose(multimodal.library_sizes(), multimodal.get_library_size("rna"))
    assert multimodal.normalized_expression(return_numpy=True).shape == (300, 80)
    (_, _, rho), = list(multimodal.decode_samples(indices=np.arange(10)))
    assert rho.shape == (10, 80)
    one = multimodal.get_latent_representation(give_mean=False, seed=3)
    np.testing.assert_array_equal(one, multimodal.get_latent_representation(give_mean=False, seed=3))
    assert one.shape == (300, 6) and not np.allclose(one, multimodal.get_latent_representation())


def test_a_subclass_names_the_pyro_modules_it_builds(multimodal):
    class EditedBlock(ps.RegularizedVIModel):
        """A modeller's block model (here unchanged) plugged in through the class attribute."""

    class EditedMultimodal(ps.RegularizedMultimodalVI):
        block_model_class = EditedBlock

    model = EditedMultimodal(multimodal.adata, n_latent=3, n_hidden=16)
    assert all(isinstance(model.module.model.block(m), EditedBlock) for m in model.modalities)
    assert isinstance(model.module.model, ps.RegularizedMultimodalVIModel)


def test_an_empty_selection_is_refused_by_name(conditioned, multimodal):
    for query in (lambda m: m.get_latent_representation(indices=[]),
                  lambda m: m.get_normalized_expression(indices=np.zeros(m.adata.n_obs, dtype=bool)),
                  lambda m: m.get_likelihood_parameters(indices=np.array([], dtype=int))):
        for model in (conditioned, multimodal):
            with pytest.raises(ValueError, match="indices selects no cells"):
                query(model)


def test_cell_noise_is_the_cells_own_across_blocks():
    from pyro_scmodels.models.cell_noise import BLOCK, CellNoise

    cells = np.arange(3 * BLOCK + 5)
    whole = CellNoise(3, 2, "cpu").of(cells, 4)
    # any selection, order and repeats, across block boundaries: the same rows
    picked = np.array([BLOCK, BLOCK - 1, 2 * BLOCK, 2 * BLOCK - 1, 0, BLOCK, 3 * BLOCK + 4])
    np.testing.assert_array_equal(CellNoise(3, 2, "cpu").of(picked, 4).numpy(), whole[:, picked].numpy())
    # independent between blocks and seeds (not one block's draws repeated)
    first, second = whole[:, :BLOCK].numpy().ravel(), whole[:, BLOCK:2 * BLOCK].numpy().ravel()
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.1
    other_seed = CellNoise(4, 2, "cpu").of(cells, 4).numpy().ravel()
    assert abs(np.corrcoef(whole.numpy().ravel(), other_seed)[0, 1]) < 0.1
    assert abs(float(whole.mean())) < 0.1 and abs(float(whole.std()) - 1.0) < 0.1


def test_queries_leave_the_modules_in_the_mode_they_found_them(conditioned):
    # "Training with your own loop" (docs/posterior_queries.md): a getter called to monitor the run put the modules in
    # evaluation mode and left them there, so every later step trained without dropout
    model = conditioned
    model.module.train()
    try:
        batch = _first_batch(model, 8)
        for query in (lambda: model.get_latent_representation(), lambda: model.get_normalized_expression(n_samples=1),
                      lambda: model.get_library_size(), lambda: model.get_elbo(), lambda: model.get_ambient_fraction(),
                      lambda: model.get_likelihood_parameters(), lambda: model.posterior_predictive_sample(seed=0),
                      lambda: model.sample_posterior(num_samples=2, seed=0)):
            query()
            assert all(module.training for module in model.module.modules())
        first, second = (model.module.guide.z_posterior(batch).loc for _ in range(2))
        assert not torch.equal(first, second)  # dropout still on in the guide's encoder
        # while a query runs the modules evaluate (no dropout): the same answer twice
        np.testing.assert_array_equal(model.get_latent_representation(), model.get_latent_representation())
        model.module.eval()
        model.get_latent_representation()
        assert not any(module.training for module in model.module.modules())
    finally:
        model.module.eval()


def test_queries_decoded_side_by_side_put_the_modes_back_whichever_ends_first(conditioned):
    # the model ITE zips one decoding per condition: the first generator to end put back the modes it found, and the
    # others, ended later, put back the evaluation mode the first had set
    model = conditioned
    model.module.train()
    try:
        passes = [model.decode_samples(indices=np.arange(20), nn_covariates={"condition": c}, seed=0)
                  for c in ("control", "stimulated")]
        for _ in zip(*passes):
            assert not any(module.training for module in model.module.modules())
        del passes
        assert all(module.training for module in model.module.modules())
    finally:
        model.module.eval()
