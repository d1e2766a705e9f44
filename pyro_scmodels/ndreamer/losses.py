"""NDreamer training losses, vectorised over codebooks and over batch x condition groups.

Group-wise terms never loop over groups in Python: the mutual-information terms sum a joint
(code, group-and-label) table as one product with a sparse cell-to-column matrix, and the
pairwise terms (triplet, neighbourhood) work on ``N x N`` matrices masked to same-group pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    """Weights of the loss parts and the hyperparameters of each part (SPEC 3.3 defaults).

    Attributes
    ----------
    mse, cosine, kl, independence, dependence, triplet, neighbourhood, codebook
        Weights of the parts; ``kl`` also weighs the correlation penalty and ``dependence`` is
        divided by the number of conditions and subtracted.
    commitment
        Weight of the commitment term inside the codebook part.
    triplet_margin, triplets_per_anchor
        Triplet margin (Euclidean) and the most triplets per anchor.
    n_neighbours, across_cluster_weight
        Neighbourhood size and extra weight of across-cluster pairs in the neighbourhood part.
    """

    mse: float = 1.0
    cosine: float = 20.0
    kl: float = 5e-3
    independence: float = 1000.0
    dependence: float = 50.0
    triplet: float = 5.0
    neighbourhood: float = 1.0
    codebook: float = 1.0
    commitment: float = 0.25
    triplet_margin: float = 5.0
    triplets_per_anchor: int = 15
    n_neighbours: int = 20
    across_cluster_weight: float = 20.0


_XLOGX_FLOOR = 1e-12


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    # the clamp keeps log finite at p == 0, so the gradient there is finite too
    return p * torch.log(p.clamp_min(_XLOGX_FLOOR))


def _zero(reference: torch.Tensor) -> torch.Tensor:
    # a zero that still belongs to the graph, so backward() works and gives zero gradients
    return reference.sum() * 0.0


def _pairwise_distances(a: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(N, N)`` between rows, with a finite gradient at zero distance."""
    sq = a.pow(2).sum(-1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * a @ a.T).clamp_min(1e-12)
    return d2.sqrt()


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


