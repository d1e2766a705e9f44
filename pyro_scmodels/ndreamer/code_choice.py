"""How each cell chooses a code of each codebook: scores against the codes and a relaxed (Gumbel-softmax) draw.

Shapes: ``K`` codebooks, ``N`` cells, ``C`` codes per codebook, ``d`` code dimension; code-related tensors are
laid out codebook first, ``(K, N, ...)``.

The relaxed draw is ``softmax((s + g) / tau)`` over the ``C`` codes with Gumbel noise ``g``. At NDreamer's
temperature (0.01) it is one-hot to float32 precision except among the few codes whose perturbed scores lie
within a fraction of a unit of the largest: every other code's weight is below the rounding of the sum.
:func:`relaxed_code_choice` draws only those codes and their noise, top down from the largest (the same
distribution as perturbing every code), and softmaxes them; if a cell has more than :data:`CANDIDATES` of them
(a high temperature), that call perturbs every code and takes the dense draw.
"""

from __future__ import annotations

import math

import torch

#: most codes per cell in the sparse relaxed draw. The other codes within the margin of the largest number about
#: Poisson(theta e^-G0) with G0 ~ Gumbel and theta = e^margin - 1 (0.27 at tau = 0.01), e^-G0 ~ Exp(1): a geometric
#: count, more than 15 with probability (theta / (1 + theta))^16, about 1e-11, so a (32 x 1,024)-cell step falls
#: back to the dense draw about once in 10^6.
CANDIDATES = 16
#: margins beyond this take the dense draw: e^3 - 1 = 19 gives Poisson means up to 19 x 16.6 (float32's largest
#: e^-G0), far more than 16 candidates, and e^margin overflows float64 beyond 709
MAX_MARGIN = 3.0


