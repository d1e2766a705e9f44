"""Checks that a named key, column, layer or modality is where it is looked for, and that a column holds groups.

Part of the argument checks of :mod:`._validation`, which imports them (call them as ``V.present`` and
``V.group_column``). A missing key raises ``KeyError`` naming the key, where it was looked for and what is
available; a column of real numbers where groups are needed raises ``ValueError``.
"""

from __future__ import annotations

import pandas as pd


def present(key, container, where: str, what: str = "key", limit: int = 20) -> None:
    """Raise ``KeyError`` unless ``key`` is in ``container``, listing what is available.

    Parameters
    ----------
    key
        The key, column, layer or modality looked for.
    container
        Anything supporting ``in`` and iteration (a mapping, a ``pandas.Index``, a list).
    where
        Where it was looked for, e.g. ``"adata.obs"`` or ``"adata.layers"``.
    what
        What the key is, e.g. ``"column"``, ``"layer"``, ``"modality"``.
    limit
        At most this many available keys are listed.

    Raises
    ------
    KeyError
        E.g. ``"Layer 'raw' not found in adata.layers. Available layers: counts."``.
    """
    if key in container:
        return
    available = ", ".join(map(str, list(container)[:limit])) or "(none)"
    plural = what[:-1] + "ies" if what.endswith("y") and what[-2:-1] not in "aeiou" else what + "s"
    raise KeyError(f"{what.capitalize()} {key!r} not found in {where}. Available {plural}: {available}.")


def group_column(obs, key: str, what: str, table: str = "adata.obs", complete: bool = False,
                 missing_hint: str = "") -> None:
    """Raise unless ``obs[key]`` exists and holds groups (categories, strings or integer labels), not real numbers.

    Parameters
    ----------
    obs
        The cell table.
    key
        The column.
    what
        The argument that named it, for the message (e.g. ``"groupby"``).
    table
        How to call ``obs`` in the message.
    complete
        Also refuse cells without a value (NaN): a result per group would leave them out without a word.
    missing_hint
        A sentence added to the missing column's message (e.g. where ``table`` comes from, and how to add a column).

    Raises
    ------
    ArgumentTypeError
        ``key`` is a list (or another collection) of columns, not one.
    KeyError
        The column is missing.
    ValueError
        It holds real numbers (not all whole): one group per value would follow; or labels of different types that
        read the same as text (1 and "1").
    """
    if pd.api.types.is_list_like(key):
        # a list of columns (scanpy's groupby takes several) failed inside pandas: "unhashable type: 'list'"
        from ._validation import ArgumentTypeError  # here, not at the top: _validation imports this module
        names = list(key)
        joined = "_".join(map(str, names[:2]))
        raise ArgumentTypeError(
            f"{what} names one column of {table} (a string), got {names!r}. To group by several columns, join them "
            f"into one first, e.g. {table}[{joined!r}] = {table}[{names[0]!r}].astype(str) + '_' + "
            f"{table}[{names[1]!r}].astype(str)." if len(names) > 1 else
            f"{what} names one column of {table} (a string), got {names!r}; pass {what}={names[0]!r}." if names else
            f"{what} names one column of {table} (a string), got {key!r}.")
    try:
        present(key, obs.columns, table, "column")
    except KeyError as err:
        if not missing_hint:
            raise
        raise KeyError(f"{err.args[0]} {missing_hint}") from None
    column = obs[key]
    if complete and column.isna().any():
        raise ValueError(f"{what}: {table}[{key!r}] has missing values ({int(column.isna().sum())} cells); fill or drop "
                         "them first (a result per group would leave those cells out).")
    # numpy's and pandas' float dtypes, unless every value is a whole number (labels such as hours 0, 6, 24)
    if getattr(column.dtype, "kind", "") == "f" and not all(float(v).is_integer() for v in column.dropna().unique()):
        raise ValueError(f"{what}: {table}[{key!r}] holds real numbers ({column.nunique()} distinct values), not groups; "
                         "give a column of groups (categories, strings or integer labels), e.g. pd.cut of it.")
    # groups are compared as text: 1 and "1" of one column were merged (1 and 1.0 split) without a word
    # a categorical column's categories are its distinct labels: compared alone, not every cell's value
    labels = (column.cat.remove_unused_categories().cat.categories.to_series()
              if isinstance(column.dtype, pd.CategoricalDtype) else column.dropna())
    if labels.astype(str).nunique() != labels.nunique():
        raise ValueError(f"{what}: {table}[{key!r}] holds labels of different types that do not stay distinct as text "
                         f"(e.g. 1 and '1'); make the column one type first: {table}[{key!r}] = "
                         f"{table}[{key!r}].astype(str).")
