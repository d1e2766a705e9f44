"""Data-parallel training on torch.distributed: 2 CPU processes with the gloo backend.

The in-process checks run two ranks forked from the test process (no second import of the
package; each rank sets the environment torchrun would set and calls ``train(devices=2,
strategy="ddp")``). The resume check runs the command line under ``torchrun``, as users do.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from unittest import mock

import anndata
import mudata
import numpy as np
import pandas as pd
import pytest
import torch
from pyro.poutine.messenger import Messenger

import pyro_scmodels as ps
from pyro_scmodels.data.on_disk import DiskCSR
from pyro_scmodels.distributed import SingleProcess

from ._on_disk_files import write_counts_h5ad
from pyro_scmodels.infer import SVITrainer, NonFiniteError

WORLD = 2
TINY = dict(n_hidden=16, n_latent=4)
SHORT_RUN = dict(max_epochs=15, batch_size=50, lr=1e-2, kl_warmup_epochs=3, early_stopping=False, device="cpu",
                 progress_bar=False, seed=0)
# the validation loss (per cell, ~166 here) of the 2-process run lies within this fraction of the
# single-process one. Measured: single-process seeds 0 and 1 differ by 0.05 %, the 2-process run
# differs from the single-process one by 0.3 % (its ranks draw their own noise)
VALIDATION_TOLERANCE = 0.01


class _AtMean(Messenger):
    """Every latent site takes its distribution's mean instead of a random draw (a deterministic ELBO).

    Single-process and 2-rank runs then compute the same function of the parameters, so their
    steps can be compared to 1e-5 although each rank would draw its own noise.
    """

    def _process_message(self, msg):
        # reparameterised latent sites only (a plate's subsampling is a "sample" message too)
        if msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None and msg["fn"].has_rsample:
            msg["value"] = msg["fn"].mean


def _cells(n_cells: int, seed: int = 3):
    adata = ps.datasets.simulate(n_cells=n_cells, n_genes=30, n_markers_per_type=3, n_responding_genes=3, seed=seed)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return adata


def _written_cells(path: str) -> str:
    """The 47 cells of the step checks with their raw counts in X, written to ``path`` (read back backed)."""
    return write_counts_h5ad(_cells(47), path)


def _model(kind: str, n_cells: int, path: str | None = None):
    if kind == "disk":
        backed = anndata.read_h5ad(path, backed="r")
        ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
        return ps.RegularizedVI(backed, dropout_rate=0.0, seed=0, **TINY)
    if kind == "multimodal":
        mudata.set_options(pull_on_update=False)
        # some cells without ATAC counts: their ATAC terms are masked, on whichever rank they land
        mdata = ps.datasets.simulate_multiome(n_cells=n_cells, n_genes=75, n_peaks=120, atac_missing_fraction=0.1, seed=0)
        ps.RegularizedMultimodalVI.setup_mudata(mdata, modalities=["rna", "atac"])
        return ps.RegularizedMultimodalVI(mdata, latent_mode="weighted_mean", modality_weights="cell", dropout_rate=0.0,
                                          seed=0, **TINY)
    return ps.RegularizedVI(_cells(n_cells), dropout_rate=0.0, seed=0, **TINY)


def _one_epoch_of_two_steps(kind: str = "rna", path: str | None = None, **parallel) -> dict:
    """47 cells, minibatches of 32 and 15 (shards 16/16 and 8/7): parameters and last gradients
    (and, for counts on disk, how many cells each read from the file took)."""
    model = _model(kind, 47, path)
    reads = []
    original = DiskCSR.rows

    def counted(self, positions, *args):
        reads.append(len(positions))
        return original(self, positions, *args)

    with _AtMean(), mock.patch.object(DiskCSR, "rows", counted):
        model.train(max_epochs=1, batch_size=32, train_size=1.0, lr=1e-2, kl_warmup_epochs=None, gradient_clip=None,
                    early_stopping=False, device="cpu", progress_bar=False, **parallel)
    named = list(model.trainer.named_parameters())
    return {"parameters": {n: p.detach().numpy().copy() for n, p in named},
            "gradients": {n: p.grad.numpy().copy() for n, p in named if p.grad is not None}, "reads": reads}


def _short_run(**parallel) -> pd.DataFrame:
    model = ps.RegularizedVI(_cells(200), seed=0, **TINY)
    return model.train(**SHORT_RUN, **parallel)


def _nan_on_rank_one(rank: int) -> str:
    """Rank 1's loss turns NaN at its second step; every rank must stop with rank 1's message."""
    if rank == 1:
        original = SVITrainer.minibatch_loss

        def poisoned(self, indices):
            loss, parts = original(self, indices)
            return (loss * float("nan") if self.step >= 1 else loss), parts

        SVITrainer.minibatch_loss = poisoned  # this forked process only
    model = ps.RegularizedVI(_cells(60), seed=0, **TINY)
    try:
        model.train(max_epochs=3, batch_size=20, device="cpu", progress_bar=False, devices=WORLD, strategy="ddp")
    except NonFiniteError as err:
        return str(err)
    return "no error"


def _refused_on_every_rank(rank: int, path: str) -> dict:
    """Rank 1 reads other counts under the same names; then a checkpoint folder that cannot be made."""
    refusals = {}
    for name, cells, options in (("other data", _cells(60, seed=3 + rank), {}),
                                 ("checkpoint folder", _cells(60), {"checkpoint_dir": os.path.join(path, "sub")})):
        model = ps.RegularizedVI(cells, seed=0, **TINY)
        try:
            model.train(max_epochs=2, batch_size=20, device="cpu", progress_bar=False, devices=WORLD, strategy="ddp",
                        **options)
            refusals[name] = "trained"
        except ValueError as err:  # StateMismatchError, OutputPathError
            refusals[name] = f"{type(err).__name__}: {err}"
    return refusals


def _rank_main(rank: int, port: int, results, path: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share two cores; no OpenMP pool inherited across fork is touched
    try:
        parallel = dict(devices=WORLD, strategy="ddp")
        results.put((rank, {"step": _one_epoch_of_two_steps(**parallel),
                            "multimodal": _one_epoch_of_two_steps("multimodal", **parallel),
                            "disk": _one_epoch_of_two_steps("disk", path, **parallel),
                            "short": _short_run(**parallel).to_dict(),
                            "refused": _refused_on_every_rank(rank, path),
                            "nan": _nan_on_rank_one(rank)}))  # last: it poisons rank 1's loss in its process
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cells_on_disk(tmp_path_factory) -> str:
    return _written_cells(str(tmp_path_factory.mktemp("disk") / "cells.h5ad"))


@pytest.fixture(scope="module")
def two_ranks(cells_on_disk):
    """Rank -> results of the in-process checks, run once on two forked ranks."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank_main, args=(rank, port, results, cells_on_disk)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    try:
        collected = dict(results.get(timeout=300) for _ in range(WORLD))
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    for rank, result in collected.items():
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
    return collected