def reconstruction_loss(x: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error and mean ``1 - cosine similarity`` per cell.

    A cell whose observed and reconstructed profiles are both all-zero counts as cosine 1.

    Parameters
    ----------
    x, reconstruction
        ``(N, G)``.

    Returns
    -------
    tuple of torch.Tensor
        Scalars ``(mse, one_minus_cosine)``.
    """
    mse = F.mse_loss(reconstruction, x)
    cos = F.cosine_similarity(reconstruction, x, dim=1, eps=1e-8)
    both_zero = (x.abs().sum(1) == 0) & (reconstruction.detach().abs().sum(1) == 0)
    cos = torch.where(both_zero, torch.ones_like(cos), cos)
    return mse, (1.0 - cos).mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL of ``N(mean, exp(logvar))`` to ``N(0, I)`` and a decorrelation penalty.

    Parameters
    ----------
    mean, logvar
        ``(N, D)``.

    Returns
    -------
    tuple of torch.Tensor
        ``(kl, correlation)``: the KL summed over dimensions and averaged over cells, and the
        mean squared off-diagonal correlation between dimensions of ``mean`` across the minibatch.
    """
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
    n, dim = mean.shape
    if n < 2 or dim < 2:
        return kl, _zero(mean)
    centred = mean - mean.mean(0, keepdim=True)
    cov = centred.T @ centred / (n - 1)
    std = cov.diagonal().clamp_min(1e-8).sqrt()
    corr = cov / (std.unsqueeze(0) * std.unsqueeze(1))
    off = ~torch.eye(dim, dtype=torch.bool, device=mean.device)
    return kl, corr[off].pow(2).mean()


def segmented_soft_nmi(
    probs: torch.Tensor, columns: torch.Tensor, segments: torch.Tensor, n_segments: int | None = None
) -> torch.Tensor:
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
    columns
        ``(N, J)`` long: for each cell its column in each of ``J`` label slots.
    segments, n_segments
        ``(L,)`` long: segment of each column; number of segments (default ``segments.max() + 1``).

    Returns
    -------
    torch.Tensor
        ``(K, S)`` NMI of each codebook in each segment (0 for an empty segment).
    """
    k, n, c = probs.shape
    n_cols = segments.numel()
    n_seg = int(segments.max()) + 1 if n_segments is None else n_segments
    col_count = torch.bincount(columns.reshape(-1), minlength=n_cols).to(probs.dtype)
    seg_count = probs.new_zeros(n_seg).index_add(0, segments, col_count)
    norm = seg_count[segments].clamp_min(1.0)
    # each cell's 1 / n_s rides in the sparse matrix, so the product gives P(c, l) without a division pass
    joint = torch.bmm(_membership(columns, 1.0 / norm[columns], n_cols, k), probs)  # (K, L, C)
    p_label = col_count / norm
    p_code = probs.new_zeros(k, n_seg, c).index_add(1, segments, joint)
    h_code = -_xlogx(p_code).sum(-1)  # (K, S)
    h_label = -probs.new_zeros(n_seg).index_add(0, segments, _xlogx(p_label))  # (S,)
    h_joint = -probs.new_zeros(k, n_seg).index_add(1, segments, SumXLogX.apply(joint))  # (K, S)
    mi = (h_code + h_label - h_joint).clamp_min(0.0)
    return 2.0 * mi / (h_code + h_label).clamp_min(1e-8)


def _membership(columns: torch.Tensor, weights: torch.Tensor, n_cols: int, n_books: int) -> torch.Tensor:
    """``(K, L, N)`` sparse matrix, the same for every codebook: entry (l, n) is the weight of cell n in column l.

    A sparse product sums each column's cells in one pass over ``probs`` and, backwards, writes the gradient of
    ``probs`` once; one ``index_add`` per label slot read ``probs`` once per slot and wrote a ``(K, N, C)`` gradient
    per slot (with both NMI terms on 32 x 1,024 x 1,024, 860 against 545 ms forward and backward on one CPU thread;
    benchmarks/RESULTS.md, "NDreamer training: what changed it").

    Parameters
    ----------
    columns, weights
        ``(N, J)``: each cell's column in each label slot, and its weight there.
    n_cols, n_books
        L, the number of columns; K, the number of codebooks.
    """
    n, slots = columns.shape
    cells = torch.arange(n, device=columns.device).repeat_interleave(slots)
    books = torch.arange(n_books, device=columns.device).repeat_interleave(n * slots)
    indices = torch.stack([books, columns.reshape(-1).repeat(n_books), cells.repeat(n_books)])
    # built valid (every index in range), so torch's checks of the indices are not needed
    return torch.sparse_coo_tensor(indices, weights.reshape(-1).repeat(n_books), (n_books, n_cols, n),
                                   check_invariants=False).coalesce()


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
    labels = labels.reshape(probs.shape[1], -1).long()
    sizes = labels.max(0).values + 1  # (J,)
    offsets = torch.cumsum(sizes, 0) - sizes
    segments = torch.repeat_interleave(torch.arange(labels.shape[1], device=labels.device), sizes)
    nmi = segmented_soft_nmi(probs, labels + offsets, segments, n_segments=labels.shape[1])
    return nmi.mean(0).sum()


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
    group = torch.unique(group, return_inverse=True)[1]
    n_groups = int(group.max()) + 1
    n_labels = int(torch.maximum(label_low.max(), label_high.max())) + 1
    # one scalar key per (group, resolution, label); segment = group * 2 + resolution
    seg = torch.stack([group * 2, group * 2 + 1], dim=1)  # (N, 2)
    keys = seg * n_labels + torch.stack([label_low, label_high], dim=1).long()
    unique_keys, columns = torch.unique(keys, return_inverse=True)
    nmi = segmented_soft_nmi(probs, columns, unique_keys // n_labels, n_segments=2 * n_groups)
    return nmi.mean(0).view(n_groups, 2).sum(1).mean()


def triplet_loss(
    embedding: torch.Tensor, group: torch.Tensor, labels: torch.Tensor, margin: float = 5.0,
    max_per_anchor: int = 15, coarse_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triplet margin loss with anchor, positive and negative from the same group.

    Positives share the anchor's label, negatives do not (with ``coarse_labels`` given,
    positives must also share it and negatives also differ in it). Each anchor gets up to
    ``max_per_anchor`` triplets pairing random positives with random negatives.

    Parameters
    ----------
    embedding, group, labels
        ``(N, D)``; ``(N,)`` batch x condition group and pseudo cell-state labels (high
        resolution in :func:`total_loss`).
    margin, max_per_anchor
        Margin on Euclidean distances; upper bound on triplets per anchor.
    coarse_labels
        Optional ``(N,)`` second labelling; see above.

    Returns
    -------
    torch.Tensor
        Mean of ``relu(d(a, p) - d(a, n) + margin)`` over valid triplets; 0 when there is none.
    """
    n = embedding.shape[0]
    m = min(max_per_anchor, n - 1)
    if m <= 0:
        return _zero(embedding)
    same_group = group.unsqueeze(0) == group.unsqueeze(1)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive = same_group & same & ~torch.eye(n, dtype=torch.bool, device=embedding.device)
    negative = same_group & ~same
    if coarse_labels is not None:
        same_coarse = coarse_labels.unsqueeze(0) == coarse_labels.unsqueeze(1)
        positive &= same_coarse
        negative &= ~same_coarse
    # top-m of uniform noise over the allowed pairs is a uniform random subset of them;
    # disallowed pairs score -1 and only appear once the allowed ones run out
    pos_score, pos_idx = torch.rand(n, n, device=embedding.device).masked_fill(~positive, -1.0).topk(m, dim=1)
    neg_score, neg_idx = torch.rand(n, n, device=embedding.device).masked_fill(~negative, -1.0).topk(m, dim=1)
    valid = (pos_score >= 0) & (neg_score >= 0)
    if not bool(valid.any()):
        return _zero(embedding)
    dist = _pairwise_distances(embedding)
    losses = F.relu(dist.gather(1, pos_idx) - dist.gather(1, neg_idx) + margin)
    return losses[valid].mean()


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # a finite fill (not -inf) keeps rows without any allowed entry finite; they are zeroed after
    return torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1) * mask


