"""The scvi-tools API on RegularizedVI's queries: normalised expression, one-vs-rest DE, ELBO / marginal
likelihood, reconstruction error, the latent distribution, sampling and the likelihood parameters."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_scmodels as ps

from . import _scvi_api
from ._scvi_api import SMALL, simulate_small

# the shared fixtures of tests/_scvi_api.py, bound here for pytest to find
model = _scvi_api.model
untrained = _scvi_api.untrained


SCVI_DE_COLUMNS = {
    "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "lfc_mean", "lfc_median", "lfc_std", "lfc_min",
    "lfc_max", "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
    "raw_normalized_mean2", "is_de_fdr_0.05", "comparison", "group1", "group2",
}


SCVI_VANILLA_COLUMNS = [
    "proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2", "raw_mean1", "raw_mean2", "non_zeros_proportion1",
    "non_zeros_proportion2", "raw_normalized_mean1", "raw_normalized_mean2", "comparison", "group1", "group2",
]


# --- normalised expression --------------------------------------------------------------------
def test_transform_batch_decodes_as_the_given_condition(model):
    adata = model.adata
    own = model.get_normalized_expression(return_numpy=True)
    as_control = model.get_normalized_expression(transform_batch="control", return_numpy=True)
    as_stimulated = model.get_normalized_expression(transform_batch="stimulated", return_numpy=True)
    control = (adata.obs["condition"] == "control").to_numpy()
    np.testing.assert_allclose(as_control[control], own[control], rtol=1e-5)
    np.testing.assert_allclose(as_stimulated[~control], own[~control], rtol=1e-5)
    assert not np.allclose(as_control[~control], own[~control])
    both = model.get_normalized_expression(transform_batch=["control", "stimulated"], return_numpy=True)
    np.testing.assert_allclose(both, (as_control + as_stimulated) / 2, rtol=1e-5)
    # at a fixed library size, the mean of the proportions (scvi-tools averages px_scale x library_size)
    shares = [model.get_normalized_expression(transform_batch=c, library_size=1, return_numpy=True)
              for c in ("control", "stimulated")]
    np.testing.assert_allclose(model.get_normalized_expression(transform_batch=["control", "stimulated"], library_size=1,
                                                               return_numpy=True), np.mean(shares, axis=0), rtol=1e-5)
    repeated = model.get_normalized_expression(transform_batch=["control", "control", "stimulated"], return_numpy=True)
    np.testing.assert_allclose(repeated, both, rtol=1e-6)  # a category named twice counts once
    # the categories as the data give them (an Index, an array, a Series) average as a list does; they were taken
    # for one category named "Index([...])" and refused
    categories = adata.obs["condition"].astype("category").cat.categories
    for given in (categories, np.asarray(categories), pd.Series(categories)):
        np.testing.assert_allclose(model.get_normalized_expression(transform_batch=given, return_numpy=True), both,
                                   rtol=1e-6)
    with pytest.raises(ValueError, match="not a category of 'condition'"):
        model.get_normalized_expression(transform_batch="no_such_condition")


@pytest.mark.filterwarnings("ignore:The model has not been trained")
def test_transform_batch_with_two_conditioning_keys_takes_dicts_and_refuses_mixed_lists():
    adata = simulate_small()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", nn_conditioning_covariate_keys=["batch", "condition"])
    two = ps.RegularizedVI(adata, **SMALL)
    get = dict(indices=np.arange(20), return_numpy=True)
    as_batch = two.get_normalized_expression(transform_batch="batch_1", **get)  # one key's category: unambiguous
    joint = two.get_normalized_expression(transform_batch={"batch": "batch_1", "condition": "stimulated"}, **get)
    assert not np.allclose(as_batch, joint)
    averaged = two.get_normalized_expression(
        transform_batch=[{"batch": "batch_0"}, {"batch": "batch_1"}], **get)
    np.testing.assert_allclose(
        averaged, (two.get_normalized_expression(transform_batch="batch_0", **get) + as_batch) / 2, rtol=1e-5)
    # a batch and a condition in one list would average two half-switched decodings: refused, with the fix
    for mixed in (["batch_1", "stimulated"], ["batch_1", {"condition": "stimulated"}],
                  [{"batch": "batch_0"}, {"condition": "stimulated"}]):
        with pytest.raises(ValueError, match="switches different decoder-conditioning keys.*pass a dict"):
            two.get_normalized_expression(transform_batch=mixed, **get)


@pytest.mark.filterwarnings("ignore:The model has not been trained")
def test_transform_batch_without_a_conditioned_decoder_warns_and_changes_nothing(untrained):
    with pytest.warns(UserWarning, match="changes nothing"):
        shifted = untrained.get_normalized_expression(transform_batch="batch_1", return_numpy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained
        np.testing.assert_array_equal(shifted, untrained.get_normalized_expression(return_numpy=True))
    with pytest.raises(ValueError, match="not conditioned on any covariate"):
        untrained.get_normalized_expression(transform_batch="batch_9")


def test_gene_list_library_size_and_samples(model):
    genes = list(model.adata.var_names[[3, 0, 7]])
    full = model.get_normalized_expression(library_size=1)
    # the model's order, each gene once, as scvi-tools' mask gives them: an unlabelled array's columns were the
    # caller's order (3, 0, 7), which scvi-tools code labels in the model's order (0, 3, 7), swapping two genes
    subset = model.get_normalized_expression(library_size=1, gene_list=genes + genes[:1])
    in_order = list(model.adata.var_names[[0, 3, 7]])
    assert list(subset.columns) == in_order
    pd.testing.assert_frame_equal(subset, full[in_order])
    np.testing.assert_array_equal(model.get_normalized_expression(library_size=1, gene_list=genes, return_numpy=True),
                                  full[in_order].to_numpy())
    np.testing.assert_allclose(full.sum(1), 1.0, rtol=1e-5)  # scvi-tools' proportions
    draws = model.get_normalized_expression(n_samples=3, return_mean=False, seed=2)
    assert draws.shape == (3, 300, 50)
    mean = model.get_normalized_expression(n_samples=3, seed=2, return_numpy=True)
    np.testing.assert_allclose(draws.mean(0), mean, rtol=1e-5)
    with pytest.raises(KeyError, match="gene_list names 1 feature"):
        model.get_normalized_expression(gene_list=["gene_0", "no_such_gene"])
    np.testing.assert_allclose(model.get_normalized_expression(library_size=np.float32(1)), full, rtol=1e-6)  # numpy's
    for bad in (float("inf"), 0, "proportions", np.ones(2)):
        with pytest.raises(ValueError, match="library_size"):
            model.get_normalized_expression(library_size=bad)


# --- differential expression ----------------------------------------------------------------
def test_one_vs_rest_over_all_groups_finds_each_types_markers(fitted):
    """The session's converged model (conftest): every type against the rest, scvi-tools' columns."""
    adata = fitted.adata
    table = fitted.differential_expression(groupby="cell_type", num_samples=5, n_cells=100)
    assert SCVI_DE_COLUMNS <= set(table.columns)
    types = sorted(adata.obs["cell_type"].astype(str).unique())
    assert sorted(table["comparison"].unique()) == [f"{t} vs Rest" for t in types]
    assert (table["group2"] == "Rest").all() and len(table) == adata.n_vars * len(types)
    for cell_type in types:
        rows = table[table["group1"] == cell_type]
        markers = adata.var_names[adata.var["marker_of"] == cell_type]
        # a type's own markers are up against the rest, far more than the other genes
        assert rows.loc[markers, "lfc_mean"].gt(0.5).mean() >= 0.8, cell_type
        assert rows.loc[markers, "lfc_mean"].mean() > rows.drop(markers)["lfc_mean"].mean() + 1.0, cell_type
        assert rows.loc[markers, "is_de_fdr_0.05"].mean() >= 0.8, cell_type


def test_vanilla_mode_has_scvi_tools_columns_and_finds_the_markers(fitted):
    """scvi-tools' default mode: P(group 1 expresses more), in its columns and order."""
    adata = fitted.adata
    table = fitted.differential_expression(groupby="cell_type", group1="type_0", mode="vanilla", num_samples=5,
                                           n_cells=100)
    assert list(table.columns) == SCVI_VANILLA_COLUMNS
    assert table["bayes_factor"].is_monotonic_decreasing
    np.testing.assert_allclose(table["proba_m1"] + table["proba_m2"], 1.0)
    markers = adata.var_names[adata.var["marker_of"] == "type_0"]
    assert table.loc[markers, "proba_m1"].gt(0.9).mean() >= 0.8
    # the same direction as the change mode's fold change, on the genes either mode is sure of
    change = fitted.differential_expression(groupby="cell_type", group1="type_0", num_samples=5, n_cells=100)
    sure = table.index[(table["proba_m1"] > 0.95) | (table["proba_m1"] < 0.05)]
    assert len(sure) > 10
    np.testing.assert_array_equal(table.loc[sure, "proba_m1"] > 0.5, change.loc[sure, "lfc_mean"] > 0)