@pytest.mark.parametrize("kind", ["step", "multimodal", "disk"])
def test_one_step_on_two_ranks_equals_one_process_on_the_union(two_ranks, kind, cells_on_disk):
    """Gradients averaged by DDP, locals scaled by N / global minibatch: the same step as one process
    (RegularizedVI, RegularizedMultimodalVI with per-cell modality weights and masked cells, and
    RegularizedVI reading its counts from disk, where each rank holds only its shards' rows)."""
    single = _one_epoch_of_two_steps("rna" if kind == "step" else kind, cells_on_disk)
    if kind == "disk":
        # the cells asked of the file: after the 2-cell first pass, one read-ahead of the epoch: all 47 in one process,
        # 16 + 8 and 16 + 7 (this rank's shards of the minibatches of 32 and 15) on the ranks
        assert single["reads"] == [2, 47]
        assert [two_ranks[rank]["disk"]["reads"] for rank in range(WORLD)] == [[2, 24], [2, 23]]
    for rank, result in two_ranks.items():
        step = result[kind]
        assert step["parameters"].keys() == single["parameters"].keys()
        for name, value in single["parameters"].items():
            np.testing.assert_allclose(step["parameters"][name], value, atol=1e-5, rtol=0, err_msg=f"rank {rank} {name}")
        assert step["gradients"].keys() == single["gradients"].keys() and single["gradients"]
        for name, value in single["gradients"].items():
            # the gradients themselves: Adam's first steps barely see a wrong gradient scale
            np.testing.assert_allclose(step["gradients"][name], value, rtol=1e-4, atol=1e-5, err_msg=f"rank {rank} {name}")


