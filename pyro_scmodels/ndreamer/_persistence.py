"""Writing and reading a saved NDreamer folder (see :meth:`NDreamer.save` / :meth:`NDreamer.load`).

A folder holds ``settings.json`` (constructor settings and loss weights), ``results.h5ad``
(the results AnnData, with the pseudo cell-state labels as hidden ``obs`` columns),
``effects.npz`` (matching space and cached effects), for a network ``network.pt`` (and, once trained,
``training.pt``: history, optimiser state, passes done) and, when the expression is held as counts (a backed
input), ``expression_counts.npz``; each name after the save's prefix (``f"{prefix}settings.json"``), so that
NDreamers saved with different prefixes share a folder.
:func:`write_effects_h5ad` writes every cell's effect layers to an ``.h5ad`` block by block.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .. import _validation as V
from .._atomic import STAGED_PREFIX, atomic_path, is_write_of, refuse_foreign_files, staged_save, write_h5ad
from .._io import load_torch_file, read_h5ad, writable_folder
from .._labels import names_as_text
from ..models.persistence import no_saved

from .attached_model import EMBEDDING_KEY, check_attached_model
from .count_rows import LogNormalisedCounts
from .effect_intervals import bound_names
from .ite_shrinkage import CLUSTER_KEY
from .losses import LossWeights

NETWORK_FILE, SETTINGS_FILE, RESULTS_FILE, EFFECTS_FILE = "network.pt", "settings.json", "results.h5ad", "effects.npz"
COUNTS_FILE = "expression_counts.npz"  # the expression of an NDreamer from a backed input (results.X is None)
TRAINING_FILE = "training.pt"  # the training loop's state without the network (history, optimiser, passes done)
#: every file a save may write
SAVED_FILES = (EFFECTS_FILE, NETWORK_FILE, TRAINING_FILE, COUNTS_FILE, SETTINGS_FILE, RESULTS_FILE)
COUNTS_ARRAYS = ("counts", "indices", "indptr", "factors")
NETWORK, LATENT = "network", "latent"  # the two kinds of representation
LABEL_COLUMNS = ("_label_low", "_label_high")


def is_saved_ndreamer(path: str) -> bool:
    """Whether ``path`` is an NDreamer's settings file (a JSON object with its loss weights), not another
    ``*settings.json``."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as handle:
            settings = json.load(handle)
        return isinstance(settings, dict) and "loss_weights" in settings
    return False


def saved_files(dir_path: str, prefix: str = "", staged: bool = False) -> tuple[str, ...]:
    """The files (names after ``prefix``, settings file aside) that the NDreamer saved in ``dir_path`` under
    ``prefix`` wrote, as its settings file lists them; () without a settings file.

    A save before the list was kept (and one whose settings cannot be read) is taken to have written every name an
    NDreamer of its representation may write: an NDreamer without a network wrote no network or training file.
    Another file of such a name is the user's, and :func:`write_ndreamer` and :func:`discard_saved` leave it alone.
    """
    marker = os.path.join(dir_path, (STAGED_PREFIX if staged else "") + prefix + SETTINGS_FILE)  # staged: unfinished
    if not os.path.isfile(marker):
        return ()
    settings = {}
    with contextlib.suppress(OSError, ValueError):
        with open(marker) as handle:
            settings = json.load(handle)
    settings = settings if isinstance(settings, dict) else {}
    listed = settings.get("files")
    if isinstance(listed, list):
        return tuple(name for name in SAVED_FILES if name in listed and name != SETTINGS_FILE)
    latent = settings.get("representation") == LATENT
    return tuple(n for n in SAVED_FILES if n != SETTINGS_FILE and not (latent and n in (NETWORK_FILE, TRAINING_FILE)))


def _is_staged(name: str, prefix: str) -> bool:
    """Whether ``name`` is a staged file of an NDreamer's save under ``prefix`` (or an unfinished write of one)."""
    return any(is_write_of(name, STAGED_PREFIX + prefix + saved) for saved in SAVED_FILES)


