"""Log-normalised expression held as the counts it is computed from: half the memory of a float32 CSR.

A float32 CSR with 32-bit gene indices costs 8 bytes per stored entry: 5.9 GB for 10^6 cells with 737
entries each. :class:`LogNormalisedCounts` keeps the raw counts (16-bit while they fit) with 16-bit gene
indices, and one size factor per cell, and computes ``log1p(count x factor)`` on the rows read: 4 bytes
per entry. The values it returns are the same float32 numbers as those of
:func:`~pyro_scmodels.ndreamer.preprocess.log_normalise`'s CSR (the same float32 operations).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

UINT16_MAX = np.iinfo(np.uint16).max


def storage_dtype(values: np.ndarray, current: np.dtype) -> np.dtype:
    """The narrowest of uint16, uint32 and float32 (no narrower than ``current``) that holds ``values`` exactly."""
    if values.size == 0 or current == np.float32:
        return np.dtype(current)
    whole = bool(np.all(values == np.floor(values)))
    if not whole or values.max() > np.iinfo(np.uint32).max:
        return np.dtype(np.float32)
    if values.max() > UINT16_MAX:
        return np.dtype(np.uint32)
    return np.dtype(current)


def index_dtype(n_genes: int) -> np.dtype:
    """16-bit gene indices when the genes fit, else 32-bit."""
    return np.dtype(np.uint16 if n_genes <= UINT16_MAX + 1 else np.int32)


class LogNormalisedCounts:
    """Cells x genes ``log1p(counts x factor)`` (factor = target sum / the cell's total), read a set of rows at a time.

    Parameters
    ----------
    counts
        Stored counts, row after row (uint16, uint32 or float32).
    indices
        Gene (column) of each stored count.
    indptr
        ``n_cells + 1`` offsets of the rows in ``counts`` (int64).
    factors
        float32 size factor of every cell.
    n_genes
        Columns.
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, counts: np.ndarray, indices: np.ndarray, indptr: np.ndarray, factors: np.ndarray, n_genes: int):
        self.counts, self.indices = counts, indices
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.factors = np.asarray(factors, dtype=np.float32)
        n_cells = self.indptr.size - 1
        if self.factors.shape != (n_cells,) or counts.shape != indices.shape or self.indptr[-1] != counts.size:
            raise ValueError(f"Inconsistent arrays: {n_cells} rows, {self.factors.size} factors, "
                             f"{counts.size} counts, {indices.size} indices, last offset {self.indptr[-1]}.")
        self.shape = (n_cells, int(n_genes))

    @property
    def nnz(self) -> int:
        """Stored entries."""
        return int(self.counts.size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return int(self.counts.nbytes + self.indices.nbytes + self.indptr.nbytes + self.factors.nbytes)

    def rows(self, positions) -> sp.csr_matrix:
        """The log-normalised rows at ``positions`` (integer positions, in any order, repeats allowed; or a slice).

        Returns
        -------
        scipy.sparse.csr_matrix
            len(positions) x genes, float32 with 32-bit indices.
        """
        if isinstance(positions, slice):
            positions = np.arange(self.shape[0])[positions]
        positions = np.asarray(positions)
        if positions.dtype == bool:
            if positions.shape != (self.shape[0],):
                raise IndexError(f"A boolean row mask must have {self.shape[0]} entries, got {positions.shape}.")
            positions = np.flatnonzero(positions)
        positions = positions.astype(np.int64).ravel()
        if positions.size and (positions.min() < -self.shape[0] or positions.max() >= self.shape[0]):
            raise IndexError(f"Row positions must lie in [0, {self.shape[0]}).")
        positions = np.where(positions < 0, positions + self.shape[0], positions)
        starts = self.indptr[positions]
        lengths = self.indptr[positions + 1] - starts
        indptr = np.zeros(positions.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # entry j of the result comes from starts[row] + (j - indptr[row]): one gather for all rows
        gather = np.arange(indptr[-1], dtype=np.int64) + np.repeat(starts - indptr[:-1], lengths)
        values = self.counts[gather].astype(np.float32)
        values *= np.repeat(self.factors[positions], lengths)
        np.log1p(values, out=values)
        return sp.csr_matrix((values, self.indices[gather].astype(np.int32), indptr), shape=(positions.size, self.shape[1]))

    def __getitem__(self, key) -> sp.csr_matrix:
        """Rows (``m[rows]``), or rows and columns (``m[rows, columns]``), as a float32 CSR."""
        columns = slice(None)
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(f"Index with m[rows] or m[rows, columns], got {len(key)} indices.")
            key, columns = key
        if isinstance(key, (int, np.integer)):
            key = [key]
        block = self.rows(key)
        return block if isinstance(columns, slice) and columns == slice(None) else block[:, columns].tocsr()

    def to_csr(self) -> sp.csr_matrix:
        """The whole matrix as a float32 CSR (8 bytes per stored entry: for data that fits in memory twice)."""
        return self.rows(slice(None))

    def toarray(self) -> np.ndarray:
        """The whole matrix, dense (small data only)."""
        return self.to_csr().toarray()

    def __repr__(self) -> str:
        return (f"LogNormalisedCounts({self.shape[0]} cells x {self.shape[1]} genes, {self.nnz} stored counts as "
                f"{self.counts.dtype}, {self.nbytes / 2**20:.1f} MiB)")
