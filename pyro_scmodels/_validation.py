"""Argument checks shared by every public entry point.

Every check names the argument, and raises one exception type per kind of error:

* :class:`ArgumentTypeError` (a ``TypeError``): the value has the wrong type (a string where a
  number is needed, 2.5 where an integer is needed). The message names the argument, what it must
  be, and the value. It is also a ``ValueError``, so code written for the earlier checks, which
  raised ``ValueError`` for every bad argument, still catches it.
* ``ValueError``: the type is right but the value is not allowed (out of range, not one of the
  choices, two arguments that exclude each other). The message names the argument and the value.
* ``FileNotFoundError``: the folder to write a file into does not exist.
* ``KeyError``: a named key, column, layer or modality is missing from a container. The
  message names the key, where it was looked for and what is available. These checks
  (:func:`present`, :func:`group_column`) live in :mod:`._key_checks` and are imported here.

Each check returns the value in a canonical type (``int``, ``float``, ``str``), so callers write
``batch_size = positive_int("batch_size", batch_size)``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable

from ._key_checks import group_column, present

__all__ = [
    "ArgumentTypeError",
    "boolean",
    "choice",
    "exclusive",
    "fraction",
    "group_column",
    "integer",
    "non_negative_float",
    "non_negative_int",
    "number",
    "optional",
    "output_path",
    "positive_float",
    "positive_int",
    "present",
    "probability",
    "rate",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ``TypeError``; also a ``ValueError`` for older callers)."""


