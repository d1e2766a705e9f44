"""Tests for the single-cell count simulator in ``pyro_scmodels.datasets``."""

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from pyro_scmodels.datasets import simulate

N_CELLS, N_GENES, N_TYPES, N_BATCHES = 1500, 300, 4, 3


@pytest.fixture(scope="module")
def adata():
    return simulate(n_cells=N_CELLS, n_genes=N_GENES, n_cell_types=N_TYPES,
                    n_batches=N_BATCHES, n_markers_per_type=15, n_responding_genes=30,
                    seed=1)


def _dense(a):
    return a.X.toarray().astype(np.float64)


def _expected_mean(a):
    """mu = l * (rho + s_b) * y_b rebuilt from the stored ground truth."""
    b = a.obs["batch"].cat.codes.to_numpy()
    rho = a.layers["true_rho"].astype(np.float64)
    return (a.obs["true_library"].to_numpy()[:, None]
            * (rho + a.varm["true_ambient"].T[b]) * a.varm["true_feature_scaling"].T[b])


def test_same_seed_identical_different_seed_differs():
    kwargs = dict(n_cells=200, n_genes=80, n_markers_per_type=5, n_responding_genes=10)
    a, b, c = simulate(seed=3, **kwargs), simulate(seed=3, **kwargs), simulate(seed=4, **kwargs)
    assert (a.X != b.X).nnz == 0
    for key in ("true_rho", "true_ite"):
        np.testing.assert_array_equal(a.layers[key], b.layers[key])
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert (a.X != c.X).nnz > 0
    assert not np.array_equal(a.var["true_theta"], c.var["true_theta"])


def _assert_same_anndata(a, b):
    """Every array, table and setting of two AnnData objects is identical."""
    assert (a.X != b.X).nnz == 0 and a.X.dtype == b.X.dtype
    assert set(a.layers) == set(b.layers)
    for key in a.layers:
        layer_a, layer_b = a.layers[key], b.layers[key]
        if sparse.issparse(layer_a):
            assert (layer_a != layer_b).nnz == 0
        else:
            np.testing.assert_array_equal(layer_a, layer_b)
    for mapping_a, mapping_b in ((a.obsm, b.obsm), (a.varm, b.varm)):
        assert set(mapping_a) == set(mapping_b)
        for key in mapping_a:
            np.testing.assert_array_equal(mapping_a[key], mapping_b[key])
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert a.uns["simulation"] == b.uns["simulation"]


@pytest.mark.parametrize("kwargs", [
    dict(n_cells=120, n_genes=60, n_markers_per_type=4, n_responding_genes=8, seed=11),
    dict(n_cells=90, n_genes=40, n_cell_types=3, n_batches=4, n_markers_per_type=3,
         n_responding_genes=5, stimulated_fraction=0.3, responding_cell_types=["type_2"],
         within_type_rank=0, seed=0),
])
def test_fixed_seed_gives_identical_anndata(kwargs):
    _assert_same_anndata(simulate(**kwargs), simulate(**kwargs))


def test_structure_and_keys(adata):
    assert adata.shape == (N_CELLS, N_GENES)
    assert list(adata.obs_names[:2]) == ["cell_0", "cell_1"]
    assert list(adata.var_names[:2]) == ["gene_0", "gene_1"]
    assert list(adata.obs["cell_type"].cat.categories) == [f"type_{k}" for k in range(N_TYPES)]
    assert list(adata.obs["batch"].cat.categories) == [f"batch_{b}" for b in range(N_BATCHES)]
    assert list(adata.obs["condition"].cat.categories) == ["control", "stimulated"]
    assert adata.obs["true_library"].dtype == np.float64
    assert {"true_theta", "is_marker", "marker_of", "responding"} <= set(adata.var.columns)
    assert adata.var["is_marker"].dtype == bool and adata.var["responding"].dtype == bool
    assert adata.varm["true_ambient"].shape == (N_GENES, N_BATCHES)
    assert adata.varm["true_feature_scaling"].shape == (N_GENES, N_BATCHES)
    assert adata.obsm["true_latent"].shape == (N_CELLS, N_TYPES + 2)
    for key in ("true_rho", "true_ite"):
        assert adata.layers[key].shape == (N_CELLS, N_GENES)
        assert adata.layers[key].dtype == np.float32
    sim = adata.uns["simulation"]
    assert sim["batches"] == [f"batch_{b}" for b in range(N_BATCHES)]
    assert sim["responding_cell_types"] == ["type_0", "type_1"]  # ceil(4 / 2) types
    assert sim["control_name"] == "control" and sim["condition_key"] == "condition"
    assert sim["batch_key"] == "batch" and sim["cell_type_key"] == "cell_type"
    assert all(v is not None for v in sim.values())