def test_observed_count_columns_are_the_group_means(model):
    adata = model.adata
    table = model.differential_expression(groupby="cell_type", group1="type_0", num_samples=2, n_cells=20)
    counts = adata.layers["counts"]
    members = (adata.obs["cell_type"] == "type_0").to_numpy()
    rows = table.loc[adata.var_names]
    np.testing.assert_allclose(rows["raw_mean1"], np.asarray(counts[members].mean(0)).ravel(), rtol=1e-6)
    np.testing.assert_allclose(rows["non_zeros_proportion2"], np.asarray((counts[~members] > 0).mean(0)).ravel(), rtol=1e-6)
    per_10k = counts[~members].multiply(1e4 / counts[~members].sum(1)).tocsr()
    np.testing.assert_allclose(rows["raw_normalized_mean2"], np.asarray(per_10k.mean(0)).ravel(), rtol=1e-5)


def test_idx1_idx2_masks_and_positions_agree(model):
    cell_type = model.adata.obs["cell_type"].astype(str).to_numpy()
    first, second = cell_type == "type_0", cell_type == "type_1"
    by_mask = model.differential_expression(idx1=first, idx2=second, num_samples=5, n_cells=50)
    by_position = model.differential_expression(idx1=np.flatnonzero(first), idx2=np.flatnonzero(second), num_samples=5,
                                                n_cells=50)
    pd.testing.assert_frame_equal(by_mask, by_position)
    assert set(by_mask["comparison"]) == {"idx1 vs idx2"}
    by_group = model.differential_expression(groupby="cell_type", group1="type_0", group2="type_1", num_samples=5, n_cells=50)
    np.testing.assert_allclose(by_group.loc[by_mask.index, "raw_mean2"], by_mask["raw_mean2"])


