"""Checkpoints of the training loop: its state, written and read back, and whether a saved state belongs to a run.

:class:`LoopCheckpoints` is the part of :class:`~pyro_scmodels.training.TrainingLoop` that writes its state (modules,
optimiser, epoch, history, early-stopping counters, the loop's own extra state) and restores it. A checkpoint records
which training loop wrote it and a fingerprint of what the run depends on (cells, genes, settings, covariates,
priors; see each model's ``_fingerprint``). :func:`check_saved_state` compares both with the run at hand, before
any parameter is loaded, and names what differs.
"""

from __future__ import annotations

import copy
import decimal
import logging
import os
import warnings

import torch

from ._atomic import atomic_path
from ._io import load_torch_file
from ._stacklevel import user_stacklevel
from .optimizers import optimizer_state_fits

logger = logging.getLogger("pyro_scmodels.training")
#: the file a training run checkpoints to, inside its checkpoint_dir (every model's, NDreamer's too)
CHECKPOINT_FILE = "checkpoint.pt"
#: fingerprint parts added after checkpoints were first written (an older checkpoint lacks them)
ADDED_FINGERPRINT_PARTS = ("covariate keys", "covariate categories", "priors", "feature names", "model settings",
                           "module classes", "cell order", "cell labels", "expression", "cell covariates", "counts",
                           "query reference", "gene order")
#: a model's parts that finer ones (which name what differs) replace: compared only for a checkpoint written before
#: its successor existed, so that an older checkpoint keeps its check and a newer one reports each difference once
SUCCEEDED_FINGERPRINT_PARTS = {"settings": "model settings", "covariates": "covariate keys"}
#: a part, and the part a model also computes the way earlier versions wrote it: a checkpoint matching either matches
#: (the priors of a multimodal block without a site are now at their defaults, unused either way)
EQUIVALENT_FINGERPRINT_PARTS = {"priors": "priors as written before 2026-12-06",
                               # a multimodal subclass's block classes, recorded since then
                               "module classes": "module classes as written before 2026-12-06",
                               # a multimodal n_hidden or n_latent as given (a dict of equal values is now recorded
                               # as the value, and a dict in the modalities' order)
                               "model settings": "model settings as given before 2026-12-06"}
#: the same, where matching the earlier form leaves something unchecked: it matches, with a warning (a multimodal
#: subclass with its own blocks resuming a checkpoint that did not record the blocks)
UNCHECKED_EQUIVALENT_PARTS = {"module classes": "module classes as written before 2026-12-06, blocks unchecked"}
#: dict parts whose entries may be unknown in a saved state (None: the counts on disk, not summed before 2026-12-06):
#: such an entry matches any value, with a warning that it cannot be checked
PARTS_WITH_UNKNOWN_ENTRIES = ("counts",)
#: a module a loop keeps, and the loop: a checkpoint from before the "loop" entry is told by its modules
LEGACY_LOOP_MODULES = {"network": "NDreamerTrainer", "model": "SVITrainer"}


def state_copy(state):
    """A copy of a training state that shares no tensor with it: tensors cloned (detached), containers rebuilt,
    anything else deep-copied.

    What :func:`copy.deepcopy` gives, without its per-object bookkeeping: taken at every epoch boundary, the deep copy
    was 3.4 ms of a small model's 50 ms epoch on a quiet host, this 0.75 ms (benchmarks/RESULTS.md). A ``state_dict``'s ``_metadata`` (the modules'
    versions, read by ``load_state_dict``) is kept.

    Parameters
    ----------
    state
        A training state (:meth:`LoopCheckpoints.state`): dicts (``state_dict`` and the optimiser's included), lists,
        tuples, tensors and plain objects.

    Returns
    -------
    The copy, of the same container types.
    """
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        copied = type(state)((key, state_copy(value)) for key, value in state.items())
        if hasattr(state, "_metadata"):
            copied._metadata = copy.deepcopy(state._metadata)
        return copied
    if type(state) in (list, tuple):
        return type(state)(state_copy(value) for value in state)
    return copy.deepcopy(state)


