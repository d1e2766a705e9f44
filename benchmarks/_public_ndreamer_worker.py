"""Runs the public NDreamer (github.com/lugia-xiao/NDreamer) at its defaults; called by ``bench_effects.py``.

It runs in the interpreter given by ``--python`` / ``NDREAMER_PYTHON`` (an environment where the public
package is installed from its repository), never imported by pyro_scmodels. Input: an ``.h5ad`` with
log-normalised expression in ``X`` and ``condition`` / ``batch`` in ``obs``. Output: an ``.npz`` with the
ITE of every stimulated cell (rows in the input's order, genes as the public package kept them).

Usage: ``python _public_ndreamer_worker.py INPUT.h5ad OUTPUT.npz WORKDIR SEED [EPOCHS]`` (EPOCHS: its
``epoches`` argument, each epoch one balanced draw of 2,048 cells per batch x condition group; default its own)
"""

from __future__ import annotations

import glob
import os
import sys
import time


def main(source: str, output: str, workdir: str, seed: int, epochs: int | None = None) -> None:
    import anndata
    import numpy as np
    import torch
    from ndreamer import NDreamer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    adata = anndata.read_h5ad(source)
    names = adata.obs_names.copy()
    save = os.path.join(workdir, "public_ndreamer") + os.sep
    os.makedirs(save, exist_ok=True)
    start = time.perf_counter()
    # the package's constructor defaults; the data are already log-normalised (its default expects that)
    model = NDreamer(adata.copy(), condition_key="condition", contorl_name="control",
                     num_hvg=min(2000, adata.n_vars),  # its network input width is num_hvg: no more than the genes
                     require_batch=True, batch_key="batch", save_pth=save,
                     save_preprocessed_adata_path=os.path.join(save, "preprocessed.h5ad"), random_seed=seed,
                     **({} if epochs is None else {"epoches": epochs}))
    model.train_model()
    model.get_modifier_space()
    model.Estmiate_ITE_all(nearest_neighbor=1, bandwidth=1)
    seconds = time.perf_counter() - start
    parts = [anndata.read_h5ad(path) for path in sorted(glob.glob(os.path.join(save, "b-*--c-*__ITE.h5ad")))]
    ite = anndata.concat(parts)
    rows = names.get_indexer(ite.obs_names)
    if (rows < 0).any():
        raise SystemExit("public NDreamer returned cells that are not in the input")
    np.savez(output, rows=rows, ite=np.asarray(ite.X, dtype=np.float32), genes=np.asarray(ite.var_names, dtype=str),
             seconds=seconds, epochs=model.DL_model.epoches)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else None)
