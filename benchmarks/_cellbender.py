"""CellBender remove-background as a peer in bench_ambient.py: raw droplets in, per-cell background share out.

CellBender (a Pyro model of ambient RNA and barcode swapping) is run from its own virtual environment,
as a command, never imported here. It needs the raw droplets of a channel, cells and empty droplets
together; it is run once per channel (per batch on the simulator, once on the spiked PBMC cells). Its
output h5 holds, per analysed droplet, ``droplet_latents/background_fraction`` (the share of the
droplet's counts it calls background), and ``global_latents/ambient_expression`` (the ambient profile).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyro_scmodels import datasets

EMPTY_PREFIX = "empty_"
EMPTIES_PER_CHANNEL = {"simulator": 2000, "spikein": 10000}  # simulated empty droplets for CellBender
EMPTIES_INCLUDED = {"simulator": 300, "spikein": 3000}  # of those, analysed together with the cells


def find_cellbender(path: str | None) -> str:
    """The ``cellbender`` command: ``path``, else $CELLBENDER, else the one on PATH; a clear error if none."""
    candidate = path or os.environ.get("CELLBENDER") or shutil.which("cellbender")
    if not candidate or not Path(candidate).exists():
        raise FileNotFoundError(
            "CellBender not found. Install it in its own environment (python -m venv --system-site-packages "
            "cb_venv && cb_venv/bin/pip install cellbender) and pass --cellbender cb_venv/bin/cellbender "
            "or set CELLBENDER.")
    return candidate


def write_raw_droplets(path: Path, cells: sp.csr_matrix, empties: sp.csr_matrix, genes, cell_names) -> None:
    """One channel's raw droplets (cells first, then empty droplets) as an h5ad that CellBender reads."""
    counts = sp.vstack([sp.csr_matrix(cells), sp.csr_matrix(empties)]).tocsr().astype(np.float32)
    names = [str(n) for n in cell_names] + [f"{EMPTY_PREFIX}{i}" for i in range(empties.shape[0])]
    raw = anndata.AnnData(X=counts, obs=pd.DataFrame(index=names),
                          var=pd.DataFrame({"gene_ids": [str(g) for g in genes]}, index=[str(g) for g in genes]))
    raw.write_h5ad(path)


def run_cellbender(command: str, raw_path: Path, n_cells: int, n_droplets: int, epochs: int, threads: int,
                   workdir: Path) -> tuple[Path, float]:
    """Run remove-background on ``raw_path``; returns the output h5 and the wall seconds of the run."""
    output = workdir / "cellbender_out.h5"
    args = [command, "remove-background", "--input", str(raw_path), "--output", str(output),
            "--expected-cells", str(n_cells), "--total-droplets-included", str(n_droplets),
            "--epochs", str(epochs), "--cpu-threads", str(threads)]
    start = time.time()
    done = subprocess.run(args, cwd=workdir, capture_output=True, text=True)  # checkpoints land in workdir
    seconds = time.time() - start
    if done.returncode != 0 or not output.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise RuntimeError(f"cellbender remove-background failed (exit {done.returncode}) on {raw_path}:\n{tail}")
    return output, seconds


def read_background(output: Path, cell_names) -> tuple[np.ndarray, np.ndarray]:
    """Background share of each named cell (NaN where CellBender did not analyse it) and the ambient profile."""
    with h5py.File(output, "r") as f:
        group = "matrix" if "matrix" in f else "matrix_v2"
        barcodes = np.asarray([b.decode() if isinstance(b, bytes) else str(b) for b in f[group]["barcodes"][:]])
        analysed = f["droplet_latents"]["barcode_indices_for_latents"][:]
        fraction = f["droplet_latents"]["background_fraction"][:]
        profile = np.asarray(f["global_latents"]["ambient_expression"][:], dtype=np.float64)
    by_name = pd.Series(fraction, index=barcodes[analysed])
    share = by_name.reindex([str(n) for n in cell_names]).to_numpy(dtype=np.float64)
    return share, profile / profile.sum()


