"""Trains the public regularizedvi (github.com/vitkl/regularizedvi) under the clock; called by
``bench_regularizedvi_public.py``.

It runs in the interpreter given by ``--public-python`` / ``REGULARIZEDVI_PYTHON`` (an environment where the
public package is installed from its repository, with scvi-tools), never imported by pyro_scmodels. Input: an
``.h5ad`` with raw counts in ``layers["counts"]`` and ``obs["batch"]``. The model is built with
``AmbientRegularizedSCVI.setup_anndata(adata, layer="counts", batch_key="batch")`` (the public ``batch_key``
sets its ambient, dispersion and library-size keys, as ours does), trained for WARMUP epochs (not timed),
then for EPOCHS more under the clock (a second scvi-tools ``train`` call continues from the current weights).
Output: a JSON file with the training cells, the timed seconds, checks and versions.

Usage: ``python _public_regularizedvi_worker.py INPUT.h5ad OUTPUT.json BATCH_SIZE EPOCHS WARMUP``
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings

from _common import status_mib

N_HIDDEN, N_LATENT, N_LAYERS, TRAIN_SIZE, SEED = 128, 10, 1, 0.9, 0


def main(source: str, output: str, batch_size: int, epochs: int, warmup: int) -> None:
    """Build, warm up and time the public model; write the JSON result to ``output``."""
    import anndata
    import torch

    # Lightning and scvi-tools log and warn a lot on the CPU; that is noise here
    warnings.filterwarnings("ignore")
    import regularizedvi
    import scvi

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    scvi.settings.seed = SEED
    adata = anndata.read_h5ad(source)
    start = time.perf_counter()
    regularizedvi.AmbientRegularizedSCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = regularizedvi.AmbientRegularizedSCVI(adata, n_hidden=N_HIDDEN, n_latent=N_LATENT, n_layers=N_LAYERS)
    settings = dict(batch_size=batch_size, accelerator="cpu", devices=1, train_size=TRAIN_SIZE, early_stopping=False,
                    check_val_every_n_epoch=1, enable_progress_bar=False)
    model.train(max_epochs=warmup, **settings)
    warm = time.perf_counter()
    model.train(max_epochs=epochs, **settings)
    seconds = time.perf_counter() - warm
    history = model.history
    train_rows, validation_rows = history.get("elbo_train"), history.get("validation_loss")
    result = {
        "tool": "public regularizedvi", "n_train": len(model.train_indices),
        "n_validation": len(model.validation_indices), "seconds": seconds, "build_warmup_seconds": warm - start,
        "epochs": epochs, "epochs_run": None if train_rows is None else len(train_rows) - warmup,
        "validation_epochs": None if validation_rows is None
        else int(validation_rows.iloc[warmup:].notna().sum().iloc[0]),
        "final_validation_loss": None if validation_rows is None else float(validation_rows.iloc[-1, 0]),
        "threads": torch.get_num_threads(), "vmhwm_mib": status_mib("VmHWM"),
        "versions": {"torch": torch.__version__, "scvi-tools": scvi.__version__,
                     "regularizedvi": regularizedvi.__version__},
    }
    with open(output, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
