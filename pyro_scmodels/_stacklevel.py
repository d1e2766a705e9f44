"""Where the package's warnings point: the user's line that called into the package, however deep the call went.

A hard-coded ``stacklevel`` counts the frames of one call path (e.g. through ``model.differential_expression``) and
points one frame off through another (``pyro_scmodels.differential.differential_expression(model, ...)``, public
too). :func:`user_stacklevel` counts them at the time of the warning instead. Python 3.12's
``warnings.warn(skip_file_prefixes=...)`` does the same; this works on 3.11 as well.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch.nn.modules.module
import torch.utils._contextlib

#: the package's directory, with a trailing separator (so ``pyro_scmodels_extra/`` is not inside it)
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


#: the package's name: code generated for it (a dataclass's ``__init__``, whose ``__post_init__`` may warn) has the file
#: name ``<string>`` and runs in the globals of the package module it was made for
PACKAGE = __name__.rpartition(".")[0]


def _real(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


#: files of the wrappers that package functions are called through, and nothing else: the standard library's
#: ``contextlib`` and torch's ``_contextlib`` (``@torch.no_grad()``, a ``contextlib.contextmanager`` used as a
#: decorator) and ``torch.nn.Module.__call__`` (a package module's ``forward``). ``warnings.warn`` counts their frames,
#: and a warning that stopped at them named torch's ``_contextlib.py`` or ``module.py``. Whole paths: a user's own
#: module named ``contextlib.py`` is the user's code.
WRAPPER_FILES = frozenset(_real(module.__file__) for module in (contextlib, torch.utils._contextlib,
                                                                torch.nn.modules.module))


@functools.lru_cache(maxsize=256)
def _is_wrapper_file(filename: str) -> bool:
    return _real(filename) in WRAPPER_FILES


def _inside_package(frame) -> bool:
    filename = frame.f_code.co_filename
    if filename.startswith("<"):
        # code without a file: the package's only when generated for one of its modules (``<string>``); ``<stdin>``,
        # ``<frozen runpy>``, ``<doctest ...>`` are not, and abspath would put them under the working directory
        return filename == "<string>" and str(frame.f_globals.get("__name__", "")).partition(".")[0] == PACKAGE
    return os.path.abspath(filename).startswith(PACKAGE_DIR)


def _passed_through(frame) -> bool:
    """A frame between the package's frames: the package's own, or a wrapper calling a package function (the walk
    only reaches a wrapper from the package function it called)."""
    return _inside_package(frame) or _is_wrapper_file(frame.f_code.co_filename)


def _internal(frame) -> bool:
    """A frame of the import machinery, which ``warnings.warn`` skips when it counts a stacklevel above 1."""
    filename = frame.f_code.co_filename
    return "importlib" in filename and "_bootstrap" in filename


def user_stacklevel() -> int:
    """The ``stacklevel`` at which a warning raised by the caller points at the first frame outside the package.

    Call it in the ``warnings.warn`` call itself: ``warnings.warn(message, UserWarning, stacklevel=user_stacklevel())``
    inside the package names the file and line of the user's code that called into the package (a script, a test,
    a notebook cell), whichever public function it called and through how many package frames.

    Returns
    -------
    int
        1 when the caller of this function is itself outside the package (the warning points at its own line);
        otherwise 1 plus the number of package frames between it and the first frame outside the package, counted as
        ``warnings.warn`` counts them (skipping the import machinery's frames; a wrapper calling a package function,
        e.g. ``@torch.no_grad()`` or ``torch.nn.Module.__call__``, and a package dataclass's generated ``__init__``
        count as package frames). When every frame is inside the package, one past the outermost, which
        ``warnings.warn`` reports as ``sys``.

    Examples
    --------
    >>> import warnings
    >>> from pyro_scmodels._stacklevel import user_stacklevel
    >>> def check(x):  # in a package module
    ...     if x < 0:
    ...         warnings.warn("x is negative", UserWarning, stacklevel=user_stacklevel())
    """
    frame = sys._getframe(1)  # the frame calling warnings.warn: stacklevel=1
    level = 1
    while frame is not None and _passed_through(frame):
        frame = frame.f_back
        while frame is not None and _internal(frame):
            frame = frame.f_back
        level += 1
    return level
