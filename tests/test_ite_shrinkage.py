"""Empirical-Bayes adaptive shrinkage (pyro_scmodels.shrinkage) and NDreamer's ``estimate_ite(shrink="clusters")``."""

import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import pyro_scmodels as ps
from pyro_scmodels import metrics as M
from pyro_scmodels.matching import match_groups
from pyro_scmodels.ndreamer import CounterfactualDesign
from pyro_scmodels.ndreamer.effects import effects_of_cells
from pyro_scmodels.ndreamer import _constants as K
from pyro_scmodels.ndreamer.ite_shrinkage import (CLUSTER_KEY, arm_weights, cluster_effects, matching_space_clusters,
                                                  shrinkage_offsets)
from pyro_scmodels.shrinkage import fit_normal_mixture, scale_grid, shrink

from ._ndreamer_tiny import tiny_nd


@pytest.fixture(scope="module")
def sparse_effects():
    """900 null effects and 100 real ones, each measured with a known standard error."""
    rng = np.random.default_rng(0)
    truth = np.r_[np.zeros(900), rng.normal(0, 1.5, 100)]
    se = rng.uniform(0.1, 0.4, truth.size)
    return truth, truth + rng.normal(0, 1, truth.size) * se, se


def test_shrinkage_recovers_a_sparse_effect_vector_better_than_the_raw_estimates(sparse_effects):
    truth, noisy, se = sparse_effects
    post = shrink(noisy, se, centre=0.0)
    assert np.mean((post.mean - truth) ** 2) < 0.5 * np.mean((noisy - truth) ** 2)
    null = truth == 0
    # null effects are pulled to ~0, far below their noise
    assert np.median(np.abs(post.mean[null])) < 0.2 * np.median(np.abs(noisy[null]))
    # a large effect, far above its noise, is kept
    big = np.r_[noisy, 5.0], np.r_[se, 0.2]
    assert shrink(*big, centre=0.0).mean[-1] == pytest.approx(5.0, abs=0.1)
    # 90 % posterior intervals hold the truth about as often as they say
    inside = np.abs(post.mean - truth) <= 1.645 * post.sd
    assert 0.85 <= inside.mean() <= 0.99


def test_shrinkage_centres_on_the_median_and_keeps_exact_estimates(sparse_effects):
    truth, noisy, se = sparse_effects
    shift = 0.7  # a shift every feature carries is no noise: shrinkage toward the median keeps it
    post = shrink(noisy + shift, se)
    assert np.median(post.mean[truth == 0]) == pytest.approx(shift, abs=0.05)
    se = se.copy()
    se[:3] = 0.0  # known exactly: returned as they are
    post = shrink(noisy, se, centre=0.0)
    np.testing.assert_array_equal(post.mean[:3], noisy[:3])
    np.testing.assert_array_equal(post.sd[:3], 0.0)
    prior = fit_normal_mixture(noisy, se)
    assert prior.weights.sum() == pytest.approx(1.0) and prior.scales[0] == 0.0
    # 90 % of the effects are null: the point mass and the scales far below the noise carry about that much
    assert 0.8 < prior.weights[prior.scales < 0.1].sum() < 0.97


@pytest.mark.parametrize("call, message", [
    (lambda: shrink(np.zeros(5), np.ones(4)), "one per estimate"),
    (lambda: shrink(np.r_[np.nan, 1.0], np.ones(2)), "non-finite"),
    (lambda: shrink(np.ones(3), np.r_[1.0, -1.0, 1.0]), "finite and >= 0"),
    (lambda: shrink(np.ones((2, 2)), np.ones((2, 2))), "1-D"),
    (lambda: shrink(np.ones(3), np.zeros(3)), "Every standard error is 0"),
    (lambda: shrink(np.ones(3), np.ones(3), centre="mean"), "'median'"),
    (lambda: fit_normal_mixture(np.ones(3), np.ones(3), scales=[-1.0, 1.0]), "scales must be"),
    (lambda: fit_normal_mixture(np.ones(3), np.ones(3), max_iter=0), "max_iter"),
    (lambda: scale_grid(np.ones(3), np.ones(3), step=1.0), "step must be > 1"),
])
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.fixture(scope="module")
def modifier_sim():
    return ps.datasets.simulate(n_cells=800, n_genes=150, effect_modifier=1.0, seed=0)


