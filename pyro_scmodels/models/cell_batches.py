"""The cells a query reads, one minibatch at a time, on the model's device.

:class:`CellBatches` is mixed into :class:`~pyro_scmodels.models._base.PyroModelBase`: every getter (latent,
normalised expression, posterior draws) reads its cells through these iterators. It uses the model's
``_cell_data``, ``module`` and ``device``.
"""

from __future__ import annotations

import numpy as np
import torch
from pyro import poutine

from .. import _constants as C
from .. import _validation as V
from .._allocator import map_large_blocks
from .._selection import SelectionError, cell_positions
from ..data import iterate_minibatches
from ..pyro_modules import evaluating


#: queries of this many cells or more fix glibc's mmap threshold first (``_allocator.map_large_blocks``): at 10^6
#: cells the latent's peak went from 1.1 GiB to 2-6.9 GiB in about a third of runs without it
MAPPED_QUERY_CELLS = 100_000


class CellBatches:
    """The chosen cells in order, in minibatches, and the guide's traces on one (mixed into ``PyroModelBase``)."""

    def _batches(self, adata=None, indices=None, batch_size=None):
        """Minibatches (on the model's device) of the chosen cells, in order."""
        for _, item in self._indexed_batches(adata, indices, batch_size):
            yield item

    def _indexed_batches(self, adata=None, indices=None, batch_size=None):
        """Like :meth:`_batches`, with each minibatch's cell positions; the queries' iterator: the Pyro modules are in
        evaluation mode (no dropout) while it runs, and each is put back in its own mode when it ends (a query inside
        a user's own training loop left them in evaluation mode, and the steps after it trained without dropout)."""
        with evaluating(self.module):
            yield from self._cell_batches(adata, indices, batch_size)

    def _cell_batches(self, adata=None, indices=None, batch_size=None):
        """The chosen cells in order, one minibatch at a time, on the model's device (the modules' modes untouched)."""
        data = self._cell_data(adata)
        data.to_device(self.device)
        indices = self._cell_positions(data.n_cells, indices)
        batch_size = C.BATCH_SIZE if batch_size is None else V.positive_int("batch_size", batch_size)
        if len(indices) >= MAPPED_QUERY_CELLS:  # a fixed mmap threshold: the loop's memory does not creep up
            map_large_blocks()
        for chunk in iterate_minibatches(indices, batch_size, shuffle=False):
            yield chunk, (data.minibatch(chunk), data.n_cells)

    @staticmethod
    def _cell_positions(n_cells: int, indices) -> np.ndarray:
        """``indices`` (None, integer positions or a boolean mask) as integer positions, checked (at least one)."""
        positions = cell_positions(n_cells, indices)
        if positions.size == 0:
            raise SelectionError("indices selects no cells; give at least one position (or None for every cell).")
        return positions

    def _guide_traces(self, batch: dict, n_obs: int, num_samples: int):
        """``num_samples`` traces of the guide on one minibatch (eval mode, no gradient)."""
        guide = self.module.guide
        with torch.no_grad():
            return [poutine.trace(guide).get_trace(batch, n_obs) for _ in range(num_samples)]
