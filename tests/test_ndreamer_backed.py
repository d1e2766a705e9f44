"""NDreamer and the model route on an AnnData opened from disk (``backed="r"``)."""

import os
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import pyro_scmodels as ps
from pyro_scmodels.cli import main
from pyro_scmodels.ndreamer import NDreamer, preprocess
from pyro_scmodels.ndreamer import pipeline as pipeline_module
from pyro_scmodels.ndreamer import _constants as K
from pyro_scmodels.ndreamer.count_rows import LogNormalisedCounts

from ._on_disk_files import write_counts_h5ad

TINY = dict(n_codebooks=4, codebook_size=16, embedding_dim=32, z_dim=8, encoder_hidden=(32,), decoder_hidden=(32,),
            batch_size=128, device="cpu", num_hvg=80)


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    adata = ps.datasets.simulate(n_cells=600, n_genes=120, seed=3)
    return adata, write_counts_h5ad(adata, tmp_path_factory.mktemp("backed") / "cells.h5ad", keep_counts_layer=True)


def _fitted(adata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer(adata, "condition", "control", batch_key="batch", **TINY)
        nd.train(n_epochs=2, progress_bar=False)
    nd.decompose_batch_effect()
    nd.estimate_ite()
    return nd


def test_backed_input_gives_the_in_memory_results(on_disk, monkeypatch):
    adata, path = on_disk
    in_memory = _fitted(adata)
    monkeypatch.setattr(preprocess, "READ_CHUNK_CELLS", 128)  # several blocks read from disk
    backed = anndata.read_h5ad(path, backed="r")
    assert not sp.issparse(backed.X) and not isinstance(backed.X, np.ndarray)  # really on disk
    from_disk = _fitted(backed)
    assert list(from_disk.genes) == list(in_memory.genes)
    np.testing.assert_allclose(from_disk.results.obsm["X_effect_modifier_space"],
                               in_memory.results.obsm["X_effect_modifier_space"], rtol=1e-5, atol=1e-5)
    for layer in ("denoised", "ite_stimulated"):
        np.testing.assert_allclose(from_disk.results.layers[layer], in_memory.results.layers[layer], rtol=1e-4, atol=1e-4)


def test_log_normalise_reads_blocks_and_leaves_the_input_alone(on_disk, monkeypatch):
    adata, path = on_disk
    counts = adata.X.copy()
    monkeypatch.setattr(preprocess, "READ_CHUNK_CELLS", 100)
    blocked = preprocess.log_normalise(adata)
    monkeypatch.setattr(preprocess, "READ_CHUNK_CELLS", 10_000)
    whole = preprocess.log_normalise(adata)
    assert (adata.X != counts).nnz == 0  # normalised in a copy, never in the user's matrix
    totals = np.asarray(counts.sum(1)).ravel()
    expected = np.log1p(counts.toarray() * (1e4 / totals)[:, None])
    np.testing.assert_allclose(blocked.toarray(), expected, rtol=1e-5, atol=1e-5)
    assert (blocked != whole).nnz == 0
    # from the file (blocks of its on-disk CSR): the same matrix
    from_file = preprocess.log_normalise(anndata.read_h5ad(path, backed="r"))
    assert from_file.dtype == np.float32 and (from_file != whole).nnz == 0
    # 64-bit indices (chosen above 2^31 stored entries; here forced): the same matrix
    monkeypatch.setattr(preprocess, "INDEX32_LIMIT", 10)
    monkeypatch.setattr(preprocess, "READ_CHUNK_CELLS", 100)
    wide = preprocess.log_normalise(anndata.read_h5ad(path, backed="r"))
    assert (wide != whole).nnz == 0
    monkeypatch.setattr(preprocess, "INDEX32_LIMIT", np.iinfo(np.int32).max)
    # a dense input (no stored-entry count to size the arrays by): the same matrix
    dense = preprocess.log_normalise(anndata.AnnData(X=counts.toarray(), obs=adata.obs))
    assert sp.issparse(dense) and (dense != whole).nnz == 0


def test_model_route_on_a_backed_model_saves_and_loads(on_disk, tmp_path):
    _, path = on_disk
    backed = anndata.read_h5ad(path, backed="r")
    ps.RegularizedVI.setup_anndata(backed, ambient_covariate_keys=["batch"], nn_conditioning_covariate_keys=["condition"],
                                   encoder_covariate_keys=["condition"])
    model = ps.RegularizedVI(backed, n_latent=5, n_hidden=32)
    model.train(max_epochs=2, batch_size=128, device="cpu", progress_bar=False)
    nd = ps.NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu")
    nd.estimate_ite()
    results = nd.estimate_model_ite(num_samples=3)
    assert results.n_obs == 600 and np.isfinite(results.layers["ite_model_stimulated"]).all()
    # chosen genes only, in a new AnnData: the same numbers (the same seeded draws of z)
    genes = list(nd.genes[[3, 0, 10]])
    part = nd.estimate_model_ite(num_samples=3, gene_list=genes)
    assert part.shape == (600, 3) and list(part.var_names) == genes
    for layer in ("ite_model_stimulated", "ite_model_stimulated_q05", "ite_model_stimulated_q95"):
        np.testing.assert_allclose(part.layers[layer], results.layers[layer][:, [3, 0, 10]], rtol=1e-5, atol=1e-6)
    # chosen cells: their rows (the draws of z come in other minibatches, so compare means of many draws)
    full = nd.estimate_model_ite(num_samples=300, gene_list=genes).layers["ite_model_stimulated"]
    order = np.argsort(full[:, 2])
    cells = [int(order[-1]), int(order[0]), int(order[300])]  # the largest, smallest and a middle effect
    few = nd.estimate_model_ite(num_samples=300, indices=cells, gene_list=genes)
    assert list(few.obs_names) == list(backed.obs_names[cells])
    assert full[cells[0], 2] - full[cells[1], 2] > 0.02  # rows far apart: a wrong order would show
    np.testing.assert_allclose(few.layers["ite_model_stimulated"], full[cells], atol=0.004)
    nd.save(str(tmp_path / "nd"))
    again = ps.NDreamer.load(str(tmp_path / "nd"), model=model)
    np.testing.assert_array_equal(again.results.layers["ite_stimulated"], results.layers["ite_stimulated"])
    # from a backed model the expression is held as counts, saved beside the results and read back
    assert isinstance(nd.expression, LogNormalisedCounts) and nd.results.X is None
    assert isinstance(again.expression, LogNormalisedCounts)
    np.testing.assert_array_equal(again.expression[cells].toarray(), nd.expression[cells].toarray())
    fresh = again.estimate_ite(nearest_neighbor=3, indices=cells).layers["ite_stimulated"]  # not cached: from the counts
    np.testing.assert_allclose(fresh, nd.estimate_ite(nearest_neighbor=3, indices=cells).layers["ite_stimulated"], rtol=1e-6)


def test_ndreamer_command_reads_a_backed_input(on_disk, tmp_path):
    adata, path = on_disk
    out = str(tmp_path / "nd")
    code = main(["ndreamer", path, "--backed", "--condition-key", "condition", "--control", "control", "--batch-key",
                 "batch", "--epochs", "1", "--batch-size", "128", "--network", "small", "--device", "cpu", "-o", out,
                 "--quiet", "--ite-interval", "0.8"])
    assert code == 0
    results = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    assert list(results.obs_names) == list(adata.obs_names) and "X_effect_modifier_space" in results.obsm
    assert not results.layers  # --backed: no whole-data layer in memory; they were written block by block
    effects = anndata.read_h5ad(os.path.join(out, "effects.h5ad"), backed="r")
    assert list(effects.obs_names) == list(adata.obs_names)
    assert {"denoised", "batch_effect", "ite_stimulated", "ite_stimulated_q10", "ite_stimulated_q90"} <= set(effects.layers.keys())
    ite, low, high = (effects.layers[f"ite_stimulated{s}"][:50] for s in ("", "_q10", "_q90"))
    assert np.isfinite(ite).all() and (low <= ite).all() and (ite <= high).all() and (low < high).any()


def test_effects_of_some_cells_and_genes_and_on_disk_equal_the_whole_layers(on_disk, tmp_path, monkeypatch):
    adata, _ = on_disk
    nd = _fitted(adata)
    whole = {name: nd.results.layers[name].copy() for name in ("denoised", "batch_effect", "ite_stimulated")}
    cells, genes = np.array([5, 590, 3]), list(nd.genes[[7, 0, 41]])
    nd.effects.forget_effects()  # computed from the matches, not sliced from the cached whole result
    for chosen in (cells, nd.results.obs_names[cells], np.isin(np.arange(600), cells)):
        part = nd.estimate_ite(indices=chosen, gene_list=genes)
        rows = np.sort(cells) if chosen.dtype == bool else cells
        assert list(part.obs_names) == list(nd.results.obs_names[rows]) and list(part.var_names) == genes
        np.testing.assert_allclose(part.layers["ite_stimulated"], whole["ite_stimulated"][rows][:, [7, 0, 41]], atol=1e-6)
    decomposed = nd.decompose_batch_effect(gene_list=genes[:1])
    assert decomposed.shape == (600, 1)
    np.testing.assert_allclose(decomposed.layers["batch_effect"][:, 0], whole["batch_effect"][:, 7], atol=1e-6)
    assert set(nd.results.layers) == set(whole)  # results untouched by the subset queries
    with pytest.raises(ValueError, match=r"gene_list names 1 feature\(s\) not among the 80 genes of the results: \['NOT_A_GENE'\]"):
        nd.estimate_ite(gene_list=["NOT_A_GENE"])
    with pytest.raises(ValueError, match=r"cell positions in \[0, 600\)"):
        nd.estimate_ite(indices=[0, 600])
    with pytest.raises(ValueError, match="boolean mask of 3 values; the results hold 600 cells"):
        nd.estimate_ite(indices=[True, False, True])
    path = str(tmp_path / "effects.h5ad")
    nd.write_effects(path, chunk_cells=64)  # ten blocks, the last one short
    on_file = anndata.read_h5ad(path, backed="r")
    assert list(on_file.var_names) == list(nd.genes)
    for name, values in whole.items():
        np.testing.assert_allclose(on_file.layers[name][:], values, atol=1e-6)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        nd.write_effects(path)
    # only the cells and genes asked for, in their order, a block of two cells at a time
    part_path = str(tmp_path / "part.h5ad")
    nd.write_effects(part_path, chunk_cells=2, indices=nd.results.obs_names[cells], gene_list=genes)
    part = anndata.read_h5ad(part_path)
    assert list(part.obs_names) == list(nd.results.obs_names[cells]) and list(part.var_names) == genes
    np.testing.assert_array_equal(part.obsm["X_effect_modifier_space"], nd.results.obsm["X_effect_modifier_space"][cells])
    for name, values in whole.items():
        np.testing.assert_allclose(part.layers[name], values[cells][:, [7, 0, 41]], atol=1e-6)
    assert [f for f in os.listdir(tmp_path) if "partial" in f] == []
    # CATE without an ITE layer: computed in blocks of cells of one group (here 50), summed; the same table
    table = nd.estimate_cate("cell_type")
    # another matching than the layer's: computed with it, not read from the layer
    assert nd.results.uns["ite_matching"]["nearest_neighbor"] == 20
    other = nd.estimate_cate("cell_type", nearest_neighbor=2)
    assert not np.allclose(other["mean_ite"], table["mean_ite"], atol=1e-3)
    del nd.results.layers["ite_stimulated"]
    nd.effects.forget_effects()
    monkeypatch.setattr(K, "WRITE_CHUNK_CELLS", 50)
    pd.testing.assert_frame_equal(nd.estimate_cate("cell_type"), table, atol=1e-5)
    assert "ite_stimulated" not in nd.results.layers


def test_log_normalise_reads_the_cells_and_genes_asked_for(on_disk):
    adata, path = on_disk
    whole = preprocess.log_normalise(adata)
    genes = np.zeros(adata.n_vars, dtype=bool)
    genes[::3] = True
    cells = np.arange(5, adata.n_obs, 7)
    for source in (adata, anndata.read_h5ad(path, backed="r")):
        picked = preprocess.log_normalise(source, genes=genes, cells=cells)
        # each cell's total is taken over every gene, not only the kept ones
        assert (picked != whole[cells][:, genes]).nnz == 0
        assert (preprocess.log_normalise(source, genes=np.flatnonzero(genes)) != whole[:, genes]).nnz == 0
    with pytest.raises(ValueError, match="cells must be increasing"):
        preprocess.log_normalise(adata, cells=[3, 1])


def test_genes_of_a_large_data_set_are_chosen_on_a_sample_of_its_cells(on_disk, monkeypatch):
    """Above HVG_MAX_CELLS cells the all-genes matrix is read for a sample only, and then only the
    chosen genes of every cell; the choice agrees with the one made on every cell."""
    _, path = on_disk
    backed = anndata.read_h5ad(path, backed="r")
    sample = preprocess.gene_selection_cells(np.asarray(backed.obs["batch"].astype(str) + "|" + backed.obs["condition"].astype(str)),
                                             max_cells=400, min_per_group=20)
    assert 380 <= sample.size <= 420 and (np.diff(sample) > 0).all()
    reads = []
    original = preprocess.log_normalise

    def spy(adata, layer=None, genes=None, cells=None, compact=False):
        reads.append((None if genes is None else int(np.sum(genes)) if np.asarray(genes).dtype == bool else len(genes),
                      None if cells is None else len(cells)))
        return original(adata, layer, genes=genes, cells=cells, compact=compact)

    monkeypatch.setattr(pipeline_module, "log_normalise", spy)
    monkeypatch.setattr(pipeline_module, "gene_selection_cells",
                        lambda groups, seed=0: preprocess.gene_selection_cells(groups, 400, 20, seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer(backed, "condition", "control", batch_key="batch", **{**TINY, "num_hvg": 40})
    # the sample's every gene, then every cell's chosen genes; never every cell's every gene
    assert reads[0] == (None, sample.size) and reads[1] == (40, None) and len(reads) == 2
    assert nd.expression.shape == (backed.n_obs, 40)
    assert isinstance(nd.expression, LogNormalisedCounts) and nd.results.X is None  # backed: held as counts
    # the genes chosen on the sample are mostly those chosen on every cell
    design = nd.design
    on_every_cell = preprocess.variable_genes(original(backed), backed.var_names, design.batch, design.condition,
                                              design.control_name, 40)
    assert len(set(backed.var_names[on_every_cell]) & set(nd.genes)) >= 0.8 * 40  # measured: 35 of 40 (32 on 240 cells)


def test_an_entry_stored_twice_is_summed_before_the_log(monkeypatch):
    # scipy sums an entry stored twice; log1p of each part, summed, was 7.5 log units off in one cell
    rng = np.random.default_rng(0)
    dense = rng.poisson(3.0, (120, 30)).astype(np.float32)
    coo = sp.coo_matrix(dense)
    half = np.floor(coo.data / 2)
    order = np.argsort(np.concatenate([coo.row, coo.row]), kind="stable")  # each row's entries, every one twice
    doubled = sp.csr_matrix((np.concatenate([half, coo.data - half])[order], np.concatenate([coo.col, coo.col])[order],
                             np.concatenate([[0], np.cumsum(np.bincount(coo.row, minlength=120) * 2)])), shape=dense.shape)
    assert doubled.nnz == 2 * coo.nnz and not doubled.has_canonical_format
    monkeypatch.setattr(preprocess, "READ_CHUNK_CELLS", 50)
    expected = preprocess.log_normalise(anndata.AnnData(sp.csr_matrix(dense)))
    for compact in (False, True):
        got = preprocess.log_normalise(anndata.AnnData(doubled), compact=compact)
        got = (got[np.arange(120)] if compact else got).toarray()
        np.testing.assert_allclose(got, expected.toarray(), rtol=1e-6)


def test_nan_or_negative_values_past_the_first_sample_are_named(monkeypatch):
    # only the first block's first values were checked: a NaN further on failed in sklearn's PCA, a negative log
    # value (scaled data) was taken as it was
    rng = np.random.default_rng(1)
    counts = rng.poisson(2.0, (200, 20)).astype(np.float32) + 1
    monkeypatch.setattr(preprocess, "LOG_CHECK_SAMPLE", 100)
    monkeypatch.setattr(preprocess, "READ_CHUNK_CELLS", 50)
    for bad, row in ((np.nan, 150), (-5.0, 120), (np.nan, 7)):  # the last among the first values
        data = counts.copy()
        data[row, 3] = bad
        with pytest.raises(ValueError, match=f"adata.X holds {bad:g} at row {row} of the cells read"):
            preprocess.log_normalise(anndata.AnnData(sp.csr_matrix(data)))
    logged = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    logged[170, 2] = -0.5
    with pytest.raises(ValueError, match="at row 170 .*finite, non-negative log-normalised values"):
        preprocess.log_normalise(anndata.AnnData(sp.csr_matrix(logged)))


def test_a_store_whose_count_of_entries_does_not_match_is_refused(monkeypatch):
    # summing entries stored twice must not hide a store whose indptr and data disagree (one being written)
    counts = sp.csr_matrix(np.random.default_rng(2).poisson(2.0, (60, 12)).astype(np.float32) + 1)
    real = preprocess._stored_entries
    monkeypatch.setattr(preprocess, "_stored_entries", lambda source: real(source) + 3)
    with pytest.raises(ValueError, match="were counted; is the file being written"):
        preprocess.log_normalise(anndata.AnnData(counts))