class _CodeScores(torch.autograd.Function):
    """``2 p.e - |e|^2`` as one batched product forwards, with the backward products laid out for speed.

    Autograd's backward of the product computes ``grad @ e``: a ``(N, C) x (C, d)`` product per codebook with
    d = 8 columns, which BLAS runs about 2.7 times slower than the same product transposed,
    ``e^T @ grad^T`` (15 against 40 ms at 32 x 1,024 x 1,024 on one CPU thread). The codebooks' gradient,
    ``2 (grad^T p - (sum_n grad) e)``, takes both of its sums over the cells from one product with ``[p, 1]``,
    one pass over the ``(K, N, C)`` gradient instead of two.
    """

    @staticmethod
    def forward(ctx, projections: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(projections, codebooks)
        # one fused batched product: -|e|^2 (broadcast over cells) + 2 p.e^T
        return torch.baddbmm(-codebooks.pow(2).sum(-1).unsqueeze(1), projections, codebooks.transpose(1, 2), alpha=2.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        projections, codebooks = ctx.saved_tensors
        grad = grad.to(projections.dtype)  # under autocast the scores (and so their gradient) are in lower precision
        grad_projections = grad_codebooks = None
        if ctx.needs_input_grad[0]:
            grad_projections = torch.bmm(codebooks.transpose(1, 2), grad.transpose(1, 2)).transpose(1, 2).mul(2.0)
        if ctx.needs_input_grad[1]:
            d = projections.shape[-1]
            with_ones = torch.cat([projections, projections.new_ones(projections.shape[:-1] + (1,))], -1)
            sums = torch.bmm(with_ones.transpose(1, 2), grad)  # (K, d + 1, C): sum_n grad p, then sum_n grad
            grad_codebooks = (sums[:, :d].transpose(1, 2) - sums[:, d].unsqueeze(-1) * codebooks).mul_(2.0)
        return grad_projections, grad_codebooks


def code_scores(projections: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The codebook logits up to a constant per cell: ``2 p.e - |e|^2 = -|p - e|^2 + |p|^2``.

    Softmax and argmax over the codes do not see the ``|p|^2`` of each cell, so it is left out: one
    ``(K, N, C)`` pass less forwards and two less backwards. Only ``(K, N, C)`` tensors are built, never the
    ``(K, N, C, d)`` differences.

    Parameters
    ----------
    projections
        ``(K, N, d)``: each cell's projection for each codebook.
    codebooks
        ``(K, C, d)``: the codes of each codebook.

    Returns
    -------
    torch.Tensor
        ``(K, N, C)`` scores.
    """
    return _CodeScores.apply(projections, codebooks)


#: codes per block in :func:`nearest_code`
ARGMAX_BLOCK = 32


def nearest_code(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(-1)``, the first code of largest score, found through block maxima.

    torch's ``argmax`` over the last dimension is about six times slower on the CPU than ``amax`` (31 against
    5 ms at 32 x 1,024 x 1,024, one thread): the largest of each block of :data:`ARGMAX_BLOCK` codes, then the
    first block that holds the row's largest, then the first code of that block that equals it, give the same
    index in 18 ms. Other devices take ``argmax`` itself.

    Parameters
    ----------
    scores
        ``(..., C)``.

    Returns
    -------
    torch.Tensor
        ``(...)`` long.
    """
    n_codes = scores.shape[-1]
    if scores.device.type != "cpu" or n_codes % ARGMAX_BLOCK or n_codes < 8 * ARGMAX_BLOCK:
        return scores.argmax(-1)
    blocks = scores.reshape(-1, n_codes // ARGMAX_BLOCK, ARGMAX_BLOCK)
    block = blocks.amax(-1).argmax(-1)  # the first block holding the largest
    within = blocks[torch.arange(blocks.shape[0], device=scores.device), block].argmax(-1)
    return (block * ARGMAX_BLOCK + within).view(scores.shape[:-1])


def _minus_gumbel(like: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """``log(-log U)``, ``U ~ Uniform(0, 1)`` shaped like ``like`` and at least ``floor``: minus a Gumbel(0, 1) draw,
    made in place (torch's ``exponential_`` was about three times slower on the ``(K, N, C)`` scores)."""
    uniform = torch.rand_like(like)
    return (uniform.clamp_(min=floor) if floor > 0 else uniform).log_().neg_().log_()


def gumbel_perturbed(scores: torch.Tensor) -> torch.Tensor:
    """``scores + g`` with ``g ~ Gumbel(0, 1)`` drawn independently per entry, without a gradient.

    ``U = 0`` (probability 2^-24 per entry) gives ``-inf``: a code that cannot be drawn, which is the limit of its
    Gumbel draw.
    """
    with torch.no_grad():
        minus_noise = _minus_gumbel(scores)
        return torch.sub(scores, minus_noise, out=minus_noise)


def _dense_choice(scores, perturbed, codebooks, tau):
    """The relaxed draw over every code: weights ``softmax((s + g) / tau)`` with the noise ``g`` of ``perturbed``."""
    noise = perturbed.sub_(scores.detach())  # the Gumbel draws; the buffer is not needed after
    weights = (scores + noise).div_(tau).softmax(-1)
    return torch.bmm(weights, codebooks), weights.argmax(-1)


def _top_down_candidates(probs: torch.Tensor, margin: float, m: int):
    """The codes whose perturbed score ``s + g`` is within ``margin`` of their cell's largest, and their noise ``g``.

    Drawn top down instead of perturbing every code: with ``x_c = s_c + g_c`` independent Gumbels, the largest is
    ``lse(s) + G0`` with ``G0 ~ Gumbel(0, 1)``, its code is a draw from ``probs``, the two are independent, and given
    them every other ``x_c`` is an independent Gumbel truncated below the largest. Such a code lies within
    ``margin`` with probability ``1 - exp(-q_c)``, ``q_c = p_c e^-G0 (e^margin - 1)``: the codes hit by a Poisson
    process of rate ``q``, whose count is Poisson with mean ``sum q_c`` and whose hits fall on the codes in
    proportion to ``p_c``. Given that it lies there, ``y = p_c e^-x`` (x measured from ``lse(s)``) is exponential
    truncated to ``(A, A e^margin)``, ``A = p_c e^-G0``, and ``g_c = -log y``. One cumulative sum over the codes
    replaces a uniform draw, two logarithms, a maximum and a threshold over them.

    Returns ``(noise, index, codes)``: ``(K, N, m)`` noise ``g`` (``-inf`` where a cell has fewer candidates) and code
    indices, and the ``(K, N)`` code of the largest; ``None`` if a cell has more than ``m`` candidates.
    """
    if margin > MAX_MARGIN:  # a high temperature: most cells would overflow m, and the Poisson means overflow too
        return None
    k, n, c = probs.shape
    p = probs.reshape(k * n, c)
    cdf = p.cumsum(-1)
    total = cdf[:, -1:]
    # right=True: a code owns [cdf before it, its cdf), so a code of probability 0 (underflow) is never drawn
    top = torch.searchsorted(cdf, torch.rand_like(total) * total, right=True).clamp_(max=c - 1)  # (R, 1): from probs
    p_top = p.gather(1, top)
    # a draw rounded onto the total, past the last code that can be drawn: the likeliest code stands in (a 2^-24
    # chance per cell). Always computed: testing for it first would read the device back to the host
    top = torch.where(p_top > 0, top, p.argmax(-1, keepdim=True))
    p_top = p.gather(1, top)
    # U = 0 read as the smallest U > 0 that rand draws (2^-24 in float32): clamped to the smallest float instead,
    # G0 fell to -4.5, beyond what the draw's resolution allows (-2.8), and its Poisson mean to 23 hits
    g0 = -_minus_gumbel(total, floor=torch.finfo(p.dtype).eps / 2)
    rest = (total - p_top).clamp_(min=0.0)
    rate = g0.neg().exp_().mul_(math.expm1(margin)).mul_(rest)
    # a cell whose scores are NaN (exploded weights) draws no hits: its NaN goes on to the loss, where the training
    # loop's check names it; torch.poisson raised an unrelated error on NaN on the CPU, and need not raise on CUDA
    events = torch.poisson(rate.nan_to_num_(nan=0.0, posinf=0.0)).squeeze(1).long()
    # the step's one read back to the host: how many hits to draw, and whether any cell has too many
    n_events = int(events.max()) if events.numel() else 0
    if n_events > m - 1:
        return None
    # the hits: codes drawn from probs without the top code (its stretch of the cumulative sum is stepped over)
    start = cdf.gather(1, top) - p_top
    draw = torch.rand(p.shape[0], n_events, dtype=p.dtype, device=p.device).mul_(rest)
    hits = torch.searchsorted(cdf, draw + p_top * (draw >= start), right=True).clamp_(max=c - 1)
    # a code hit twice is one candidate; a hit on the top code (rounding at the stretch's ends) is none
    hits, _ = torch.where(torch.arange(n_events, device=p.device) < events.unsqueeze(1), hits, c).sort(1)
    repeated = torch.cat([torch.zeros_like(hits[:, :1], dtype=torch.bool), hits[:, 1:] == hits[:, :-1]], 1)
    p_hit = p.gather(1, hits.clamp(max=c - 1))
    kept = (hits < c) & ~repeated & (hits != top) & (p_hit > 0)
    # the noise of each hit, in double precision: y truncated exponential on (A, A e^margin)
    a_rate = p_hit.double() * g0.neg().exp().double()
    width = -torch.expm1(-a_rate * math.expm1(margin))
    y = a_rate - torch.log1p(-torch.rand_like(a_rate) * width)
    hit_noise = torch.where(kept, -y.log(), -math.inf).to(p.dtype)
    noise = torch.cat([g0 - p_top.log(), hit_noise], 1)  # the top code's noise: x_top - s_top = G0 - log p_top
    index = torch.cat([top, torch.where(kept, hits, top)], 1)
    pad = m - noise.shape[1]
    noise = torch.nn.functional.pad(noise, (0, pad), value=-math.inf)
    index = torch.nn.functional.pad(index, (0, pad), value=0)
    return noise.view(k, n, m), index.view(k, n, m), top.view(k, n)


def relaxed_code_choice(scores: torch.Tensor, probs: torch.Tensor, projections: torch.Tensor,
                        codebooks: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gumbel-softmax (soft, not straight-through) choice of one code per cell and codebook.

    The vector passed on is ``sum_c w_c e_c`` with ``w = softmax((s + g) / tau)``, ``g ~ Gumbel(0, 1)``. It is
    computed on the codes whose ``s + g`` lies within ``tau (log C + 24 log 2)`` of the cell's largest, when no
    cell has more than :data:`CANDIDATES` of them: every other code's weight is below ``2^-24 / C`` of the
    largest, so together they are below float32 rounding, and the gradient reaches the scores through the
    candidates only (the others' gradient is below rounding as well). Those codes and their noise are drawn top
    down (:func:`_top_down_candidates`), the same distribution as perturbing every code. Otherwise (a high
    temperature; at 0.01, a cell has more than 16 candidates with probability about 1e-11) every code is perturbed
    and the draw is taken over all of them.

    Parameters
    ----------
    scores
        ``(K, N, C)`` from :func:`code_scores` of ``projections`` and ``codebooks`` (the candidates' gradient is
        taken through those two, so other scores would get another gradient).
    probs
        ``softmax(scores)`` over the codes (no gradient is taken through it here).
    projections, codebooks
        ``(K, N, d)`` and ``(K, C, d)``, the tensors ``scores`` was computed from.
    tau
        Temperature (> 0).

    Returns
    -------
    quantised : torch.Tensor
        ``(K, N, d)``.
    codes : torch.Tensor
        ``(K, N)`` the code of largest weight.
    """
    n_codes = scores.shape[-1]
    found = None
    if CANDIDATES < n_codes:
        with torch.no_grad():
            found = _top_down_candidates(probs.detach(), tau * (math.log(n_codes) + 24 * math.log(2)), CANDIDATES)
    if found is None:
        return _dense_choice(scores, gumbel_perturbed(scores.detach()), codebooks, tau)
    noise, index, codes = found
    # the candidates' values are the scores' own; their gradient is that of 2 p.e - |e|^2 through m codes, not C
    quantised = _CandidateChoice.apply(projections, codebooks, scores.detach().gather(-1, index), noise, index, tau)
    return quantised, codes


class _CandidateChoice(torch.autograd.Function):
    """``sum_m w_m e_m`` with ``w = softmax((s + g) / tau)`` over each cell's ``m`` candidate codes, the gradient
    written out.

    The scores ``s_m`` are given (the full scores' values); backwards they count as ``2 p.e_m - |e_m|^2``, so the
    gradient reaches the projections and the codes through the candidates only. Written out, the backward pass
    makes three passes over the ``(K, N, m, d)`` candidate codes and one scatter into the codebooks, where
    autograd's graph of the same expression made about a dozen.
    """

    @staticmethod
    def forward(ctx, projections, codebooks, candidate_scores, noise, index, tau):
        k, n, m = index.shape
        d = codebooks.shape[-1]
        flat = (index + codebooks.shape[1] * torch.arange(k, device=index.device).view(-1, 1, 1)).view(-1)
        chosen = codebooks.reshape(-1, d).index_select(0, flat).view(k * n, m, d)
        weights = (candidate_scores + noise).div_(tau).softmax(-1).view(k * n, 1, m)
        ctx.save_for_backward(projections, codebooks, chosen, weights, flat)
        ctx.tau = tau
        return torch.bmm(weights, chosen).view(k, n, d)

    @staticmethod
    def backward(ctx, grad):
        projections, codebooks, chosen, weights, flat = ctx.saved_tensors
        k, n, d = projections.shape
        grad_rows = grad.reshape(k * n, d, 1)
        grad_weights = torch.bmm(chosen, grad_rows).view(k * n, 1, -1)  # e_m . grad
        # softmax backward, then d/ds: the scores' gradient (K N, 1, m)
        grad_scores = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True)) / ctx.tau
        grad_projections = torch.bmm(grad_scores, chosen).view(k, n, d).mul_(2.0)
        if not ctx.needs_input_grad[1]:
            return grad_projections, None, None, None, None, None
        # each candidate code e_m: w_m grad from the sum, and grad_s (2 p - 2 e_m) from its score
        # (an outer product per cell by broadcasting: baddbmm on (m, 1) x (1, d) matrices was three times slower)
        per_candidate = (grad_scores.transpose(1, 2) * projections.reshape(k * n, 1, d).mul(2.0)).addcmul_(
            weights.transpose(1, 2), grad_rows.transpose(1, 2))
        per_candidate.sub_(chosen.mul(grad_scores.transpose(1, 2)).mul_(2.0))
        grad_codebooks = codebooks.new_zeros(codebooks.numel() // d, d).index_add_(0, flat, per_candidate.view(-1, d))
        return grad_projections, grad_codebooks.view(codebooks.shape), None, None, None, None