@pytest.mark.parametrize("factual", ["observed", "matched"])
def test_cluster_effect_is_the_mean_ite_of_its_cells(modifier_sim, factual):
    """The arms' weights give exactly each cluster's mean ITE, with a positive standard error."""
    adata = modifier_sim
    nd = tiny_nd(adata)
    design = CounterfactualDesign(adata.obs["condition"].to_numpy(), "control", adata.obs["batch"].to_numpy())
    matches = match_groups(adata.obsm["true_latent"], design.groups, k=5, device="cpu")
    ite = effects_of_cells(nd.expression, matches, design, factual=factual)["ite_stimulated"]
    labels = adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    arms = [arm_weights(matches, design, labels, c, design.common_batches("stimulated"), factual)
            for c in ("stimulated", "control")]
    effect, se = cluster_effects(nd.expression, *arms)
    for cluster in range(labels.max() + 1):
        np.testing.assert_allclose(effect[cluster], ite[labels == cluster].mean(0), atol=1e-5)
    assert (se > 0).mean() > 0.9 and np.isfinite(se).all()


def test_arm_weights_built_a_block_of_cells_at_a_time_equal_those_built_at_once(modifier_sim, monkeypatch):
    """Blocks of 37 cells (the package uses 100,000, so that 10^6 cells need no all-cells triplets) sum the repeated
    (cluster, matched cell) pairs across blocks to the same weights."""
    from pyro_scmodels.ndreamer import ite_shrinkage

    adata = modifier_sim
    design = CounterfactualDesign(adata.obs["condition"].to_numpy(), "control", adata.obs["batch"].to_numpy())
    matches = match_groups(adata.obsm["true_latent"], design.groups, k=5, device="cpu")
    labels = adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    batches = design.common_batches("stimulated")
    whole = arm_weights(matches, design, labels, "stimulated", batches, "observed")
    monkeypatch.setattr(ite_shrinkage, "ARM_BLOCK_CELLS", 37)
    blocks = arm_weights(matches, design, labels, "stimulated", batches, "observed")
    assert adata.n_obs > 37 * 10 and whole.nnz > 0
    np.testing.assert_allclose(blocks.toarray(), whole.toarray(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.asarray(blocks.sum(axis=1)).ravel(), 1.0)


def test_estimate_ite_shrink_lowers_the_false_effect(modifier_sim, tmp_path):
    adata = modifier_sim
    nd = tiny_nd(adata)
    nd._set_embedding(adata.obsm["true_latent"])  # the true cell state: no training needed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = {n: np.array(v) for n, v in nd.estimate_ite(interval=0.9, shrink=None).layers.items()}
        shrunk = nd.estimate_ite(interval=0.9)  # shrink="clusters", the default
    assert shrunk.uns["ite_matching"]["shrink"] == "clusters"
    before = M.effect_recovery(adata, raw["ite_stimulated"], genes=nd.genes)
    after = M.effect_recovery(adata, shrunk.layers["ite_stimulated"], genes=nd.genes)
    assert after["false_effect_ratio"] < 0.6 * before["false_effect_ratio"]
    assert after["cate_r"] > before["cate_r"]
    # the bounds are centred on the shrunk estimate, their variance the matched one plus the cluster mean's posterior
    moved = shrunk.layers["ite_stimulated"] - raw["ite_stimulated"]
    assert np.abs(moved).max() > 0.01
    low, ite, high = (np.array(shrunk.layers[f"ite_stimulated{s}"]) for s in ("_q05", "", "_q95"))
    np.testing.assert_allclose((low + high) / 2, ite, atol=1e-5)
    labels, fit = nd.effects.shrinkage(K.NEAREST_NEIGHBOR, K.BANDWIDTH, "stimulated")
    t = stats.t.ppf(0.95, K.NEAREST_NEIGHBOR - 1)
    raw_half = (raw["ite_stimulated_q95"] - raw["ite_stimulated_q05"]) / 2
    np.testing.assert_allclose((high - low) / 2, np.sqrt(raw_half ** 2 + (t * fit.posterior_sd[labels]) ** 2), rtol=1e-4)
    assert ((high - low) / 2 - raw_half).mean() > 1e-3
    # the cells' clusters are recorded with the layers
    np.testing.assert_array_equal(shrunk.obs[CLUSTER_KEY].to_numpy().astype(int), labels)
    # cells and genes asked for: the same numbers as the whole layer
    cells, genes = np.arange(0, adata.n_obs, 7), list(nd.genes[[3, 10, 40]])
    part = nd.estimate_ite(indices=cells, gene_list=genes, interval=0.9, shrink="clusters")
    for layer in ("ite_stimulated", "ite_stimulated_q05", "ite_stimulated_q95"):
        np.testing.assert_allclose(part.layers[layer], shrunk.layers[layer][cells][:, [3, 10, 40]], atol=1e-5)
    np.testing.assert_array_equal(part.obs[CLUSTER_KEY].to_numpy().astype(int), labels[cells])
    # the CATE reads the shrunk ITE when asked, the unshrunk one otherwise
    full = np.array(shrunk.layers["ite_stimulated"])
    for which, layer in (("clusters", full), (None, raw["ite_stimulated"])):
        table = nd.estimate_cate("cell_type", shrink=which)
        group = table["group"].iloc[0]
        cells_of = (adata.obs["cell_type"].astype(str) == group).to_numpy()
        np.testing.assert_allclose(table[table["group"] == group]["mean_ite"].to_numpy(), layer[cells_of].mean(0),
                                   atol=1e-5)
    with pytest.raises(ValueError, match="shrink must be"):
        nd.estimate_ite(shrink="cluster")
    # written to disk block by block: the same shrunk layers and clusters
    path = nd.write_effects(str(tmp_path / "effects.h5ad"), interval=0.9, chunk_cells=300, shrink="clusters")
    written = anndata.read_h5ad(path)
    for layer in ("ite_stimulated", "ite_stimulated_q05", "ite_stimulated_q95"):
        np.testing.assert_allclose(written.layers[layer], shrunk.layers[layer], atol=1e-5)
    np.testing.assert_array_equal(written.obs[CLUSTER_KEY].to_numpy().astype(int), labels)
    with pytest.raises(ValueError, match="shrink must be"):
        nd.write_effects(str(tmp_path / "bad.h5ad"), shrink="genes")
    # unshrunk layers carry no clusters
    assert CLUSTER_KEY not in nd.estimate_ite(shrink=None).obs
    assert CLUSTER_KEY not in anndata.read_h5ad(nd.write_effects(str(tmp_path / "raw.h5ad"), shrink=None)).obs
    # the default shrinks (every method: estimate_ite, estimate_cate and write_effects)
    np.testing.assert_allclose(nd.estimate_ite(interval=0.9).layers["ite_stimulated"], full, atol=1e-6)
    default = anndata.read_h5ad(nd.write_effects(str(tmp_path / "default.h5ad"), interval=0.9))
    np.testing.assert_allclose(default.layers["ite_stimulated"], full, atol=1e-5)
    np.testing.assert_array_equal(default.obs[CLUSTER_KEY].to_numpy().astype(int), labels)
    pd.testing.assert_frame_equal(nd.estimate_cate("cell_type"), nd.estimate_cate("cell_type", shrink="clusters"))


def test_a_new_representation_drops_the_old_clusters(modifier_sim):
    nd = tiny_nd(modifier_sim)
    nd._set_embedding(modifier_sim.obsm["true_latent"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd.estimate_ite(shrink="clusters")
    assert CLUSTER_KEY in nd.results.obs
    nd._invalidate()  # what retraining or a new embedding does before the new representation is set
    assert CLUSTER_KEY not in nd.results.obs  # it stayed beside the new space, and was saved


def test_clusters_form_where_many_cells_share_one_point():
    """NDreamer's discrete codes put many cells on one point: the clusters still group them (a gaussian kernel
    left each cell alone, and nothing was shrunk)."""
    rng = np.random.default_rng(0)
    points = np.repeat(rng.normal(0, 5, (12, 8)), 30, axis=0)  # 12 distinct points, 30 cells on each
    labels = matching_space_clusters(points)
    sizes = np.bincount(labels)
    assert labels.shape == (360,) and 2 <= sizes.size <= 12 and sizes.min() >= 30
    for point in range(12):  # the cells on one point share a cluster
        assert np.unique(labels[point * 30:(point + 1) * 30]).size == 1


def test_large_data_cluster_a_sample_and_the_rest_take_their_nearest_sampled_cell(monkeypatch):
    """Above ``sample_cells`` Leiden sees only a sample (the graph of 10^6 cells cost more than the matching); every
    cell still gets a cluster, the cells on one point the same one, numbered 0, 1, ... with none empty."""
    from pyro_scmodels.ndreamer import ite_shrinkage

    seen, leiden = [], ite_shrinkage.sc.tl.leiden
    monkeypatch.setattr(ite_shrinkage.sc.tl, "leiden", lambda frame, **kw: (seen.append(frame.n_obs), leiden(frame, **kw)))
    rng = np.random.default_rng(1)
    points = np.repeat(rng.normal(0, 5, (12, 8)), 30, axis=0)
    labels = matching_space_clusters(points, sample_cells=120)
    assert seen == [120]
    assert labels.shape == (360,) and set(np.unique(labels)) == set(range(labels.max() + 1)) and labels.max() >= 1
    for point in range(12):
        assert np.unique(labels[point * 30:(point + 1) * 30]).size == 1
    np.testing.assert_array_equal(matching_space_clusters(points, sample_cells=120), labels)  # seeded
    with pytest.raises(ValueError, match="sample_cells"):
        matching_space_clusters(points, sample_cells=2)


def test_a_cluster_too_small_to_shrink_keeps_its_ite_and_its_matched_bounds(modifier_sim):
    """A cell alone in its cluster is not shrunk: its ITE and its interval stay the matched ones (its interval was
    widened by the posterior sd of a cluster mean that moved nothing)."""
    nd = tiny_nd(modifier_sim)
    nd._set_embedding(modifier_sim.obsm["true_latent"])
    labels = modifier_sim.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    labels[5] = labels.max() + 1  # cell 5 alone in its cluster
    nd.effects._clusters = labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = {n: np.array(v) for n, v in nd.estimate_ite(interval=0.9, shrink=None).layers.items()}
        shrunk = nd.estimate_ite(interval=0.9, shrink="clusters")
    for layer in ("ite_stimulated", "ite_stimulated_q05", "ite_stimulated_q95"):
        np.testing.assert_array_equal(shrunk.layers[layer][5], raw[layer][5])
    # the other cells' clusters are shrunk, and their bounds widened
    widened = (shrunk.layers["ite_stimulated_q95"] - shrunk.layers["ite_stimulated_q05"]
               - raw["ite_stimulated_q95"] + raw["ite_stimulated_q05"])
    assert (np.delete(widened, 5, axis=0) > 1e-4).mean() > 0.5


def test_a_failing_shrunk_estimate_ite_leaves_the_earlier_result_whole(modifier_sim, monkeypatch):
    """A failure part-way through estimate_ite changes nothing stored: the earlier layers, their clusters and record
    stay together (the clusters were dropped before the new layers were computed)."""
    nd = tiny_nd(modifier_sim)
    nd._set_embedding(modifier_sim.obsm["true_latent"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd.estimate_ite(interval=0.9, shrink="clusters")
    layers = {n: np.array(v) for n, v in nd.results.layers.items()}
    clusters, record = nd.results.obs[CLUSTER_KEY].copy(), dict(nd.results.uns["ite_matching"])

    def fail(*args, **kwargs):
        raise RuntimeError("stopped part-way")

    monkeypatch.setattr(nd.effects, "shrunk", fail)
    for kwargs in (dict(interval=0.8, shrink="clusters"), dict(nearest_neighbor=3, shrink="clusters")):
        with pytest.raises(RuntimeError, match="part-way"):
            nd.estimate_ite(**kwargs)
        assert sorted(nd.results.layers) == sorted(layers)
        for name, values in layers.items():
            np.testing.assert_array_equal(nd.results.layers[name], values)
        assert CLUSTER_KEY in nd.results.obs and nd.results.obs[CLUSTER_KEY].equals(clusters)
        assert dict(nd.results.uns["ite_matching"]) == record


def test_write_effects_records_how_its_layers_were_made(modifier_sim, tmp_path):
    """The file's uns says what estimate_ite's result says: the matching, the shrinkage and the interval's level."""
    nd = tiny_nd(modifier_sim)
    nd._set_embedding(modifier_sim.obsm["true_latent"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = nd.write_effects(str(tmp_path / "shrunk.h5ad"), nearest_neighbor=3, bandwidth=2.0, interval=0.8,
                                shrink="clusters")
        plain = nd.write_effects(str(tmp_path / "plain.h5ad"), nearest_neighbor=4, shrink=None)
        expected = dict(nd.estimate_ite(nearest_neighbor=3, bandwidth=2.0, interval=0.8, shrink="clusters").uns["ite_matching"])
    record = dict(anndata.read_h5ad(path).uns["ite_matching"])
    assert record == expected
    assert (record["nearest_neighbor"], record["bandwidth"], record["shrink"], record["interval"]) == (3, 2.0, "clusters", 0.8)
    record = dict(anndata.read_h5ad(plain).uns["ite_matching"])
    assert record["shrink"] == "none" and record["nearest_neighbor"] == 4 and "interval" not in record


def test_a_batch_shift_leaves_the_cluster_means_standard_error_as_it_is():
    """Each batch counts in an arm's mean with a share fixed by the design: a batch's shift of level is no sampling
    noise, and adding one changes neither the cluster's ITE nor its standard error (pooled over batches, the spread
    held the shift, 20 times the noise here)."""
    rng = np.random.default_rng(0)
    n = 240
    batch, condition = np.repeat(["b0", "b1"], n // 2), np.tile(["control", "stimulated"], n // 2)
    design = CounterfactualDesign(condition, "control", batch)
    state = rng.normal(0, 1, (n, 3)).astype(np.float32)
    matches = match_groups(state, design.groups, k=5, device="cpu")
    labels = (state[:, 0] > 0).astype(np.int64)
    expression = rng.normal(0, 1, (n, 40))
    shifted = expression + np.where(batch == "b1", 20.0, 0.0)[:, None]
    plain, moved = (shrinkage_offsets(x, matches, design, labels, "stimulated") for x in (expression, shifted))
    assert (plain.standard_error > 0).all()
    np.testing.assert_allclose(moved.standard_error, plain.standard_error, rtol=1e-4)
    np.testing.assert_allclose(moved.offset, plain.offset, atol=1e-4)