class StateMismatchError(ValueError):
    """A saved training state written for other data or settings; ``parts`` names what differs."""

    def __init__(self, message: str, parts: list[str]):
        super().__init__(message)
        self.parts = parts


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
        the user to remove it).
    StateMismatchError
        The fingerprints differ (naming the parts, and a dict part's entries, also in ``parts``).
    """
    writer = state.get("loop") or next((kind for name, kind in LEGACY_LOOP_MODULES.items()
                                        if name in state and name not in modules), None)
    if writer is not None and writer != loop:
        raise ValueError(f"{source} was written by another model's training ({writer}), not by this {loop}; "
                         "choose another checkpoint_dir, or on the command line another output folder (that file "
                         "belongs to the other run).")
    saved = state.get("fingerprint", {})
    differing = fingerprint_differences(saved, fingerprint)
    if differing:
        raise StateMismatchError(f"{source} was written for different data or settings ({', '.join(differing)} differ); "
                                 f"{_settings_to_resume(differing, saved, fingerprint)}remove it or choose another "
                                 "checkpoint_dir (on the command line: --overwrite, or another output folder).", differing)


def _settings_to_resume(differing: list[str], saved: dict, fingerprint: dict) -> str:
    """The model settings the checkpoint was written with, where only those differ: the way to resume it rather than
    discard it (``"to resume it, use the settings it was written with: n_hidden=64 (now 32); or "``), or ``""``."""
    part = "model settings"
    if not differing or not all(d.startswith(part + ".") for d in differing):
        return ""
    old, new = saved.get(part, {}), fingerprint.get(part, {})

    def written(name: str) -> str:
        # a setting left out of the record is at its default (options added later are recorded only when set); a
        # long value (priors, a profile's digest) cannot be typed in: named only
        now = "the default" if new.get(name) is None else new[name] if len(str(new[name])) <= 60 else "another value"
        value = old.get(name)
        if value is None:
            return f"{name} at its default (now {now})"
        return f"{name}={value} (now {now})" if len(str(value)) <= 60 else f"{name} as it recorded it (now {now})"

    return f"to resume it, use the settings it was written with: {', '.join(written(d[len(part) + 1:]) for d in differing)}; or "


def refuse_other_data_on_other_ranks(parallel, fingerprint: dict) -> None:
    """Raise :class:`StateMismatchError` on every rank unless each rank's fingerprint matches the writer's (rank 0).

    A stale copy of the input on one node trained a model on a mix of two data sets, each rank with its own
    train/validation split; this compares them before the first step.

    Parameters
    ----------
    parallel
        The loop's :class:`~pyro_scmodels.distributed.DataParallel` context.
    fingerprint
        This rank's loop fingerprint.
    """
    differing = fingerprint_differences(parallel.from_writer(lambda: fingerprint), fingerprint)
    message = parallel.first_message(None if not differing else (
        f"this process reads other data or settings than rank 0 ({', '.join(differing)} differ): every process "
        "must read the same cells, counts and settings (the same file, unchanged, at the same path on every machine)."))
    if message is not None:
        raise StateMismatchError(message, differing)


def fingerprint_differences(saved: dict, fingerprint: dict) -> list[str]:
    """The parts (and a dict part's entries, ``"part.entry"``) in which two loops' fingerprints differ.

    Parts added or renamed since ``saved`` was written are compared as :func:`check_saved_state` describes, and an
    entry unknown on either side (:data:`PARTS_WITH_UNKNOWN_ENTRIES`) matches any.
    """
    differing = []
    # a legacy part is compared only when the saved state has it and lacks its successor (written in between)
    skipped = ({k for k in ADDED_FINGERPRINT_PARTS if k not in saved}
               | {k for k, successor in SUCCEEDED_FINGERPRINT_PARTS.items() if k not in saved or successor in saved}
               | set(EQUIVALENT_FINGERPRINT_PARTS.values()) | set(UNCHECKED_EQUIVALENT_PARTS.values()))
    for key in sorted((set(saved) | set(fingerprint)) - skipped):
        old, new = saved.get(key), fingerprint.get(key)
        if _same(old, new) or (key in EQUIVALENT_FINGERPRINT_PARTS
                               and _same(old, fingerprint.get(EQUIVALENT_FINGERPRINT_PARTS[key]))):
            continue
        if key in UNCHECKED_EQUIVALENT_PARTS and _same(old, fingerprint.get(UNCHECKED_EQUIVALENT_PARTS[key])):
            warnings.warn(f"The saved state was written before its {key} were recorded as they are now ({old}); it is "
                          f"taken up by {new}, which cannot be checked against it.", UserWarning,
                          stacklevel=user_stacklevel())
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # name the entries that differ, not the whole group
            unknown = (lambda k: old.get(k) is None or new.get(k) is None) if key in PARTS_WITH_UNKNOWN_ENTRIES else (
                lambda k: False)
            differing += [f"{key}.{k}" for k in sorted(set(old) | set(new), key=str)
                          if not _same(old.get(k), new.get(k)) and not unknown(k)]
            unchecked = [k for k in sorted(set(old) | set(new), key=str) if unknown(k) and not _same(old.get(k), new.get(k))]
            if unchecked and not differing:
                warnings.warn(f"The saved state did not record the {key} of {', '.join(map(repr, unchecked))} (counts on "
                              "disk, saved before 2026-12-06): it is taken up without checking that they are the "
                              "counts it was trained on.", UserWarning, stacklevel=user_stacklevel())
        else:
            differing.append(key)
    return differing


def _same(old, new) -> bool:
    """Equal, or the same number written two ways (``"1000"`` and ``"1000.0"``: a setting given as an int then, and
    stored as a float now)."""
    if old == new:
        return True
    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    try:  # exact (a float would equate seeds that differ above 2**53)
        return decimal.Decimal(old) == decimal.Decimal(new)
    except decimal.InvalidOperation:
        return False


class LoopCheckpoints:
    """Writing and restoring a training loop's state (mixed into :class:`~pyro_scmodels.training.TrainingLoop`)."""

    def _resume(self, path: str) -> None:
        """Continue from the checkpoint at ``path`` if there is one (read by the writing rank, handed to all)."""
        state = self.parallel.from_writer(lambda: load_torch_file(path, "training checkpoint") if os.path.exists(path) else None)
        if state is not None:
            self._refuse_a_file_that_is_not_a_checkpoint(state, path)
            self.load_state(state, source=f"Checkpoint {path}")
            self.after_resume()
            if self.parallel.is_writer:
                logger.info("Resumed from %s at epoch %d.", path, self.epoch)

    def _refuse_another_runs_checkpoint(self, path: str) -> None:
        """Before a loop that has trained writes to ``path``: refuse a checkpoint there of another run on other data
        or settings (it would be overwritten; a loop's first call resumes from it or refuses it instead)."""
        def summary():
            if not os.path.exists(path):
                return None
            state = load_torch_file(path, "training checkpoint")
            self._refuse_a_file_that_is_not_a_checkpoint(state, path)
            return {key: state.get(key) for key in ("run", "loop", "fingerprint")}

        found = self.parallel.from_writer(summary)
        # the writing rank's run (each rank drew its own id): every rank takes the same decision
        if found is not None and found.get("run") != self.parallel.from_writer(lambda: self.run_id):
            check_saved_state(found, type(self).__name__, self.modules, self.fingerprint,
                              f"Checkpoint {path} (of another run, which this one would overwrite)")

    def after_resume(self) -> None:  # noqa: B027 (a hook)
        """Called once a checkpoint was resumed: take up this call's settings where the state brought back older ones."""

    def state(self, include_modules: bool = True) -> dict:
        """Everything needed to continue training (the modules' parameters optionally left out)."""
        modules = {name: module.state_dict() for name, module in self.modules.items()} if include_modules else {}
        return {
            **modules,
            "run": self.run_id,  # which run wrote it: a run resumed from it, or a model loaded from a save, takes it up
            "loop": type(self).__name__,  # which model's training wrote it (they share the file name checkpoint.pt)
            "fingerprint": self.fingerprint,
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "best": self._best,
            "epochs_without_improvement": self._epochs_without_improvement,
            **self.extra_state(),
        }

    def load_state(self, state: dict, source: str = "the saved state", check: bool = True) -> None:
        """Restore :meth:`state`; a state from other cells, genes or settings raises ``ValueError`` (unless
        ``check`` is False: this loop's own state, kept in memory)."""
        if check:
            check_saved_state(state, type(self).__name__, self.modules, self.fingerprint, source)
        self.run_id = state.get("run", self.run_id)
        self._state_restored = True
        if all(name in state for name in self.modules):
            for name, module in self.modules.items():
                module.load_state_dict(state[name])
        if state.get("optimizer") is not None:
            self._make_optimizer()
            if optimizer_state_fits(state["optimizer"], self.optimizer):
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                # e.g. a query model saved with its reference rows frozen (only new rows trained) and loaded as
                # an ordinary model: the moment estimates were kept for other parameter shapes
                warnings.warn(f"{source} holds optimiser moments for other parameter shapes or groups than this model's; "
                              "training continues with fresh Adam moments.", stacklevel=user_stacklevel())
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = state["history"]
        self._best, self._epochs_without_improvement = state["best"], state["epochs_without_improvement"]
        self.load_extra_state(state)

    def save_checkpoint(self, path: str) -> None:
        """Write the full training state (atomically: a crash never leaves half a file)."""
        self._write_state(self.state(), path)

    @staticmethod
    def _write_state(state: dict, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as temporary:
            torch.save(state, temporary)

    def _boundary_state(self) -> dict:
        """A copy of :meth:`state` (the parameters and the optimiser's moments cloned), kept between epochs."""
        return state_copy(self.state())

    def load_checkpoint(self, path: str) -> None:
        """Restore the state written by :meth:`save_checkpoint` (fingerprint checked)."""
        state = load_torch_file(path, "training checkpoint")
        self._refuse_a_file_that_is_not_a_checkpoint(state, path)
        self.load_state(state, source=f"Checkpoint {path}")

    def _refuse_a_file_that_is_not_a_checkpoint(self, state, path: str) -> None:
        """``ValueError`` unless ``state`` holds what :meth:`save_checkpoint` writes: a saved NDreamer's training state
        (no network) copied in as a checkpoint was taken up with the random network; a pickled list failed with
        ``AttributeError``."""
        if isinstance(state, dict) and (state.get("loop", type(self).__name__) != type(self).__name__
                                        or any(name in state and name not in self.modules for name in LEGACY_LOOP_MODULES)):
            return  # another model's checkpoint: load_state names the model that wrote it
        needed = [*self.modules, "epoch", "step", "history"]
        missing = needed if not isinstance(state, dict) else [key for key in needed if key not in state]
        if missing:
            held = type(state).__name__ if not isinstance(state, dict) else f"keys {sorted(map(str, state))[:8]}"
            raise ValueError(f"{path} is not a training checkpoint of this {type(self).__name__} (it lacks "
                             f"{', '.join(map(repr, missing))}; it holds {held}): remove it or choose another "
                             "checkpoint_dir.")

    def move_optimizer_state(self) -> None:
        """After the modules moved device, move the optimiser's state with them."""
        if self.optimizer is not None:
            # load_state_dict casts each state tensor to its parameter's device
            self.optimizer.load_state_dict(self.optimizer.state_dict())
