"""Where a minibatch's stored (non-zero) counts are, tied to the counts tensor they describe (:class:`CountPositions`)."""

from __future__ import annotations

import torch


class CountPositions(tuple):
    """``(flat, column, row)``: where the stored (non-zero) counts of one dense tensor, ``counts``, are.

    A tuple of the three long tensors of :func:`~pyro_scmodels.data.counts.stored_positions` (the flat position in
    ``counts``, the gene and the cell of each), which also holds the cells x genes tensor they locate, so that
    :class:`GammaPoissonMean` uses them for that tensor only.

    Parameters
    ----------
    positions
        The three long tensors.
    counts
        The dense counts they locate.
    """

    def __new__(cls, positions, counts: torch.Tensor):
        new = super().__new__(cls, positions)
        if len(new) != 3:
            raise ValueError(f"CountPositions takes (flat, column, row), got {len(new)} tensors.")
        new.counts = counts
        return new

    def __reduce__(self):
        # copy, deepcopy and pickle rebuild it with its counts (tuple's own reduction passes the items only); under
        # deepcopy's memo the copy's counts are the copied minibatch's counts, so the copy keeps the fast path
        return CountPositions, (tuple(self), self.counts)