def discard_saved(dir_path: str, prefix: str = "") -> None:
    """Remove the NDreamer saved in ``dir_path`` under ``prefix``: the files its settings file lists
    (:func:`saved_files`) and the settings file, or, after a save stopped during its renames (no settings file, its
    effects file in place), the files its staged settings file lists (the effects file alone without one); and the
    staged files of a save under ``prefix``
    that did not finish. Other files (another prefix's save, a model's, the user's) are left alone."""
    if not os.path.isdir(dir_path):
        return
    names = [f for f in os.listdir(dir_path) if _is_staged(f, prefix)]
    if os.path.isfile(os.path.join(dir_path, prefix + SETTINGS_FILE)):
        names += [prefix + n for n in (*saved_files(dir_path, prefix), SETTINGS_FILE)]
    elif os.path.isfile(os.path.join(dir_path, prefix + EFFECTS_FILE)):  # the one file no other output of the package has
        # a save stopped during its renames: the files its staged settings list, else the effects file alone
        names += [prefix + n for n in (saved_files(dir_path, prefix, staged=True) or (EFFECTS_FILE,))]
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(dir_path, name))


def write_ndreamer(nd, dir_path: str, overwrite: bool = False, prefix: str = "") -> None:
    """Write ``nd`` into ``dir_path`` (and nowhere else), each file's name after ``prefix`` (checked by
    :func:`~pyro_scmodels.models.persistence.file_prefix`); ``FileExistsError`` unless ``overwrite``, which replaces
    only the files of the same prefix.

    Every file is first written under a staged name beside its final one. Only when all are written are they
    renamed into place: the settings file, which marks a saved NDreamer, is removed before the renames and
    written last. A save that fails while writing (a full disk) leaves an earlier save in the folder as it was;
    one stopped during the renames leaves a folder without settings, which does not load (never a mix of two
    saves, which loaded without a word).
    """
    overwrite = V.boolean("overwrite", overwrite)  # a string "False" from a config file read as True
    marker = prefix + SETTINGS_FILE
    if os.path.exists(os.path.join(dir_path, marker)) and not overwrite:
        raise FileExistsError(f"{dir_path} holds a saved NDreamer ({marker}); pass overwrite=True to replace it, or "
                              "save with another prefix.")
    if not overwrite:  # e.g. the results.h5ad of `pyro-scmodels fit` in the same folder, replaced by NDreamer's
        refuse_foreign_files(dir_path, marker, [prefix + name for name in SAVED_FILES], "a saved NDreamer")
    writable_folder("dir_path", dir_path)
    # the files the earlier save under this prefix wrote and this one does not are removed (a stale training state
    # loaded beside a new network); a file it did not write (the user's best_network.pt) stays
    earlier = saved_files(dir_path, prefix)
    with staged_save(dir_path, marker, replaces=tuple(prefix + name for name in earlier)) as stage:
        written = []

        def stage_file(name: str) -> str:
            written.append(name)
            return stage(prefix + name)

        if nd.network is not None:
            torch.save(nd.network.state_dict(), stage_file(NETWORK_FILE))
        if nd.trainer is not None:  # history, optimiser moments and the passes done: training goes on after a load
            torch.save(nd.trainer.state(include_modules=False), stage_file(TRAINING_FILE))
        write_h5ad(_results_to_save(nd), stage_file(RESULTS_FILE))
        if isinstance(nd.expression, LogNormalisedCounts):
            with open(stage_file(COUNTS_FILE), "wb") as handle:
                np.savez(handle, n_genes=nd.expression.shape[1], **{n: getattr(nd.expression, n) for n in COUNTS_ARRAYS})
        nd.effects.save(stage_file(EFFECTS_FILE))
        with open(stage(marker), "w") as handle:  # the files written: only those are read back, or removed later
            json.dump({**nd.settings, "loss_weights": dataclasses.asdict(nd.loss_weights), "files": written}, handle)


def _results_to_save(nd) -> anndata.AnnData:
    """A new AnnData over the same matrices as ``nd.results`` (a .copy() would duplicate X and every layer), with
    obs and uns copied (changed here: the labels as hidden columns, the CATE tables' categories as text)."""
    source = nd.results
    results = anndata.AnnData(X=source.X, obs=source.obs.copy(), var=source.var, uns=copy.deepcopy(dict(source.uns)),
                              obsm=dict(source.obsm), varm=dict(source.varm), layers=dict(source.layers),
                              obsp=dict(source.obsp), varp=dict(source.varp))
    for key in [k for k in results.uns if k.startswith("cate_")]:
        results.uns[key] = results.uns[key].astype({"group": str, "gene": str})
    if nd.label_low is not None:
        results.obs[LABEL_COLUMNS[0]], results.obs[LABEL_COLUMNS[1]] = nd.label_low, nd.label_high
    return results