def neighbourhood_loss(
    x: torch.Tensor, embedding: torch.Tensor, group: torch.Tensor, label_low: torch.Tensor,
    n_neighbours: int = 20, across_cluster_weight: float = 20.0, temperature: float = 1.0,
) -> torch.Tensor:
    """Agreement of expression-space and embedding-space neighbourhoods within groups.

    For each cell, its ``n_neighbours`` nearest same-group cells in expression space and in
    embedding space are pooled; over that pool, ``softmax(-distance / temperature)`` is formed in
    both spaces and the squared differences are summed, weighted by
    ``1 + across_cluster_weight`` for pairs whose low-resolution labels differ (both sides of the
    comparison use the low-resolution labels).

    Parameters
    ----------
    x, embedding
        ``(N, G)`` expression (no gradient needed) and ``(N, D)`` embedding.
    group, label_low
        ``(N,)`` batch x condition group and low-resolution labels.
    n_neighbours, across_cluster_weight, temperature
        Neighbours per space, extra weight of across-cluster pairs, softmax temperature.

    Returns
    -------
    torch.Tensor
        Mean over cells with at least one same-group neighbour; 0 when there is none.
    """
    n = x.shape[0]
    k = min(n_neighbours, n - 1)
    allowed = (group.unsqueeze(0) == group.unsqueeze(1)) & ~torch.eye(n, dtype=torch.bool, device=x.device)
    has_neighbour = allowed.any(1)
    if k <= 0 or not bool(has_neighbour.any()):
        return _zero(embedding)
    dist_x = _pairwise_distances(x.detach())
    dist_z = _pairwise_distances(embedding)
    pool = torch.zeros_like(allowed)
    for dist in (dist_x, dist_z.detach()):
        values, idx = (-dist).masked_fill(~allowed, float("-inf")).topk(k, dim=1)
        pool.scatter_(1, idx, torch.isfinite(values) | pool.gather(1, idx))
    p_x = _masked_softmax(-dist_x / temperature, pool)
    p_z = _masked_softmax(-dist_z / temperature, pool)
    weight = 1.0 + across_cluster_weight * (label_low.unsqueeze(0) != label_low.unsqueeze(1)).to(x.dtype)
    per_cell = ((p_x - p_z) * weight).pow(2).sum(1)
    return per_cell[has_neighbour].mean()