def background_of_channel(command: str, cells: sp.csr_matrix, empties: sp.csr_matrix, genes, cell_names,
                          epochs: int, threads: int, empties_included: int) -> dict:
    """Write, run and read one channel: ``{"share", "profile", "seconds", "unanalysed"}`` for its cells in order.

    ``empties_included`` empty droplets are analysed with the cells (CellBender's
    ``--total-droplets-included`` is the cells plus these); the rest only inform its priors.
    """
    with tempfile.TemporaryDirectory(prefix="cellbender_") as tmp:
        workdir = Path(tmp)
        raw_path = workdir / "raw.h5ad"
        write_raw_droplets(raw_path, cells, empties, genes, cell_names)
        output, seconds = run_cellbender(command, raw_path, cells.shape[0], cells.shape[0] + empties_included,
                                         epochs, threads, workdir)
        share, profile = read_background(output, cell_names)
    # CellBender analyses the droplets it ranks highest; a cell it left out has no share (NaN), and is counted
    return {"share": share, "profile": profile, "seconds": seconds, "unanalysed": int(np.isnan(share).sum())}


# --- the two designs of bench_ambient.py, one run per channel ---------------------------------------
def cellbender_simulator(adata, command: str, epochs: int, threads: int, seed: int = 1) -> dict:
    """CellBender once per batch, each with that batch's simulated empty droplets."""
    counts = sp.csr_matrix(adata.layers["counts"])
    batch = adata.obs["batch"].to_numpy()
    levels = list(adata.obs["batch"].cat.categories)
    empties = datasets.simulate_empty_droplets(adata, n_droplets=EMPTIES_PER_CHANNEL["simulator"], seed=seed)
    share, profiles, seconds, unanalysed = np.full(adata.n_obs, np.nan), [], 0.0, 0
    for b in levels:
        cells = np.flatnonzero(batch == b)
        run = background_of_channel(command, counts[cells], sp.csr_matrix(empties.X[empties.obs["batch"].to_numpy() == b]),
                                    adata.var_names, adata.obs_names[cells], epochs, threads, EMPTIES_INCLUDED["simulator"])
        share[cells] = run["share"]
        profiles.append(run["profile"])
        seconds, unanalysed = seconds + run["seconds"], unanalysed + run["unanalysed"]
    return {"share": share, "profile": np.stack(profiles, 1), "seconds": seconds, "unanalysed": unanalysed}


def soup_droplets(adata, n: int, mean_counts: float, rng) -> sp.csr_matrix:
    """``n`` empty droplets of the added soup, ``mean_counts`` counts each on average (log-normal sd 0.3)."""
    sizes = np.maximum(1, np.round(mean_counts * rng.lognormal(0.0, 0.3, n))).astype(np.int64)
    return sp.csr_matrix(np.stack([rng.multinomial(size, adata.uns["soup"]) for size in sizes]))


def cellbender_spikein(adata, command: str, epochs: int, threads: int, per_group: bool, seed: int = 1) -> dict:
    """CellBender on the spiked cells, with empty droplets of the added soup.

    CellBender assumes every droplet of a channel takes up the same amount of soup (times a droplet
    efficiency). One channel (``per_group`` False): all cells, empty droplets at the mean amount added.
    One channel per spiked group (``per_group``): each group's cells with empty droplets at that
    group's amount; the 0 % group has no soup to draw empty droplets from and is left out (NaN).
    """
    rng = np.random.default_rng(seed)
    counts, n = sp.csr_matrix(adata.X), EMPTIES_PER_CHANNEL["spikein"]
    if not per_group:
        return background_of_channel(command, counts, soup_droplets(adata, n, adata.obs["added_counts"].mean(), rng),
                                     adata.var_names, adata.obs_names, epochs, threads, EMPTIES_INCLUDED["spikein"])
    share, seconds, unanalysed = np.full(adata.n_obs, np.nan), 0.0, 0
    spike = adata.obs["spike"].to_numpy()
    for level in adata.obs["spike"].cat.categories[1:]:  # the first is the 0 % group
        cells = np.flatnonzero(spike == level)
        soup_counts = float(adata.obs["added_counts"].to_numpy()[cells].mean())
        run = background_of_channel(command, counts[cells], soup_droplets(adata, n // 4, soup_counts, rng),
                                    adata.var_names, adata.obs_names[cells], epochs, threads, EMPTIES_INCLUDED["spikein"] // 4)
        share[cells], seconds, unanalysed = run["share"], seconds + run["seconds"], unanalysed + run["unanalysed"]
    return {"share": share, "seconds": seconds, "unanalysed": unanalysed}
