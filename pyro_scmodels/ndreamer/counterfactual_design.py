"""NDreamer's counterfactual design: each cell's condition and batch, their matching groups, and the checks on them.

:mod:`.design` reads it from a cell table; the effects (:mod:`.effects`) are computed over it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .. import _validation as V
from .._stacklevel import user_stacklevel

GROUP_SEPARATOR = "|"  # joins batch and condition into one matching-group label


@dataclass
class CounterfactualDesign:
    """Conditions, batches and their groups, checked once.

    Parameters
    ----------
    condition
        Condition label per cell.
    control_name
        The control condition.
    batch
        Batch label per cell (a combined label when several batch keys); None for one batch.
    min_cells_per_group
        Fewest cells a batch x condition group may hold. Matching into a smaller group gives every
        cell the same few partners, and effects that look certain but rest on a handful of cells.
    refuse_confounding
        Raise when a treatment shares no batch with the control; False (a saved NDreamer) warns instead.
    """

    condition: np.ndarray
    control_name: str
    batch: np.ndarray | None = None
    min_cells_per_group: int = 1
    refuse_confounding: bool = True

    def __post_init__(self):
        self.condition = np.asarray(self.condition).astype(str)
        n = len(self.condition)
        self.batch = np.full(n, "all") if self.batch is None else np.asarray(self.batch).astype(str)
        if len(self.batch) != n:
            raise ValueError(f"batch has {len(self.batch)} labels for {n} cells.")
        self.conditions = [str(c) for c in dict.fromkeys(self.condition)]  # str, not numpy's, in names and messages
        if self.control_name not in self.conditions:
            raise ValueError(f"control_name {self.control_name!r} is not a condition (conditions: {self.conditions}).")
        self.treatments = [c for c in self.conditions if c != self.control_name]
        if not self.treatments:
            raise ValueError(f"Only the control condition {self.control_name!r} is present: nothing to compare with.")
        self.groups = np.char.add(np.char.add(self.batch, GROUP_SEPARATOR), self.condition)
        self._check_group_sizes(V.positive_int("min_cells_per_group", self.min_cells_per_group))
        present = set(self.groups)
        self.batches_with = {c: [str(b) for b in dict.fromkeys(self.batch) if f"{b}{GROUP_SEPARATOR}{c}" in present]
                             for c in self.conditions}
        self._check_batches_hold_both_arms()
        self._warn_of_one_arm_batches()

    def _check_batches_hold_both_arms(self) -> None:
        """Refuse a treatment that no batch holds together with the control: its batch effect and its effect would
        be the same difference, and every ITE would carry the batch effect."""
        controls = set(self.batches_with[self.control_name])
        for treatment in self.treatments:
            if not controls & set(self.batches_with[treatment]):
                message = (f"No batch holds both condition {treatment!r} (batches {self.batches_with[treatment]}) and the "
                           f"control {self.control_name!r} (batches {sorted(controls)}): the batch is confounded with the "
                           "condition, so the treatment effect cannot be told from the batch effect. Use a batch key "
                           "whose batches each hold both conditions (e.g. donors or runs), or none.")
                if self.refuse_confounding:
                    raise ValueError(message)
                warnings.warn(message, UserWarning, stacklevel=user_stacklevel())

    def common_batches(self, treatment: str) -> list[str]:
        """The batches holding both ``treatment`` and the control: the ITE compares the two arms over these.

        Averaging each arm over the batches holding it put the batch effect of a batch holding one arm only into
        every cell's ITE (a third of it with one such batch in three).
        """
        controls = set(self.batches_with[self.control_name])
        return [b for b in self.batches_with[treatment] if b in controls]

    def ite_batches(self, treatment: str, arm: str) -> list[str]:
        """The batches over which the ITE of ``treatment`` averages ``arm`` (the treatment or the control): the
        :meth:`common_batches`, or, where none is common (a saved, confounded design), the arm's own."""
        return self.common_batches(treatment) or self.batches_with[arm]

    def _warn_of_one_arm_batches(self) -> None:
        for treatment in self.treatments:
            common = self.common_batches(treatment)
            one_arm = [b for b in dict.fromkeys([*self.batches_with[treatment], *self.batches_with[self.control_name]])
                       if b not in common]
            if one_arm and common:
                warnings.warn(f"Batch(es) {one_arm} hold only one of condition {treatment!r} and the control "
                              f"{self.control_name!r}: the ITE of {treatment!r} compares the two over the batches holding "
                              f"both ({common}); the denoised expression still averages each condition over every "
                              "batch holding it.", UserWarning, stacklevel=user_stacklevel())

    def _check_group_sizes(self, minimum: int) -> None:
        names, sizes = np.unique(self.groups, return_counts=True)
        small = [(name, int(size)) for name, size in zip(names, sizes) if size < minimum]
        if small:
            listed = ", ".join(f"batch {n.split(GROUP_SEPARATOR, 1)[0]!r} x condition {n.split(GROUP_SEPARATOR, 1)[1]!r}: "
                               f"{s} cell{'s' if s != 1 else ''}" for n, s in small[:10])
            raise ValueError(
                f"{len(small)} batch x condition group(s) hold fewer than min_cells_per_group={minimum} cells ({listed}). "
                "Every cell is matched into each group, so effects from so few cells are not trustworthy: remove "
                "those cells, merge their batches, or lower min_cells_per_group if you accept that."
            )

    def group(self, batch: str, condition: str) -> str:
        """The matching-group label of ``batch`` x ``condition``."""
        return f"{batch}{GROUP_SEPARATOR}{condition}"
