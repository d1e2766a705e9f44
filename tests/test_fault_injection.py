"""Fault injection: ``fit`` and ``ndreamer`` killed with SIGKILL at a seeded random moment, then rerun.

After every kill, no file under a final name is truncated (each one reads back), the rerun with
``--resume`` finishes, and its results equal those of an uninterrupted run. The kill moments are
drawn (seeded) across the uninterrupted run's own duration, so they land in start-up, training,
checkpoint writes or result writes depending on the machine's speed; every outcome must hold up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import pyro_scmodels as ps

COMMANDS = {
    "fit": ["--batch-key", "batch", "--layer", "counts", "--max-epochs", "12", "--batch-size", "64", "--n-hidden", "16",
            "--n-latent", "4", "--quiet"],
    "ndreamer": ["--condition-key", "condition", "--control", "control", "--batch-key", "batch", "--layer", "counts",
                 "--network", "small", "--epochs", "4", "--batch-size", "64", "--quiet"],
}
COMPARED = {"fit": ("obsm", "X_regularizedvi"), "ndreamer": ("layers", "ite_stimulated")}


@pytest.fixture(scope="module")
def input_h5ad(tmp_path_factory):
    adata = ps.datasets.simulate(n_cells=240, n_genes=40, n_markers_per_type=3, n_responding_genes=4, seed=11)
    path = str(tmp_path_factory.mktemp("input") / "cells.h5ad")
    adata.write_h5ad(path)
    return path


def _start(command: str, data: str, out: str, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pyro_scmodels", command, data, "-o", out, *COMMANDS[command], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr


def _read_back(path: str) -> None:
    """Read a file completely by its type; a truncated file raises."""
    if path.endswith(".h5ad"):
        anndata.read_h5ad(path)
    elif path.endswith(".pt"):
        torch.load(path, map_location="cpu", weights_only=False)
    elif path.endswith(".csv"):
        pd.read_csv(path)
    elif path.endswith(".json"):
        with open(path) as handle:
            json.load(handle)
    elif path.endswith(".npz"):
        with np.load(path) as arrays:
            [arrays[name] for name in arrays.files]


def _final_files_read_back(out: str) -> list[str]:
    checked = []
    for folder, _, names in os.walk(out):
        for name in names:
            if ".partial-" in name:
                continue  # a temporary name: never taken for a result
            _read_back(os.path.join(folder, name))
            checked.append(name)
    return checked


def _result(out: str, command: str) -> np.ndarray:
    where, key = COMPARED[command]
    return np.asarray(getattr(anndata.read_h5ad(os.path.join(out, "results.h5ad")), where)[key])


@pytest.mark.parametrize("command", ["fit", "ndreamer"])
def test_killed_runs_resume_to_the_uninterrupted_result(command, input_h5ad, tmp_path):
    reference = str(tmp_path / "reference")
    started = time.perf_counter()
    _finish(_start(command, input_h5ad, reference))
    duration = time.perf_counter() - started
    expected = _result(reference, command)

    rng = np.random.default_rng({"fit": 1, "ndreamer": 2}[command])
    for trial, fraction in enumerate(rng.uniform(0.35, 0.95, size=1)):
        out = str(tmp_path / f"killed_{trial}")
        process = _start(command, input_h5ad, out)
        try:
            process.wait(timeout=fraction * duration)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        if os.path.isdir(out):
            _final_files_read_back(out)
        _finish(_start(command, input_h5ad, out, "--resume"))
        np.testing.assert_array_equal(_result(out, command), expected, err_msg=f"kill at {fraction:.2f} of the run")