def test_two_process_run_reaches_the_single_process_validation_loss(two_ranks):
    single = _short_run()
    histories = [pd.DataFrame(two_ranks[rank]["short"]) for rank in range(WORLD)]
    # the loss of every epoch is reduced over ranks: both ranks record (and early-stop on) the same numbers
    pd.testing.assert_frame_equal(histories[0], histories[1])
    assert len(histories[0]) == len(single) == SHORT_RUN["max_epochs"]
    final_single = single["validation_loss"].iloc[-3:].mean()
    final_parallel = histories[0]["validation_loss"].iloc[-3:].mean()
    assert abs(final_parallel - final_single) <= VALIDATION_TOLERANCE * final_single, (final_parallel, final_single)
    assert final_parallel < 0.8 * histories[0]["validation_loss"].iloc[0]  # it trained


def test_a_nan_on_one_rank_stops_every_rank_with_its_message(two_ranks):
    for rank in range(WORLD):
        message = two_ranks[rank]["nan"]
        assert "rank 1 of 2" in message and "NaN or Inf" in message and "step 1" in message, (rank, message)


def test_other_data_on_one_rank_and_a_bad_checkpoint_folder_are_refused_on_every_rank(two_ranks):
    # a stale copy on one node trained a mixed model, each rank with its own split; a checkpoint folder that could not
    # be made was refused on rank 0 only, and rank 1 failed on the closed connection
    for rank in range(WORLD):
        refused = two_ranks[rank]["refused"]
        assert refused["other data"].startswith("StateMismatchError: (rank 1 of 2)"), (rank, refused)
        assert "counts" in refused["other data"] and "same file" in refused["other data"]
        assert refused["checkpoint folder"].startswith("OutputPathError") and "checkpoint_dir" in refused["checkpoint folder"]


def test_devices_without_torchrun_says_how_to_launch(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    model = ps.RegularizedVI(_cells(40), **TINY)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        model.train(max_epochs=1, devices=2, device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match="strategy"):
        model.train(max_epochs=1, strategy="dp", device="cpu", progress_bar=False)
    assert not model.is_trained


def test_each_ranks_device_is_checked_as_in_one_process(monkeypatch):
    # under torchrun, device="cuda" without CUDA (or a misspelt "gpu0") trained on the CPU without a word
    from pyro_scmodels.distributed import _rank_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, accelerator in (("cuda", None), ("cuda:0", "auto")):
        with pytest.raises(ValueError, match="CUDA is not available"):
            _rank_device(accelerator, device)
    with pytest.raises(ValueError, match="device must be"):
        _rank_device(None, "gpu0")
    with pytest.raises(ValueError, match="not both"):
        _rank_device("cpu", "cuda")
    with pytest.raises(ValueError, match="accelerator='gpu' was requested"):
        _rank_device("gpu", "auto")
    assert _rank_device(None, "auto") == _rank_device("auto", "cpu") == torch.device("cpu")
    # with GPUs, each rank takes its own, whatever index "cuda:N" names; "cpu" stays on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert _rank_device(None, "cuda:0") == _rank_device("gpu", "auto") == torch.device("cuda", 1)
    assert _rank_device(None, "auto") == torch.device("cuda", 1) and _rank_device(None, "cpu") == torch.device("cpu")


def test_latent_independence_is_refused_data_parallel(monkeypatch):
    # its MMD compares cells across the minibatch; a rank sees only its shard (the objective would change with W)
    class TwoRanks(SingleProcess):
        world_size = 2

    monkeypatch.setattr("pyro_scmodels.models._base.training_parallelism", lambda *args: (torch.device("cpu"), TwoRanks()))
    adata = _cells(40)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch", encoder_covariate_keys=["condition"],
                                   nn_conditioning_covariate_keys=["condition"])
    model = ps.RegularizedVI(adata, latent_independence=10.0, **TINY)
    with pytest.raises(ValueError, match="latent_independence=10.0 cannot be trained data-parallel"):
        model.train(max_epochs=1, device="cpu", progress_bar=False)
    assert not model.is_trained
    monkeypatch.undo()
    model.train(max_epochs=1, device="cpu", progress_bar=False)  # in one process it trains
    assert model.is_trained
