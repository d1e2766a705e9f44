"""Access to a count matrix by rows, whatever holds it.

Models never touch ``adata.X`` directly: they ask a :class:`CountMatrix` for the rows of a
minibatch. The matrix stays in its host format (scipy sparse, dense numpy, or an h5py-backed
sparse dataset of a backed AnnData) and only the requested rows are densified.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .on_disk import DiskCSR, is_disk_csr, reopenable

# rows are validated in chunks so a backed (on-disk) matrix never has to fit in memory
_VALIDATION_CHUNK = 10_000
#: a minibatch's entry ``<counts key> + POSITIONS_SUFFIX`` holds where its stored counts are
#: (:meth:`CountMatrix.rows_and_positions`), or None
POSITIONS_SUFFIX = "_positions"


def _is_backed(matrix) -> bool:
    return not isinstance(matrix, np.ndarray) and not sp.issparse(matrix)


def stored_x(adata):
    """``adata.X``, or None when the file behind a backed AnnData has none (anndata raises a bare ``KeyError``)."""
    try:
        return adata.X
    except KeyError:
        return None


def fingerprint(matrix) -> dict:
    """A cheap summary of a count matrix: shape, dtype, number of nonzero entries and their sum.

    Setup records it after validating the counts; later reads of the same object validate
    again only if it changed. The sum catches the common in-place mistakes after setup
    (``sc.pp.normalize_total``, ``sc.pp.log1p``), which keep shape, dtype and nonzeros.

    Parameters
    ----------
    matrix
        ``scipy.sparse`` matrix, dense array or a backed AnnData sparse dataset.

    Returns
    -------
    dict
        ``{"shape": [cells, features], "dtype": str, "nnz": int or None, "sum": float or None}``
        (JSON-ready; ``nnz`` and ``sum`` are None for a backed matrix, whose entries are not read).
    """
    if sp.issparse(matrix):
        nnz, total = int(matrix.nnz), float(np.sum(matrix.data, dtype=np.float64))
    elif isinstance(matrix, np.ndarray):
        nnz, total = int(np.count_nonzero(matrix)), float(np.sum(matrix, dtype=np.float64))
    else:
        nnz = total = None
    dtype = getattr(matrix, "dtype", None)
    return {"shape": [int(s) for s in matrix.shape], "dtype": None if dtype is None else str(np.dtype(dtype)), "nnz": nnz,
            "sum": total}


def _stored_entries(block) -> int:
    """Entries a block stores: a sparse block's stored values, a dense block's nonzeros (as :func:`fingerprint`)."""
    return int(block.nnz) if sp.issparse(block) else int(np.count_nonzero(block))


def _first_bad_row(block) -> int:
    """The first row of a block (sparse or dense) holding a NaN or Inf."""
    if sp.issparse(block):
        block = sp.csr_matrix(block)
        entry = int(np.flatnonzero(~np.isfinite(block.data))[0])
        return int(np.searchsorted(block.indptr, entry, side="right") - 1)
    return int(np.flatnonzero(~np.isfinite(np.asarray(block)).all(axis=1))[0])


class EmptyCellsError(ValueError):
    """Cells with zero total counts where every cell needs counts; ``name`` (e.g. ``"adata.layers['counts']"``) and
    ``rows`` (their positions) let a caller word the message for its own case (e.g. data given to a query)."""

    def __init__(self, message: str, name: str, rows: np.ndarray):
        super().__init__(message)
        self.name, self.rows = name, rows


class CountMatrix:
    """Row access to a cells x features matrix of raw counts.

    Parameters
    ----------
    matrix
        ``scipy.sparse`` matrix, dense ``numpy.ndarray`` or a backed AnnData sparse dataset.
    name
        What to call the matrix in error messages (e.g. ``"adata.layers['counts']"``).
    validate
        Check that the values are finite, non-negative integers and that every cell has a
        nonzero total.
    allow_empty_cells
        Accept cells with no counts (one modality of a multimodal measurement may be empty).
    """

    def __init__(self, matrix, name: str = "adata.X", validate: bool = True, allow_empty_cells: bool = False):
        if matrix is None:
            raise ValueError(f"{name} holds no matrix (it is None): this AnnData has no values there, e.g. the "
                             "results.h5ad that `fit --backed` writes, whose counts stay in the input file. Pass the file "
                             "that holds the counts, or the layer that does (layer=..., --layer).")
        self.allow_empty_cells = allow_empty_cells
        # of the matrix as given, before any format conversion below
        self.fingerprint = fingerprint(matrix)
        self.validated = False
        if sp.issparse(matrix) and not sp.isspmatrix_csr(matrix) and not isinstance(matrix, sp.csr_array):
            matrix = sp.csr_matrix(matrix)
        if isinstance(matrix, np.matrix):
            matrix = np.asarray(matrix)
        self.matrix = matrix
        self.name = name
        self.shape = tuple(int(s) for s in matrix.shape)
        if len(self.shape) != 2:
            raise ValueError(f"{name} must be a 2-d cells x features matrix, got shape {self.shape}.")
        if self.shape[0] == 0:
            raise ValueError(f"{name} has zero cells; nothing to fit.")
        if self.shape[1] == 0:
            raise ValueError(f"{name} has zero features (genes); nothing to fit.")
        self._totals = None
        self._stored = None  # stored entries counted in a pass over counts on disk (see content_summary)
        # an on-disk CSR (backed AnnData) is read as contiguous runs; other backed formats go through anndata. Both
        # open their file again if its handle is closed (anndata closes it in to_memory() or a write of the object)
        self.disk = DiskCSR(matrix) if _is_backed(matrix) and is_disk_csr(matrix) else None
        if self.disk is None and _is_backed(matrix):
            self.matrix = matrix = reopenable(matrix)
        self._held: tuple[np.ndarray, sp.csr_matrix] | None = None
        self._unique: bool | None = None  # see _entries_unique
        if validate:
            self.validate()

    @property
    def n_cells(self) -> int:
        return self.shape[0]

    @property
    def n_features(self) -> int:
        return self.shape[1]

    def chunks(self, chunk_size: int = _VALIDATION_CHUNK):
        """Consecutive blocks of rows, read one at a time (a backed matrix never has to fit in memory).

        Parameters
        ----------
        chunk_size
            Rows per block.

        Yields
        ------
        tuple
            ``(start, stop, block)``: the block holds rows ``start..stop-1`` in the host's format
            (sparse for a sparse or backed sparse matrix, dense for a dense one).
        """
        for start in range(0, self.n_cells, chunk_size):
            stop = min(start + chunk_size, self.n_cells)
            yield start, stop, self.disk.block(start, stop) if self.disk is not None else self.matrix[start:stop]

    @property
    def on_disk(self) -> bool:
        """Whether the counts stay in a file (a backed AnnData) and are read as rows are needed."""
        return _is_backed(self.matrix)

    def hold(self, indices: np.ndarray | None) -> None:
        """Read rows ``indices`` from disk now and keep them in memory for :meth:`rows` (None: drop them).

        Used to read a training buffer in one pass; a no-op for counts held in memory.
        """
        if self.disk is None or indices is None:
            self._held = None
            return
        kept = np.unique(np.asarray(indices, dtype=np.int64))
        self._held = (kept, self.disk.rows(kept))

    def _held_rows(self, indices: np.ndarray):
        """The held rows ``indices`` (sparse), or None when some of them are not held."""
        if self._held is None or self._held[0].size == 0:
            return None
        kept, block = self._held
        where = np.minimum(np.searchsorted(kept, indices), kept.size - 1)
        return block[where] if np.array_equal(kept[where], indices) else None

    def validate(self) -> None:
        """Raise ``ValueError`` on NaN/Inf, negative or non-integer counts, or empty cells."""
        totals = self._read_totals(self._check_block)
        empty = np.flatnonzero(totals <= 0)
        if empty.size == self.n_cells:
            raise ValueError(f"{self.name} has no counts at all ({self.n_cells} cells x {self.shape[1]} genes, every total 0); "
                             "pass the layer that holds the raw counts with `layer=`, or check how the data were loaded.")
        if empty.size and not self.allow_empty_cells:
            raise EmptyCellsError(
                f"{self.name} has {empty.size} cell(s) with zero total counts (first at row {empty[0]}). "
                "Remove them before setup, e.g. `sc.pp.filter_cells(adata, min_counts=1)`.", self.name, empty
            )
        self.validated = True

    def _check_block(self, start: int, block) -> None:
        """Raise ``ValueError`` on NaN/Inf, negative or non-integer values in a block of rows starting at ``start``."""
        values = block.data if sp.issparse(block) else np.asarray(block)
        if not np.all(np.isfinite(values)):
            raise ValueError(
                f"{self.name} contains NaN or Inf values (first at row {start + _first_bad_row(block)}). "
                "The models need raw counts; pass the raw count layer with `layer=`."
            )
        if values.size and values.min() < 0:
            raise ValueError(
                f"{self.name} contains negative values (min {values.min():g}). The models need "
                "raw counts, not scaled or centred data; pass the raw count layer with `layer=`."
            )
        if values.size and not np.all(values == np.round(values)):
            bad = values[values != np.round(values)][:3]
            raise ValueError(
                f"{self.name} contains non-integer values (e.g. {bad.tolist()}). The models need raw "
                "counts, not normalised or log-transformed data; pass the raw count layer with `layer=`."
            )

    def _read_totals(self, check=None) -> np.ndarray:
        """One pass over the rows, a block at a time: the totals per cell and the stored entries, kept (``check``:
        called on each block first, as ``check(start, block)``)."""
        totals = np.empty(self.n_cells, dtype=np.float64)
        stored = 0
        for start, stop, block in self.chunks():
            if check is not None:
                check(start, block)
            totals[start:stop] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()  # float16 overflowed at 65,504
            stored += _stored_entries(block)
        self._totals, self._stored = totals, stored
        return totals

    def totals(self) -> np.ndarray:
        """Total counts per cell (float64, length ``n_cells``)."""
        return self._read_totals() if self._totals is None else self._totals

    def content_summary(self) -> str:
        """The counts' stored entries and their sum, as ``"N entries, sum S"``: what tells these counts from others
        of the same shape (thinned, normalised, other cells) when a saved training state is taken up.

        In memory it is the :attr:`fingerprint`'s; on disk it is counted in the one pass over the file that validation
        or :meth:`totals` makes (kept), so that counts on disk are checked as counts in memory are, and the same file
        read either way gives the same summary.
        """
        if self.fingerprint["sum"] is not None:
            entries, total = self.fingerprint["nnz"], self.fingerprint["sum"]
        else:
            totals = self.totals()
            entries, total = self._stored, float(np.sum(totals, dtype=np.float64))
        return f"{entries} entries, sum {total:.12g}"

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Dense float32 rows ``indices`` (in the given order)."""
        return self.rows_and_positions(indices)[0]

    def rows_and_positions(self, indices: np.ndarray) -> tuple[np.ndarray, tuple | None]:
        """Dense float32 rows ``indices`` and, for sparse counts, where their stored entries are.

        Returns
        -------
        tuple
            ``(rows, positions)``; ``positions`` is ``(flat, column, row)`` (int64 arrays: the
            flat position in ``rows``, the feature and the row of every stored entry; each
            position once), or None for dense counts. The likelihood evaluates its count-only
            terms there instead of searching the dense rows for non-zeros (see
            :class:`~pyro_scmodels.distributions.GammaPoissonMean`).
        """
        indices = np.asarray(indices)
        if self.disk is not None:
            block = self._held_rows(indices)
            block = self.disk.rows(indices) if block is None else block
            return block.toarray().astype(np.float32, copy=False), stored_positions(block, unique=False)
        if _is_backed(self.matrix):
            # h5py-backed datasets need strictly increasing indices: read each row once, sorted, then expand
            unique, inverse = np.unique(indices, return_inverse=True)
            block = self.matrix[unique]
            block = block.toarray() if sp.issparse(block) else np.asarray(block)
            return block[inverse.reshape(-1)].astype(np.float32, copy=False), None
        block = self.matrix[indices]
        if sp.issparse(block):
            positions = stored_positions(block, unique=self._entries_unique())
            return block.toarray().astype(np.float32, copy=False), positions
        return np.asarray(block, dtype=np.float32), None

    def _entries_unique(self) -> bool:
        """Whether no (row, column) is stored twice in the in-memory sparse matrix (checked once).

        A canonical CSR says so itself; otherwise (e.g. unsorted indices, common in files) the
        rows are checked a chunk at a time, once, rather than every minibatch's rows.
        """
        if self._unique is None:
            self._unique = bool(self.matrix.has_canonical_format) or all(
                _without_duplicates(block) for _, _, block in self.chunks())
        return self._unique

    def column_means(self, weights: np.ndarray | None = None, groups: np.ndarray | None = None, n_groups: int = 1,
                     nonzero: bool = False):
        """Per-group weighted column means: ``sum_n w_n x_n / count`` for each group.

        With ``nonzero``, ``x_n`` is replaced by the indicator ``x_n > 0`` (the fraction of cells
        expressing each feature). Returns an array of shape ``(n_groups, n_features)``.
        """
        weights = np.ones(self.n_cells) if weights is None else np.asarray(weights, dtype=np.float64)
        groups = np.zeros(self.n_cells, dtype=np.int64) if groups is None else np.asarray(groups)
        sums = np.zeros((n_groups, self.n_features))
        counts = np.bincount(groups, minlength=n_groups).astype(np.float64)
        for start, stop, block in self.chunks():
            g = groups[start:stop]
            # a sparse one-hot of group membership turns the grouped sum into one product
            member = sp.csr_matrix(
                (weights[start:stop], (g, np.arange(stop - start))), shape=(n_groups, stop - start)
            )
            if nonzero:
                block = block.copy() if sp.issparse(block) else np.asarray(block)
                if sp.issparse(block):
                    # an entry stored twice counted twice (proportions up to 2): summed first, as scipy reads it
                    block = sp.csr_matrix(block)
                    block.sum_duplicates()
                    block.data = (block.data > 0).astype(np.float64)
                else:
                    block = (block > 0).astype(np.float64)
            product = member @ block
            sums += product.toarray() if sp.issparse(product) else np.asarray(product)
        return sums / np.maximum(counts, 1.0)[:, None]

    def to_torch_csr(self, device: torch.device) -> "DeviceCSR":
        """The whole matrix as a CSR held on ``device`` (device-backed mode)."""
        matrix = self.matrix
        if self.disk is not None:
            matrix = self.disk.block(0, self.n_cells)
        elif _is_backed(matrix):
            matrix = matrix[:]
        matrix = sp.csr_matrix(matrix, copy=True)
        matrix.sum_duplicates()  # the device gather writes each (row, column) once; the host path sums duplicates
        return DeviceCSR(matrix, device)


