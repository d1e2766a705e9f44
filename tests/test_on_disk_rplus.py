"""Counts rewritten inside a file opened with ``backed="r+"`` after a model read them: every query and ``train``
refuse, as they do for counts edited in memory (the backed fingerprint has no sum; a sample of the stored entries
stands in for it)."""

import re
import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

import pyro_scmodels as ps

QUICK = dict(n_hidden=16, n_latent=4)
TRAIN = dict(batch_size=50, device="cpu", progress_bar=False, kl_warmup_epochs=1)


def _doubled(backed):
    """Every stored count doubled, written into the file through the AnnData's own handle."""
    group = backed.X.group if hasattr(backed.X, "group") else None
    stored = group["data"] if group is not None else backed.X
    stored[...] = stored[...] * 2


def _log1p(backed):
    """scanpy's chunked log1p, which writes into a backed file."""
    sc = pytest.importorskip("scanpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.log1p(backed, chunked=True, chunk_size=40)


@pytest.fixture(scope="module")
def cells():
    """160 simulated cells with their raw counts in X (float32 CSR), in memory."""
    adata = ps.datasets.simulate(n_cells=160, n_genes=30, n_markers_per_type=4, n_responding_genes=4, seed=4)
    adata.X = sp.csr_matrix(adata.layers.pop("counts"), dtype=np.float32)
    return adata


def _trained_on(cells, path, fmt):
    written = cells.copy()
    written.X = written.X if fmt == "csr" else written.X.toarray()
    written.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r+")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    model = ps.RegularizedVI(backed, seed=0, **QUICK)
    model.train(max_epochs=1, seed=0, **TRAIN)
    return backed, model


@pytest.mark.parametrize("edit", [_doubled, _log1p], ids=["doubled", "log1p"])
@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_counts_rewritten_in_an_r_plus_file_are_refused_by_every_query_and_train(cells, tmp_path, fmt, edit):
    # the model computed the latent from log1p values without a word (max change 0.352) and trained on them
    path = tmp_path / f"{fmt}.h5ad"
    backed, model = _trained_on(cells, path, fmt)
    model.get_latent_representation()  # the file as the model read it: answered
    edit(backed)
    refusal = re.escape(f"(counts adata.X); the model would go on answering for the data as they were. A sample of "
                        f"the counts stored in {path} differs")
    for query in (model.get_latent_representation, lambda: model.get_normalized_expression(indices=[0, 5]),
                  lambda: model.train(max_epochs=1, **TRAIN)):
        with pytest.raises(ValueError, match=refusal):
            query()


def test_an_r_plus_file_whose_counts_are_untouched_is_read_as_before(cells, tmp_path):
    # a write of .obs through r+ leaves the counts, and the queries, as they were
    backed, model = _trained_on(cells, tmp_path / "cells.h5ad", "csr")
    before = model.get_latent_representation()
    backed.obs["score"] = np.arange(backed.n_obs, dtype=float)
    backed.write()
    np.testing.assert_array_equal(model.get_latent_representation(), before)
    model.train(max_epochs=1, seed=1, **TRAIN)


def test_counts_edited_in_an_in_memory_layer_of_a_backed_adata_get_the_in_memory_advice(cells, tmp_path):
    # the file's advice (transform a copy of the file) named a file whose counts had not changed
    written = cells.copy()
    written.layers["counts"] = written.X.copy()
    written.write_h5ad(tmp_path / "layer.h5ad")
    backed = anndata.read_h5ad(tmp_path / "layer.h5ad", backed="r")  # X on disk, layers in memory
    ps.RegularizedVI.setup_anndata(backed, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(backed, seed=0, **QUICK)
    model.train(max_epochs=1, seed=0, **TRAIN)
    backed.layers["counts"].data[:] = np.log1p(backed.layers["counts"].data)
    with pytest.raises(ValueError, match=r"\(counts adata.layers\['counts'\]\).*Put the raw counts back") as refused:
        model.get_latent_representation()
    assert "stored in" not in str(refused.value)
