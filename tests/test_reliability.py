"""Nothing lost, nothing silently wrong: every input and output problem is reported before the work,
with one ``error:`` line (exit 2) naming the file, and results rest on enough cells.

Each case here fails before any training, so the file runs in seconds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels import _io
from pyro_scmodels.cli import main
from pyro_scmodels.criticism import posterior_predictive_check
from pyro_scmodels.ndreamer import NDreamer

FIT = ["--batch-key", "batch", "--layer", "counts", "--max-epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def small():
    return ps.datasets.simulate(n_cells=240, n_genes=40, n_markers_per_type=3, n_responding_genes=4, seed=3)


@pytest.fixture(scope="module")
def small_h5ad(small, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("input") / "small.h5ad")
    small.write_h5ad(path)
    return path


def _cli(argv) -> tuple[int, str]:
    """Exit code and stderr of ``main(argv)``; the package logger is restored afterwards."""
    logger = logging.getLogger("pyro_scmodels")
    handlers, level = list(logger.handlers), logger.level
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
    return code, stderr.getvalue()


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# --- unreadable inputs ----------------------------------------------------------------------------
def _truncated(tmp_path, small_h5ad):
    data = open(small_h5ad, "rb").read()
    path = tmp_path / "truncated.h5ad"
    path.write_bytes(data[: len(data) // 2])
    return path


def _text(tmp_path, _):
    path = tmp_path / "notes.txt"
    path.write_text("not a matrix\n")
    return path


def _csv(tmp_path, _):
    path = tmp_path / "counts.csv"
    path.write_text("gene_a,gene_b\n1,2\n3,4\n")
    return path


def _folder(tmp_path, _):
    path = tmp_path / "a_folder"
    path.mkdir()
    return path


def _mudata(tmp_path, small_h5ad):
    import anndata
    import mudata

    path = tmp_path / "pair.h5mu"
    mudata.MuData({"rna": anndata.read_h5ad(small_h5ad)}).write(str(path))  # anndata's traceback said to update it
    return path


def _zarr(tmp_path, small_h5ad):
    import anndata

    path = tmp_path / "cells.zarr"
    anndata.read_h5ad(small_h5ad).write_zarr(str(path))  # the message said to give the .h5ad inside (there is none)
    return path


@pytest.mark.parametrize("command", ["fit", "ndreamer"])
@pytest.mark.parametrize("make, words", [(_truncated, "could not be read"), (_text, "not an .h5ad"),
                                          (_csv, "not an .h5ad"), (_folder, "is a folder"),
                                          (_mudata, "is a MuData (.h5mu) file"), (_zarr, "a zarr store")],
                         ids=["truncated", "text", "csv", "folder", "mudata", "zarr"])
def test_unreadable_input_gives_one_line_naming_the_file(tmp_path, small_h5ad, command, make, words):
    path = str(make(tmp_path, small_h5ad))
    out = tmp_path / "out"
    extra = ["--condition-key", "condition", "--control", "control"] if command == "ndreamer" else ["--max-epochs", "1"]
    code, stderr = _cli([command, path, "-o", str(out), *extra])
    line = _one_error_line(stderr)
    assert code == 2 and path in line and words in line
    assert not out.exists(), "a failed run must not leave an empty output folder"


# --- outputs checked before the work -------------------------------------------------------------
def test_output_that_is_a_file_is_refused(tmp_path, small_h5ad):
    existing = tmp_path / "taken"
    existing.write_text("x")
    code, stderr = _cli(["fit", small_h5ad, "-o", str(existing), *FIT])
    assert code == 2 and "is an existing file" in _one_error_line(stderr)
    code, stderr = _cli(["fit", small_h5ad, "-o", str(existing / "sub"), *FIT])
    assert code == 2 and f"{existing} is a file" in _one_error_line(stderr)


def test_output_that_cannot_be_created_is_refused_before_training(tmp_path, small_h5ad, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started although the output folder cannot be written")

    monkeypatch.setattr(ps.RegularizedVI, "train", no_training)
    # /proc refuses new folders, also for root (permissions cannot make a folder unwritable for root)
    code, stderr = _cli(["fit", small_h5ad, "-o", "/proc/pyro_scmodels_out", *FIT])
    assert code == 2 and "/proc/pyro_scmodels_out cannot be created" in _one_error_line(stderr)


def test_unwritable_folder_found_by_the_probe_file(tmp_path, monkeypatch):
    real_open = open

    def refusing_open(path, *args, **kwargs):
        if ".write-probe-" in os.fspath(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    folder = _io.OutputFolder(str(tmp_path / "new" / "out"))
    with pytest.raises(_io.OutputPathError, match="is not writable"):
        folder.check()
    assert not (tmp_path / "new").exists(), "the folders made for the probe are removed again"


def test_cuda_without_a_gpu_leaves_no_folder(tmp_path, small_h5ad, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    code, stderr = _cli(["fit", small_h5ad, "-o", str(out), "--device", "cuda", *FIT])
    assert code == 2 and "CUDA is not available" in _one_error_line(stderr)
    assert not out.exists()


def test_cate_groupby_typo_is_reported_before_ndreamer_trains(tmp_path, small, small_h5ad, monkeypatch):
    monkeypatch.setattr(NDreamer, "train", lambda *a, **k: pytest.fail("NDreamer trained before the key was checked"))
    out = tmp_path / "out"
    code, stderr = _cli(["ndreamer", small_h5ad, "-o", str(out), "--condition-key", "condition", "--control", "control",
                         "--cate-groupby", "celltype"])
    line = _one_error_line(stderr)
    assert code == 2 and "'celltype' not found" in line and "cell_type" in line
    assert not out.exists()
    # a column holding "/" names a nested key of the saved results: refused before training, not after it
    slashed = small.copy()
    slashed.obs["cell/type"] = slashed.obs["cell_type"]
    slashed.write_h5ad(tmp_path / "slashed.h5ad")
    code, stderr = _cli(["ndreamer", str(tmp_path / "slashed.h5ad"), "-o", str(out), "--condition-key", "condition",
                         "--control", "control", "--cate-groupby", "cell/type"])
    assert code == 2 and "--cate-groupby 'cell/type' holds '/'" in _one_error_line(stderr) and not out.exists()


# --- enough cells for an effect --------------------------------------------------------------------
@pytest.mark.parametrize("relabel", ["condition", "treated"], ids=["one-cell condition", "one treated cell"])
def test_ndreamer_refuses_groups_of_a_single_cell(small, relabel):
    adata = small.copy()
    condition = adata.obs["condition"].astype(str).to_numpy().copy()
    if relabel == "condition":
        condition[0] = "single"
    else:
        treated = np.flatnonzero(condition == "stimulated")
        condition[treated[1:]] = "control"
    adata.obs["condition"] = condition
    with pytest.raises(ValueError, match=r"fewer than min_cells_per_group=10 cells \(batch '.*' x condition '.*': 1 cell\)"):
        NDreamer(adata, "condition", "control", batch_key="batch", layer="counts")


def test_min_cells_per_group_is_a_setting(small):
    adata = small.copy()
    condition = adata.obs["condition"].astype(str).to_numpy().copy()
    condition[np.flatnonzero(condition == "stimulated")[5:]] = "control"  # 5 treated cells
    adata.obs["condition"] = condition
    with pytest.raises(ValueError, match="min_cells_per_group=10"):
        NDreamer(adata, "condition", "control", layer="counts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer(adata, "condition", "control", layer="counts", min_cells_per_group=5, n_codebooks=2,
                      codebook_size=8, embedding_dim=16, z_dim=4, encoder_hidden=(16,), decoder_hidden=(16,))
    assert nd.settings["min_cells_per_group"] == 5


def test_cate_skips_small_groups_and_says_which(small):
    adata = small.copy()
    rng = np.random.default_rng(0)
    adata.obs["group"] = np.where(rng.random(adata.n_obs) < 0.97, "big", "tiny")
    model_free = NDreamer(adata, "condition", "control", batch_key="batch", layer="counts", n_codebooks=2,
                          codebook_size=8, embedding_dim=16, z_dim=4, encoder_hidden=(16,), decoder_hidden=(16,))
    # only the CATE step is tested: the true latent stands in for a trained network's embedding
    model_free._set_embedding(adata.obsm["true_latent"].astype(np.float32))
    with pytest.warns(UserWarning, match=r"CATE skipped 1 group.*'tiny' \(\d+ stimulated, \d+ control\)"):
        table = model_free.estimate_cate("group")
    assert set(table["group"]) == {"big"}
    with pytest.raises(ValueError, match="No group has at least min_cells=1000"):
        model_free.estimate_cate("group", min_cells=1000)


# --- categorical keys ------------------------------------------------------------------------------
def test_numeric_batch_key_is_refused_with_its_number_of_values(small):
    adata = small.copy()
    adata.obs["qc_score"] = np.random.default_rng(0).random(adata.n_obs)
    with pytest.raises(ValueError, match=r"adata\.obs\['qc_score'\] is numeric \(float64, 240 distinct values\)"):
        ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="qc_score")
    # the user opts in by making the column categorical
    adata.obs["lane"] = pd.Categorical(np.arange(adata.n_obs) % 2)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="lane")
    # 1 and "1" were two categories with one name: the model failed later in pandas ("categories must be unique")
    adata.obs["mixed"] = np.array([1 if i % 2 else "1" for i in range(adata.n_obs)], dtype=object)
    with pytest.raises(ValueError, match=r"adata\.obs\['mixed'\] holds labels of different types that read the same "
                                         r"as text \(\['1'\]"):
        ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="mixed")


# --- saved files that are damaged -----------------------------------------------------------------
def test_truncated_model_file_names_the_file(small, tmp_path):
    adata = small.copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, n_latent=2, n_hidden=8)
    model.save(str(tmp_path / "model"))
    path = tmp_path / "model" / "model.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(_io.InputFileError, match=rf"{path} could not be read as a saved model.*truncated"):
        ps.RegularizedVI.load(str(tmp_path / "model"), adata)


def test_interrupted_training_is_marked_honestly(small, tmp_path, monkeypatch):
    adata = small.copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, n_latent=2, n_hidden=8)
    from pyro_scmodels.infer import SVITrainer

    original = SVITrainer.end_epoch
    calls = {"n": 0}

    def interrupt_in_third_epoch(self, plan, train_loss, parts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, plan, train_loss, parts)

    monkeypatch.setattr(SVITrainer, "end_epoch", interrupt_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        model.train(max_epochs=5, batch_size=64, checkpoint_dir=str(tmp_path / "ck"), progress_bar=False)
    assert os.path.exists(tmp_path / "ck" / "checkpoint.pt")
    assert model.is_trained
    with pytest.warns(UserWarning, match=r"interrupted: the model was trained for 2 of 5 epochs"):
        model.get_latent_representation()


def test_predictive_check_headline_is_the_calibrated_figure(small):
    adata = small[:120].copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, n_latent=2, n_hidden=8)
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    text = repr(posterior_predictive_check(model, num_samples=5))
    headline = text.splitlines()[1]
    assert headline.index("calibration (randomised PIT)") < headline.index("raw interval coverage")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_building_a_model_leaves_the_gpus_alone(monkeypatch):
    # torch.random.fork_rng() without devices saves the RNG of every visible GPU (starting a CUDA
    # context on each); the networks are built on the CPU, so none may be touched. Forced here:
    # with two "visible" GPUs any GPU RNG call fails on this CUDA-less torch.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    adata = ps.datasets.simulate(n_cells=100, n_genes=120, seed=0)
    ps.RegularizedVI.setup_anndata(adata, layer="counts")
    ps.RegularizedVI(adata, n_hidden=16)
    mdata = ps.datasets.simulate_multiome(n_cells=100, n_genes=120, n_peaks=150, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(mdata)
    ps.RegularizedMultimodalVI(mdata, n_hidden=16)
