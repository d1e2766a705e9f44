"""How each cell chooses a code of each codebook: scores against the codes and a relaxed (Gumbel-softmax) draw.

Shapes: ``K`` codebooks, ``N`` cells, ``C`` codes per codebook, ``d`` code dimension; code-related tensors are
laid out codebook first, ``(K, N, ...)``.

The relaxed draw is ``softmax((s + g) / tau)`` over the ``C`` codes with Gumbel noise ``g``. At NDreamer's
temperature (0.01) it is one-hot to float32 precision except among the few codes whose perturbed scores lie
within a fraction of a unit of the largest: every other code's weight is below the rounding of the sum.
:func:`relaxed_code_choice` therefore softmaxes only the :data:`CANDIDATES` best-perturbed codes of each cell,
and checks on every call that the codes it leaves out carry no weight at float32 precision; if any cell fails
the check (a high temperature, near ties), that call takes the dense draw over every code.
"""

from __future__ import annotations

import math

import torch

#: most codes per cell in the sparse relaxed draw. The gap between the largest of C iid Gumbel draws and the
#: (m+1)-th is distributed as the largest of m iid Exp(1) draws, so with equal scores (the worst case) a cell has
#: more than m codes within 0.24 of its largest (the margin at tau = 0.01) with probability (1 - exp(-0.24))^m:
#: about 2e-11 for m = 16, so a (32 x 1,024)-cell step falls back to the dense draw about once in 10^6.
CANDIDATES = 16


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
    # one fused batched product: -|e|^2 (broadcast over cells) + 2 p.e^T
    return torch.baddbmm(-codebooks.pow(2).sum(-1).unsqueeze(1), projections, codebooks.transpose(1, 2), alpha=2.0)


def gumbel_perturbed(scores: torch.Tensor) -> torch.Tensor:
    """``scores + g`` with ``g ~ Gumbel(0, 1)`` drawn independently per entry, without a gradient.

    The noise is drawn as ``-log(-log U)``, ``U ~ Uniform(0, 1)``, in place (torch's ``exponential_`` was about
    three times slower on the ``(K, N, C)`` scores). ``U = 0`` (probability 2^-24 per entry) gives ``-inf``: a
    code that cannot be drawn, which is the limit of its Gumbel draw.
    """
    with torch.no_grad():
        minus_noise = torch.rand_like(scores).log_().neg_().log_()
        return torch.sub(scores, minus_noise, out=minus_noise)


def _dense_choice(scores, perturbed, codebooks, tau):
    """The relaxed draw over every code: weights ``softmax((s + g) / tau)`` with the noise ``g`` of ``perturbed``."""
    noise = perturbed.sub_(scores.detach())  # the Gumbel draws; the buffer is not needed after
    weights = (scores + noise).div_(tau).softmax(-1)
    return torch.bmm(weights, codebooks), weights.argmax(-1)


def _candidates(perturbed: torch.Tensor, margin: float, m: int):
    """The codes whose perturbed score is within ``margin`` of their cell's largest, at most ``m`` per cell.

    Returns ``(values, index, codes)``: ``(K, N, m)`` perturbed scores (``-inf`` where a cell has fewer
    candidates) and code indices, and the ``(K, N)`` code of the largest; ``None`` if a cell has more than ``m``.
    A threshold and a compaction are one pass each over the ``(K, N, C)`` scores (``topk`` took 3-4 times as long).
    """
    top_value, codes = perturbed.max(-1)
    flat = (perturbed >= (top_value - margin).unsqueeze(-1)).view(-1).nonzero().squeeze(1)  # sorted by cell
    n_codes = perturbed.shape[-1]
    cell = flat // n_codes
    counts = torch.bincount(cell, minlength=top_value.numel())
    if int(counts.max()) > m:
        return None
    slot = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[cell]
    values = perturbed.new_full((top_value.numel(), m), -math.inf)
    index = torch.zeros(top_value.numel(), m, dtype=torch.long, device=flat.device)
    values[cell, slot] = perturbed.view(-1)[flat]
    index[cell, slot] = flat - cell * n_codes
    return values.view(*top_value.shape, m), index.view(*top_value.shape, m), codes


def relaxed_code_choice(scores: torch.Tensor, projections: torch.Tensor, codebooks: torch.Tensor,
                        tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gumbel-softmax (soft, not straight-through) choice of one code per cell and codebook.

    The vector passed on is ``sum_c w_c e_c`` with ``w = softmax((s + g) / tau)``, ``g ~ Gumbel(0, 1)``. It is
    computed on the codes whose ``s + g`` lies within ``tau (log C + 24 log 2)`` of the cell's largest, when no
    cell has more than :data:`CANDIDATES` of them: every other code's weight is below ``2^-24 / C`` of the
    largest, so together they are below float32 rounding, and the gradient reaches the scores through the
    candidates only (the others' gradient is below rounding as well). Otherwise the draw is taken over every code.

    Parameters
    ----------
    scores
        ``(K, N, C)`` from :func:`code_scores`.
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
    perturbed = gumbel_perturbed(scores.detach())
    n_codes = scores.shape[-1]
    found = None
    if CANDIDATES < n_codes:
        with torch.no_grad():
            found = _candidates(perturbed, tau * (math.log(n_codes) + 24 * math.log(2)), CANDIDATES)
    if found is None:
        return _dense_choice(scores, perturbed, codebooks, tau)
    values, index, codes = found
    k_index = torch.arange(scores.shape[0], device=scores.device).view(-1, 1, 1)
    chosen = codebooks[k_index, index]  # (K, N, m, d)
    # the candidates' scores recomputed from their codes carry the gradient (through m codes, not C); the
    # values are the perturbed scores found above, the same numbers as in the dense draw
    recomputed = 2 * (projections.unsqueeze(2) * chosen).sum(-1) - chosen.pow(2).sum(-1)
    weights = (values + (recomputed - recomputed.detach())).div(tau).softmax(-1)
    quantised = (weights.unsqueeze(-1) * chosen).sum(2)
    return quantised, codes