def test_counts_are_nonnegative_integer_csr(adata):
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    values = adata.X.data
    assert (values >= 0).all() and np.array_equal(values, np.round(values))
    assert (adata.X != adata.layers["counts"]).nnz == 0
    assert (np.asarray(adata.X.sum(axis=1)).ravel() > 0).all()


def test_rho_rows_sum_to_mean_library(adata):
    np.testing.assert_allclose(adata.layers["true_rho"].sum(axis=1), 2000.0, rtol=1e-4)
    latent = adata.obsm["true_latent"]
    np.testing.assert_array_equal(latent[:, :N_TYPES].argmax(axis=1),
                                  adata.obs["cell_type"].cat.codes.to_numpy())


def test_balanced_design_every_type_in_every_batch_and_condition():
    for seed in range(3):
        a = simulate(n_cells=200, n_genes=100, n_markers_per_type=5, n_responding_genes=10,
                     seed=seed)
        table = pd.crosstab([a.obs["cell_type"], a.obs["batch"]], a.obs["condition"])
        assert table.shape == (5 * 3, 2) and (table.to_numpy() > 0).all()
        assert abs((a.obs["condition"] == "stimulated").mean() - 0.5) < 0.05
    only_control = simulate(n_cells=100, n_genes=50, n_markers_per_type=2,
                            n_responding_genes=5, stimulated_fraction=0.0)
    assert (only_control.obs["condition"] == "control").all()
    assert list(only_control.obs["condition"].cat.categories) == ["control", "stimulated"]


def test_sample_mean_matches_generative_mean(adata):
    x, mu = _dense(adata), _expected_mean(adata)
    assert abs(x.sum() / mu.sum() - 1.0) < 0.01
    abundant = mu.sum(axis=0) > 2000  # genes with enough counts for a 5% check
    assert abundant.sum() > 50
    ratio = x.sum(axis=0)[abundant] / mu.sum(axis=0)[abundant]
    assert np.median(np.abs(ratio - 1.0)) < 0.05


def test_overdispersion_matches_theta(adata):
    x, mu = _dense(adata), _expected_mean(adata)
    # E[(x - mu)^2 - x] = mu^2 / theta for the negative binomial
    inv_theta = ((x - mu) ** 2 - x).sum(axis=0) / (mu**2).sum(axis=0)
    well_expressed = mu.mean(axis=0) > 2.0
    truth = 1.0 / adata.var["true_theta"].to_numpy()[well_expressed]
    estimate = inv_theta[well_expressed]
    assert np.corrcoef(np.log(truth), np.log(np.clip(estimate, 1e-4, None)))[0, 1] > 0.9
    assert 0.85 < np.median(estimate / truth) < 1.15


def test_markers_are_higher_in_their_own_type(adata):
    x = _dense(adata)
    x = x / x.sum(axis=1, keepdims=True)
    types = adata.obs["cell_type"].to_numpy()
    for name in adata.obs["cell_type"].cat.categories:
        genes = (adata.var["marker_of"] == name).to_numpy()
        assert genes.sum() == 15
        inside, outside = x[types == name][:, genes].mean(0), x[types != name][:, genes].mean(0)
        assert (inside > outside).mean() > 0.9
        assert np.median(inside / outside) > 2.0
    assert not (adata.var["is_marker"] & adata.var["responding"]).any()


def test_true_ite_pattern(adata):
    ite = adata.layers["true_ite"]
    types = adata.obs["cell_type"].to_numpy()
    responding = adata.var["responding"].to_numpy()
    reacting = np.isin(types, adata.uns["simulation"]["responding_cell_types"])
    assert responding.sum() == 30 and 0 < reacting.sum() < N_CELLS
    assert (ite[~reacting] == 0).all()
    assert (ite[:, adata.var["true_lfc"].to_numpy() == 0][~reacting] == 0).all()
    effect = ite[reacting][:, responding]
    assert (effect != 0).all()
    np.testing.assert_array_equal(np.sign(effect),
                                  np.broadcast_to(np.sign(adata.var["true_lfc"][responding]),
                                                  effect.shape))
    # non-responding genes only move through renormalisation, far less than responders
    spill = np.abs(ite[reacting][:, ~responding])
    assert np.median(spill) < 0.2 * np.median(np.abs(effect))


