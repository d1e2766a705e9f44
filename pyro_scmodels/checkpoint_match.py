"""Whether a saved training state belongs to the run that is about to resume from it.

A checkpoint records which training loop wrote it and a fingerprint of what the run depends on (cells,
genes, settings, covariates, priors; see each model's ``_fingerprint``). :func:`check_saved_state` compares
both with the run at hand, before any parameter is loaded, and names what differs.
"""

from __future__ import annotations

#: fingerprint parts added after checkpoints were first written (an older checkpoint lacks them)
ADDED_FINGERPRINT_PARTS = ("covariate keys", "covariate categories", "priors", "feature names", "model settings")
#: a model's parts that finer ones (which name what differs) replace: compared only for a checkpoint written before
#: its successor existed, so that an older checkpoint keeps its check and a newer one reports each difference once
SUCCEEDED_FINGERPRINT_PARTS = {"settings": "model settings", "covariates": "covariate keys"}
#: a module a loop keeps, and the loop: a checkpoint from before the "loop" entry is told by its modules
LEGACY_LOOP_MODULES = {"network": "NDreamerTrainer", "model": "SVITrainer"}


def check_saved_state(state: dict, loop: str, modules, fingerprint: dict, source: str) -> None:
    """Raise ``ValueError`` unless ``state`` was written by this kind of loop for the same data and settings.

    Parameters
    ----------
    state
        A loop's saved state (``TrainingLoop.state``).
    loop
        The name of the loop resuming (its class name).
    modules
        The names of the loop's modules.
    fingerprint
        The loop's fingerprint now.
    source
        What the state is, for the message (``"Checkpoint <path>"``).

    Raises
    ------
    ValueError
        Another model's training wrote it (it shares the file name ``checkpoint.pt``: the message does not tell
        the user to remove it), or the fingerprints differ (naming the parts, and a dict part's entries).
    """
    writer = state.get("loop") or next((kind for name, kind in LEGACY_LOOP_MODULES.items()
                                        if name in state and name not in modules), None)
    if writer is not None and writer != loop:
        raise ValueError(f"{source} was written by another model's training ({writer}), not by this {loop}; "
                         "choose another checkpoint_dir, or on the command line another output folder (that file "
                         "belongs to the other run).")
    saved = state.get("fingerprint", {})
    differing = []
    skipped = ({k for k in ADDED_FINGERPRINT_PARTS if k not in saved}
               | {k for k, successor in SUCCEEDED_FINGERPRINT_PARTS.items() if successor in saved and successor in fingerprint})
    for key in sorted((set(saved) | set(fingerprint)) - skipped):
        old, new = saved.get(key), fingerprint.get(key)
        if _same(old, new):
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # name the entries that differ, not the whole group
            differing += [f"{key}.{k}" for k in sorted(set(old) | set(new), key=str) if not _same(old.get(k), new.get(k))]
        else:
            differing.append(key)
    if differing:
        raise ValueError(f"{source} was written for different data or settings ({', '.join(differing)} differ); "
                         "remove it or choose another checkpoint_dir (on the command line: --overwrite, or another "
                         "output folder).")


def _same(old, new) -> bool:
    """Equal, or the same number written two ways (``"1000"`` and ``"1000.0"``: a setting given as an int then, and
    stored as a float now)."""
    if old == new:
        return True
    try:
        return isinstance(old, str) and isinstance(new, str) and float(old) == float(new)
    except ValueError:
        return False