def _without_duplicates(block) -> bool:
    """Whether a sparse block stores each (row, column) at most once."""
    summed = sp.csr_matrix(block, copy=True)
    summed.sum_duplicates()
    return summed.nnz == block.nnz


def stored_positions(block, unique: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(flat, column, row)`` of every stored entry of a CSR block (int64), or None.

    ``flat = row * n_columns + column`` indexes the block densified and flattened. Read off the
    CSR structure in O(stored entries), against a search of the dense block for its non-zeros.
    A position stored twice would be counted twice, so a block that is not canonical gives
    None unless ``unique`` says that its entries are known to be distinct (unsorted only).
    """
    block = sp.csr_matrix(block)
    if not unique and not block.has_canonical_format:
        return None
    row = np.repeat(np.arange(block.shape[0], dtype=np.int64), np.diff(block.indptr))
    column = block.indices.astype(np.int64)
    return row * block.shape[1] + column, column, row


class DeviceCSR:
    """A CSR matrix held on a torch device, densified a minibatch at a time on that device."""

    def __init__(self, matrix: sp.csr_matrix, device: torch.device):
        self.n_features = matrix.shape[1]
        self.indptr = torch.as_tensor(matrix.indptr.astype(np.int64), device=device)
        self.indices = torch.as_tensor(matrix.indices.astype(np.int64), device=device)
        self.data = torch.as_tensor(matrix.data.astype(np.float32), device=device)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dense rows ``index`` (a long tensor on the same device)."""
        return self.rows_and_positions(index)[0]

    def rows_and_positions(self, index: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Dense rows ``index`` and ``(flat, column, row)`` of their stored entries (see :func:`stored_positions`)."""
        starts = self.indptr[index]
        lengths = self.indptr[index + 1] - starts
        row_of_entry = torch.repeat_interleave(torch.arange(index.numel(), device=index.device), lengths)
        # position of each stored entry: its row's start plus its rank within the row
        offsets = torch.cumsum(lengths, 0) - lengths
        rank = torch.arange(row_of_entry.numel(), device=index.device) - offsets[row_of_entry]
        entry = starts[row_of_entry] + rank
        dense = torch.zeros(index.numel(), self.n_features, device=index.device)
        column = self.indices[entry]
        dense[row_of_entry, column] = self.data[entry]
        return dense, (row_of_entry * self.n_features + column, column, row_of_entry)