def test_stimulation_raises_up_regulated_genes(adata):
    x = _dense(adata)
    x = x / x.sum(axis=1, keepdims=True)
    up = (adata.var["true_lfc"] > 0).to_numpy()
    stim = (adata.obs["condition"] == "stimulated").to_numpy()
    for name in adata.obs["cell_type"].cat.categories:
        cells = (adata.obs["cell_type"] == name).to_numpy()
        ratio = x[cells & stim][:, up].sum() / x[cells & ~stim][:, up].sum()
        if name in adata.uns["simulation"]["responding_cell_types"]:
            assert ratio > 2.0
        else:
            assert 0.8 < ratio < 1.25


def test_ambient_profiles_differ_across_batches(adata):
    ambient = adata.varm["true_ambient"]
    np.testing.assert_allclose(ambient.sum(axis=0), adata.uns["simulation"]["ambient_fraction"] * adata.uns["simulation"]["mean_library"], rtol=1e-8)
    corr = np.corrcoef(ambient.T)
    assert corr[np.triu_indices(N_BATCHES, 1)].max() < 0.99
    assert (adata.varm["true_feature_scaling"] > 0).all()


def test_responding_cell_types_by_name_and_index():
    kwargs = dict(n_cells=100, n_genes=60, n_markers_per_type=3, n_responding_genes=5)
    by_name = simulate(responding_cell_types=["type_4", "type_1"], **kwargs)
    by_index = simulate(responding_cell_types=[1, 4], **kwargs)
    assert by_name.uns["simulation"]["responding_cell_types"] == ["type_1", "type_4"]
    np.testing.assert_array_equal(by_name.layers["true_ite"], by_index.layers["true_ite"])
    none = simulate(responding_cell_types=[], **kwargs)
    assert (none.layers["true_ite"] == 0).all()


def test_h5ad_round_trip(adata, tmp_path):
    path = tmp_path / "sim.h5ad"
    adata.copy().write_h5ad(path)
    back = anndata.read_h5ad(path)
    assert (back.X != adata.X).nnz == 0
    np.testing.assert_array_equal(back.layers["true_ite"], adata.layers["true_ite"])
    np.testing.assert_array_equal(back.varm["true_ambient"], adata.varm["true_ambient"])
    np.testing.assert_array_equal(back.obsm["true_latent"], adata.obsm["true_latent"])
    assert list(back.obs["condition"].cat.categories) == ["control", "stimulated"]
    np.testing.assert_array_equal(back.var["marker_of"].astype(str),
                                  adata.var["marker_of"].astype(str))
    assert list(back.uns["simulation"]["batches"]) == adata.uns["simulation"]["batches"]
    assert back.uns["simulation"]["seed"] == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_cells=0), "n_cells"),
        (dict(n_genes=2.5), "n_genes"),
        (dict(n_cell_types=0), "n_cell_types"),
        (dict(n_batches=-1), "n_batches"),
        (dict(n_genes=50, n_markers_per_type=20), "n_markers_per_type"),
        (dict(within_type_rank=-1), "within_type_rank"),
        (dict(stimulated_fraction=1.5), "stimulated_fraction"),
        (dict(n_responding_genes=1000), "n_responding_genes"),
        (dict(responding_cell_types=[7]), "responding_cell_types"),
        (dict(responding_cell_types=["B cell"]), "responding_cell_types"),
        (dict(ambient_fraction=-0.1), "ambient_fraction"),
        (dict(batch_scaling_sd=float("nan")), "batch_scaling_sd"),
        (dict(mean_library=0.0), "mean_library"),
        (dict(library_sd=-1.0), "library_sd"),
        (dict(theta_range=(5.0, 1.0)), "theta_range"),
        (dict(theta_range=(0.0, 1.0)), "theta_range"),
        (dict(theta_range=3.0), "theta_range"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        simulate(**kwargs)
