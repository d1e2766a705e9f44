"""NDreamer training losses, vectorised over codebooks and over batch x condition groups.

Group-wise terms never loop over groups in Python: the mutual-information terms
(:mod:`.code_information`) sum a joint (code, group-and-label) table as one sparse product, and the
pairwise terms (triplet, neighbourhood) compare cells of the same group only, on ``(B, M, M)`` blocks
(:func:`~.loss_layout.group_blocks`).

No term reads a value back to the host: on a GPU each such read waits for every queued kernel. What depends on the
minibatch's labels only (groups, blocks, label columns) is its :class:`~.loss_layout.MinibatchLayout`, built on
the host with the labels; counts that would decide a branch are folded into the arithmetic instead (a mean over
no entries is 0).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from .. import _validation as V
from .code_information import independence_and_dependence_nmi
from .loss_layout import group_blocks, group_index, minibatch_layout  # noqa: F401 (the first two re-exported)


@dataclass
class LossWeights:
    """Weights of the loss parts and the hyperparameters of each part (SPEC 3.3 defaults, but ``independence``).

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
    # SPEC 3.3 (and the public NDreamer) weigh independence 1000. Measured (benchmarks/RESULTS.md, "NDreamer keeps the
    # cell state"): at 1000 the codes lose most of the state inside a cell type on some seeds (cross-validated R^2 of
    # the simulator's state 0.14-0.82 over six seeds; at 300, 0.82-0.89), and with it the per-cell effect; the
    # codes' NMI with condition and batch stays at 0.001-0.003 and the CATE correlation does not change. At 30 that
    # correlation falls (0.92-0.95 against 0.96)
    independence: float = 300.0
    dependence: float = 50.0
    triplet: float = 5.0
    neighbourhood: float = 1.0
    codebook: float = 1.0
    commitment: float = 0.25
    triplet_margin: float = 5.0
    triplets_per_anchor: int = 15
    n_neighbours: int = 20
    across_cluster_weight: float = 20.0

    def __post_init__(self):
        # a negative weight would reward the part it weighs (e.g. a negative independence weight rewards codes
        # that carry the batch); checked here, before any preprocessing or training
        for f in fields(self):
            if f.name in ("triplets_per_anchor", "n_neighbours"):
                setattr(self, f.name, V.positive_int(f"loss_weights.{f.name}", getattr(self, f.name)))
            else:
                setattr(self, f.name, V.non_negative_float(f"loss_weights.{f.name}", getattr(self, f.name)))

    @classmethod
    def from_value(cls, value) -> "LossWeights":
        """``value`` as a new :class:`LossWeights`: None (the defaults), a LossWeights (copied) or a dict.

        A dict overrides those entries of the defaults, e.g. ``{"independence": 1000.0}``.
        """
        if value is None:
            return cls()
        if isinstance(value, LossWeights):
            return replace(value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"loss_weights has unknown entries {unknown}; known: {[f.name for f in fields(cls)]}.")
            return cls(**value)
        raise V.ArgumentTypeError(f"loss_weights must be a LossWeights, a dict of its entries or None; got {value!r}.")


def _zero(reference: torch.Tensor) -> torch.Tensor:
    # a zero that still belongs to the graph, so backward() works and gives zero gradients
    return reference.sum() * 0.0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 (still in the graph) where it is 0 everywhere."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _pairwise_distances(a: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(..., M, M)`` between the rows of ``(..., M, D)``, with a finite gradient at zero distance."""
    sq = a.pow(2).sum(-1)
    d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * a @ a.transpose(-1, -2)).clamp_min(1e-12)
    return d2.sqrt()


def _same_group_pairs(group: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, M, M)``: both cells real, of the same group, and not the same cell."""
    g = group[index]
    pairs = valid.unsqueeze(-1) & valid.unsqueeze(-2) & (g.unsqueeze(-1) == g.unsqueeze(-2))
    return pairs & ~torch.eye(index.shape[1], dtype=torch.bool, device=index.device)


def _pairs_of(labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, M, M)``: whether two cells of a block share a label."""
    blocked = labels[index]
    return blocked.unsqueeze(-1) == blocked.unsqueeze(-2)


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
    # the mean over the off-diagonal entries, without a boolean index (its size is read back on a GPU)
    off = 1.0 - torch.eye(dim, dtype=mean.dtype, device=mean.device)
    return kl, (corr.pow(2) * off).sum() / (dim * (dim - 1))


