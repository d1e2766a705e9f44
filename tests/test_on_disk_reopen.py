"""A model on a backed AnnData keeps reading its counts after anndata closes the file's handle (``to_memory()``,
``adata.file.close()``, ``save(save_anndata=True)``), whether X is stored as CSR or dense (a model refuses a backed
CSC at setup; NDreamer reads one, through the same reopening reader), and refuses a file that was rewritten with
other counts meanwhile."""

import os
import re
import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

import pyro_scmodels as ps
from pyro_scmodels.data import CountMatrix

QUICK = dict(n_hidden=16, n_latent=4)
TRAIN = dict(batch_size=50, device="cpu", progress_bar=False, kl_warmup_epochs=1)
FORMATS = ("csr", "dense")  # the stored formats a model reads from disk (a backed CSC is refused at setup)
CELLS = np.array([7, 0, 150, 3])


def _stored(counts: sp.csr_matrix, fmt: str):
    return {"csr": counts, "csc": counts.tocsc(), "dense": counts.toarray()}[fmt]


@pytest.fixture(scope="module")
def cells():
    """160 simulated cells with their raw counts in X (float32 CSR), in memory."""
    adata = ps.datasets.simulate(n_cells=160, n_genes=30, n_markers_per_type=4, n_responding_genes=4, seed=2)
    adata.X = sp.csr_matrix(adata.layers.pop("counts"), dtype=np.float32)
    return adata


def _write(adata, path, fmt: str) -> str:
    written = adata.copy()
    written.X = _stored(adata.X, fmt)
    written.write_h5ad(path)
    return str(path)


def _trained(path):
    backed = anndata.read_h5ad(path, backed="r")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    model = ps.RegularizedVI(backed, seed=0, **QUICK)
    model.train(max_epochs=1, seed=0, **TRAIN)
    return backed, model


def _queries(model) -> dict:
    return {"latent": model.get_latent_representation(),
            "normalized": model.get_normalized_expression(indices=CELLS, return_numpy=True),
            "library": model.get_library_size()}


@pytest.mark.parametrize("how", ["file.close", "to_memory", "save_anndata"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_model_reads_and_trains_on_after_its_backed_file_is_closed(cells, tmp_path, fmt, how):
    # dense X (and CSC, which models now refuse) failed at the next query inside h5py ("Can't synchronously determine
    # if attribute exists by name", "identifier is not of specified type"); CSR opened its file again
    path = _write(cells, tmp_path / f"{fmt}.h5ad", fmt)
    backed, model = _trained(path)
    _, untouched = _trained(path)  # the same model whose file stays open
    before = _queries(model)
    if how == "file.close":
        backed.file.close()
    elif how == "to_memory":
        backed.to_memory()
    else:
        model.save(str(tmp_path / "model"), save_anndata=True)  # anndata's write_h5ad closes the backed file
    after = _queries(model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for trained in (model, untouched):
        trained.train(max_epochs=1, seed=1, **TRAIN)
    np.testing.assert_array_equal(model.get_latent_representation(), untouched.get_latent_representation())
    np.testing.assert_array_equal(backed.X[:3].toarray() if fmt != "dense" else backed.X[:3], cells.X[:3].toarray())


@pytest.mark.parametrize("fmt", ["csc", "dense"])
def test_a_csc_or_dense_file_rewritten_after_its_handle_closed_is_refused(cells, tmp_path, fmt):
    path = tmp_path / f"{fmt}.h5ad"
    expected = cells.X[CELLS].toarray()

    def read_after(change):
        _write(cells, path, fmt)
        backed = anndata.read_h5ad(path, backed="r")
        counts = CountMatrix(backed.X, name="adata.X", validate=False)
        backed.file.close()  # anndata closes a backed file, e.g. in to_memory() or when the object is written elsewhere
        change()
        return counts.rows(CELLS)

    np.testing.assert_array_equal(read_after(lambda: None), expected)
    np.testing.assert_array_equal(read_after(lambda: os.utime(path)), expected)  # a touch: the same counts
    reordered = cells[::-1].copy()
    with pytest.raises(ValueError, match=re.escape(f"The file {path} holds other counts than when they were read")):
        read_after(lambda: _write(reordered, path, fmt))
    scaled = cells.copy()
    scaled.X = scaled.X * 3  # the same sparsity, other values
    with pytest.raises(ValueError, match="holds other counts"):
        read_after(lambda: _write(scaled, path, fmt))
    with pytest.raises(FileNotFoundError, match="is no longer there"):
        read_after(lambda: os.remove(path))


def test_only_backed_csc_and_dense_matrices_in_an_hdf5_file_are_wrapped(cells, tmp_path):
    from pyro_scmodels.data.on_disk import BackedMatrix, DiskCSR, reopenable

    dense = np.asarray(cells.X.toarray())
    assert reopenable(dense) is dense and reopenable(cells.X) is cells.X
    for fmt in ("csc", "dense"):
        backed = anndata.read_h5ad(_write(cells, tmp_path / f"{fmt}.h5ad", fmt), backed="r")
        assert isinstance(reopenable(backed.X), BackedMatrix)
    backed = anndata.read_h5ad(_write(cells, tmp_path / "csr.h5ad", "csr"), backed="r")
    assert CountMatrix(backed.X, validate=False).disk is not None  # CSR goes through DiskCSR
    assert isinstance(DiskCSR(backed.X)._reopener.source, tuple)


@pytest.mark.parametrize("fmt", ["dense"])
def test_ndreamer_from_a_model_whose_backed_file_was_closed(cells, tmp_path, fmt):
    # NDreamer on the AnnData itself reads every count when it is made; from a model, it asks the model's latent,
    # which read a closed dense file
    from pyro_scmodels.ndreamer import NDreamer

    path = _write(cells, tmp_path / f"{fmt}.h5ad", fmt)
    results = []
    for close in (False, True):
        backed, model = _trained(path)
        if close:
            backed.file.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nd = NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu")
            nd.estimate_ite()
        results.append(nd.results.layers["ite_stimulated"])
    np.testing.assert_array_equal(results[1], results[0])