def codebook_loss(projections: torch.Tensor, nearest_vectors: torch.Tensor, commitment: float = 0.25) -> torch.Tensor:
    """VQ codebook loss plus ``commitment`` x commitment loss, averaged over the K codebooks.

    ``mean ||sg(p) - e||^2 + commitment * mean ||p - sg(e)||^2`` with ``e`` the nearest code and
    ``sg`` stop-gradient; the mean over ``(K, N, d)`` is the per-codebook mean summed and divided
    by ``K``.

    Parameters
    ----------
    projections, nearest_vectors, commitment
        ``(K, N, d)`` projections and their nearest codes; weight of the commitment term.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    code_term = (projections.detach() - nearest_vectors).pow(2).mean()
    commit_term = (projections - nearest_vectors.detach()).pow(2).mean()
    return code_term + commitment * commit_term


def total_loss(
    outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], weights: LossWeights | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every NDreamer loss part.

    Parameters
    ----------
    outputs
        The dict returned by :meth:`NDreamerNetwork.forward`.
    batch
        ``x`` ``(N, G)``, ``condition`` ``(N,)``, ``label_low`` and ``label_high`` ``(N,)``;
        optional ``batches`` ``(N, B)``, ``group`` ``(N,)`` (else derived from condition and
        batches) and ``n_conditions`` (else the number of conditions in the minibatch).
    weights
        :class:`LossWeights`; defaults when ``None``.

    Returns
    -------
    tuple
        ``(loss, parts)`` where ``parts`` holds detached unweighted values: ``mse``, ``cosine``,
        ``kl``, ``correlation``, ``independence``, ``dependence`` (positive NMI; it enters the
        loss with a minus sign), ``triplet``, ``neighbourhood``, ``codebook``.
    """
    w = LossWeights() if weights is None else weights
    x, condition = batch["x"], batch["condition"]
    batches = batch.get("batches")
    group = batch["group"] if batch.get("group") is not None else group_index(condition, batches)
    n_conditions = batch.get("n_conditions") or int(torch.unique(condition).numel())
    nuisance = condition.reshape(-1, 1)
    if batches is not None and batches.numel():
        nuisance = torch.cat([nuisance, batches.reshape(nuisance.shape[0], -1)], dim=1)

    mse, cosine = reconstruction_loss(x, outputs["reconstruction"])
    kl, correlation = kl_loss(outputs["mean"], outputs["logvar"])
    parts = {
        "mse": mse, "cosine": cosine, "kl": kl, "correlation": correlation,
        "independence": independence_nmi(outputs["probs"], nuisance),
        "dependence": dependence_nmi(outputs["probs"], group, batch["label_low"], batch["label_high"]),
        "triplet": triplet_loss(outputs["mean"], group, batch["label_high"], w.triplet_margin, w.triplets_per_anchor),
        "neighbourhood": neighbourhood_loss(
            x, outputs["mean"], group, batch["label_low"], w.n_neighbours, w.across_cluster_weight
        ),
        "codebook": codebook_loss(outputs["projections"], outputs["nearest_vectors"], w.commitment),
    }
    factors = {
        "mse": w.mse, "cosine": w.cosine, "kl": w.kl, "correlation": w.kl, "independence": w.independence,
        "dependence": -w.dependence / n_conditions, "triplet": w.triplet, "neighbourhood": w.neighbourhood,
        "codebook": w.codebook,
    }
    loss = sum(factors[name] * value for name, value in parts.items())
    return loss, {name: value.detach() for name, value in parts.items()}
