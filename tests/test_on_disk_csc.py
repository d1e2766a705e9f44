"""Counts stored on disk as CSC: a model refuses them at setup (every read of cells would load the whole matrix),
before reading any; NDreamer, which reads its AnnData once in blocks, still takes them."""

import re
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata._core import sparse_dataset

import pyro_scmodels as ps


@pytest.fixture(scope="module")
def csc_file(tmp_path_factory):
    """120 simulated cells whose raw counts are written as a CSC X; (in-memory CSR AnnData, path)."""
    adata = ps.datasets.simulate(n_cells=120, n_genes=30, n_markers_per_type=4, n_responding_genes=4, seed=3)
    adata.X = sp.csr_matrix(adata.layers.pop("counts"), dtype=np.float32)
    path = tmp_path_factory.mktemp("csc") / "csc.h5ad"
    anndata.AnnData(X=sp.csc_matrix(adata.X), obs=adata.obs, var=adata.var).write_h5ad(path)
    return adata, str(path)


@pytest.fixture
def whole_matrix_reads(monkeypatch):
    """A list that grows by one each time anndata loads a backed sparse matrix whole."""
    calls = []
    original = sparse_dataset.BaseCompressedSparseDataset.to_memory

    def counted(self, *args, **kwargs):
        calls.append(self.format)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sparse_dataset.BaseCompressedSparseDataset, "to_memory", counted)
    return calls


def test_a_backed_csc_x_is_refused_at_setup_before_any_read(csc_file, whole_matrix_reads):
    # every minibatch and getter read the whole matrix through anndata's to_memory (50 loads an epoch on 50,000 cells)
    adata, path = csc_file
    backed = anndata.read_h5ad(path, backed="r")
    message = re.escape(f"adata.X is stored on disk as CSC (compressed sparse columns) in {path}")
    with pytest.raises(ValueError, match=message) as refused:
        ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    assert "adata.to_memory()" in str(refused.value) and "a.X = a.X.tocsr()" in str(refused.value)
    assert whole_matrix_reads == []  # refused before validation read the counts
    # the first fix: in memory the same file sets up, and its counts are read as CSR rows
    loaded = backed.to_memory()
    ps.RegularizedVI.setup_anndata(loaded, batch_key="batch")
    model = ps.RegularizedVI(loaded, n_hidden=16, n_latent=4, seed=0)
    assert model.get_latent_representation(indices=np.arange(5)).shape == (5, 4)


def test_the_csr_copy_the_message_gives_is_read_from_disk(csc_file, tmp_path):
    _, path = csc_file
    copy = anndata.read_h5ad(path)
    copy.X = copy.X.tocsr()
    copy.write_h5ad(tmp_path / "counts_csr.h5ad")
    backed = anndata.read_h5ad(tmp_path / "counts_csr.h5ad", backed="r")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    assert ps.RegularizedVI(backed, n_hidden=16, n_latent=4, seed=0)._cell_data().modalities["x"].disk is not None


def test_a_backed_csc_modality_of_a_mudata_is_refused_by_name(csc_file, tmp_path):
    mudata = pytest.importorskip("mudata")
    adata, _ = csc_file
    rna = anndata.AnnData(sp.csc_matrix(adata.X), obs=pd.DataFrame(index=adata.obs_names), var=adata.var[[]])
    peaks = anndata.AnnData(adata.X[:, :10].copy(), obs=pd.DataFrame(index=adata.obs_names),
                            var=pd.DataFrame(index=[f"peak{i}" for i in range(10)]))
    mdata = mudata.MuData({"rna": rna, "atac": peaks})
    mdata.obs["batch"] = adata.obs["batch"].to_numpy()
    mdata.write(tmp_path / "cells.h5mu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backed = mudata.read_h5mu(tmp_path / "cells.h5mu", backed=True)
    with pytest.raises(ValueError, match=re.escape("mdata.mod['rna'].X is stored on disk as CSC")) as refused:
        ps.RegularizedMultimodalVI.setup_mudata(backed, batch_key="batch")
    assert "mudata.read_h5mu(path)" in str(refused.value)


def test_ndreamer_still_reads_a_backed_csc_in_blocks(csc_file, whole_matrix_reads):
    from pyro_scmodels.ndreamer import NDreamer

    _, path = csc_file
    backed = anndata.read_h5ad(path, backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer(backed, "condition", "control", batch_key="batch", n_codebooks=4, codebook_size=16,
                      embedding_dim=32, z_dim=8, encoder_hidden=(32,), decoder_hidden=(32,), batch_size=64, device="cpu",
                      num_hvg=20)
    assert nd.expression.shape == (backed.n_obs, 20) and whole_matrix_reads == []