def test_batch_correction_pairs_within_each_condition(model):
    table = model.differential_expression(groupby="cell_type", group1="type_0", batch_correction=True, num_samples=5,
                                          n_cells=50)
    assert np.isfinite(table["lfc_mean"]).all() and set(table["comparison"]) == {"type_0 vs Rest"}
    with pytest.raises(ValueError, match="not a decoder-conditioning key"):
        model.differential_expression(groupby="cell_type", group1="type_0", batch_correction="batch")


@pytest.mark.parametrize("arguments, message", [
    (dict(), "Pass groupby"),
    (dict(groupby="cell_type", idx1=np.arange(10)), "not both"),
    (dict(groupby="cell_type", mode="vanila"), "mode must be"),
    (dict(groupby="true_library"), "holds real numbers"),
    (dict(groupby=["cell_type", "batch"]), "groupby names one column of adata.obs"),  # was "unhashable type: 'list'"
    (dict(groupby="cell_type", group1=[]), "group1 is an empty list"),
    (dict(groupby="cell_type", group1=0), "Group 0 not found"),  # a number is one group, not a list (TypeError)
    (dict(idx1=np.arange(20), idx2=np.arange(20)[::-1]), "select the same cells"),
    (dict(groupby="cell_type", delta="0.5"), "delta must be a non-negative number"),
    (dict(groupby="cell_type", pseudocount=float("inf")), "pseudocount"),
    (dict(groupby="cell_type", fdr_target=1.0), "fdr_target must be a number in \\(0, 1\\)"),
    (dict(idx1=np.zeros(300, dtype=bool)), "idx1 selects no cells"),
    (dict(idx1=np.ones(10, dtype=bool)), "one per cell"),
])
def test_differential_expression_bad_requests(model, arguments, message):
    with pytest.raises(ValueError, match=message):
        model.differential_expression(num_samples=2, n_cells=10, **arguments)