@dataclasses.dataclass
class SavedNDreamer:
    """What a saved NDreamer folder holds, read back; :meth:`NDreamer.load` builds the instance from it.

    Attributes
    ----------
    settings, loss_weights
        Constructor settings and loss weights.
    results
        The results AnnData (its X is the log-normalised expression of the selected genes, or None).
    expression
        The log-normalised expression: ``results.X`` as a CSR, or the saved
        :class:`~pyro_scmodels.ndreamer.count_rows.LogNormalisedCounts`.
    labels
        The pseudo cell-state labels (low, high resolution), or None.
    latent
        The fixed embedding of a ``from_model`` NDreamer, or None.
    network_state
        The network's state dict, or None when the representation is a latent.
    effects_file
        Path of the matching state and cached effects, or None when it was not saved.
    training_state
        The training loop's state without the network (:meth:`TrainingLoop.state`), or None.
    """

    settings: dict
    loss_weights: LossWeights
    results: anndata.AnnData
    expression: object
    labels: tuple | None
    latent: np.ndarray | None
    network_state: dict | None  # None when the folder has no network file
    effects_file: str | None  # None when the folder has no effects file
    training_state: dict | None = None  # None when saved before training, or before the file existed


def read_ndreamer(dir_path: str, model=None, prefix: str = "") -> SavedNDreamer:
    """Read the NDreamer saved in ``dir_path`` under ``prefix`` by :func:`write_ndreamer`.

    Parameters
    ----------
    dir_path
        The folder.
    model
        The model a ``from_model`` NDreamer was built from, checked to hold the saved cells.
    prefix
        The prefix it was saved with (checked by :func:`~pyro_scmodels.models.persistence.file_prefix`).

    Returns
    -------
    SavedNDreamer

    Raises
    ------
    FileNotFoundError
        A file of the save is missing; without ``f"{prefix}settings.json"`` the message names the files in the folder
        and the prefixes of the NDreamers saved there.
    ValueError
        ``model`` is not the one the saved NDreamer was built from (:func:`check_attached_model`).
    """
    path = lambda name: os.path.join(dir_path, prefix + name)  # noqa: E731
    for name in (SETTINGS_FILE, RESULTS_FILE):
        if not os.path.exists(path(name)):
            interrupted = os.path.isdir(dir_path) and any(_is_staged(f, prefix) for f in os.listdir(dir_path))
            error = (no_saved(dir_path, prefix, SETTINGS_FILE, "saved NDreamer", is_saved_ndreamer) if name == SETTINGS_FILE else
                     FileNotFoundError(f"No saved NDreamer in {dir_path} ({prefix}{name} missing)."))
            raise FileNotFoundError(str(error)[:-1] + ("; a save into it was interrupted: save again." if interrupted else "."))
    with open(path(SETTINGS_FILE)) as handle:
        settings = json.load(handle)
    settings.setdefault("representation", NETWORK)
    listed = settings.pop("files", None)  # the files the save wrote (None before they were listed)
    # a file of such a name the save did not write (one stopped during its renames left it, or the user's) is not read
    saved = lambda name: os.path.exists(path(name)) and (listed is None or name in listed)  # noqa: E731
    loss_weights = LossWeights(**settings.pop("loss_weights", {}))
    results = read_h5ad(path(RESULTS_FILE))
    labels = None
    if LABEL_COLUMNS[0] in results.obs:
        labels = tuple(results.obs.pop(c).to_numpy() for c in LABEL_COLUMNS)
    if model is not None and settings["representation"] != LATENT:
        raise ValueError(f"{dir_path} holds an NDreamer with its own network, not one built with NDreamer.from_model: it "
                         "takes no model; load it with NDreamer.load(dir_path).")
    if model is not None:
        check_attached_model(model, settings, results)
    latent = results.obsm[EMBEDDING_KEY] if settings["representation"] == LATENT else None
    network_state = None
    if settings["representation"] == NETWORK:
        network_file = path(NETWORK_FILE)
        if not saved(NETWORK_FILE):
            raise FileNotFoundError(f"No saved NDreamer network in {dir_path} ({prefix}{NETWORK_FILE} missing).")
        network_state = load_torch_file(network_file, "saved NDreamer network")
    counts_file = path(COUNTS_FILE)
    if results.X is not None:
        expression = sp.csr_matrix(results.X)
    elif saved(COUNTS_FILE):
        with np.load(counts_file, allow_pickle=False) as stored:
            expression = LogNormalisedCounts(*(stored[n] for n in COUNTS_ARRAYS), int(stored["n_genes"]))
    else:
        raise FileNotFoundError(f"The saved NDreamer in {dir_path} has no expression: {prefix}{RESULTS_FILE} has no X "
                                f"and {prefix}{COUNTS_FILE} is missing.")
    effects_file = path(EFFECTS_FILE)
    training_file = path(TRAINING_FILE)
    training_state = None
    if network_state is not None and saved(TRAINING_FILE):
        training_state = load_torch_file(training_file, "saved NDreamer training state")
    return SavedNDreamer(settings, loss_weights, results, expression, labels, latent, network_state,
                         effects_file if saved(EFFECTS_FILE) else None, training_state)


