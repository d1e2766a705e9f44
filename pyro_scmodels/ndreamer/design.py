"""NDreamer's counterfactual design read from the cell table: conditions, batches, and the checks on them.

Every entry point (the constructor, ``from_model``, ``load``) builds its design here, before any expensive work.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .. import _validation as V
from .effect_queries import labels_of
from .effects import GROUP_SEPARATOR, CounterfactualDesign


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
    if not saved:
        _refuse_separator(condition, batches, settings)
    batch = np.array([GROUP_SEPARATOR.join(row) for row in batches]) if batches.shape[1] else None
    # saved before the setting existed: no minimum
    return CounterfactualDesign(condition, settings["control_name"], batch, settings.get("min_cells_per_group", 1),
                                refuse_confounding=not saved)


def _refuse_separator(condition: np.ndarray, batches: np.ndarray, settings: dict) -> None:
    """Refuse a condition or batch label holding the separator that joins them into matching groups.

    A batch's labels (one per batch key) and a cell's condition are joined with ``|``: batch ``"x"`` with condition
    ``"y|ctrl"`` and batch ``"x|y"`` with ``"ctrl"`` would be one group, ``"x|y|ctrl"``, so treated and control
    cells would be matched as one group.
    """
    columns = [(settings["condition_key"], "condition_key", condition),
               *((key, "batch_key", batches[:, j]) for j, key in enumerate(settings["batch_key"]))]
    for key, role, labels in columns:
        joined = [value for value in np.unique(labels) if GROUP_SEPARATOR in value]
        if joined:
            raise ValueError(f"{role} {key!r} has the label {joined[0]!r}: conditions and batches are joined with "
                             f"{GROUP_SEPARATOR!r} into matching groups, so a label holding {GROUP_SEPARATOR!r} could "
                             "merge two groups (e.g. batch 'x' with condition 'y|ctrl', and batch 'x|y' with 'ctrl'). "
                             "Rename those labels.")
