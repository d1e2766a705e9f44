"""The output folder of a command line run: checked before any work, and cleared of an earlier run's outputs.

:func:`prepare_output` refuses a folder that would lose results or replace the input file; :func:`discard_earlier_outputs`
(``--overwrite``) and :func:`remove_superseded` (a resumed ``ndreamer`` run) remove what an earlier run wrote, so that
none of it stays beside this run's results.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil

from ._io import OutputFolder, OutputPathError
from .checkpoints import CHECKPOINT_FILE

# names inside an output folder that mark results of an earlier run
RESULT_NAMES = ("results.h5ad", "model", "checkpoint", "network.pt", "ndreamer")
#: other files the commands write into the output folder (an input file there would be replaced)
WRITTEN_FILES = ("effects.h5ad", "history.csv")
#: what the commands write into an output folder, removed by --overwrite: an earlier run's optional outputs (its
#: CATE tables, heatmaps, effects file, NDreamer folder) stayed beside the new results
EARLIER_OUTPUTS = ("results.h5ad", "effects.h5ad", "history.csv", "latent.png", "training_curve.png",
                   "ndreamer_ite_heatmap.png", "model", "ndreamer", "checkpoint")
EARLIER_OUTPUT_PATTERNS = ("cate_*.csv", "ite_heatmap_*.png")


def prepare_output(folder: OutputFolder, args) -> str:
    """Check the output folder before any work: writable, not a file, no earlier results unless allowed, and not
    where the input file lies.

    Parameters
    ----------
    folder
        The command's output folder.
    args
        The parsed command line (``overwrite``; ``data`` and ``resume`` where the command has them).

    Returns
    -------
    str
        The folder's path, created if it was missing.
    """
    data = getattr(args, "data", None)
    if data is not None:
        _check_input_is_not_an_output(data, folder.path)
    _check_resumable(folder, args)
    return folder.check(overwrite=args.overwrite, resume=getattr(args, "resume", False))


def _check_input_is_not_an_output(data: str, out: str) -> None:
    """Refuse an input file that the command would replace (e.g. ``-o`` its own folder with ``results.h5ad``)."""
    relative = os.path.relpath(os.path.realpath(data), os.path.realpath(out))
    first = relative.split(os.sep)[0]
    if first != os.pardir and first in (*RESULT_NAMES, *WRITTEN_FILES):
        raise OutputPathError(f"the input file {data} is where this command writes its results "
                              f"({os.path.join(out, first)}); choose another output folder (-o) or move the input.")


def _check_resumable(folder: OutputFolder, args) -> None:
    """``--resume`` into a folder of finished results without a checkpoint: refused (it replaced them with a new run)."""
    checkpoint = os.path.join(folder.path, "checkpoint")
    if not getattr(args, "resume", False) or os.path.isfile(os.path.join(checkpoint, CHECKPOINT_FILE)):
        return
    # a checkpoint folder without its file (a run stopped before its first checkpoint) is not a result: resuming
    # starts afresh
    earlier = [path for path in folder.earlier_results() if os.path.basename(path) != "checkpoint"]
    if earlier:
        raise OutputPathError(f"--resume: {folder.path} holds results ({', '.join(earlier)}) but no checkpoint to resume "
                              "from; pass --overwrite to replace them with a new run, or choose another output folder.")
    logging.getLogger("pyro_scmodels").warning(f"--resume: no checkpoint in {checkpoint}; training starts from the "
                                               "beginning.")


def discard_earlier_outputs(out: str, args) -> None:
    """On ``--overwrite`` (without ``--resume``), remove what an earlier run wrote into the folder.

    Nothing of it is then left beside this run's results, and this run does not resume from its checkpoint. Called
    once every input check has passed, right before training: a run refused for its input keeps them. Other files
    are left alone.

    Parameters
    ----------
    out
        The output folder.
    args
        The parsed command line (``overwrite``, and ``resume`` where the command has it).
    """
    if getattr(args, "resume", False) or not args.overwrite:
        return
    from .ndreamer import discard_saved

    discard_saved(out)  # an NDreamer saved into the folder (the ndreamer command), or a save of one interrupted
    names = [*EARLIER_OUTPUTS, *(os.path.basename(p) for pattern in EARLIER_OUTPUT_PATTERNS
                                 for p in glob.glob(os.path.join(glob.escape(out), pattern)))]
    for name in names:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.isfile(path):
            os.remove(path)


def remove_superseded(out: str, written: set[str]) -> None:
    """Once a resumed ``ndreamer`` run has saved its results, and before its CATE tables: remove the earlier run's
    effects file, CATE tables and heatmaps.

    They stayed beside the new results, up to 2.1 log units off them; this run writes its own, if asked, after.

    Parameters
    ----------
    out
        The output folder.
    written
        Paths this run has written already (kept).
    """
    candidates = [os.path.join(out, "effects.h5ad"), *(p for pattern in EARLIER_OUTPUT_PATTERNS
                                                        for p in glob.glob(os.path.join(glob.escape(out), pattern)))]
    stale = [path for path in candidates if os.path.isfile(path) and path not in written]
    for path in stale:
        os.remove(path)
    if stale:
        logging.getLogger("pyro_scmodels").warning(
            f"--resume: removed the earlier run's {', '.join(os.path.basename(p) for p in stale)} (they would not belong "
            "to this run's results; the tables asked for are written again).")