#: anndata's on-disk encoding of a dense array (the attributes ``anndata.io.write_elem`` gives one)
DENSE_ARRAY_ENCODING = {"encoding-type": "array", "encoding-version": "0.2.0"}
H5_CHUNK_VALUES = 2**20  # float32 values per HDF5 chunk (4 MiB): whole rows, so that reading cells reads few chunks


def write_effects_h5ad(nd, path: str, nearest_neighbor: int, bandwidth: float, chunk_cells: int,
                       overwrite: bool = False, interval: float | None = None, cells: np.ndarray | None = None,
                       columns: np.ndarray | None = None, shrink: str | None = None, uns: dict | None = None) -> str:
    """Write ``nd``'s denoised expression, batch effect and ITE layers, ``chunk_cells`` cells at a time.

    The file is an ordinary ``.h5ad`` (obs, the genes as var, obsm, the layers), written under a temporary
    name and renamed when complete. Memory holds one block of cells x genes per layer. ``cells`` and
    ``columns`` (positions; None for all) select the rows and genes written, in their order. ``shrink``
    ``"clusters"``: the ITEs shrunk (:meth:`~.matched_effects.MatchedEffects.shrunk`), the clusters in ``obs``.
    ``uns``: the file's ``uns`` (how its layers were made).
    """
    path = os.fspath(path)
    overwrite = V.boolean("overwrite", overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    if not path.endswith(".h5ad"):
        raise ValueError(f"write_effects writes an .h5ad file; got {path!r}.")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"The folder of {path} does not exist; create it first.")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    names = ["denoised", "batch_effect"] + [f"ite_{c}" for c in nd.design.treatments]
    if interval is not None:
        names += [f"ite_{c}_{bound}" for c in nd.design.treatments for bound in bound_names(interval)]
    cells = np.arange(nd.results.n_obs) if cells is None else np.asarray(cells)
    genes = pd.Index(nd.genes) if columns is None else pd.Index(nd.genes)[columns]
    n_cells, n_genes = len(cells), len(genes)
    obsm = {key: value.iloc[cells] if isinstance(value, pd.DataFrame) else value[cells]
            for key, value in nd.results.obsm.items()}
    obs = nd.results.obs.iloc[cells].drop(columns=CLUSTER_KEY, errors="ignore")
    if shrink is not None:  # the clusters are the matching space's, one set for every treatment
        obs[CLUSTER_KEY] = pd.Categorical(nd.effects.clusters()[cells])
    shell = anndata.AnnData(obs=obs, var=pd.DataFrame(index=names_as_text(genes)), obsm=obsm, uns=uns or {})
    with atomic_path(path) as temporary:
        shell.write_h5ad(temporary)
        with h5py.File(temporary, "a") as handle:
            layers = handle.require_group("layers")
            layers.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
            rows = int(max(1, min(n_cells, H5_CHUNK_VALUES // max(n_genes, 1))))
            datasets = {}
            for name in names:
                datasets[name] = layers.create_dataset(name, shape=(n_cells, n_genes), dtype="float32",
                                                       chunks=(rows, n_genes) if n_cells and n_genes else None)
                datasets[name].attrs.update(DENSE_ARRAY_ENCODING)
            for start in range(0, n_cells, chunk_cells):
                stop = min(start + chunk_cells, n_cells)
                block = nd.effects.effects_of(nearest_neighbor, bandwidth, cells[start:stop], columns, interval=interval)
                if shrink is not None:
                    block = nd.effects.shrunk(block, nearest_neighbor, bandwidth, cells[start:stop], columns, interval)
                for name in names:
                    datasets[name][start:stop] = block[name]
    return path
