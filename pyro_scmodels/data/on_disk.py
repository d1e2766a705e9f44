"""Counts that stay on disk: contiguous reads of a stored CSR matrix, and a minibatch order made for them.

An AnnData opened with ``backed="r"`` keeps ``X`` in its file as three arrays (``data``,
``indices``, ``indptr``: anndata's on-disk CSR format). Cells ``a..b-1`` are one contiguous
slice of ``data`` and of ``indices``, so a block of neighbouring cells costs about one read,
while every scattered cell costs a read of its own. :class:`DiskCSR` holds ``indptr`` in memory
(8 bytes a cell) and reads any set of cells as a few contiguous runs.

Training from disk then follows the scheme of scverse's ``annbatch``: the cells are cut into
chunks of neighbouring cells, the chunks are shuffled, and the cells of a buffer of chunks are
shuffled again before they are cut into minibatches (:func:`chunk_shuffled_order`); a buffer's
rows are read ahead in one pass (:meth:`DiskCSR.rows` over their sorted positions).
``annbatch`` itself needs Python >= 3.12; this package supports 3.11, and anndata's own backed
reader re-reads ``indptr`` and goes row by row (9-12 thousand 1,024-cell minibatch cells a second
against 46-54 thousand for this reader on the same files: ``benchmarks/RESULTS.md``, "Scale from disk").

In a data-parallel run each minibatch's cells are grouped by chunk (:func:`chunk_grouped_minibatches`)
before the ranks take their contiguous shards, so a rank's shards of a buffer come from about 1 / W
of its chunks and the ranks together read the file about once per epoch; the minibatches, as sets of
cells, are the same for any number of ranks.

A backed file's handle can be closed under the model (anndata closes it in ``to_memory()``, ``adata.file.close()``
and when the object is written elsewhere): :class:`FileReopener` opens it again and refuses a file that now holds
other counts. :class:`DiskCSR` and :class:`BackedMatrix` (backed dense matrices, and CSC ones read by slices of
cells as NDreamer reads them; models refuse CSC: :func:`refuse_backed_csc`) read through it.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp

# cells of one on-disk chunk, and chunks per shuffling buffer (16,384 cells: tens of MB of sparse rows)
CHUNK_CELLS = 256
BUFFER_CHUNKS = 64
# sorted positions closer than this are read as one run (reading a few unwanted rows is cheaper than a new read)
MAX_GAP = 32


def is_disk_csr(matrix) -> bool:
    """Whether ``matrix`` is a backed AnnData CSR dataset whose arrays :class:`DiskCSR` can slice."""
    group = getattr(matrix, "group", None)
    return getattr(matrix, "format", None) == "csr" and group is not None and all(k in group for k in ("data", "indices", "indptr"))


def refuse_backed_csc(matrix, name: str) -> None:
    """Raise before any reading when ``matrix`` is a backed AnnData matrix stored as CSC.

    A cell's counts are spread over every column of a CSC matrix, so reading any set of cells reads every stored
    entry: anndata loads the whole matrix (``to_memory()``) for each minibatch and each query, which a backed
    AnnData is opened to avoid.

    Parameters
    ----------
    matrix
        The count matrix as stored (``adata.X`` or a layer).
    name
        What to call it in the message, e.g. ``"adata.X"``.

    Raises
    ------
    ValueError
        Naming the matrix, its file and the two fixes (load it, or a CSR copy of the file).
    """
    if sp.issparse(matrix) or getattr(matrix, "format", None) != "csc":  # in memory: converted to CSR rows
        return
    source = _h5py_source(getattr(matrix, "group", None))
    where = f" in {source[0]}" if source is not None else ""
    if name.startswith("mdata"):  # a modality of a MuData read with read_h5mu(path, backed=True)
        load, copy = "`mdata = mudata.read_h5mu(path)` (not backed)", (
            f"`m = mudata.read_h5mu(path); {name.replace('mdata', 'm', 1)} = {name.replace('mdata', 'm', 1)}.tocsr(); "
            "m.write('counts_csr.h5mu')`, then `mudata.read_h5mu('counts_csr.h5mu', backed=True)`")
    else:
        load, copy = "`adata = adata.to_memory()`", (
            f"`a = anndata.read_h5ad(path); {name.replace('adata', 'a', 1)} = {name.replace('adata', 'a', 1)}.tocsr(); "
            "a.write_h5ad('counts_csr.h5ad')`, then `anndata.read_h5ad('counts_csr.h5ad', backed='r')`")
    raise ValueError(
        f"{name} is stored on disk as CSC (compressed sparse columns){where}. A cell's counts are spread over every "
        "column there, so anndata would read the whole matrix into memory for every minibatch and every query, which "
        f"reading from disk exists to avoid. Either load it, when it fits in memory: {load} (the counts are then "
        f"read as CSR rows); or make a CSR copy of the file once and open that backed: {copy} (the copy needs the matrix "
        "in memory once: anndata has no out-of-core CSC-to-CSR conversion). On the command line: leave out --backed, or give the CSR copy to --backed.")


def _content_probe(arrays, width: int = 4096, points: int = 64, inner: int = 16) -> tuple:
    """Slices along the first axis of ``arrays`` (all as long): ``width`` from the start and the end, ``inner`` at
    ``points`` evenly spaced places. A few thousand stored entries (values and columns of a sparse matrix, or rows of
    a dense one) tell a rewritten file (reordered cells, scaled counts) from the one read, for a few reads."""
    n = int(arrays[0].shape[0])
    starts = sorted({0, max(n - width, 0), *np.linspace(0, max(n - 1, 0), points).astype(np.int64).tolist()})
    parts = []
    for start in starts:
        stop = min(start + (width if start in (0, max(n - width, 0)) else inner), n)
        parts.append(tuple(np.asarray(array[start:stop]).tobytes() for array in arrays))
    return n, tuple(parts)


def _sparse_parts(group) -> tuple | None:
    """``(data, indices, indptr)`` of a group holding a compressed sparse matrix, or None when it holds none."""
    if group is None or not all(k in group for k in ("data", "indices", "indptr")):
        return None
    return group["data"], group["indices"], group["indptr"]


def stored_sample(matrix) -> str | None:
    """A digest of a sample of a backed matrix's stored entries (the probe :class:`FileReopener` compares), or None for
    a matrix in memory.

    A few thousand entries (the first and last 4,096 values and columns, 16 at 64 places between; with the row
    offsets at the same places; a dense matrix's rows likewise) tell counts rewritten in the file (``backed="r+"``:
    ``sc.pp.log1p(adata, chunked=True)``, scaled or reordered cells) for a few dozen small reads; an edit of a few
    cells between the sampled places goes unseen.

    Parameters
    ----------
    matrix
        ``adata.X`` (or a layer) as stored: anndata's backed sparse dataset, an h5py or zarr dataset, or a matrix in
        memory.
    """
    if sp.issparse(matrix) or isinstance(matrix, np.ndarray) or not hasattr(matrix, "shape"):
        return None
    import hashlib

    parts = _sparse_parts(getattr(matrix, "group", None))
    if parts is not None:
        probe = (_content_probe(parts[:2]), _content_probe(parts[2:]))
    else:  # whole rows, as _same_dense reads them
        probe = _content_probe((matrix,), width=max(1, 4096 // max(int(matrix.shape[1]), 1)), inner=1)
    return hashlib.blake2b(repr(probe).encode(), digest_size=16).hexdigest()


def _h5py_source(node) -> tuple[str, str] | None:
    """The HDF5 file and the name in it of an h5py group or dataset; None for any other store (zarr, memory)."""
    file = getattr(node, "file", None)
    return (file.filename, node.name) if hasattr(file, "filename") and hasattr(node, "id") else None


class FileReopener:
    """Opens the HDF5 file behind a lazily read group or dataset again when its handle was closed under us.

    anndata closes a backed object's file in ``to_memory()``, in ``adata.file.close()`` and when the object is
    written elsewhere (``write_h5ad`` of a copy); the h5py objects read from then fail with h5py's own messages.

    Parameters
    ----------
    node
        The h5py group or dataset read from.
    same_content
        Whether a node of the file opened again holds what ``node`` held (``node -> bool``): the file at that path
        may have been rewritten since (other counts, or the cells in another order), and the rows would be read at
        the old places without a word.
    """

    def __init__(self, node, same_content):
        self.source = _h5py_source(node)
        self._same_content = same_content
        self.opened = None  # the h5py.File opened again, once it was (kept open while it is read)

    def reopened(self, handle):
        """The node opened again from its file when ``handle`` (an h5py object of it) is closed; else None.

        Raises
        ------
        FileNotFoundError
            The file is no longer at its path.
        ValueError
            The file there holds other counts than the ones read.
        """
        identifier = getattr(handle, "id", None)
        if identifier is None or identifier.valid or self.source is None:
            return None
        import h5py

        filename, name = self.source
        if not os.path.exists(filename):
            raise FileNotFoundError(f"The file {filename}, whose counts this model reads, is no longer there.")
        reopened = h5py.File(filename, "r")
        node = reopened[name] if name in reopened else None
        if node is None or not self._same_content(node):
            reopened.close()
            raise ValueError(f"The file {filename} holds other counts than when they were read (other cells, another "
                             "order or other values), so its rows no longer sit where they did. Open it again "
                             "(anndata.read_h5ad(path, backed='r')) and set the model up on it.")
        self.opened = reopened
        return node


def _same_sparse(indptr: np.ndarray, probe: tuple):
    """``group -> bool``: whether a group holds a sparse matrix of these offsets and this content probe (a write of
    .obs or .uns, or a touch, changes neither)."""
    def same(group) -> bool:
        parts = _sparse_parts(group)
        return (parts is not None and parts[2].shape == indptr.shape and np.array_equal(parts[2][:], indptr)
                and _content_probe(parts[:2]) == probe)
    return same


class DiskCSR:
    """Rows of an on-disk CSR matrix, read as contiguous runs.

    Parameters
    ----------
    dataset
        A backed AnnData sparse dataset in CSR format (``adata.X`` of ``read_h5ad(..., backed="r")``);
        any group holding ``data``, ``indices`` and ``indptr`` arrays that slice like numpy (h5py or zarr).
    """

    def __init__(self, dataset):
        if not is_disk_csr(dataset):
            raise ValueError(f"{type(dataset).__name__} is not an on-disk CSR matrix (a group with data, indices and "
                             "indptr); CSC or dense backed matrices are read through anndata (see BackedMatrix).")
        group = dataset.group
        self.shape = tuple(int(s) for s in dataset.shape)
        self.dtype = dataset.dtype
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self._data, self._indices = group["data"], group["indices"]
        self._reopener = FileReopener(group, _same_sparse(self.indptr, _content_probe((self._data, self._indices))))

    @property
    def _reopened(self):
        """The h5py.File opened again after the first was closed, or None."""
        return self._reopener.opened

    def _open_if_closed(self) -> None:
        group = self._reopener.reopened(self._data)
        if group is not None:
            self._data, self._indices = group["data"], group["indices"]

    def block(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start..stop-1`` as an in-memory CSR matrix (one read of each array)."""
        self._open_if_closed()
        a, b = self.indptr[start], self.indptr[stop]
        return sp.csr_matrix((self._data[a:b], self._indices[a:b], self.indptr[start : stop + 1] - a),
                             shape=(stop - start, self.shape[1]))

    def rows(self, positions: np.ndarray, max_gap: int = MAX_GAP) -> sp.csr_matrix:
        """Rows ``positions`` (any order, repeats allowed) as a CSR matrix in that order.

        The sorted positions are split into runs wherever two neighbours are more than ``max_gap``
        rows apart; each run is one :meth:`block` read, from which its rows are taken.
        """
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        if positions.min() < 0 or positions.max() >= self.shape[0]:
            raise IndexError(f"cell positions must lie in 0..{self.shape[0] - 1}, got {positions.min()}..{positions.max()}.")
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        runs = np.split(ordered, np.flatnonzero(np.diff(ordered) > max_gap) + 1)
        stacked = sp.vstack([self.block(run[0], run[-1] + 1)[run - run[0]] for run in runs], format="csr")
        restore = np.empty_like(order)
        restore[order] = np.arange(order.size)
        return stacked[restore]