def triplet_loss(
    embedding: torch.Tensor, group: torch.Tensor, labels: torch.Tensor, margin: float = 5.0,
    max_per_anchor: int = 15, coarse_labels: torch.Tensor | None = None,
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
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
    blocks
        :func:`group_blocks` of ``group``, when already computed.

    Returns
    -------
    torch.Tensor
        Mean of ``relu(d(a, p) - d(a, n) + margin)`` over valid triplets; 0 when there is none.
    """
    index, valid = group_blocks(group) if blocks is None else blocks
    n_blocks, width = index.shape
    m = min(max_per_anchor, width - 1)
    if m <= 0:
        return _zero(embedding)
    pairs = _same_group_pairs(group, index, valid)
    same = _pairs_of(labels, index)
    positive = pairs & same
    negative = pairs & ~same
    if coarse_labels is not None:
        same_coarse = _pairs_of(coarse_labels, index)
        positive &= same_coarse
        negative &= ~same_coarse
    # top-m of uniform noise over the allowed pairs is a uniform random subset of them;
    # disallowed pairs score -1 and only appear once the allowed ones run out
    noise = torch.rand(2, n_blocks, width, width, device=embedding.device)
    pos_score, pos_idx = noise[0].masked_fill_(~positive, -1.0).topk(m, dim=-1)
    neg_score, neg_idx = noise[1].masked_fill_(~negative, -1.0).topk(m, dim=-1)
    ok = ((pos_score >= 0) & (neg_score >= 0)).to(embedding.dtype)
    dist = _pairwise_distances(embedding[index])
    losses = F.relu(dist.gather(-1, pos_idx) - dist.gather(-1, neg_idx) + margin)
    return _masked_mean(losses, ok)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # a finite fill (not -inf) keeps rows without any allowed entry finite; they are zeroed after
    return torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1) * mask


def neighbourhood_loss(
    x: torch.Tensor, embedding: torch.Tensor, group: torch.Tensor, label_low: torch.Tensor,
    n_neighbours: int = 20, across_cluster_weight: float = 20.0, temperature: float = 1.0,
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
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
    blocks
        :func:`group_blocks` of ``group``, when already computed.

    Returns
    -------
    torch.Tensor
        Mean over cells with at least one same-group neighbour; 0 when there is none.
    """
    index, valid = group_blocks(group) if blocks is None else blocks
    k = min(n_neighbours, index.shape[1] - 1)
    allowed = _same_group_pairs(group, index, valid)
    has_neighbour = allowed.any(-1)
    if k <= 0:
        return _zero(embedding)
    dist_x = _pairwise_distances(x.detach()[index])
    dist_z = _pairwise_distances(embedding[index])
    pool = torch.zeros_like(allowed)
    for dist in (dist_x, dist_z.detach()):
        values, idx = (-dist).masked_fill(~allowed, float("-inf")).topk(k, dim=-1)
        pool.scatter_(-1, idx, torch.isfinite(values) | pool.gather(-1, idx))
    p_x = _masked_softmax(-dist_x / temperature, pool)
    p_z = _masked_softmax(-dist_z / temperature, pool)
    weight = 1.0 + across_cluster_weight * (~_pairs_of(label_low, index)).to(x.dtype)
    per_cell = ((p_x - p_z) * weight).pow(2).sum(-1)
    return _masked_mean(per_cell, has_neighbour.to(per_cell.dtype))


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
        batches), ``n_conditions`` (else the number of conditions in the minibatch) and
        ``layout``, the :class:`~.loss_layout.MinibatchLayout` of these labels (else built here).
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
    layout = batch.get("layout")
    if layout is None:  # built here, on the minibatch's device (NDreamer builds it on the host)
        layout = minibatch_layout(condition, batch.get("batches"), batch["label_low"], batch["label_high"],
                                  outputs["probs"].shape[0], group=batch.get("group"), dtype=outputs["probs"].dtype)
    group, blocks = layout.group, layout.blocks  # blocks: shared by the two pairwise terms
    n_conditions = batch.get("n_conditions") or int(torch.unique(condition).numel())

    mse, cosine = reconstruction_loss(x, outputs["reconstruction"])
    kl, correlation = kl_loss(outputs["mean"], outputs["logvar"])
    independence, dependence = independence_and_dependence_nmi(outputs["probs"], terms=layout.nmi)
    parts = {
        "mse": mse, "cosine": cosine, "kl": kl, "correlation": correlation,
        "independence": independence, "dependence": dependence,
        "triplet": triplet_loss(outputs["mean"], group, batch["label_high"], w.triplet_margin, w.triplets_per_anchor,
                                blocks=blocks),
        "neighbourhood": neighbourhood_loss(
            x, outputs["mean"], group, batch["label_low"], w.n_neighbours, w.across_cluster_weight, blocks=blocks
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
