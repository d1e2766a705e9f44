"""The log-normalised expression held as counts (LogNormalisedCounts): same values, half the memory."""

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from pyro_scmodels.matching import match_groups, weighted_average
from pyro_scmodels.ndreamer import preprocess
from pyro_scmodels.ndreamer.count_rows import LogNormalisedCounts
from pyro_scmodels.ndreamer import CounterfactualDesign
from pyro_scmodels.ndreamer.effects import effects_of_cells


def _counts(n_cells=300, n_genes=50, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.gamma(0.5, scale, size=(n_cells, n_genes))).astype(np.float32)
    dense[:, 0] += 1  # no empty cell
    return anndata.AnnData(X=sp.csr_matrix(dense))


def _same(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    a, b = sp.csr_matrix(a), sp.csr_matrix(b)
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)  # bit for bit: the same float32 operations


def test_rows_are_the_log_normalised_csr_bit_for_bit(tmp_path, monkeypatch):
    adata = _counts()
    csr = preprocess.log_normalise(adata)
    compact = preprocess.log_normalise(adata, compact=True)
    assert isinstance(compact, LogNormalisedCounts) and compact.shape == csr.shape and compact.nnz == csr.nnz
    assert compact.counts.dtype == np.uint16 and compact.indices.dtype == np.uint16
    # half the bytes of a float32 CSR with 32-bit indices (plus a factor per cell and 64-bit offsets)
    assert compact.counts.nbytes + compact.indices.nbytes == (csr.data.nbytes + csr.indices.nbytes) // 2
    rng = np.random.default_rng(1)
    for rows in (rng.integers(0, 300, 57), np.array([5, 5, 0, 299]), slice(10, 40), rng.random(300) < 0.3):
        _same(compact[rows], csr[rows])
    _same(compact.to_csr(), csr)
    np.testing.assert_array_equal(compact[[3, 8], [1, 4, 2]].toarray(), csr[[3, 8]][:, [1, 4, 2]].toarray())
    # a subset of genes, read from a backed file in several blocks (totals still over every gene)
    adata.write_h5ad(tmp_path / "c.h5ad")
    monkeypatch.setattr(preprocess, "READ_CHUNK_CELLS", 64)
    genes = np.array([0, 3, 7, 20, 49])
    from_disk = preprocess.log_normalise(anndata.read_h5ad(tmp_path / "c.h5ad", backed="r"), genes=genes, compact=True)
    _same(from_disk.to_csr(), csr[:, genes])
    with pytest.raises(IndexError, match=r"\[0, 300\)"):
        compact[[300]]


def test_large_and_non_integer_counts_are_stored_exactly():
    adata = _counts(n_cells=40, n_genes=10)
    big = adata.X.toarray()
    big[30, 2] = 70_000  # above 16 bits: widened to 32-bit counts, from that block on
    wide = preprocess.log_normalise(anndata.AnnData(X=sp.csr_matrix(big)), compact=True)
    assert wide.counts.dtype == np.uint32
    _same(wide.to_csr(), preprocess.log_normalise(anndata.AnnData(X=sp.csr_matrix(big))))
    fractional = big.copy()
    fractional[0, 0] = 2.5  # e.g. corrected counts: kept as float32
    loose = preprocess.log_normalise(anndata.AnnData(X=sp.csr_matrix(fractional)), compact=True)
    assert loose.counts.dtype == np.float32
    _same(loose.to_csr(), preprocess.log_normalise(anndata.AnnData(X=sp.csr_matrix(fractional))))


def test_log_normalised_input_stays_a_csr():
    logged = sp.csr_matrix(np.log1p(_counts(n_cells=30).X.toarray() * 1.5))
    out = preprocess.log_normalise(anndata.AnnData(X=logged), compact=True)
    assert sp.issparse(out)


def test_weighted_averages_and_effects_equal_those_of_the_csr():
    adata = _counts(n_cells=400, n_genes=30, seed=2)
    csr, compact = preprocess.log_normalise(adata), preprocess.log_normalise(adata, compact=True)
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 400, size=(120, 7))
    weights = rng.random((120, 7)).astype(np.float32)
    np.testing.assert_allclose(weighted_average(compact, indices, weights).toarray(),
                               weighted_average(csr, indices, weights).toarray(), rtol=1e-6, atol=1e-7)
    condition = np.where(np.arange(400) % 2, "treated", "control")
    batch = np.where(np.arange(400) < 200, "a", "b")
    design = CounterfactualDesign(condition, "control", batch)
    matches = match_groups(rng.normal(size=(400, 5)).astype(np.float32), design.groups, k=4)
    assert all(m.indices.dtype == np.int32 and m.weights.dtype == np.float32 for m in matches.values())
    cells, genes = np.array([7, 3, 399, 120]), np.array([5, 0, 29])
    for part in (dict(), dict(cells=cells, genes=genes)):
        expected = effects_of_cells(csr, matches, design, **part)
        got = effects_of_cells(compact, matches, design, **part)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
    # the genes asked for are the columns of the whole result
    whole = effects_of_cells(csr, matches, design)
    np.testing.assert_allclose(effects_of_cells(csr, matches, design, cells, genes)["ite_treated"],
                               whole["ite_treated"][cells][:, genes], rtol=1e-6, atol=1e-7)
