"""What a model's copy of its training data depends on, to tell when the data object changed under it.

A model reads its set-up AnnData or MuData once (:class:`~pyro_scmodels.data.CellData`) and serves every
later query from that copy. If the user then edits the object in place (subsets its cells, rescales the
counts, relabels a covariate), the copy would silently answer for the old data. :func:`source_state` is a
cheap summary (one pass over the cell names, the covariate codes and the stored counts) taken when the copy
is made and compared on every later read; :func:`changes` says what differs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from .counts import fingerprint
from .covariates import CovariateEncoding


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).hexdigest()


def source_state(data, setup, encoding: CovariateEncoding) -> dict:
    """A summary of the parts of ``data`` that a model's copy of it holds.

    Parameters
    ----------
    data
        The set-up AnnData or MuData.
    setup
        Its setup record (:class:`~pyro_scmodels.data.AnnDataSetup` or :class:`~pyro_scmodels.data.MuDataSetup`):
        where the counts are and which columns are covariates.
    encoding
        The model's covariate encoding (a category it does not know raises ``ValueError``).

    Returns
    -------
    dict
        ``{"cells": ..., "counts <name>": ..., "<key>": ...}``, equal for unchanged data.
    """
    obs = data.obs
    state = {"cells": (len(obs), _digest(pd.util.hash_pandas_object(obs.index, index=False).to_numpy()))}
    for name, matrix in setup.count_sources(data).items():
        state[f"counts {name}"] = fingerprint(matrix)
    for key in encoding.keys.categorical_keys():
        state[f"covariate {key!r}"] = _digest(encoding.codes(obs, key, setup.table))
    if encoding.keys.continuous:
        state["continuous covariates"] = _digest(encoding.continuous(obs, setup.table))
    return state


def changes(before: dict, now: dict) -> list[str]:
    """The parts that differ between two :func:`source_state` summaries, named for a message."""
    return [part for part in dict.fromkeys([*before, *now]) if before.get(part) != now.get(part)]
