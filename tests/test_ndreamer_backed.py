"""NDreamer and the model route on an AnnData opened from disk (``backed="r"``)."""

import os
import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

import pyro_scmodels as ps
from pyro_scmodels.cli import main
from pyro_scmodels.ndreamer import NDreamer, preprocess

TINY = dict(n_codebooks=4, codebook_size=16, embedding_dim=32, z_dim=8, encoder_hidden=(32,), decoder_hidden=(32,),
            batch_size=128, device="cpu", num_hvg=80)


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    adata = ps.datasets.simulate(n_cells=600, n_genes=120, seed=3)
    adata.X = sp.csr_matrix(adata.layers["counts"], dtype=np.float32)
    path = str(tmp_path_factory.mktemp("backed") / "cells.h5ad")
    adata.write_h5ad(path)
    return adata, path


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
    adata, _ = on_disk
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
    nd.save(str(tmp_path / "nd"))
    again = ps.NDreamer.load(str(tmp_path / "nd"), model=model)
    np.testing.assert_array_equal(again.results.layers["ite_stimulated"], results.layers["ite_stimulated"])


def test_ndreamer_command_reads_a_backed_input(on_disk, tmp_path):
    adata, path = on_disk
    out = str(tmp_path / "nd")
    code = main(["ndreamer", path, "--backed", "--condition-key", "condition", "--control", "control", "--batch-key",
                 "batch", "--epochs", "1", "--batch-size", "128", "--network", "small", "--device", "cpu", "-o", out,
                 "--quiet"])
    assert code == 0
    results = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    assert list(results.obs_names) == list(adata.obs_names) and "ite_stimulated" in results.layers
