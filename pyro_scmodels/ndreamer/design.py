"""NDreamer's counterfactual design read from the cell table: conditions, batches, and the checks on them.

Every entry point (the constructor, ``from_model``, ``load``) builds its design here, before any expensive work.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .. import _validation as V
from .effect_queries import labels_of
from .effects import CounterfactualDesign


def design_from_obs(obs: pd.DataFrame, settings: dict, saved: bool = False) -> CounterfactualDesign:
    """Conditions and batches of the cells, checked (unknown keys, NaN, unknown control, confounding).

    Parameters
    ----------
    obs
        The cell table.
    settings
        NDreamer's settings (``condition_key``, ``control_name``, ``batch_key``, ``min_cells_per_group``).
    saved
        An NDreamer saved before some checks existed: a confounded design loads with a warning instead.

    Returns
    -------
    CounterfactualDesign
    """
    if settings["condition_key"] in settings["batch_key"]:
        message = (f"batch_key {settings['batch_key']} holds the condition_key {settings['condition_key']!r}: a batch "
                   "effect equal to the condition would take the whole treatment effect. Give the batches (e.g. "
                   "donors or runs) as batch_key, or none.")
        if not saved:
            raise ValueError(message)
        warnings.warn(f"This saved NDreamer's design is confounded: {message}", UserWarning, stacklevel=3)
    if not saved:  # a column of real numbers made one group per cell (the error then listed every cell)
        for key in dict.fromkeys([settings["condition_key"], *settings["batch_key"]]):
            if key in obs.columns:  # a missing one is named by labels_of below
                V.group_column(obs, key, "condition_key" if key == settings["condition_key"] else "batch_key")
    condition = labels_of(obs, [settings["condition_key"]], "condition_key")[:, 0]
    batches = labels_of(obs, settings["batch_key"], "batch_key")
    if batches.shape[1] > 1 and not saved:
        joined = [(key, value) for j, key in enumerate(settings["batch_key"]) for value in np.unique(batches[:, j])
                  if "|" in value]
        if joined:  # ("x|1", "2") and ("x", "1|2") would be one batch, "x|1|2"
            key, value = joined[0]
            raise ValueError(f"batch_key {key!r} has the label {value!r}: with several batch keys the labels are "
                             "joined with '|', so a label holding '|' could merge two batches. Rename those labels.")
    batch = np.array(["|".join(row) for row in batches]) if batches.shape[1] else None
    # saved before the setting existed: no minimum
    return CounterfactualDesign(condition, settings["control_name"], batch, settings.get("min_cells_per_group", 1),
                                refuse_confounding=not saved)
