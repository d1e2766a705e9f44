"""Names: of the quantile layers and columns every posterior and effect query writes (``q05``, ``q97.5``), of
cells, genes and categories as the package compares them (as text), and of categories as ``.varm`` columns."""

from __future__ import annotations

import pandas as pd


def names_as_text(names) -> pd.Index:
    """Cell, gene or category names as text, the way the package compares them: h5ad and CSV files store names as
    strings, so the integer name 7 and the string "7" are one name."""
    return pd.Index(names).astype(str)


def quantile_label(q: float) -> str:
    """``q05`` for 0.05, ``q97.5`` for 0.975: whole percents with two digits, others as they are."""
    # to 1e-4 of a percent: a float32 0.9 (0.8999999762) is q90 and its lower bound q05, not q5; a level that small
    # rounding would make 0 keeps its own digits (1e-7 is not q00)
    exact = 100.0 * float(q)
    percent = round(exact, 4)
    if percent in (0.0, 100.0) and exact != percent:  # 1e-7 is not q00, nor 1 - 1e-7 q100
        return f"q{float(f'{exact:.12g}')!r}"  # 12 digits: two close levels keep two names
    return f"q{round(percent):02d}" if percent == round(percent) else f"q{percent:g}"


def stored_column_names(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its column names written so that an h5ad can store them: ``%`` as ``%25``, ``/`` as ``%2F``.

    A DataFrame in ``.varm`` is written with one HDF5 dataset per column, and "/" in its name would make a path (anndata
    warns that such names will fail). The escape is percent-encoding: ``urllib.parse.unquote`` gives the category's
    name back (``"batch=10x%2Fv3"`` -> ``"batch=10x/v3"``); a name without ``/`` or ``%`` is kept as it is.

    Parameters
    ----------
    frame
        A features x categories table (e.g. ``model.get_ambient_profile()``).

    Returns
    -------
    pandas.DataFrame
        A shallow copy, renamed.
    """
    # "%" first, so that a name holding "%2F" comes back as written
    names = [str(name).replace("%", "%25").replace("/", "%2F") for name in frame.columns]
    return frame.set_axis(names, axis=1)