def _is_real(value) -> bool:
    # bool is an Integral in Python, but True as a batch size is a mistake, not a 1
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# --- integers ----------------------------------------------------------------------------------
def integer(name: str, value, minimum: int | None = None, maximum: int | None = None, description: str | None = None) -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]`` (either bound may be None).

    An integer-valued float such as ``2.0`` is accepted and converted.

    Parameters
    ----------
    name
        The argument's name, used in the message.
    value
        The value to check.
    minimum, maximum
        Inclusive bounds; None for no bound.
    description
        What the value must be, for the message; default ``"an integer >= minimum"`` etc.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        ``value`` is not an integer (nor an integer-valued float).
    ValueError
        ``value`` is out of bounds.
    """
    if description is None:
        bounds = [f">= {minimum}"] if minimum is not None else []
        bounds += [f"<= {maximum}"] if maximum is not None else []
        description = "an integer" + (" " + " and ".join(bounds) if bounds else "")
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        if _is_real(value) and math.isfinite(value) and float(value).is_integer():
            value = int(value)
        else:
            raise ArgumentTypeError(f"{name} must be {description}, got {value!r}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {description}, got {value!r}.")
    return int(value)


def positive_int(name: str, value) -> int:
    """``value`` as an ``int`` >= 1.

    Raises
    ------
    TypeError
        Not an integer.
    ValueError
        Smaller than 1.
    """
    return integer(name, value, minimum=1, description="a positive integer")


def non_negative_int(name: str, value) -> int:
    """``value`` as an ``int`` >= 0 (e.g. a seed or a number of warm-up epochs).

    Raises
    ------
    TypeError
        Not an integer.
    ValueError
        Negative.
    """
    return integer(name, value, minimum=0, description="a non-negative integer")


def seed(name: str, value) -> int:
    """``value`` as a seed: an ``int`` in ``[0, 2**32 - 1]``, the one range of every seed the package takes.

    The range numpy's legacy seeding and scikit-learn (NDreamer's PCA) take, and scvi-tools' (Lightning's) seeds;
    torch's ``manual_seed`` failed with its own overflow message above ``2**64 - 1``.

    Raises
    ------
    TypeError
        Not an integer.
    ValueError
        Outside that range.
    """
    return integer(name, value, minimum=0, maximum=2**32 - 1, description="an integer in [0, 2**32 - 1]")


# --- real numbers ------------------------------------------------------------------------------
def number(name: str, value, minimum: float | None = None, maximum: float | None = None, *,
           strict_minimum: bool = False, strict_maximum: bool = False, finite: bool = True,
           description: str | None = None) -> float:
    """``value`` as a ``float`` within the given bounds.

    Parameters
    ----------
    name
        The argument's name, used in the message.
    value
        The value to check.
    minimum, maximum
        Bounds; None for no bound.
    strict_minimum, strict_maximum
        Exclude the bound itself (``> minimum`` rather than ``>= minimum``).
    finite
        Reject NaN and infinities (NaN is always rejected when there is a bound).
    description
        What the value must be, for the message; default built from the bounds.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        ``value`` is not a real number (e.g. a string, None or a bool).
    ValueError
        ``value`` is NaN, infinite (with ``finite``) or out of bounds.
    """
    if description is None:
        bounds = [f"{'>' if strict_minimum else '>='} {minimum}"] if minimum is not None else []
        bounds += [f"{'<' if strict_maximum else '<='} {maximum}"] if maximum is not None else []
        description = ("a finite number" if finite else "a number") + (" " + " and ".join(bounds) if bounds else "")
    if not _is_real(value):
        raise ArgumentTypeError(f"{name} must be {description}, got {value!r}.")
    value = float(value)
    ok = not math.isnan(value) and (math.isfinite(value) or not finite)
    if minimum is not None:
        ok = ok and (value > minimum if strict_minimum else value >= minimum)
    if maximum is not None:
        ok = ok and (value < maximum if strict_maximum else value <= maximum)
    if not ok:
        raise ValueError(f"{name} must be {description}, got {value!r}.")
    return value


def positive_float(name: str, value) -> float:
    """``value`` as a finite ``float`` > 0 (a learning rate, a bandwidth).

    Raises
    ------
    TypeError
        Not a number.
    ValueError
        Zero, negative, NaN or infinite.
    """
    return number(name, value, minimum=0.0, strict_minimum=True, description="a positive number")


def non_negative_float(name: str, value) -> float:
    """``value`` as a finite ``float`` >= 0 (e.g. ``weight_decay``).

    Raises
    ------
    TypeError
        Not a number.
    ValueError
        Negative, NaN or infinite.
    """
    return number(name, value, minimum=0.0, description="a non-negative number")


def rate(name: str, value) -> float:
    """A probability in [0, 1) such as a dropout rate (1 would drop everything).

    Raises
    ------
    TypeError
        Not a number.
    ValueError
        Outside [0, 1).
    """
    return number(name, value, 0.0, 1.0, strict_maximum=True, description="a number in [0, 1)")


def level(name: str, value) -> float:
    """An interval's level in (0, 1), such as 0.9 for a 90 % interval.

    Raises
    ------
    TypeError
        Not a number.
    ValueError
        Outside (0, 1).
    """
    return number(name, value, 0.0, 1.0, strict_minimum=True, strict_maximum=True,
                  description="a level in (0, 1), e.g. 0.9 for a 90 % interval")


def probability(name: str, value) -> float:
    """A probability in [0, 1].

    Raises
    ------
    TypeError
        Not a number.
    ValueError
        Outside [0, 1].
    """
    return number(name, value, 0.0, 1.0, description="a probability in [0, 1]")


def fraction(name: str, value) -> float:
    """A non-empty fraction in (0, 1], such as ``train_size``.

    Raises
    ------
    TypeError
        Not a number.
    ValueError
        Outside (0, 1].
    """
    return number(name, value, 0.0, 1.0, strict_minimum=True, description="in (0, 1]")


# --- other kinds ---------------------------------------------------------------------------------
def boolean(name: str, value) -> bool:
    """``value`` as a ``bool`` (``numpy.bool_`` accepted; 0 and 1 are not).

    Raises
    ------
    TypeError
        Not a bool.
    """
    # numpy's bool is not a subclass of bool; recognised by name so numpy need not be imported
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return bool(value)
    raise ArgumentTypeError(f"{name} must be True or False, got {value!r}.")


def _listed(options: Iterable) -> str:
    shown = [repr(o) for o in options]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def choice(name: str, value, choices: Iterable, allow_none: bool = False):
    """``value``, which must be one of ``choices`` (or None with ``allow_none``).

    Parameters
    ----------
    name
        The argument's name, used in the message.
    value
        The value to check.
    choices
        The allowed values, e.g. ``("data", "prior")``.
    allow_none
        Also accept None.

    Raises
    ------
    TypeError
        Every choice is a string and ``value`` is not (e.g. ``init=3``).
    ValueError
        ``value`` is not one of ``choices``.
    """
    choices = tuple(choices)
    if value is None and allow_none:
        return None
    allowed = _listed([*choices, None] if allow_none else choices)
    if all(isinstance(c, str) for c in choices) and not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be {allowed}, got {value!r}.")
    if value not in choices:
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
    return value


def optional(check: Callable, name: str, value, *args, **kwargs):
    """None when ``value`` is None, else ``check(name, value, *args, **kwargs)``.

    Examples
    --------
    >>> optional(positive_int, "batch_size", None) is None
    True
    """
    return None if value is None else check(name, value, *args, **kwargs)


def exclusive(first_name: str, first, second_name: str, second) -> None:
    """Raise ``ValueError`` when both arguments are given (not None): they exclude each other."""
    if first is not None and second is not None:
        raise ValueError(f"Pass either {first_name} or {second_name}, not both (got {first_name}={first!r}).")


def file_path(name: str, value) -> str:
    """``value`` as a non-empty path ``str`` (``TypeError`` for other types, ``ValueError`` if empty)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a file path (str or os.PathLike), got {value!r}.")
    path = os.fspath(value)
    if not path:
        raise ValueError(f"{name} must be a file path, got {value!r}.")
    return path


def output_path(name: str, value) -> str:
    """``value``, a file to be written, as a ``str``; its folder must exist.

    Raises
    ------
    TypeError
        Not a str or path-like.
    ValueError
        An empty path.
    FileNotFoundError
        The folder to write into does not exist.
    """
    path = file_path(name, value)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name}: the folder {folder} to write {os.path.basename(path)} into does not exist.")
    return path
