"""Standard-normal draws that belong to each cell, so that seeded posterior samples do not depend on the selection.

A seeded query draws z = loc + scale * noise for each cell. Drawn from one generator over the minibatches, a
cell's noise would depend on which cells come before it: ``estimate_model_ite(indices=[1, 2, 3])`` would not
repeat the rows of the full run, and a result written a block of cells at a time would differ from one computed
at once. Here cell i's noise depends only on the seed and i (its position in the data queried): the cells are cut
into blocks of ``BLOCK`` positions, each block's noise comes from its own generator, seeded from (seed, block), and a
cell takes its row.
"""

from __future__ import annotations

import numpy as np
import torch

#: cells whose draws come from one seeded generator (small, so that a few scattered cells cost little)
BLOCK = 64
#: blocks kept, so that minibatches smaller than a block or revisits do not draw a block again
CACHED_BLOCKS = 64


def _block_seed(seed: int, block: int) -> int:
    """A generator seed for one block: the query's seed, with the block as numpy's spawn key (no two collide)."""
    sequence = np.random.SeedSequence(int(seed), spawn_key=(int(block),))
    return int(sequence.generate_state(1, np.uint64)[0] % (2**63 - 1))


class CellNoise:
    """Noise for posterior samples of z, ``n_samples`` x cells x ``width``, reproducible per cell.

    Parameters
    ----------
    seed
        The query's seed.
    n_samples
        Draws per cell.
    device
        Where the noise is made (the model's device).
    """

    def __init__(self, seed: int, n_samples: int, device: torch.device):
        self.seed, self.n_samples, self.device = int(seed), int(n_samples), torch.device(device)
        self._blocks: dict[tuple[int, int], torch.Tensor] = {}  # the latest blocks made, by (number, width)

    def _noise_of_block(self, block: int, width: int) -> torch.Tensor:
        key = (block, width)
        if key not in self._blocks:
            generator = torch.Generator(device=self.device).manual_seed(_block_seed(self.seed, block))
            self._blocks[key] = torch.randn((self.n_samples, BLOCK, width), generator=generator, device=self.device)
            while len(self._blocks) > CACHED_BLOCKS:
                self._blocks.pop(next(iter(self._blocks)))
        return self._blocks[key]

    def of(self, cells, width: int) -> torch.Tensor:
        """The noise of the cells at ``cells`` (positions in the data), in their order.

        Parameters
        ----------
        cells
            Cell positions (any order, repeats allowed).
        width
            The latent dimensions.

        Returns
        -------
        torch.Tensor
            ``n_samples`` x len(cells) x ``width``, on the device.
        """
        cells = np.asarray(cells, dtype=np.int64)
        blocks = cells // BLOCK
        out = torch.empty((self.n_samples, cells.size, width), device=self.device)
        for block in dict.fromkeys(blocks.tolist()):  # in order of first appearance: sequential cells reuse a block
            where = np.flatnonzero(blocks == block)
            rows = torch.as_tensor(cells[where] - block * BLOCK, device=self.device)
            out[:, torch.as_tensor(where, device=self.device)] = self._noise_of_block(block, width)[:, rows]
        return out

    def normal_draws(self, posterior, cells) -> torch.Tensor:
        """``loc + scale * noise`` of a Normal posterior (cells x dims) for the cells at ``cells``: each cell's
        ``n_samples`` seeded draws (z's; every query that draws z from a seed draws it here).

        Parameters
        ----------
        posterior
            A distribution with ``loc`` and ``scale`` of shape cells x dims.
        cells
            The cells' positions, as for :meth:`of`.

        Returns
        -------
        torch.Tensor
            ``n_samples`` x cells x dims.
        """
        return posterior.loc + posterior.scale * self.of(cells, posterior.loc.shape[-1])

    def log_normal_draws(self, posterior, cells) -> torch.Tensor:
        """``exp(loc + scale * noise)`` of a LogNormal posterior of one value per cell (the library size's): each
        cell's ``n_samples`` seeded draws.

        Parameters
        ----------
        posterior
            A distribution with ``loc`` and ``scale`` of shape cells.
        cells
            The cells' positions, as for :meth:`of`.

        Returns
        -------
        torch.Tensor
            ``n_samples`` x cells.
        """
        return torch.exp(posterior.loc + posterior.scale * self.of(cells, 1)[..., 0])
