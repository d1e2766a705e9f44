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
    temporary = os.path.join(folder, _temporary_name(name, str(os.getpid())))
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _temporary_name(name: str, pid: str) -> str:
    """The name :func:`atomic_path` writes ``name`` under first, in the process ``pid`` (the suffix kept)."""
    stem, suffix = os.path.splitext(name)
    return f"{stem}.partial-{pid}{suffix}"


def is_write_of(name: str, final: str) -> bool:
    """Whether the file ``name`` is ``final`` or an unfinished :func:`atomic_path` write of it (any process's)."""
    if name == final:
        return True
    stem, suffix = os.path.splitext(final)
    pid = name[len(stem) + len(".partial-"):len(name) - len(suffix)]  # where the process id would be
    return pid.isdigit() and name == _temporary_name(final, pid)


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


def refuse_foreign_files(dir_path: str, marker: str, names, what: str) -> None:
    """``FileExistsError`` naming the first of ``names`` in ``dir_path`` when no ``marker`` makes the folder a save:
    such a file is someone else's (the user's data, another command's results), which a save must not replace.

    Parameters
    ----------
    dir_path
        The folder saved into.
    marker
        The file that marks a complete save (its presence: the files are an earlier save's, replaced with
        ``overwrite=True``).
    names
        The files the save writes or removes.
    what
        What is saved, for the message (e.g. ``"a saved model"``).
    """
    if os.path.exists(os.path.join(dir_path, marker)):
        return
    for name in names:
        if os.path.exists(os.path.join(dir_path, name)):
            raise FileExistsError(f"{os.path.join(dir_path, name)} exists and is not part of {what} (there is no "
                                  f"{marker}); save into another folder, or pass overwrite=True to replace it.")


STAGED_PREFIX = ".staged-"  # a file of a save in progress, renamed into place once every file of the save is written


@contextlib.contextmanager
def staged_save(dir_path: str, marker: str, replaces=()):
    """Write the files of one save into ``dir_path`` so that the folder never holds a mix of two saves.

    Each file is written (atomically) under a staged name beside its final one. Only when the block has
    written them all are they put in place: ``marker``, the file that makes the folder a saved object, is
    removed first, the files of ``replaces`` that this save did not write are removed when ``marker`` was there
    before the save (they belong to the earlier save; without it they are someone else's, and stay), the others
    are renamed in, and ``marker`` last. A save that fails while writing (a full
    disk, Ctrl-C) leaves the earlier save as it was; one stopped during the renames leaves a folder without
    ``marker``, which does not load.

    Parameters
    ----------
    dir_path
        An existing, writable folder.
    marker
        The file whose presence marks a complete save; the block must stage it.
    replaces
        Other file names an earlier save may have left, removed unless this save writes them (only with ``marker``
        there: without it they are not known to be a save's).

    Yields
    ------
    callable
        ``stage(name) -> path``: the path to write the file ``name`` to.
    """
    final = lambda name: os.path.join(dir_path, name)  # noqa: E731
    earlier_save = os.path.exists(final(marker))
    staged: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            def stage(name: str) -> str:
                staged.append(name)
                return stack.enter_context(atomic_path(final(f"{STAGED_PREFIX}{name}")))

            yield stage
        if marker not in staged:
            raise RuntimeError(f"staged_save: the save wrote no {marker}")  # a bug of the caller, not of the input
        # every file is written (each atomic_path renamed its temporary to the staged name): put them in place
        with contextlib.suppress(FileNotFoundError):
            os.remove(final(marker))
        for name in replaces if earlier_save else ():
            if name not in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(final(name))
        for name in [n for n in staged if n != marker] + [marker]:
            os.replace(final(f"{STAGED_PREFIX}{name}"), final(name))
    except BaseException:
        for name in staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(final(f"{STAGED_PREFIX}{name}"))
        raise
