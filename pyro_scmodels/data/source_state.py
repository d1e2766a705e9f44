"""What a model's copy of its training data depends on, to tell when the data object changed under it.

A model reads its set-up AnnData or MuData once (:class:`~pyro_scmodels.data.CellData`) and serves every
later query from that copy. If the user then edits the object in place (subsets its cells, rescales the
counts, relabels a covariate), the copy would silently answer for the old data. :func:`source_state` is a
summary taken when the copy is made and compared on every later read; :func:`changes` says what differs. It
costs a pass over the covariate codes and the stored counts' values (the sum of an in-memory matrix; of a backed
file, a sample of its stored entries: :func:`~pyro_scmodels.data.on_disk.stored_sample`), and the cell names only
when the index object was replaced: 0.11 s a check for 10^6 cells with 10^8 stored counts and two covariates
(0.47 s the first time, with the names).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import torch

from .._labels import names_as_text
from .counts import fingerprint
from .covariates import CovariateEncoding
from .on_disk import stored_sample


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).hexdigest()


def state_digest(state_dict: dict, skip=None) -> str:
    """A SHA-256 digest of a module's parameters and buffers (names and bytes): the same state, saved and loaded,
    gives the same one.

    Parameters
    ----------
    state_dict
        Name -> tensor, as ``torch.nn.Module.state_dict()`` returns it.
    skip
        ``skip(name, value)`` True leaves an entry out (e.g. one a state saved before it existed amounts to).

    Returns
    -------
    str
        The hex digest.
    """
    digest = hashlib.sha256()
    for name, value in sorted(state_dict.items()):
        if skip is not None and skip(name, value):
            continue
        digest.update(name.encode())
        # the bytes of any dtype (reshaped: a 0-d tensor has no last dimension to view)
        digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def names_digest(names) -> str:
    """A digest of a sequence of names, in order (cell or feature names)."""
    return _digest(pd.util.hash_pandas_object(names_as_text(names), index=False).to_numpy())


def unordered_names_hash(names) -> int:
    """The first checkpoints' hash of a set of names: a sum of per-name hashes, blind to their order (kept, so that
    those checkpoints keep matching; :func:`names_digest` is the ordered one)."""
    # as text (the same hash for string names): h5ad stores integer names as strings
    return int(pd.util.hash_pandas_object(names_as_text(names), index=False).to_numpy().sum() % (2**61))


def setting_text(value) -> str:
    """A text that changes whenever ``value`` does: ``repr``, but arrays and tables by a digest of their content
    (pandas and numpy shorten a long ``repr`` with "...", so two profiles differing in a middle gene read the same)."""
    if isinstance(value, (pd.DataFrame, pd.Series)):
        frame = value.to_frame() if isinstance(value, pd.Series) else value
        content = pd.util.hash_pandas_object(frame, index=False).to_numpy()  # any dtype, row by row
        return (f"{type(value).__name__} {frame.shape} {names_digest(frame.index)} {names_digest(frame.columns)} "
                f"{_digest(content)}")
    if isinstance(value, np.ndarray):
        return f"ndarray {value.shape} {value.dtype} {_digest(value)}"
    return repr(value)


def source_state(data, setup, encoding: CovariateEncoding, previous: dict | None = None,
                 count_fingerprints: list[dict] | None = None) -> dict:
    """A summary of the parts of ``data`` that a model's copy of it holds.

    Parameters
    ----------
    data
        The set-up AnnData or MuData.
    setup
        Its setup record (:class:`~pyro_scmodels.data.AnnDataSetup` or :class:`~pyro_scmodels.data.MuDataSetup`):
        where the counts are and which columns are covariates.
    encoding
        The model's covariate encoding (a column it cannot encode counts as changed).
    previous
        The summary taken before, if any: an unchanged cell index object is then not hashed again.
    count_fingerprints
        The counts' fingerprints, in the order of ``setup.count_sources(data)``, when they were just
        taken of the same matrices (the model's first read): the stored counts are then not summed again.

    Returns
    -------
    dict
        ``{"cells": ..., "counts <name>": ..., "covariate <key>": ...}``; compare with :func:`changes`.
    """
    obs = data.obs
    state = {"cells": _index_state(obs.index, previous, "cells")}
    if hasattr(data, "mod"):
        # a modality replaced after the model read it (its features or cells reordered) keeps the sums of its
        # counts: its names tell (the model would label its per-feature values with the new order's names)
        for m in setup.modalities:
            table = data.mod[m] if m in data.mod else None
            for axis in ("var", "obs"):
                part = f"{'features' if axis == 'var' else 'cells'} of mdata.mod[{m!r}]"
                state[part] = None if table is None else _index_state(getattr(table, f"{axis}_names"), previous, part)
    sources = setup.count_sources(data)
    known = count_fingerprints if count_fingerprints is not None else [None] * len(sources)
    if len(known) != len(sources):
        raise ValueError(f"{len(known)} count fingerprints given for {len(sources)} count matrices.")
    for (name, matrix), taken in zip(sources.items(), known):
        state[f"counts {name}"] = fingerprint(matrix) if taken is None else taken
        sample = stored_sample(matrix)
        if sample is not None:  # counts in a file: a sample of its stored entries stands in for their sum
            state[f"counts {name}"] = {**state[f"counts {name}"], "stored sample": sample}
    for key in encoding.keys.categorical_keys():
        try:
            state[f"covariate {key!r}"] = _digest(encoding.codes(obs, key, setup.table))
        except (KeyError, ValueError):  # the column is gone, or holds a category the model never saw: it changed
            state[f"covariate {key!r}"] = None
    if encoding.keys.continuous:
        try:
            state["continuous covariates"] = _digest(encoding.continuous(obs, setup.table))
        except (KeyError, ValueError):
            state["continuous covariates"] = None
    return state


def _index_state(index: pd.Index, previous: dict | None, part: str) -> tuple:
    """(length, index object[, digest of the names]): the names are hashed only when the object is not the one seen
    before (a pandas Index cannot change in place: the same object has the same names)."""
    seen = None if previous is None else previous.get(part)
    if seen is not None and seen[1] is index:
        return len(index), index
    return len(index), index, _digest(pd.util.hash_pandas_object(index, index=False).to_numpy())


def changes(before: dict, now: dict) -> list[str]:
    """The parts that differ between two :func:`source_state` summaries, named for a message.

    Parameters
    ----------
    before, now
        Two summaries of the same data object.

    Returns
    -------
    list of str
        E.g. ``["cells", "counts adata.X", "covariate 'batch'"]``; empty when nothing changed.
    """
    differ = []
    for part in dict.fromkeys([*before, *now]):
        old, new = before.get(part), now.get(part)
        if isinstance(old, tuple) and isinstance(new, tuple):
            # names, as (count, index object[, digest]): the same object, or the same count and digest
            same = old[1] is new[1] or (len(old) == 3 and len(new) == 3 and old[0] == new[0] and old[2] == new[2])
        else:
            same = old == new
        if not same:
            differ.append(part)
    return differ


def backed_files(data) -> list[str]:
    """The files behind a backed AnnData, or behind a MuData's backed modalities (empty in memory).

    Parameters
    ----------
    data
        An AnnData or MuData.

    Returns
    -------
    list of str
        Each file once.
    """
    tables = list(data.mod.values()) if hasattr(data, "mod") else [data]
    files = [str(table.filename) for table in tables if getattr(table, "isbacked", False)]
    return list(dict.fromkeys(files))


def counts_on_disk(changed: list[str], sources: dict) -> bool:
    """Whether every part of ``changed`` (:func:`changes`) is a count matrix read from a file.

    Parameters
    ----------
    changed
        The parts that differ, e.g. ``["counts adata.X"]``.
    sources
        The setup's count matrices as stored (``setup.count_sources(data)``), by name.

    Returns
    -------
    bool
        True when each changed part names counts whose matrix is on disk.
    """
    return bool(changed) and all(part.startswith("counts ") and stored_sample(sources.get(part[len("counts "):]))
                                 is not None for part in changed)