def test_differential_expression_given_the_data_first_says_to_pass_adata(model):
    # scvi-tools' first argument is adata: here it failed deep inside with "unhashable type: 'AnnData'"
    with pytest.raises(TypeError, match="first argument is groupby.*got a AnnData.*adata=adata"):
        model.differential_expression(model.adata, "cell_type")


# --- ELBO, reconstruction, marginal likelihood, latent distribution ---------------------------
def test_elbo_marginal_ll_and_reconstruction_error(model):
    cells = np.arange(150)
    elbo = model.get_elbo(indices=cells, return_mean=False, seed=3)
    assert elbo.shape == (150,) and np.isfinite(elbo).all()
    assert model.get_elbo(indices=cells, seed=3) == pytest.approx(elbo.mean())
    # one importance sample is the ELBO itself; many tighten the bound
    np.testing.assert_allclose(model.get_marginal_ll(indices=cells, n_mc_samples=1, return_mean=False, seed=3), elbo,
                               rtol=1e-6)
    marginal = model.get_marginal_ll(indices=cells, n_mc_samples=40, return_mean=False, seed=3)
    assert marginal.shape == (150,) and np.isfinite(marginal).all()
    assert marginal.mean() > model.get_elbo(indices=cells, seed=4) and (marginal > elbo).mean() > 0.7
    reconstruction = model.get_reconstruction_error(indices=cells, seed=3)
    assert set(reconstruction) == {"reconstruction_loss"}
    assert 0 < reconstruction["reconstruction_loss"] < -elbo.mean()
    # the same quantity training reports on the validation cells, up to the global prior terms
    validation = model.validation_indices
    assert -model.get_elbo(indices=validation) == pytest.approx(model.history["validation_loss"].dropna().iloc[-1], rel=0.05)


def test_latent_distribution(model):
    mean, variance = model.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(mean, model.get_latent_representation())
    assert variance.shape == (300, 4) and (variance > 0).all()
    draws = model.posterior_z(n_samples=400, seed=0)
    np.testing.assert_allclose(draws.var(0).mean(), variance.mean(), rtol=0.15)
    # scvi-tools' positional order (adata, indices, give_mean, mc_samples, batch_size): the mean is exact for a Normal z
    np.testing.assert_allclose(model.get_latent_representation(None, np.arange(7), True, 100, 3), mean[:7], rtol=1e-5)
    with pytest.raises(ValueError, match="mc_samples"):
        model.get_latent_representation(mc_samples=0)
    with pytest.raises(TypeError, match="give_mean"):
        model.get_latent_representation(give_mean="no")  # a non-empty string would read as True


