"""Counts read from disk: contiguous runs of an on-disk CSR, the chunk-shuffled epoch order, and
training from a backed AnnData that reads each buffer once and serves the same rows as memory."""

import anndata
import numpy as np
import pandas as pd
import pytest

import pyro_scmodels as ps
from pyro_scmodels.data import on_disk
from pyro_scmodels.data.on_disk import DiskCSR, chunk_shuffled_order, read_ahead_groups

from ._on_disk_files import write_counts_h5ad

QUICK = dict(n_hidden=16, n_latent=4)
TRAIN = dict(batch_size=50, device="cpu", progress_bar=False, kl_warmup_epochs=1)


@pytest.fixture(scope="module")
def on_file(tmp_path_factory):
    """600 simulated cells with their raw counts in X, written to an h5ad; (in-memory AnnData, path)."""
    adata = ps.datasets.simulate(n_cells=600, n_genes=40, n_markers_per_type=4, n_responding_genes=4, seed=5)
    return adata, write_counts_h5ad(adata, tmp_path_factory.mktemp("disk") / "cells.h5ad")


def test_rows_in_any_order_with_repeats_equal_memory(on_file):
    adata, path = on_file
    backed = anndata.read_h5ad(path, backed="r")
    disk = DiskCSR(backed.X)
    rng = np.random.default_rng(0)
    for positions in (rng.choice(600, 70, replace=True), np.array([599, 0, 300, 300, 1]), np.arange(100, 400)):
        for gap in (0, 32, 1000):  # one read per cell, a few runs, one run
            np.testing.assert_array_equal(disk.rows(positions, max_gap=gap).toarray(), adata.X[positions].toarray())
    np.testing.assert_array_equal(disk.block(17, 230).toarray(), adata.X[17:230].toarray())
    with pytest.raises(IndexError, match="0..599"):
        disk.rows(np.array([3, 600]))


def test_a_file_rewritten_after_its_handle_closed_is_refused(on_file, tmp_path):
    # the rows were read again, from the new file, at the old offsets: a latent matching neither order of the cells
    import os

    import h5py

    adata, _ = on_file
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)  # X holds the counts (the fixture put them there)
    backed = anndata.read_h5ad(path, backed="r")
    disk = DiskCSR(backed.X)
    expected = disk.block(0, 5).toarray()

    def reopen_after(change):
        backed.file.close()  # anndata closes a backed file, e.g. in to_memory() or when the object is written elsewhere
        if disk._reopened is not None:
            disk._reopened.close()
        change()
        return disk.block(0, 5).toarray()

    # a touch, or an r+ open that writes nothing to the counts (it rewrites the superblock): the same counts
    np.testing.assert_array_equal(reopen_after(lambda: os.utime(path)), expected)
    np.testing.assert_array_equal(reopen_after(lambda: h5py.File(path, "r+").close()), expected)
    stamp = os.stat(path)
    # the same cells in another order, the modification time put back (as a network file system may show it)
    reopen = lambda: (adata[::-1].copy().write_h5ad(path), os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns)))  # noqa
    with pytest.raises(ValueError, match="holds other counts than when they were read"):
        reopen_after(reopen)
    scaled = adata.copy()
    scaled.X = scaled.X * 3  # the same sparsity, other values
    with pytest.raises(ValueError, match="holds other counts than when they were read"):
        reopen_after(lambda: scaled.write_h5ad(path))
    with pytest.raises(FileNotFoundError, match="is no longer there"):
        reopen_after(lambda: path.unlink())


def test_a_backed_dense_or_csc_matrix_reads_repeated_and_unsorted_rows(on_file, tmp_path):
    # h5py needs strictly increasing indices: a repeated cell (indices=[3, 3]) failed inside h5py
    from pyro_scmodels.data import CountMatrix

    adata, _ = on_file
    for name, matrix in (("dense", adata.X.toarray()), ("csc", adata.X.tocsc())):
        written = anndata.AnnData(matrix, obs=adata.obs[[]], var=adata.var[[]])
        written.write_h5ad(tmp_path / f"{name}.h5ad")
        backed = anndata.read_h5ad(tmp_path / f"{name}.h5ad", backed="r")
        rows, _ = CountMatrix(backed.X, name="adata.X", validate=False).rows_and_positions(np.array([5, 2, 5, 3, 3]))
        np.testing.assert_array_equal(rows, adata.X[[5, 2, 5, 3, 3]].toarray())


