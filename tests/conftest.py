"""Shared fixtures: one simulated dataset and one model fitted on it, reused by many tests."""

from __future__ import annotations

import os

import pytest
import torch

import pyro_scmodels as ps

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
#: the thread-pool sizes that OpenMP (torch, faiss), the BLAS libraries and numba (scanpy's) read when they load
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def pytest_configure(config):
    """Under pytest-xdist (setup.cfg runs one worker a core), each worker's thread pools get its share of the cores.

    Without it every worker would start one thread a core in each of torch's, faiss's and the BLAS libraries' pools,
    and two workers on two cores would run their threads over each other (the waiting threads spin: the suite took
    longer than in one process). The controller sets the share in the environment before it starts the workers, so
    that every pool reads it when its library loads (an OpenMP pool's size set later holds only for the thread that
    set it; threads of the training loop's helpers started their own pools of two); processes the tests start (the
    CLI's, the tutorials') inherit it too. A worker also limits the pools already loaded.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    worker = "PYTEST_XDIST_WORKER" in os.environ
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"]) if worker else (getattr(config.option, "numprocesses", 0) or 0)
    if workers > 1:
        share = max(1, cores // workers)
        for name in THREAD_VARIABLES:
            os.environ[name] = str(share)
        if worker:
            from threadpoolctl import threadpool_limits  # scikit-learn's dependency; only xdist's workers need it

            threadpool_limits(limits=share)  # the pools already loaded (numpy's and scipy's BLAS, torch's OpenMP)
            torch.set_num_threads(share)


@pytest.fixture(scope="module", autouse=True)
def worker_threads():
    """Each test file starts at its xdist worker's share of torch's threads, whatever the file before left."""
    share = os.environ.get("OMP_NUM_THREADS") if "PYTEST_XDIST_WORKER" in os.environ else None
    if share is not None:
        torch.set_num_threads(int(share))
    yield


def shared_file(name: str) -> str:
    """Path of a file in ../shared/data; skips the test when the folder is absent."""
    path = os.path.abspath(os.path.join(SHARED_DATA, name))
    if not os.path.exists(path):
        pytest.skip(f"{name} not found in ../shared/data")
    return path


@pytest.fixture(scope="session")
def simulated():
    """3000 cells x 500 genes, 5 cell types, 3 batches with ambient RNA and feature scaling."""
    return ps.datasets.simulate(n_cells=3000, n_genes=500, seed=0)


@pytest.fixture(scope="session")
def fitted(simulated):
    """RegularizedVI with each technical effect on its own key, trained to convergence.

    Small data gives few optimiser steps per epoch, so the learning rate is 1e-2 (the default
    1e-3 is tuned for tens of thousands of cells) and the KL warm-up is short.
    """
    adata = simulated.copy()
    ps.RegularizedVI.setup_anndata(
        adata, layer="counts", ambient_covariate_keys=["batch"], feature_scaling_covariate_keys=["batch"],
        library_size_key="batch",
    )
    model = ps.RegularizedVI(adata, seed=0)
    model.train(max_epochs=150, batch_size=512, lr=1e-2, kl_warmup_epochs=15, early_stopping=False,
                device="cpu", seed=0, progress_bar=False)
    return model
