"""NDreamer's counterfactual design read from the cell table: conditions, batches, and the checks on them.

Every entry point (the constructor, ``from_model``, ``load``) builds its design here, before any expensive work.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd

from .. import _validation as V
from .._stacklevel import user_stacklevel
from .effect_queries import labels_of
from .counterfactual_design import GROUP_SEPARATOR, CounterfactualDesign


def design_keys(condition_key, batch_key) -> tuple[str, list[str]]:
    """The condition column and the list of batch columns, as given to the constructor or ``from_model``.

    Parameters
    ----------
    condition_key
        One column name.
    batch_key
        None, one column name, or a list, tuple, array or ``pandas.Index`` of them.

    Returns
    -------
    tuple
        ``(condition_key, batch_keys)``.

    Raises
    ------
    TypeError
        A condition key that is not one name (a list failed inside Python as "unhashable"), or batch keys of another
        kind (an Index failed inside pandas as "ambiguous").
    """
    if not isinstance(condition_key, str):
        raise TypeError(f"condition_key must be one column of adata.obs (a string), got {condition_key!r}"
                        + (f"; pass condition_key={condition_key[0]!r}." if isinstance(condition_key, (list, tuple))
                           and len(condition_key) == 1 else "."))
    if batch_key is None or isinstance(batch_key, str):
        return condition_key, [] if batch_key is None else [batch_key]
    if not isinstance(batch_key, (list, tuple, np.ndarray, pd.Index)) or not all(isinstance(k, str) for k in batch_key):
        raise TypeError(f"batch_key must be None, a column of adata.obs or a list of them, got {batch_key!r}.")
    return condition_key, [str(k) for k in batch_key]


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
    repeated = sorted({key for key in settings["batch_key"] if settings["batch_key"].count(key) > 1})
    if repeated and not saved:
        # each key is a batch effect of its own: one named twice got two embeddings and twice the independence weight
        raise ValueError(f"batch_key {settings['batch_key']} names {repeated} more than once; name each batch column "
                         "once.")
    if settings["condition_key"] in settings["batch_key"]:
        message = (f"batch_key {settings['batch_key']} holds the condition_key {settings['condition_key']!r}: a batch "
                   "effect equal to the condition would take the whole treatment effect. Give the batches (e.g. "
                   "donors or runs) as batch_key, or none.")
        if not saved:
            raise ValueError(message)
        warnings.warn(f"This saved NDreamer's design is confounded: {message}", UserWarning,
                      stacklevel=user_stacklevel())
    if not saved:  # a column of real numbers made one group per cell (the error then listed every cell)
        for key in dict.fromkeys([settings["condition_key"], *settings["batch_key"]]):
            if key in obs.columns:  # a missing one is named by labels_of below
                V.group_column(obs, key, "condition_key" if key == settings["condition_key"] else "batch_key")
    condition = labels_of(obs, [settings["condition_key"]], "condition_key")[:, 0]
    batches = labels_of(obs, settings["batch_key"], "batch_key")
    if not saved:
        _refuse_separator(condition, batches, settings)
        _refuse_colliding_layer_names(condition, settings)
    batch = np.array([GROUP_SEPARATOR.join(row) for row in batches]) if batches.shape[1] else None
    # saved before the setting existed: no minimum
    return CounterfactualDesign(condition, settings["control_name"], batch, settings.get("min_cells_per_group", 1),
                                refuse_confounding=not saved)


def _refuse_colliding_layer_names(condition: np.ndarray, settings: dict) -> None:
    """Refuse two treatments whose layers would share a name, where one would silently replace the other's.

    A treatment ``c`` names the layers ``ite_<c>``, its bounds ``ite_<c>_q05`` / ``ite_<c>_q95`` (per level) and
    the model's ``ite_model_<c>`` (with bounds): treatments ``IFN`` and ``IFN_q05``, or ``A`` and ``model_A``,
    wrote one layer twice (the second won, so IFN's lower bound was IFN_q05's ITE).
    """
    treatments = [str(c) for c in np.unique(condition) if str(c) != str(settings["control_name"])]
    for first in treatments:
        # what follows ite_ in a layer of `first`: first, first_q<..>, model_first, model_first_q<..>
        pattern = re.compile(rf"(model_)?{re.escape(first)}(_q[0-9][0-9.e+-]*)?")
        for second in treatments:
            if second != first and pattern.fullmatch(second):
                raise ValueError(f"condition_key {settings['condition_key']!r} has the treatments {first!r} and "
                                 f"{second!r}: the layers of {second!r} (ite_{second}) would take the name of a layer "
                                 f"of {first!r} (its interval's bounds ite_{first}_q05 / _q95, or the model's "
                                 f"ite_model_{first}), and one would replace the other. Rename one of them.")


def _refuse_separator(condition: np.ndarray, batches: np.ndarray, settings: dict) -> None:
    """Refuse a batch label holding the separator that joins the labels into matching groups, and a treatment's label
    holding ``/``.

    A group is its batch keys' labels and its condition joined with ``|``: with ``|`` in no batch label, the first
    parts of a group are its batch labels and the rest its condition, so a condition may hold ``|``; batch ``"x"``
    with condition ``"y|ctrl"`` and batch ``"x|y"`` with ``"ctrl"`` were one group. A condition names layers
    (``ite_<c>``) and files (``cate_<c>.csv``): with ``/`` the h5ad stored a nested group that anndata could not
    read back, and the CLI's CSV went to a folder that does not exist (the control names neither).
    """
    for j, key in enumerate(settings["batch_key"]):
        joined = [value for value in np.unique(batches[:, j]) if GROUP_SEPARATOR in value]
        if joined:
            raise ValueError(f"batch_key {key!r} has the label {joined[0]!r}: the batch labels are joined with "
                             f"{GROUP_SEPARATOR!r} into matching groups, so a label holding {GROUP_SEPARATOR!r} could "
                             "merge two groups (e.g. batch 'x' with condition 'y|ctrl', and batch 'x|y' with 'ctrl'). "
                             "Rename those labels.")
    # the control names no layer or file
    slashed = [value for value in np.unique(condition) if "/" in value and value != str(settings["control_name"])]
    if slashed:
        raise ValueError(f"condition_key {settings['condition_key']!r} has the label {slashed[0]!r}: conditions name "
                         "layers (ite_<condition>) and files (cate_<condition>.csv), where '/' would make a folder. "
                         "Rename those labels (e.g. replace '/' with '_').")
