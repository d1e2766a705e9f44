"""The NDreamer pipeline (SPEC 3) on simulated truth: effects, modifier space, results, save/load, gene selection and
errors (real data and NDreamer.from_model: test_ndreamer_real_data.py)."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import pyro_scmodels as ps
from pyro_scmodels import metrics as M
from pyro_scmodels.ndreamer import NDreamer, network_preset
from pyro_scmodels.ndreamer.preprocess import log_normalise, variable_genes

# a smaller network than the SPEC defaults keeps the tests fast on two CPU cores
SMALL = dict(network_preset("small"), batch_size=256, device="cpu")


@pytest.fixture(scope="module")
def simulated_nd():
    # a within-type state scales the response: every stimulated cell has its own true effect
    adata = ps.datasets.simulate(n_cells=2000, n_genes=300, seed=0, effect_modifier=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer(adata, "condition", "control", batch_key="batch", layer="counts", **SMALL)
        nd.train(progress_bar=False)
    return adata, nd


def test_ite_matches_the_simulated_effect(simulated_nd):
    adata, nd = simulated_nd
    nd.estimate_ite(nearest_neighbor=10)
    ite = nd.results.layers["ite_stimulated"]
    truth = adata[:, nd.genes].layers["true_ite"]
    responding_genes = adata[:, nd.genes].var["responding"].to_numpy()
    assert ite.shape == (adata.n_obs, len(nd.genes)) and np.isfinite(ite).all()
    assert M.pearson(ite[:, responding_genes], truth[:, responding_genes]) >= 0.7
    quiet = ~adata.obs["cell_type"].isin(adata.uns["simulation"]["responding_cell_types"]).to_numpy()
    assert np.abs(ite[quiet][:, responding_genes].mean(0)).mean() < 0.15
    assert np.abs(ite[~quiet][:, responding_genes].mean(0)).mean() > 0.5


def test_default_matching_averages_out_the_partners_count_noise(simulated_nd):
    # the small test network keeps cell type but little within-type state, so the per-cell figures
    # sit below those of the default network (benchmarks/bench_effects.py, where the default beats
    # the oracle); here the default k must clearly beat causal matching (k = 1) on the same embedding
    adata, nd = simulated_nd
    results = nd.estimate_ite()  # the defaults
    scores = M.effect_recovery(adata, results.layers["ite_stimulated"], genes=results.var_names)
    causal = M.effect_recovery(adata, nd.estimate_ite(nearest_neighbor=1).layers["ite_stimulated"], genes=results.var_names)
    message = f"default {scores}, k=1 {causal}"
    assert scores["per_cell_r"] > causal["per_cell_r"] + 0.08, message  # one partner's count noise
    assert scores["false_effect_ratio"] < 0.9 * causal["false_effect_ratio"], message
    assert scores["cate_r"] >= max(causal["cate_r"], 0.9), message
    assert 0.65 <= scores["slope"] <= 1.1, message


def test_default_network_keeps_the_state_inside_a_cell_type():
    """Issue 10: the per-cell ITE at NDreamer's defaults beats the oracle (true type x batch control mean).

    At the SPEC's independence weight (1000) the codes lost the within-type state on this seed (two torch threads:
    per-cell r 0.449 against the oracle's 0.446, slope 0.745; benchmarks/RESULTS.md, "NDreamer keeps the cell
    state"); at the default 300, 0.630 and 0.904 with the cell's own counts, unshrunk. At today's defaults (the
    matched own term and the shrinkage, which trade slope for noise: docs/ndreamer.md) 0.689 and 0.815.
    """
    adata = ps.datasets.simulate(n_cells=1500, n_genes=500, seed=4, effect_modifier=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer(adata, "condition", "control", batch_key="batch", layer="counts", device="cpu", seed=4)
        nd.train(progress_bar=False)
    scores = M.effect_recovery(adata, nd.estimate_ite().layers["ite_stimulated"], genes=nd.genes)
    oracle = M.effect_recovery(adata, M.oracle_effect(adata))
    assert scores["per_cell_r"] >= oracle["per_cell_r"] + 0.12, (scores, oracle)
    assert 0.78 <= scores["slope"] <= 1.1, scores  # the weight of 1000 gave 0.745


def test_modifier_space_is_deterministic_and_keeps_cell_types(simulated_nd):
    adata, nd = simulated_nd
    first = nd.get_modifier_space()
    np.testing.assert_array_equal(first, nd.get_modifier_space())
    assert nd.results.obsm["X_effect_modifier_space"].shape == (adata.n_obs, 32)
    space = nd.results.obsm["X_effect_modifier_space_PCA"]
    assert M.knn_entropy(space, adata.obs["condition"]) > 0.9  # conditions mixed
    assert M.cluster_ari(space, adata.obs["cell_type"]) > 0.8  # cell states kept


def test_modifier_space_embedded_block_by_block_equals_one_pass(simulated_nd):
    # the embedding is built one minibatch of cells at a time (never a cells x genes dense array);
    # it must equal the network's embedding of every cell at once
    adata, nd = simulated_nd
    assert adata.n_obs > nd.settings["batch_size"]  # several blocks
    with torch.no_grad():
        whole = nd.network.embed(torch.as_tensor(nd.expression.toarray())).numpy()
    np.testing.assert_allclose(nd.get_modifier_space(), whole, rtol=1e-5, atol=1e-5)


def test_results_matrix_is_the_expression_the_effects_read(simulated_nd):
    # results.X is not a copy (at 10^6 cells a copy is gigabytes); docs/ndreamer.md says to copy it
    # before changing it in place
    _, nd = simulated_nd
    assert sp.issparse(nd.results.X) and nd.results.X.shape == nd.expression.shape
    assert np.shares_memory(nd.results.X.data, nd.expression.data)


def test_results_align_with_input_cells_and_every_cell_has_an_effect(simulated_nd):
    adata, nd = simulated_nd
    nd.decompose_batch_effect()
    nd.estimate_ite()
    results = nd.results
    assert list(results.obs_names) == list(adata.obs_names)
    for layer in ("denoised", "batch_effect", "ite_stimulated"):
        assert results.layers[layer].shape == (adata.n_obs, len(nd.genes))
        assert np.isfinite(results.layers[layer]).all()
    np.testing.assert_allclose(results.layers["denoised"] + results.layers["batch_effect"], results.X.toarray(), atol=1e-4)


def test_cate_table(simulated_nd):
    adata, nd = simulated_nd
    table = nd.estimate_cate("cell_type")
    assert set(table["group"]) == set(adata.obs["cell_type"].astype(str))
    assert {"mean_ite", "sign_test_p_adj", "z_p_adj"} <= set(table.columns)
    # a "/" made the saved table a nested key (uns["cate_stimulated_cell"]["type"]) that load returned elsewhere
    nd.results.obs["cell/type"] = nd.results.obs["cell_type"]
    with pytest.raises(ValueError, match=r"groupby 'cell/type' holds '/'"):
        nd.estimate_cate("cell/type")
    del nd.results.obs["cell/type"]
    # several columns, as scanpy's groupby lists take them: it failed inside pandas ("unhashable type: 'list'")
    with pytest.raises(TypeError, match=r"groupby names one column of results.obs.*got \['cell_type', 'batch'\].*join"):
        nd.estimate_cate(["cell_type", "batch"])
    # gene_list takes names: positions or a mask were reported as genes "not among" the results
    for genes, given in ((np.arange(3), "integer positions"), (np.isin(nd.genes, nd.genes[:3]), "a boolean mask")):
        with pytest.raises(ValueError, match=f"gene_list takes gene names .*got {given}"):
            nd.estimate_ite(gene_list=genes)


def test_save_and_load_round_trip(simulated_nd, tmp_path):
    adata, nd = simulated_nd
    nd.estimate_cate("cell_type")
    bounds = nd.estimate_ite(interval=0.9).layers["ite_stimulated_q95"].copy()  # cached with its level, and saved
    nd.save(str(tmp_path / "nd"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nd"]  # nothing written elsewhere
    loaded = NDreamer.load(str(tmp_path / "nd"), device="cpu")
    np.testing.assert_allclose(loaded.get_modifier_space(), nd.get_modifier_space(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.results.layers["ite_stimulated_q95"], bounds)
    assert (20, 1.0, 0.9) in loaded.effects.cached  # the cached effects came back with their level
    loaded.estimate_ite()
    nd.estimate_ite()
    np.testing.assert_allclose(loaded.results.layers["ite_stimulated"], nd.results.layers["ite_stimulated"], atol=1e-5)
    np.testing.assert_allclose(loaded.estimate_ite(interval=0.9).layers["ite_stimulated_q95"], bounds, atol=1e-5)
    # scvi-tools' habit, Model.load(dir_path, adata): told what NDreamer.load takes instead of a device error
    with pytest.raises(TypeError, match="takes no AnnData"):
        NDreamer.load(str(tmp_path / "nd"), adata)
    with pytest.raises(FileExistsError):
        nd.save(str(tmp_path / "nd"))


def test_bounds_of_an_earlier_interval_are_not_left_beside_new_effects(simulated_nd):
    _, nd = simulated_nd
    nd.estimate_ite(interval=0.9)
    nd.estimate_ite(interval=0.5)
    assert {"ite_stimulated_q25", "ite_stimulated_q75"} <= set(nd.results.layers)
    assert "ite_stimulated_q05" not in nd.results.layers
    nd.estimate_ite(nearest_neighbor=5)  # other matches: no bounds of the k = 20 ones stay
    assert not [name for name in nd.results.layers if name.startswith("ite_stimulated_q")]
    with pytest.raises(ValueError, match="nearest_neighbor=1"):
        nd.estimate_ite(nearest_neighbor=1, interval=0.9)


def test_log_normalised_input_and_fewer_genes_than_num_hvg():
    adata = ps.datasets.simulate(n_cells=400, n_genes=80, n_markers_per_type=6, n_responding_genes=8, seed=2)
    counts = adata.X.toarray()
    adata.X = sp.csr_matrix(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32))
    nd = NDreamer(adata, "condition", "control", num_hvg=2000, **SMALL)
    assert len(nd.genes) == 80
    np.testing.assert_allclose(nd.expression.toarray(), adata.X.toarray(), rtol=1e-6)
    nd.train(n_epochs=1, progress_bar=False)
    assert "ite_stimulated" in nd.estimate_ite().layers
    # normalised but not logged (sc.pp.normalize_total(target_sum=1)) was taken as log values: on 600 simulated cells
    # the ITE of the responding genes came out 0.005 in mean size against 0.58 from the counts (truth 0.64)
    adata.X = sp.csr_matrix((counts / counts.sum(1, keepdims=True)).astype(np.float32))
    with pytest.raises(ValueError, match=r"adata.X looks normalised but not log-transformed: every cell's values sum "
                                         r"to 1\. .*sc.pp.log1p"):
        NDreamer(adata, "condition", "control", **SMALL)
    # log1p of the raw counts, not normalised: each cell kept its depth, and it was used as log-normalised
    adata.X = sp.csr_matrix(np.log1p(counts).astype(np.float32))
    with pytest.raises(ValueError, match=r"adata.X looks like log1p of raw counts, not normalised.*normalize_total"):
        NDreamer(adata, "condition", "control", **SMALL)


def test_keys_given_as_a_list_or_an_index():
    adata = ps.datasets.simulate(n_cells=200, n_genes=60, n_markers_per_type=4, n_responding_genes=4, seed=3)
    # one condition column, given in a list as batch_key takes them: it failed inside dict.fromkeys ("unhashable type")
    with pytest.raises(TypeError, match=r"condition_key must be one column of adata.obs.*\['condition'\]"):
        NDreamer(adata, ["condition"], "control", **SMALL)
    # batch columns as an Index (adata.obs.columns[...]): pandas' "truth value of a Index is ambiguous"
    nd = NDreamer(adata, "condition", "control", batch_key=adata.obs.columns[adata.obs.columns == "batch"], **SMALL)
    assert nd.settings["batch_key"] == ["batch"]
    with pytest.raises(TypeError, match=r"batch_key must be None, a column of adata.obs or a list of them"):
        NDreamer(adata, "condition", "control", batch_key=3, **SMALL)


def test_errors_and_deprecated_alias():
    adata = ps.datasets.simulate(n_cells=200, n_genes=60, n_markers_per_type=4, n_responding_genes=4, seed=3)
    with pytest.raises(ValueError, match="control_name 'ctrl' is not a condition"):
        NDreamer(adata, "condition", "ctrl", **SMALL)
    with pytest.raises(KeyError, match="condition_key 'treatment'"):
        NDreamer(adata, "treatment", "control", **SMALL)
    with pytest.raises(KeyError, match="batch_key 'donor'"):
        NDreamer(adata, "condition", "control", batch_key="donor", **SMALL)
    for genes in ("gene_0", adata.var_names == "gene_0"):  # a string read as its characters, a mask as True/False
        with pytest.raises(TypeError, match=r"keep_genes takes a list of gene names.*list\(adata.var_names\[mask\]\)"):
            NDreamer(adata, "condition", "control", keep_genes=genes, **SMALL)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32 - 1\]"):
        NDreamer(adata, "condition", "control", seed=2**40, **SMALL)
    with pytest.warns(DeprecationWarning, match="contorl_name"):
        nd = NDreamer(adata, "condition", contorl_name="control", **SMALL)
    assert nd.design.control_name == "control"
    # treatments whose layers share a name: IFN's lower bound ite_IFN_q05 was overwritten by IFN_q05's ITE
    for second in ("stimulated_q05", "model_stimulated", "model_stimulated_q97.5"):
        renamed = adata.copy()
        renamed.obs["condition"] = renamed.obs["condition"].astype(str)
        renamed.obs.loc[renamed.obs_names[renamed.obs["condition"] == "stimulated"][::2], "condition"] = second
        with pytest.raises(ValueError, match=f"treatments 'stimulated' and '{second}'.*Rename one of them"):
            NDreamer(renamed, "condition", "control", **SMALL)
    only_control = adata[adata.obs["condition"] == "control"].copy()
    with pytest.raises(ValueError, match="nothing to compare"):
        NDreamer(only_control, "condition", "control", **SMALL)
    repeated = adata.copy()
    repeated.var_names = [*adata.var_names[:-1], adata.var_names[0]]
    with pytest.raises(ValueError, match=r"var_names are not unique.*var_names_make_unique"):
        NDreamer(repeated, "condition", "control", **SMALL)
    # designs whose batch effect is the treatment effect: the condition as a batch, or batches holding one arm each
    with pytest.raises(ValueError, match="batch_key \\['batch', 'condition'\\] holds the condition_key"):
        NDreamer(adata, "condition", "control", batch_key=["batch", "condition"], **SMALL)
    # a batch column named twice was two batch effects of one column (twice the independence weight), a fit unlike
    # the one-key fit, without a word; RegularizedVI's setup refuses a repeated key
    with pytest.raises(ValueError, match=r"batch_key \['batch', 'batch'\] names \['batch'\] more than once"):
        NDreamer(adata, "condition", "control", batch_key=["batch", "batch"], **SMALL)
    # labels are compared as text: batches 1 and "1" of one column were merged into one batch without a word
    mixed = adata.copy()
    mixed.obs["lane"] = np.array([1 if b == "batch_0" else "1" if b == "batch_1" else 2 for b in adata.obs["batch"]],
                                 dtype=object)
    with pytest.raises(ValueError, match=r"adata.obs\['lane'\] holds labels of different types .*e.g. 1 and '1'"):
        NDreamer(mixed, "condition", "control", batch_key="lane", **SMALL)
    adata.obs["run"] = np.where(adata.obs["condition"] == "control", "run_a", "run_b")
    with pytest.raises(ValueError, match=r"No batch holds both condition 'stimulated' \(batches \['run_b'\]\) and the "
                                         r"control 'control' \(batches \['run_a'\]\)"):
        NDreamer(adata, "condition", "control", batch_key="run", **SMALL)
    # one batch holding one arm is fine when another holds both
    adata.obs["run"] = np.where((adata.obs["condition"] == "stimulated") & (adata.obs["batch"] == "batch_0"), "run_b",
                                "run_a")
    design = NDreamer(adata, "condition", "control", batch_key="run", **SMALL).design
    assert sorted(design.batches_with["stimulated"]) == ["run_a", "run_b"] and design.batches_with["control"] == ["run_a"]


def test_gene_selection_keeps_simulated_responding_genes():
    adata = ps.datasets.simulate(n_cells=1000, n_genes=1500, n_responding_genes=30, seed=1)
    expression = log_normalise(adata, "counts")
    args = (expression, adata.var_names, adata.obs["batch"].to_numpy(), adata.obs["condition"].to_numpy(), "control", 200)
    responding = adata.var["responding"].to_numpy()
    kept, pooled_only = (responding & variable_genes(*args)).sum(), (responding & variable_genes(*args, response_share=0.0)).sum()
    assert kept >= 2 * pooled_only and kept >= 20, (kept, pooled_only)
