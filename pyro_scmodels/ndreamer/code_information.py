"""How much the codes say about labels: the normalised mutual information between NDreamer's soft code
assignments and the nuisance labels (independence, to be minimised) and the pseudo cell-state labels
within each group (dependence, to be maximised), vectorised over codebooks and groups.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

_XLOGX_FLOOR = 1e-12


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    # the clamp keeps log finite at p == 0, so the gradient there is finite too
    return p * torch.log(p.clamp_min(_XLOGX_FLOOR))


@dataclass(frozen=True, eq=False)  # tensors: no field-wise ==
class NMILayout:
    """Which cells each label column sums, for :func:`soft_nmi`: everything that depends on the labels only.

    Built where the labels are (:meth:`build`), then moved: in training, on the host, because two of its steps have
    outputs sized by the data (the column counts, ``bincount``, and the sparse ``coalesce``), and each would wait for
    every queued kernel on a GPU. It holds one codebook's table; the K copies are made on the device.

    Attributes
    ----------
    pattern_indices, pattern_values
        One codebook's ``(L, N)`` sparse table (:func:`_membership_pattern`): entry (l, n) is ``1 / n_s`` for cell n
        in column l of segment s. :meth:`membership` repeats it for every codebook where the product runs, so the
        host builds and sends one copy, not K.
    n_cells, n_books
        N and K.
    segments
        ``(L,)`` long: segment of each column.
    n_segments
        S, the number of segments.
    label_entropy
        ``(S,)`` entropy of the labels in each segment.
    """

    pattern_indices: torch.Tensor
    pattern_values: torch.Tensor
    n_cells: int
    n_books: int
    segments: torch.Tensor
    n_segments: int
    label_entropy: torch.Tensor

    @classmethod
    def build(cls, columns: torch.Tensor, segments: torch.Tensor, n_segments: int | None, n_books: int,
              dtype: torch.dtype = torch.float32) -> "NMILayout":
        """The layout of ``columns`` ``(N, J)`` (each cell's column in each of J label slots) with ``segments``
        ``(L,)`` (segment of each column), ``n_segments`` (default ``segments.max() + 1``), for ``n_books``
        codebooks."""
        n_cols = segments.numel()
        n_seg = int(segments.max()) + 1 if n_segments is None else n_segments
        col_count = torch.bincount(columns.reshape(-1), minlength=n_cols).to(dtype)
        seg_count = torch.zeros(n_seg, dtype=dtype, device=segments.device).index_add(0, segments, col_count)
        norm = seg_count[segments].clamp_min(1.0)
        # each cell's 1 / n_s rides in the sparse matrix, so the product gives P(c, l) without a division pass
        pattern_indices, pattern_values = _membership_pattern(columns, 1.0 / norm[columns], n_cols)
        p_label = col_count / norm
        label_entropy = -torch.zeros(n_seg, dtype=dtype, device=segments.device).index_add(0, segments, _xlogx(p_label))
        return cls(pattern_indices, pattern_values, columns.shape[0], n_books, segments, n_seg, label_entropy)

    def to(self, device) -> "NMILayout":
        """The same layout on ``device``."""
        return replace(self, pattern_indices=self.pattern_indices.to(device),
                       pattern_values=self.pattern_values.to(device), segments=self.segments.to(device),
                       label_entropy=self.label_entropy.to(device))

    def membership(self) -> torch.Tensor:
        """``(K, L, N)`` sparse: the pattern once per codebook (:func:`_membership`), on the layout's device."""
        return _membership(self.pattern_indices, self.pattern_values, self.segments.numel(), self.n_cells,
                           self.n_books)


def soft_nmi(probs: torch.Tensor, layout: NMILayout) -> torch.Tensor:
    """Normalised mutual information between soft code assignments and labels, per segment.

    Each *segment* is one (set of cells, label variable) pair; its label categories are
    *columns*. Every cell lies in exactly one column of each segment it belongs to. For segment
    ``s`` and codebook ``k`` the joint is ``P(c, l) = sum_{n in l} probs[k, n, c] / n_s``, then
    ``NMI = 2 I(c; l) / (H(c) + H(l))`` (arithmetic-mean normalisation: stays finite when one
    side has zero entropy, and is 1 when codes and labels determine each other).

    Parameters
    ----------
    probs
        ``(K, N, C)`` soft assignments (rows sum to 1).
    layout
        :class:`NMILayout` of the labels, for ``K`` codebooks.

    Returns
    -------
    torch.Tensor
        ``(K, S)`` NMI of each codebook in each segment (0 for an empty segment).
    """
    k, _, c = probs.shape
    segments, n_seg = layout.segments, layout.n_segments
    joint = torch.bmm(layout.membership(), probs)  # (K, L, C)
    p_code = probs.new_zeros(k, n_seg, c).index_add(1, segments, joint)
    h_code = -_xlogx(p_code).sum(-1)  # (K, S)
    h_joint = -probs.new_zeros(k, n_seg).index_add(1, segments, SumXLogX.apply(joint))  # (K, S)
    mi = (h_code + layout.label_entropy - h_joint).clamp_min(0.0)
    return 2.0 * mi / (h_code + layout.label_entropy).clamp_min(1e-8)


def segmented_soft_nmi(
    probs: torch.Tensor, columns: torch.Tensor, segments: torch.Tensor, n_segments: int | None = None
) -> torch.Tensor:
    """:func:`soft_nmi` with the layout built here from the labels' columns.

    Parameters
    ----------
    probs
        ``(K, N, C)`` soft assignments (rows sum to 1).
    columns
        ``(N, J)`` long: for each cell its column in each of ``J`` label slots.
    segments, n_segments
        ``(L,)`` long: segment of each column; number of segments (default ``segments.max() + 1``).

    Returns
    -------
    torch.Tensor
        ``(K, S)`` NMI of each codebook in each segment (0 for an empty segment).
    """
    return soft_nmi(probs, NMILayout.build(columns, segments, n_segments, probs.shape[0], probs.dtype))


def _membership_pattern(columns: torch.Tensor, weights: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(L, N)`` matrix of one codebook, entry (l, n) the weight of cell n in column l, as its ``(2, nnz)``
    coalesced indices (sorted by column, then cell) and values.

    Parameters
    ----------
    columns, weights
        ``(N, J)``: each cell's column in each label slot, and its weight there.
    n_cols
        L, the number of columns.
    """
    n, slots = columns.shape
    cells = torch.arange(n, device=columns.device).repeat_interleave(slots)
    # built valid (every index in range), so torch's checks of the indices are not needed
    pattern = torch.sparse_coo_tensor(torch.stack([columns.reshape(-1), cells]), weights.reshape(-1), (n_cols, n),
                                      check_invariants=False).coalesce()
    return pattern.indices(), pattern.values()


def _membership(indices: torch.Tensor, values: torch.Tensor, n_cols: int, n_cells: int, n_books: int) -> torch.Tensor:
    """``(K, L, N)`` sparse matrix, the same for every codebook: :func:`_membership_pattern` once per codebook.

    A sparse product sums each column's cells in one pass over ``probs`` and, backwards, writes the gradient of
    ``probs`` once; one ``index_add`` per label slot read ``probs`` once per slot and wrote a ``(K, N, C)`` gradient
    per slot (with both NMI terms on 32 x 1,024 x 1,024, 860 against 545 ms forward and backward on one CPU thread;
    benchmarks/RESULTS.md, "NDreamer training: what changed it").
    """
    nnz = values.numel()
    # the copies, book after book, of a sorted pattern are sorted: no coalesce (no sort, no read-back on a GPU)
    books = torch.arange(n_books, device=values.device).view(-1, 1).expand(n_books, nnz).reshape(1, -1)
    indices = torch.cat([books, indices.repeat(1, n_books)])
    return torch.sparse_coo_tensor(indices, values.repeat(n_books), (n_books, n_cols, n_cells), is_coalesced=True,
                                   check_invariants=False)


class SumXLogX(torch.autograd.Function):
    """``sum_c p log max(p, 1e-12)`` over the last dimension, with its gradient written out.

    The gradient is ``log max(p, 1e-12) + [p > 1e-12]``, finite at p = 0, as autograd gives it for
    ``(p * p.clamp_min(1e-12).log()).sum(-1)``. Written out, it saves the logarithm from the forward pass and makes
    three passes over the ``(K, L, C)`` joint backwards instead of about six.
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor) -> torch.Tensor:
        log_p = p.clamp_min(_XLOGX_FLOOR).log_()
        ctx.save_for_backward(p, log_p)
        return torch.linalg.vecdot(p, log_p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        p, log_p = ctx.saved_tensors
        return (log_p + (p > _XLOGX_FLOOR)).mul_(grad.unsqueeze(-1))


def _independence_columns(labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Columns ``(N, J)``, their segments and the number of segments for the independence term: one segment per
    label variable, over every cell."""
    labels = labels.reshape(n, -1).long()
    sizes = labels.max(0).values + 1  # (J,)
    offsets = torch.cumsum(sizes, 0) - sizes
    segments = torch.repeat_interleave(torch.arange(labels.shape[1], device=labels.device), sizes)
    return labels + offsets, segments, labels.shape[1]


def _dependence_columns(group: torch.Tensor, label_low: torch.Tensor, label_high: torch.Tensor):
    """Columns ``(N, 2)``, their segments, the number of segments and of groups for the dependence term: one
    segment per (group, resolution)."""
    group = torch.unique(group, return_inverse=True)[1]
    n_groups = int(group.max()) + 1
    n_labels = int(torch.maximum(label_low.max(), label_high.max())) + 1
    # one scalar key per (group, resolution, label); segment = group * 2 + resolution
    seg = torch.stack([group * 2, group * 2 + 1], dim=1)  # (N, 2)
    keys = seg * n_labels + torch.stack([label_low, label_high], dim=1).long()
    unique_keys, columns = torch.unique(keys, return_inverse=True)
    return columns, unique_keys // n_labels, 2 * n_groups, n_groups


def independence_nmi(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NMI between codes and nuisance labels over the whole minibatch (to be minimised).

    Parameters
    ----------
    probs
        ``(K, N, C)`` soft assignments.
    labels
        ``(N, J)`` integer codes of ``J`` label variables (condition, then each batch key).

    Returns
    -------
    torch.Tensor
        Scalar: NMI averaged over codebooks, summed over the ``J`` label variables.
    """
    columns, segments, n_segments = _independence_columns(labels, probs.shape[1])
    return segmented_soft_nmi(probs, columns, segments, n_segments).mean(0).sum()


def dependence_nmi(
    probs: torch.Tensor, group: torch.Tensor, label_low: torch.Tensor, label_high: torch.Tensor
) -> torch.Tensor:
    """NMI between codes and the two pseudo cell-state labels within each group (to be maximised).

    Parameters
    ----------
    probs
        ``(K, N, C)`` soft assignments.
    group, label_low, label_high
        ``(N,)`` batch x condition group of each cell, low- and high-resolution Leiden labels.

    Returns
    -------
    torch.Tensor
        Scalar: per group, ``NMI(codes, low) + NMI(codes, high)`` averaged over codebooks; then
        averaged over the groups present (each group counts once whatever its size).
    """
    columns, segments, n_segments, n_groups = _dependence_columns(group, label_low, label_high)
    return segmented_soft_nmi(probs, columns, segments, n_segments).mean(0).view(n_groups, 2).sum(1).mean()


@dataclass(frozen=True, eq=False)  # tensors: no field-wise ==
class NMITerms:
    """The independence and dependence terms' columns laid side by side in one :class:`NMILayout`.

    Attributes
    ----------
    layout
        Segments ``0..n_independence-1`` are the nuisance label variables over every cell; then two per group
        (low and high resolution pseudo labels).
    n_independence, n_groups
        Segments of the independence term; groups of the dependence term.
    """

    layout: NMILayout
    n_independence: int
    n_groups: int

    @classmethod
    def build(cls, labels: torch.Tensor, group: torch.Tensor, label_low: torch.Tensor, label_high: torch.Tensor,
              n_books: int, dtype: torch.dtype = torch.float32) -> "NMITerms":
        """The layout of both terms for ``n_books`` codebooks (arguments as for
        :func:`independence_and_dependence_nmi`)."""
        first, first_segments, n_first = _independence_columns(labels, labels.shape[0])
        second, second_segments, n_second, n_groups = _dependence_columns(group, label_low, label_high)
        columns = torch.cat([first, second + first_segments.numel()], dim=1)
        segments = torch.cat([first_segments, second_segments + n_first])
        return cls(NMILayout.build(columns, segments, n_first + n_second, n_books, dtype), n_first, n_groups)

    def to(self, device) -> "NMITerms":
        """The same layout on ``device``."""
        return replace(self, layout=self.layout.to(device))


def independence_and_dependence_nmi(
    probs: torch.Tensor, labels: torch.Tensor | None = None, group: torch.Tensor | None = None,
    label_low: torch.Tensor | None = None, label_high: torch.Tensor | None = None, terms: NMITerms | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`independence_nmi` and :func:`dependence_nmi` from one joint table.

    The two terms' columns and segments are laid side by side, so ``probs`` is summed into the joint by one sparse
    product and its gradient written by one: each product's backward pass allocates and zeroes a ``(K, N, C)``
    gradient, which on the CPU cost about as much as the product itself.

    Parameters
    ----------
    probs, labels
        As for :func:`independence_nmi`.
    group, label_low, label_high
        As for :func:`dependence_nmi`.
    terms
        :meth:`NMITerms.build` of the labels, when already built (then the labels are not needed).

    Returns
    -------
    tuple
        ``(independence, dependence)``, each equal to its own function's value.
    """
    if terms is None:
        terms = NMITerms.build(labels, group, label_low, label_high, probs.shape[0], probs.dtype)
    nmi = soft_nmi(probs, terms.layout).mean(0)
    n_first = terms.n_independence
    return nmi[:n_first].sum(), nmi[n_first:].view(terms.n_groups, 2).sum(1).mean()
