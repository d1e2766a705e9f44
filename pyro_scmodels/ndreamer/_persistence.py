"""Writing and reading a saved NDreamer folder (see :meth:`NDreamer.save` / :meth:`NDreamer.load`).

A folder holds ``settings.json`` (constructor settings and loss weights), ``results.h5ad``
(the results AnnData, with the pseudo cell-state labels as hidden ``obs`` columns),
``effects.npz`` (matching space and cached effects) and, for a trained network, ``network.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pandas as pd
import scipy.sparse as sp
import torch

from .._atomic import atomic_path, write_h5ad
from .._io import load_torch_file, read_h5ad

from .losses import LossWeights

EMBEDDING_KEY = "X_effect_modifier_space"
NETWORK_FILE, SETTINGS_FILE, RESULTS_FILE, EFFECTS_FILE = "network.pt", "settings.json", "results.h5ad", "effects.npz"
NETWORK, LATENT = "network", "latent"  # the two kinds of representation
LABEL_COLUMNS = ("_label_low", "_label_high")


def write_ndreamer(nd, dir_path: str, overwrite: bool = False) -> None:
    """Write ``nd`` into ``dir_path`` (and nowhere else); ``FileExistsError`` unless ``overwrite``."""
    if os.path.exists(os.path.join(dir_path, SETTINGS_FILE)) and not overwrite:
        raise FileExistsError(f"{dir_path} holds a saved NDreamer; pass overwrite=True.")
    os.makedirs(dir_path, exist_ok=True)
    # every file atomically; the settings file, which marks a saved NDreamer, is written last
    if nd.network is not None:
        with atomic_path(os.path.join(dir_path, NETWORK_FILE)) as temporary:
            torch.save(nd.network.state_dict(), temporary)
    results = nd.results.copy()
    for key in [k for k in results.uns if k.startswith("cate_")]:
        results.uns[key] = results.uns[key].astype({"group": str, "gene": str})
    if nd.label_low is not None:
        results.obs[LABEL_COLUMNS[0]], results.obs[LABEL_COLUMNS[1]] = nd.label_low, nd.label_high
    write_h5ad(results, os.path.join(dir_path, RESULTS_FILE))
    with atomic_path(os.path.join(dir_path, EFFECTS_FILE)) as temporary:
        nd.effects.save(temporary)
    with atomic_path(os.path.join(dir_path, SETTINGS_FILE)) as temporary, open(temporary, "w") as handle:
        json.dump({**nd.settings, "loss_weights": dataclasses.asdict(nd.loss_weights)}, handle)


def read_ndreamer(cls, dir_path: str, device: str = "auto", model=None):
    """An instance of ``cls`` restored from ``dir_path`` through its one constructor path (``_setup``)."""
    for name in (SETTINGS_FILE, RESULTS_FILE):
        if not os.path.exists(os.path.join(dir_path, name)):
            raise FileNotFoundError(f"No saved NDreamer in {dir_path} ({name} missing).")
    with open(os.path.join(dir_path, SETTINGS_FILE)) as handle:
        settings = json.load(handle)
    settings.setdefault("representation", NETWORK)
    loss_weights = LossWeights(**settings.pop("loss_weights", {}))
    results = read_h5ad(os.path.join(dir_path, RESULTS_FILE))
    labels = None
    if LABEL_COLUMNS[0] in results.obs:
        labels = tuple(results.obs.pop(c).to_numpy() for c in LABEL_COLUMNS)
    if model is not None and not pd.Index(model.adata.obs_names).equals(results.obs_names):
        raise ValueError("model.adata holds other cells than the saved NDreamer; pass the model it was built from.")
    latent = results.obsm[EMBEDDING_KEY] if settings["representation"] == LATENT else None
    nd = cls.__new__(cls)
    nd._setup(settings, results.obs.copy(), sp.csr_matrix(results.X), pd.Index(results.var_names), device,
              labels=labels, loss_weights=loss_weights, latent=latent, model=model)
    if nd.network is not None:
        network_file = os.path.join(dir_path, NETWORK_FILE)
        if not os.path.exists(network_file):
            raise FileNotFoundError(f"No saved NDreamer network in {dir_path} ({NETWORK_FILE} missing).")
        nd.network.load_state_dict(load_torch_file(network_file, "saved NDreamer network"))
        nd.network.eval()
    nd.results = results
    if os.path.exists(os.path.join(dir_path, EFFECTS_FILE)):
        nd.effects.load(os.path.join(dir_path, EFFECTS_FILE))
    return nd