def _sparse_dataset(group):
    """anndata's backed sparse dataset of an h5py group (``anndata.io`` from 0.11, ``anndata.experimental`` before)."""
    try:
        from anndata.io import sparse_dataset
    except ImportError:  # anndata < 0.11
        from anndata.experimental import sparse_dataset
    return sparse_dataset(group)


def _same_dense(dataset):
    """``node -> bool``: whether a node is a dense dataset of the shape, dtype and content probe of ``dataset``."""
    # whole rows: a few thousand values at each end, one row at each inner point
    width = max(1, 4096 // max(int(dataset.shape[1]), 1))
    shape, dtype, probe = tuple(dataset.shape), dataset.dtype, _content_probe((dataset,), width=width, inner=1)

    def same(node) -> bool:
        return (tuple(getattr(node, "shape", ())) == shape and getattr(node, "dtype", None) == dtype
                and _content_probe((node,), width=width, inner=1) == probe)
    return same


class BackedMatrix:
    """A backed CSC or dense matrix, read through anndata or h5py as before, whose file is opened again (and checked
    to hold the same counts) when its handle was closed, as :class:`DiskCSR` does.

    Parameters
    ----------
    matrix
        ``adata.X`` (or a layer) of ``read_h5ad(..., backed="r")``: anndata's CSC dataset or an h5py dataset.
        Use :func:`reopenable` to wrap only what lives in an HDF5 file.
    """

    def __init__(self, matrix):
        self.matrix = matrix
        self.shape = tuple(int(s) for s in matrix.shape)
        self.dtype = matrix.dtype
        group = getattr(matrix, "group", None)
        self._sparse = _sparse_parts(group) is not None
        # a sparse dataset is read through its group; a dense one is itself the h5py dataset
        self._node = group if self._sparse else matrix
        if self._sparse:
            data, indices, indptr = _sparse_parts(group)
            same = _same_sparse(np.asarray(indptr[:], dtype=np.int64), _content_probe((data, indices)))
        else:
            same = _same_dense(matrix)
        self._reopener = FileReopener(self._node, same)

    def __getitem__(self, key):
        node = self._reopener.reopened(self._node)
        if node is not None:
            self._node = node
            self.matrix = _sparse_dataset(node) if self._sparse else node
        return self.matrix[key]


def reopenable(matrix):
    """``matrix`` as a :class:`BackedMatrix` when it is a backed CSC or dense matrix in an HDF5 file; else itself
    (memory, zarr, or any other store, which has no handle to close)."""
    group = getattr(matrix, "group", None)
    node = group if _sparse_parts(group) is not None else matrix
    if _h5py_source(node) is None or getattr(matrix, "ndim", len(getattr(matrix, "shape", ()))) != 2:
        return matrix
    return BackedMatrix(matrix)


def chunk_shuffled_order(indices: np.ndarray, rng: np.random.Generator, chunk_cells: int | None = None,
                         buffer_chunks: int | None = None, return_chunk_rank: bool = False):
    """An epoch's order of ``indices`` for reading from disk: shuffled chunks, shuffled within buffers.

    The sorted cells are cut into chunks of ``chunk_cells`` neighbours; the chunks are put in a
    random order; each run of ``buffer_chunks`` chunks (a buffer) is shuffled cell by cell.
    Every cell appears once. A minibatch cut from this order draws its cells from a whole buffer
    (``chunk_cells * buffer_chunks`` cells from ``buffer_chunks`` places in the file).

    Parameters
    ----------
    indices
        The cells of the epoch (positions).
    rng
        The epoch's generator.
    chunk_cells, buffer_chunks
        Chunk length and chunks per buffer; default :data:`CHUNK_CELLS` and :data:`BUFFER_CHUNKS`.
    return_chunk_rank
        Also return, per cell of the order, the place of its chunk in the epoch's chunk order.

    Returns
    -------
    numpy.ndarray or (numpy.ndarray, numpy.ndarray)
        A permutation of ``indices`` (and the chunk rank of each of its cells).
    """
    chunk_cells = CHUNK_CELLS if chunk_cells is None else chunk_cells
    buffer_chunks = BUFFER_CHUNKS if buffer_chunks is None else buffer_chunks
    cells = np.sort(np.asarray(indices))
    chunks = [cells[s : s + chunk_cells] for s in range(0, cells.size, chunk_cells)]
    order = rng.permutation(len(chunks))
    buffers, ranks = [], []
    for start in range(0, len(order), buffer_chunks):
        picked = order[start : start + buffer_chunks]
        buffer = np.concatenate([chunks[i] for i in picked])
        rank = np.repeat(np.arange(start, start + len(picked)), [len(chunks[i]) for i in picked])
        shuffle = rng.permutation(buffer.size)
        buffers.append(buffer[shuffle])
        ranks.append(rank[shuffle])
    if not buffers:
        return (cells, np.zeros(0, dtype=np.int64)) if return_chunk_rank else cells
    return (np.concatenate(buffers), np.concatenate(ranks)) if return_chunk_rank else np.concatenate(buffers)


def chunk_grouped_minibatches(order: np.ndarray, chunk_rank: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Minibatches cut from a chunk-shuffled order, each with its cells grouped by chunk.

    A minibatch holds the same cells as a plain cut of ``order``; only their order within it
    changes. Data-parallel ranks take contiguous shards of a minibatch, so rank r then takes cells
    of the r-th share of the buffer's chunks in nearly every minibatch, and reads about 1 / W of
    the buffer instead of every chunk.
    """
    out = []
    for start in range(0, order.size, batch_size):
        keys = chunk_rank[start : start + batch_size]
        out.append(order[start : start + batch_size][np.argsort(keys, kind="stable")])
    return out


def read_ahead_groups(minibatches: list[np.ndarray], buffer_cells: int | None = None):
    """Consecutive minibatches gathered into groups of about ``buffer_cells`` cells, each read from disk at once.

    ``buffer_cells`` defaults to one buffer of :func:`chunk_shuffled_order`.

    Yields
    ------
    list of numpy.ndarray
        The minibatches of one group, in order.
    """
    buffer_cells = CHUNK_CELLS * BUFFER_CHUNKS if buffer_cells is None else buffer_cells
    group, size = [], 0
    for batch in minibatches:
        group.append(batch)
        size += len(batch)
        if size >= buffer_cells:
            yield group
            group, size = [], 0
    if group:
        yield group
