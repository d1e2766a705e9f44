"""Reading inputs and preparing output folders, with errors that name the file.

Every check here runs before any expensive work: an input that cannot be read, or an output
folder that cannot be written, is reported at once with the path and the fix, instead of a
library traceback (h5py, torch) after training.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile

import torch

from . import _validation as V


class InputFileError(ValueError):
    """An input file that does not exist, is a folder, or is not in the expected format."""


class OutputPathError(ValueError):
    """An output path that is a file, lies under a file, or cannot be written."""


def read_h5ad(path, *, backed: str | None = None):
    """Read an AnnData ``.h5ad`` file; a missing, truncated or foreign file raises :class:`InputFileError`.

    Parameters
    ----------
    path
        The file to read.
    backed
        ``None`` (read into memory) or ``"r"`` (leave the matrix on disk), as in
        :func:`anndata.read_h5ad`.

    Returns
    -------
    anndata.AnnData
    """
    import anndata
    import h5py

    path = _existing_input(path)
    if not h5py.is_hdf5(path):
        raise InputFileError(
            f"input file {path} is not an .h5ad file (no HDF5 signature); convert it with anndata "
            "(e.g. `anndata.read_csv(...).write_h5ad(...)`) or scanpy first."
        )
    try:
        with h5py.File(path, "r") as file:
            encoding = file.attrs.get("encoding-type", "")
        if encoding == "MuData":  # anndata's own message says to update anndata
            raise InputFileError(f"input file {path} is a MuData (.h5mu) file; this reads one AnnData. Write the "
                                 "modality to use as its own file, e.g. mudata.read_h5mu(path)['rna'].write_h5ad("
                                 "'rna.h5ad'), or use RegularizedMultimodalVI from Python for both modalities.")
        return anndata.read_h5ad(path, backed=backed)
    except InputFileError:
        raise
    except Exception as err:  # noqa: BLE001 - anndata's IORegistryError is a bare Exception
        if not isinstance(err, (OSError, KeyError, ValueError, TypeError)) and "IOSpec" not in str(err):
            raise
        # h5py reports a truncated file as OSError, a foreign HDF5 layout as KeyError/ValueError
        raise InputFileError(f"input file {path} could not be read as an .h5ad file ({err}); is it complete?") from err


def read_h5mu(path):
    """Read a MuData ``.h5mu`` file, with the same checks as :func:`read_h5ad`."""
    import h5py
    import mudata

    path = _existing_input(path)
    if not h5py.is_hdf5(path):
        raise InputFileError(f"input file {path} is not an .h5mu file (no HDF5 signature).")
    try:
        return mudata.read_h5mu(path)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise InputFileError(f"input file {path} could not be read as an .h5mu file ({err}); is it complete?") from err


def load_torch_file(path: str, what: str = "saved file"):
    """``torch.load`` on the CPU; a truncated or foreign file raises :class:`InputFileError` naming it.

    Parameters
    ----------
    path
        File written by ``torch.save``.
    what
        What the file should hold, for the message (``"saved model"``, ``"checkpoint"``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {what} at {path}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise InputFileError(
            f"{path} could not be read as a {what} ({type(err).__name__}: {err}); the file is truncated or was not "
            "written by pyro_scmodels. Save it again, or remove it to start afresh."
        ) from err


def _existing_input(value) -> str:
    path = V.file_path("input file", value)
    if os.path.isdir(path):
        store = " (a zarr store: write it as .h5ad with anndata.read_zarr(path).write_h5ad(...))" if (
            os.path.exists(os.path.join(path, ".zattrs")) or os.path.exists(os.path.join(path, "zarr.json"))) else ""
        raise InputFileError(f"input file {path} is a folder{store}; give the path of an .h5ad file.")
    if not os.path.exists(path):
        raise InputFileError(f"input file {path} not found.")
    return path


class OutputFolder:
    """An output folder checked before the work: writable, not a file, not holding earlier results.

    :meth:`check` creates the folder (and its parents) if needed and writes and removes a probe
    file, so that an unwritable destination is reported before training. If the command then fails
    before writing anything, :meth:`discard_if_empty` removes the folders it created.

    Parameters
    ----------
    path
        The folder.
    result_names
        Names inside the folder that mark earlier results.
    label, option
        How messages name the folder, and the option that sets it (none for a Python argument).
    resumable
        Whether the command can continue an interrupted run (the refusal of earlier results then names
        ``--resume``).
    """

    def __init__(self, path, result_names: tuple[str, ...] = (), label: str = "output folder", option: str | None = "-o",
                 resumable: bool = True):
        self.label, self.hint = label, "" if option is None else f" ({option})"
        self.resumable = resumable
        self.path = V.file_path(label, path)
        self.result_names = tuple(result_names)
        self._created: list[str] = []

    def earlier_results(self) -> list[str]:
        """The paths inside the folder that hold earlier results."""
        return [os.path.join(self.path, n) for n in self.result_names if os.path.exists(os.path.join(self.path, n))]

    def check(self, overwrite: bool = False, resume: bool = False) -> str:
        """Create the folder if needed and prove that it can be written; refuse earlier results.

        Parameters
        ----------
        overwrite
            Earlier results may be replaced.
        resume
            The folder is expected to hold an interrupted run (earlier results are allowed).

        Returns
        -------
        str
            The folder's path.
        """
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OutputPathError(f"{self.label} {self.path} is an existing file; choose a folder name{self.hint}.")
        blocking = _file_on_the_way(self.path)
        if blocking is not None:
            raise OutputPathError(f"{self.label} {self.path} cannot be created: {blocking} is a file, not a folder.")
        earlier = self.earlier_results()
        if earlier and not (overwrite or resume):
            raise OutputPathError(
                f"{self.path} holds earlier results ({', '.join(earlier)}); choose another output folder"
                + (", pass --overwrite (overwrite=True) to replace them, or --resume to continue an interrupted run."
                   if self.resumable else " or pass --overwrite (overwrite=True) to replace them.")
            )
        self._make_folders()
        probe = os.path.join(self.path, f".write-probe-{os.getpid()}")
        try:
            with open(probe, "wb") as handle:
                handle.write(b"0")
            os.remove(probe)
        except OSError as err:
            self.discard_if_empty()
            raise OutputPathError(f"{self.label} {self.path} is not writable ({err.strerror}); choose another.") from err
        return self.path

    def _make_folders(self) -> None:
        missing, current = [], os.path.abspath(self.path)
        while not os.path.exists(current):
            missing.append(current)
            current = os.path.dirname(current)
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except OSError as err:
                self.discard_if_empty()
                raise OutputPathError(f"{self.label} {self.path} cannot be created ({err.strerror}: {folder}).") from err
            self._created.append(folder)

    def discard_if_empty(self) -> None:
        """Remove the folders :meth:`check` created, where they are still empty."""
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only succeeds on an empty folder
        self._created = [f for f in self._created if os.path.exists(f)]


def writable_folder(name: str, path) -> str:
    """``path`` as a folder that exists (made with its parents if needed) and can be written: checked before any work.

    Parameters
    ----------
    name
        The argument, for the message (e.g. ``"checkpoint_dir"``).
    path
        The folder.

    Returns
    -------
    str
        The path.

    Raises
    ------
    OutputPathError
        An existing file, a file among its parents, or a folder that cannot be made or written.
    """
    # the command line's output-folder check, named after the argument (a folder it makes stays: it is used next)
    return OutputFolder(path, label=name, option=None).check(overwrite=True)


def _file_on_the_way(path: str) -> str | None:
    """The first existing non-folder among the parents of ``path`` (``None`` when there is none)."""
    current = os.path.dirname(os.path.abspath(path))
    while current and current != os.path.dirname(current):
        if os.path.exists(current):
            return None if os.path.isdir(current) else current
        current = os.path.dirname(current)
    return None
