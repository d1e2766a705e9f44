"""The measured process of ``bench_train.py``: one tool trained on one dataset under the clock.

``bench_train.py`` re-invokes itself with hidden ``--_worker`` arguments for every
(dataset, tool) pair; that process calls :func:`run_worker`, so its peak resident memory is
its own. Both tools train the same architecture with the settings below.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import sys
import time

from _common import status_mib

# architecture and training settings shared by both tools
N_HIDDEN, N_LATENT, N_LAYERS = 128, 10, 1
BATCH_SIZE, TRAIN_SIZE, SEED = 1024, 0.9, 0
WARMUP_EPOCHS = 1


def scvi_available() -> bool:
    """Whether ``import scvi`` can find a module (scvi-tools is optional)."""
    return importlib.util.find_spec("scvi") is not None


def _maxrss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux ``ru_maxrss`` survives ``exec`` (a child started by a large parent reports the
    parent's peak), so the per-address-space high-water mark ``VmHWM`` is read instead.
    """
    peak = status_mib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def _train_ours(adata, epochs: int, batch_size: int = BATCH_SIZE, direct: bool = True, compile: bool = False) -> dict:
    """Warm up and time ``RegularizedVI`` training; returns training cells, seconds, checks.

    ``direct=False`` trains with Pyro's ``Trace_ELBO`` (the model class's direct form switched off);
    ``compile=True`` with ``train(compile=True)``, whose compiling falls in the (reported) warm-up epoch.
    """
    import pyro_scmodels
    from pyro_scmodels.models.regularizedvi_module import RegularizedVIModel

    RegularizedVIModel.direct_elbo = direct

    pyro_scmodels.RegularizedVI.setup_anndata(adata, batch_key="batch")
    model = pyro_scmodels.RegularizedVI(adata, n_hidden=N_HIDDEN, n_latent=N_LATENT, n_layers=N_LAYERS)
    settings = dict(batch_size=batch_size, train_size=TRAIN_SIZE, early_stopping=False, device="cpu", progress_bar=False,
                    compile=compile)
    start = time.perf_counter()
    model.train(max_epochs=WARMUP_EPOCHS, **settings)
    warmup_seconds = time.perf_counter() - start
    rss_before = _maxrss_mib()
    start = time.perf_counter()
    # as in scvi-tools, a second call trains max_epochs more epochs from the current weights
    model.train(max_epochs=epochs, **settings)
    seconds = time.perf_counter() - start
    if model.trainer.elbo_loss.direct is not direct:
        raise RuntimeError(f"asked for direct={direct}, trained with direct={model.trainer.elbo_loss.direct}")
    if (model.trainer.elbo_loss.compiled_loss is not None) is not compile:
        raise RuntimeError(f"asked for compile={compile}, the loss was {'' if compile else 'not '}compiled")
    timed = model.history.iloc[WARMUP_EPOCHS:]
    return {
        "n_train": len(model.train_indices),
        "seconds": seconds,
        "epochs_run": len(timed),
        "validation_epochs": int(timed["validation_loss"].notna().sum()),
        "rss_warm_mib": rss_before,
        "warmup_seconds": warmup_seconds,
    }


def _train_scvi(adata, epochs: int, batch_size: int = BATCH_SIZE) -> dict:
    """Warm up and time ``scvi.model.SCVI`` training; returns training cells, seconds, checks."""
    import logging
    import warnings

    import scvi

    # Lightning and scvi-tools log and warn a lot on the CPU; that is noise here
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "scvi", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.seed = SEED

    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_hidden=N_HIDDEN, n_latent=N_LATENT, n_layers=N_LAYERS, gene_likelihood="nb")
    settings = dict(
        batch_size=batch_size, accelerator="cpu", early_stopping=False, train_size=TRAIN_SIZE,
        enable_progress_bar=False, check_val_every_n_epoch=1,
    )
    start = time.perf_counter()
    model.train(max_epochs=WARMUP_EPOCHS, **settings)
    warmup_seconds = time.perf_counter() - start
    rss_before = _maxrss_mib()
    start = time.perf_counter()
    # each scvi train call runs max_epochs more epochs from the current weights
    model.train(max_epochs=epochs, **settings)
    seconds = time.perf_counter() - start
    # history holds one DataFrame per metric, concatenated over the train calls
    train_rows = model.history.get("elbo_train")
    validation_rows = model.history.get("elbo_validation")
    return {
        "n_train": len(model.train_indices),
        "seconds": seconds,
        "epochs_run": None if train_rows is None else len(train_rows) - WARMUP_EPOCHS,
        "validation_epochs": None if validation_rows is None else int(validation_rows.iloc[WARMUP_EPOCHS:].notna().sum().iloc[0]),
        "rss_warm_mib": rss_before,
        "warmup_seconds": warmup_seconds,
        "scvi_version": scvi.__version__,
    }


def run_worker(tool: str, data_path: str, epochs: int, threads: int | None, result_path: str,
               batch_size: int = BATCH_SIZE) -> None:
    """Entry point of a measured process: load data, train, write a JSON result.

    Parameters
    ----------
    tool
        ``"pyro_scmodels"``, ``"pyro_scmodels-trace"`` (with Pyro's ``Trace_ELBO``), ``"pyro_scmodels-compiled"``
        (``train(compile=True)``) or ``"scvi-tools"``.
    data_path
        An ``.h5ad`` file with raw counts in ``.X`` and ``obs["batch"]``.
    epochs
        Timed epochs (after one warm-up epoch).
    threads
        torch intra-op threads to set, or None for torch's default.
    result_path
        Where the JSON result goes.
    batch_size
        Minibatch size of both tools.
    """
    import anndata
    import torch

    # each tool's package imported first, so that "RSS loaded" counts it for both (before 2026-12-06 ours was read
    # before pyro_scmodels was imported: about 145 MiB less than with it)
    if tool == "scvi-tools":
        import scvi  # noqa: F401
    else:
        import pyro_scmodels  # noqa: F401
    if threads:
        torch.set_num_threads(threads)
    # read afresh: this process owns its AnnData
    adata = anndata.read_h5ad(data_path)
    rss_loaded = _maxrss_mib()
    if tool == "scvi-tools":
        result = _train_scvi(adata, epochs, batch_size)
    else:
        result = _train_ours(adata, epochs, batch_size, direct=tool != "pyro_scmodels-trace",
                             compile=tool == "pyro_scmodels-compiled")
    result.update(
        tool=tool, epochs=epochs, threads=torch.get_num_threads(),
        rss_loaded_mib=rss_loaded, rss_peak_mib=_maxrss_mib(),
    )
    with open(result_path, "w") as handle:
        json.dump(result, handle)
