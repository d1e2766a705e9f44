"""The layout of an NDreamer minibatch: which cells share a group, which label columns the NMI terms sum over.

Everything here depends on the minibatch's integer labels only, never on the network. :class:`NDreamer` builds it
on the host, where the labels are drawn (:func:`minibatch_layout`), and sends it to the device with the minibatch.
On a GPU this matters: each of these steps has an output whose size depends on the data (``unique``, a
``max`` that sizes a tensor, a sparse ``coalesce``), and on the device each would be a device-to-host copy that
waits for every queued kernel. The training step then reads the host once, in the training loop's check of the
loss, and once in the sparse code draw (:mod:`.code_choice`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .code_information import NMITerms


def group_index(condition: torch.Tensor, batches: torch.Tensor | None = None) -> torch.Tensor:
    """Integer id ``0..n_groups-1`` of each cell's batch x condition group.

    Parameters
    ----------
    condition, batches
        ``(N,)`` integer condition codes; ``(N, B)`` integer batch codes or ``None``.

    Returns
    -------
    torch.Tensor
        ``(N,)`` long tensor.
    """
    keys = condition.reshape(-1, 1)
    if batches is not None and batches.numel():
        keys = torch.cat([keys, batches.reshape(keys.shape[0], -1)], dim=1)
    return torch.unique(keys, dim=0, return_inverse=True)[1]


def group_blocks(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells laid out in ``(B, M)`` blocks of one group each, for terms that compare cells of a group only.

    With G groups of about N / G cells (NDreamer's balanced draws), the blocks' pairs number N^2 / G
    instead of N^2: the pairwise distances, masks and top-k of the triplet and neighbourhood terms shrink
    G-fold. When blocks would hold N^2 pairs or more (very unequal groups), one block holds every cell
    (``B = 1``, ``M = N``) and the terms mask pairs of different groups, as they do inside blocks.

    Parameters
    ----------
    group
        ``(N,)`` group of each cell (labels torch can compare).

    Returns
    -------
    index : torch.Tensor
        ``(B, M)`` long position of each block's cells; padding points at cell 0.
    valid : torch.Tensor
        ``(B, M)`` bool, False for padding.
    """
    n = group.numel()
    ids, counts = torch.unique(group, return_counts=True)
    width = int(counts.max()) if n else 0
    if ids.numel() * width * width >= n * n:
        return torch.arange(n, device=group.device).unsqueeze(0), torch.ones(1, n, dtype=torch.bool, device=group.device)
    order = torch.argsort(group, stable=True)
    block = torch.repeat_interleave(torch.arange(ids.numel(), device=group.device), counts, output_size=n)
    rank = torch.arange(n, device=group.device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts, output_size=n)
    index = torch.zeros(ids.numel(), width, dtype=torch.long, device=group.device)
    valid = torch.zeros(ids.numel(), width, dtype=torch.bool, device=group.device)
    index[block, rank] = order
    valid[block, rank] = True
    return index, valid


@dataclass(frozen=True, eq=False)  # tensors: no field-wise ==
class MinibatchLayout:
    """What :func:`~pyro_scmodels.ndreamer.losses.total_loss` needs to know about a minibatch besides its values.

    Attributes
    ----------
    group
        ``(N,)`` batch x condition group of each cell (:func:`group_index`).
    blocks
        :func:`group_blocks` of ``group``, for the triplet and neighbourhood terms.
    nmi
        :class:`NMITerms`, for the independence and dependence terms.
    """

    group: torch.Tensor
    blocks: tuple[torch.Tensor, torch.Tensor]
    nmi: NMITerms

    def to(self, device) -> "MinibatchLayout":
        """The same layout on ``device`` (copies to the device at the start of a step; nothing is read back)."""
        return MinibatchLayout(self.group.to(device), tuple(t.to(device) for t in self.blocks), self.nmi.to(device))


def nuisance_labels(condition: torch.Tensor, batches: torch.Tensor | None) -> torch.Tensor:
    """``(N, J)``: the condition, then each batch key (the independence term's label variables)."""
    nuisance = condition.reshape(-1, 1)
    if batches is not None and batches.numel():
        nuisance = torch.cat([nuisance, batches.reshape(nuisance.shape[0], -1)], dim=1)
    return nuisance


def minibatch_layout(condition: torch.Tensor, batches: torch.Tensor | None, label_low: torch.Tensor,
                     label_high: torch.Tensor, n_books: int, group: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> MinibatchLayout:
    """The :class:`MinibatchLayout` of a minibatch, computed where its labels are (the host, in training).

    Parameters
    ----------
    condition, batches
        ``(N,)`` condition codes and ``(N, B)`` batch codes (or ``None``).
    label_low, label_high
        ``(N,)`` pseudo cell-state labels, unique across groups.
    n_books
        Codebooks of the network (the NMI terms' sparse table holds one copy per codebook).
    group
        ``(N,)`` group ids, when known; else :func:`group_index` of the condition and batches.
    dtype
        Floating type of the network's code assignments.

    Returns
    -------
    MinibatchLayout
        On the labels' device; :meth:`MinibatchLayout.to` moves it.
    """
    group = group_index(condition, batches) if group is None else group
    nmi = NMITerms.build(nuisance_labels(condition, batches), group, label_low, label_high, n_books, dtype)
    return MinibatchLayout(group, group_blocks(group), nmi)
