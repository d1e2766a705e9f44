"""Atomic file writes: a file appears under its final name complete, or not at all.

Every file the package writes (results, saved models, NDreamer folders, checkpoints) goes through
:func:`atomic_path`: the writer writes a temporary file in the same folder, which is renamed onto
the final name (``os.replace``, atomic on POSIX) only after the write finished. A crash or kill
during the write leaves at most a ``*.partial-*`` file, never a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary path next to ``path``, renamed to ``path`` when the block finishes without error.

    The temporary name keeps the final suffix (``results.partial-123.h5ad``), since some writers
    choose the format by it. On an error the temporary file is removed and the error re-raised.

    Parameters
    ----------
    path
        The final file name.

    Yields
    ------
    str
        The path to write to.
    """
    folder, name = os.path.split(os.path.abspath(path))
    stem, suffix = os.path.splitext(name)
    temporary = os.path.join(folder, f"{stem}.partial-{os.getpid()}{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_h5ad(adata, path: str) -> None:
    """``adata`` written to ``path`` as h5ad, atomically (see :func:`atomic_path`).

    A backed AnnData stays backed by its own file: its ``write_h5ad`` method would move it onto the
    written (temporary) file, leaving the user's object pointing at a name that is then renamed away.
    """
    with atomic_path(path) as temporary:
        if not getattr(adata, "isbacked", False):
            adata.write_h5ad(temporary)
            return
        from anndata.io import write_h5ad as write_copy  # the function writes a copy without rebinding

        if os.path.exists(temporary):  # it would append into an earlier process's left-over file of the same name
            os.remove(temporary)
        write_copy(temporary, adata)