def test_sampling_queries_draw_afresh_in_each_call_as_scvi_tools_does(model):
    # a user averaging give_mean=False calls (scvi-tools' Monte Carlo habit) got one draw 20 times: variance 0
    draws = np.stack([model.get_latent_representation(give_mean=False, indices=np.arange(40)) for _ in range(20)])
    _, variance = model.get_latent_representation(return_dist=True, indices=np.arange(40))
    np.testing.assert_allclose(draws.var(0).mean(), variance.mean(), rtol=0.5)
    twice = [model.get_normalized_expression(n_samples=2, return_mean=False, indices=np.arange(9)) for _ in range(2)]
    assert not np.allclose(*twice)
    assert not np.allclose(*[model.get_likelihood_parameters(indices=np.arange(9), n_samples=2)["mean"] for _ in range(2)])
    # repeatable: by torch's seed, or with seed= for each cell's own draw
    repeats = []
    for _ in range(2):
        torch.manual_seed(5)
        repeats.append(model.get_latent_representation(give_mean=False, indices=np.arange(9)))
    np.testing.assert_array_equal(*repeats)
    np.testing.assert_array_equal(*[model.get_latent_representation(give_mean=False, seed=3) for _ in range(2)])
    state = torch.get_rng_state()
    model.get_latent_representation()  # the mean draws nothing: torch's stream is left as it was
    model.get_normalized_expression(indices=np.arange(9))
    assert torch.equal(state, torch.get_rng_state())


def test_posterior_predictive_sample_in_scvi_layout(model):
    genes = list(model.adata.var_names[:10])
    draws = model.posterior_predictive_sample(n_samples=20, gene_list=genes)
    assert draws.shape == (300, 10, 20) and (draws >= 0).all() and np.array_equal(draws, np.round(draws))
    # the draws follow the data: gene means (over cells and draws) against the observed gene means
    observed = np.asarray(model.adata[:, genes].layers["counts"].mean(0)).ravel()
    assert np.corrcoef(np.log1p(draws.mean((0, 2))), np.log1p(observed))[0, 1] > 0.9
    one = model.posterior_predictive_sample(indices=np.arange(5))
    assert one.shape == (5, 50)
    # columns in the model's gene order whatever gene_list's order (scvi-tools selects by a mask)
    means = np.asarray(model.adata.layers["counts"].mean(0)).ravel()
    first, second = sorted([int(np.argmin(means)), int(np.argmax(means))])
    asked = [model.adata.var_names[second], model.adata.var_names[first]]  # against the model's order
    drawn = model.posterior_predictive_sample(n_samples=30, gene_list=asked).mean((0, 2))
    assert (drawn[0] < drawn[1]) == (means[first] < means[second]), (first, second, drawn)
    with pytest.raises(KeyError, match="not_a_gene"):
        model.posterior_predictive_sample(gene_list=["not_a_gene"])
    with pytest.raises(ValueError, match="n_samples"):
        model.posterior_predictive_sample(n_samples=0)


def test_likelihood_parameters_are_the_models_mean_and_dispersion(model):
    params = model.get_likelihood_parameters()
    mean, theta = params["mean"], params["dispersions"]
    assert mean.shape == theta.shape == (300, 50) and (mean > 0).all()
    # theta is each cell's dispersion group's (batch_key gives one per batch)
    table = model.get_dispersion()
    batch = model.adata.obs["batch"].astype(str).to_numpy()
    np.testing.assert_allclose(theta, table[batch].to_numpy().T, rtol=1e-5)
    # the mean follows the counts: per-cell totals and per-gene means
    counts = np.asarray(model.adata.layers["counts"].todense())
    assert np.corrcoef(np.log(mean.sum(1)), np.log(counts.sum(1)))[0, 1] > 0.9
    # the whole mean, background included: the expected totals are the observed ones (without the background, about
    # a sixth lower)
    assert 0.93 < np.median(mean.sum(1) / counts.sum(1)) < 1.07
    assert np.corrcoef(np.log(mean.mean(0)), np.log1p(counts.mean(0)))[0, 1] > 0.9
    draws = model.get_likelihood_parameters(n_samples=4, seed=1)
    assert draws["mean"].shape == (4, 300, 50)
    averaged = model.get_likelihood_parameters(n_samples=4, give_mean=True, seed=1)["mean"]
    np.testing.assert_allclose(averaged, draws["mean"].mean(0), rtol=1e-5)