def test_csc_or_dense_backed_matrices_are_refused_by_name():
    with pytest.raises(ValueError, match="not an on-disk CSR"):
        DiskCSR(np.zeros((3, 2)))


def test_chunk_shuffled_order_is_a_permutation_mixing_distant_chunks():
    cells = np.sort(np.random.default_rng(1).choice(10_000, 6_000, replace=False))
    order = chunk_shuffled_order(cells, np.random.default_rng(2), chunk_cells=100, buffer_chunks=8)
    np.testing.assert_array_equal(np.sort(order), cells)
    chunk_of = {cell: i // 100 for i, cell in enumerate(cells)}
    first_batch = order[:64]
    # a minibatch comes from several chunks of its buffer, and only from that buffer's 8 chunks
    assert 4 <= len({chunk_of[c] for c in first_batch}) <= 8
    assert len({chunk_of[c] for c in order[:800]}) == 8
    again = chunk_shuffled_order(cells, np.random.default_rng(2), chunk_cells=100, buffer_chunks=8)
    np.testing.assert_array_equal(order, again)
    groups = list(read_ahead_groups([order[s:s + 64] for s in range(0, 6000, 64)], buffer_cells=800))
    assert [sum(map(len, g)) for g in groups[:-1]] == [832] * (len(groups) - 1)
    np.testing.assert_array_equal(np.concatenate([b for g in groups for b in g]), order)


def test_training_from_disk_reads_each_buffer_once_and_serves_the_right_rows(on_file, monkeypatch):
    adata, path = on_file
    backed = anndata.read_h5ad(path, backed="r")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    model = ps.RegularizedVI(backed, seed=0, **QUICK)
    monkeypatch.setattr(on_disk, "CHUNK_CELLS", 40)
    monkeypatch.setattr(on_disk, "BUFFER_CHUNKS", 4)
    reads, served = [], []
    original_rows, original_minibatch = DiskCSR.rows, ps.data.CellData.minibatch

    def counting_rows(self, positions, max_gap=on_disk.MAX_GAP):
        reads.append(len(positions))
        return original_rows(self, positions, max_gap)

    def checked_minibatch(self, indices):
        batch = original_minibatch(self, indices)
        served.append(len(indices))
        # every minibatch, from the held buffer or from disk, holds exactly these cells' counts
        np.testing.assert_array_equal(batch["x"].numpy(), adata.X[np.asarray(indices)].toarray())
        return batch

    monkeypatch.setattr(DiskCSR, "rows", counting_rows)
    monkeypatch.setattr(ps.data.CellData, "minibatch", checked_minibatch)
    model.train(max_epochs=2, **TRAIN)
    n_train = len(model.trainer.train_indices)
    assert n_train == 540 and sum(served) >= 2 * n_train
    # training reads: 160-cell buffers of 50-cell minibatches (4 per read-ahead), each read once; the
    # rest are the prepare pass and validation, in file order
    n_validation_batches = 2 * int(np.ceil(60 / 50))
    per_epoch = int(np.ceil(np.ceil(n_train / 50) / 4))
    assert len(reads) == 1 + 2 * per_epoch + n_validation_batches
    assert model.history["train_loss"].notna().all()


def test_model_trained_from_disk_matches_one_trained_in_memory(on_file):
    """Same data, same settings: the epoch order differs (chunks from disk), the fit does not."""
    adata, path = on_file
    memory = adata.copy()
    ps.RegularizedVI.setup_anndata(memory, batch_key="batch")
    backed = anndata.read_h5ad(path, backed="r")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    losses = []
    for data in (memory, backed):
        model = ps.RegularizedVI(data, seed=0, **QUICK)
        model.train(max_epochs=30, **TRAIN)
        losses.append(model.history["validation_loss"].dropna().iloc[-5:].mean())
        latent = model.get_latent_representation()
        assert latent.shape == (600, 4) and np.isfinite(latent).all()
    assert abs(losses[1] - losses[0]) / losses[0] < 0.02, losses


def test_queries_of_a_model_read_the_same_from_disk_as_from_memory(on_file, tmp_path):
    """A model trained in memory, loaded over the backed file: getters, predictive check and DE agree."""
    from pyro_scmodels import criticism

    adata, path = on_file
    memory = adata.copy()
    ps.RegularizedVI.setup_anndata(memory, batch_key="batch")
    model = ps.RegularizedVI(memory, seed=0, **QUICK)
    model.train(max_epochs=3, **TRAIN)
    model.save(str(tmp_path / "model"))
    backed = anndata.read_h5ad(path, backed="r")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    on_disk_model = ps.RegularizedVI.load(str(tmp_path / "model"), adata=backed, device="cpu")
    cells = np.array([590, 3, 300, 41])
    for query in (lambda m: m.get_latent_representation(),
                  lambda m: m.get_library_size(),
                  lambda m: m.get_normalized_expression(indices=cells, return_numpy=True),
                  lambda m: m.get_ambient_fraction()):
        np.testing.assert_allclose(query(on_disk_model), query(model), rtol=1e-5, atol=1e-6)
    checks = [criticism.posterior_predictive_check(m, num_samples=4, seed=1).summary for m in (model, on_disk_model)]
    pd.testing.assert_frame_equal(checks[0], checks[1])
    de = [m.differential_expression(groupby="cell_type", group1="type_0", num_samples=5, n_cells=100) for m in
          (model, on_disk_model)]
    pd.testing.assert_frame_equal(de[0], de[1])


def test_saving_a_backed_model_with_its_data_leaves_the_users_file_open(on_file, tmp_path):
    """save(save_anndata=True) writes a copy; the model and the user's backed AnnData keep reading their own file."""
    adata, path = on_file
    backed = anndata.read_h5ad(path, backed="r")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    model = ps.RegularizedVI(backed, seed=0, **QUICK)
    model.train(max_epochs=1, **TRAIN)
    before = model.get_latent_representation()
    model.save(str(tmp_path / "model"), save_anndata=True)
    assert str(backed.filename) == str(path) and backed.isbacked
    np.testing.assert_array_equal(model.get_latent_representation(), before)
    np.testing.assert_array_equal(backed.X[:5].toarray(), adata.X[:5].toarray())
    model.train(max_epochs=1, **TRAIN)  # and it trains on from the file
    saved = ps.RegularizedVI.load(str(tmp_path / "model"))
    # the copy of data on disk is opened on disk (it was read whole into memory)
    assert saved.adata.isbacked and str(saved.adata.filename) == str(tmp_path / "model" / "adata.h5ad")
    assert (saved.adata.X[:] != adata.X).nnz == 0 and list(saved.adata.obs_names) == list(adata.obs_names)
    np.testing.assert_array_equal(saved.get_latent_representation(), before)  # the model as saved
    # saved again over itself, with its data: the copy it reads from is replaced by an equal one, and loads
    saved.save(str(tmp_path / "model"), save_anndata=True, overwrite=True)
    again = ps.RegularizedVI.load(str(tmp_path / "model"))
    np.testing.assert_array_equal(again.get_latent_representation(), before)


def test_counts_held_on_the_device_are_not_read_from_disk_again(on_file, monkeypatch):
    _, path = on_file
    backed = anndata.read_h5ad(path, backed="r")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    model = ps.RegularizedVI(backed, seed=0, **QUICK)
    held = []
    original = ps.data.CountMatrix.hold
    monkeypatch.setattr(ps.data.CountMatrix, "hold", lambda self, indices: held.append(indices) or original(self, indices))
    model.train(max_epochs=2, counts_on_device=True, **TRAIN)
    # the whole matrix went to the device once: no buffer is read from the file during the epochs
    assert [h for h in held if h is not None] == []
    assert model.history["train_loss"].notna().all()


def test_model_ite_refuses_an_empty_selection(on_file):
    adata, _ = on_file
    memory = adata.copy()
    ps.RegularizedVI.setup_anndata(memory, batch_key="batch", nn_conditioning_covariate_keys=["condition"],
                                   encoder_covariate_keys=["condition"])
    model = ps.RegularizedVI(memory, seed=0, **QUICK)
    model.train(max_epochs=1, **TRAIN)
    nd = ps.NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu")
    for selection, word in ((dict(indices=np.zeros(600, dtype=bool)), "indices"), (dict(gene_list=[]), "gene_list")):
        with pytest.raises(ValueError, match=f"{word} selects nothing"):
            nd.estimate_model_ite(num_samples=2, **selection)
        with pytest.raises(ValueError, match=f"{word} selects nothing"):  # the matching route shares the check
            nd.estimate_ite(**selection)


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_ranks_read_about_their_share_of_the_file(world):
    """Each minibatch grouped by chunk: a rank's shards of a buffer lie in about 1 / W of its chunks, so
    the rows the ranks read (whole runs of the sorted positions, as DiskCSR.rows reads them) add up
    to about the file once, where shards of an ungrouped minibatch would make every rank read it all."""
    from pyro_scmodels.data.on_disk import MAX_GAP, chunk_grouped_minibatches
    from pyro_scmodels.distributed import shard

    cells = np.sort(np.random.default_rng(0).choice(220_000, 200_000, replace=False))
    order, rank_of = chunk_shuffled_order(cells, np.random.default_rng(1), return_chunk_rank=True)
    grouped = chunk_grouped_minibatches(order, rank_of, 1024)
    plain = [order[s:s + 1024] for s in range(0, order.size, 1024)]
    for a, b in zip(grouped, plain):  # the same cells in every minibatch
        np.testing.assert_array_equal(np.sort(a), np.sort(b))

    def rows_read(batches):
        total = 0
        for group in read_ahead_groups(batches):
            for r in range(world):
                held = np.unique(np.concatenate([shard(b, r, world)[0] for b in group]))
                runs = np.split(held, np.flatnonzero(np.diff(held) > MAX_GAP) + 1)
                total += sum(run[-1] - run[0] + 1 for run in runs)
        return total

    assert rows_read(grouped) < 1.25 * 220_000
    assert rows_read(plain) > 0.9 * world * 200_000


def test_a_backed_file_with_the_genes_in_another_order_is_told_to_copy_to_a_new_file(on_file, tmp_path):
    # the advice (adata[:, model_genes], then adata.copy()) led to anndata refusing to copy a backed view in memory
    # (then anndata's copy(filename=) of the gene subset, which reads the whole matrix into memory)
    from anndata.experimental import concat_on_disk

    adata, path = on_file
    model = ps.RegularizedVI(_set_up(adata.copy()), seed=0, **QUICK)
    reversed_genes = adata[:, ::-1].copy()
    # X and obs only: concat_on_disk joins dense arrays through dask, not installed here
    anndata.AnnData(reversed_genes.X, obs=reversed_genes.obs, var=reversed_genes.var[[]]).write_h5ad(
        tmp_path / "reversed.h5ad")
    backed = anndata.read_h5ad(tmp_path / "reversed.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"a block of cells at a time.*concat_on_disk"):
        model.get_latent_representation(backed)
    with pytest.raises(ValueError, match=r"adata.copy\(filename='subset.h5ad'\)"):
        ps.RegularizedVI.setup_anndata(backed[:, list(adata.var_names)])
    # the route the message gives: blocks of cells, the model's genes in order, joined on disk
    parts = []
    for start in range(0, backed.n_obs, 150):
        parts.append(str(tmp_path / f"part_{start}.h5ad"))
        backed[start:start + 150].to_memory()[:, list(adata.var_names)].write_h5ad(parts[-1])
    concat_on_disk(parts, str(tmp_path / "subset.h5ad"))
    subset = anndata.read_h5ad(tmp_path / "subset.h5ad", backed="r")
    np.testing.assert_allclose(model.get_latent_representation(subset), model.get_latent_representation(), atol=1e-5)


def _set_up(adata):
    ps.RegularizedVI.setup_anndata(adata, batch_key="batch")
    return adata
