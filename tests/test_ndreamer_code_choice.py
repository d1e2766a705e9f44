"""NDreamer's code choice: the code scores and their gradient, the nearest code, and the relaxed (Gumbel-softmax)
draw on the candidate codes against the dense draw over every code."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_scmodels.ndreamer.code_choice import code_scores, gumbel_perturbed, nearest_code, relaxed_code_choice


def test_code_scores_are_minus_squared_distances_up_to_a_constant_per_cell():
    torch.manual_seed(0)
    p, e = torch.randn(3, 20, 8), torch.randn(3, 30, 8)
    naive = -(p.unsqueeze(2) - e.unsqueeze(1)).pow(2).sum(-1)
    assert torch.allclose(code_scores(p, e), naive + p.pow(2).sum(-1, keepdim=True), atol=1e-4)


def test_code_scores_gradient_equals_the_definitions():
    """The written-out backward products give autograd's gradient of 2 p.e - |e|^2, for both inputs."""
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(3, 20, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    e = torch.randn(3, 30, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(code_scores, (p, e))
    grad = torch.randn(3, 20, 30, generator=gen, dtype=torch.float64)
    fast = torch.autograd.grad(code_scores(p, e), (p, e), grad)
    slow = torch.autograd.grad(2 * p @ e.transpose(1, 2) - e.pow(2).sum(-1).unsqueeze(1), (p, e), grad)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b)
    # with one input needing no gradient, the other's is still right
    (only_p,) = torch.autograd.grad(code_scores(p, e.detach()), p, grad)
    assert torch.allclose(only_p, slow[0])


def test_code_scores_backward_under_autocast():
    """Under CPU autocast the scores come out in bfloat16; the written-out backward still gives float32 gradients
    close to those of the float32 definition."""
    gen = torch.Generator().manual_seed(6)
    p = torch.randn(2, 30, 8, generator=gen, requires_grad=True)
    e = torch.randn(2, 40, 8, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = code_scores(p, e)
    assert scores.dtype == torch.bfloat16
    grads = torch.autograd.grad(scores.float().sum(), (p, e))
    expected = torch.autograd.grad((2 * p @ e.transpose(1, 2) - e.pow(2).sum(-1).unsqueeze(1)).sum(), (p, e))
    for a, b in zip(grads, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


@pytest.mark.parametrize("n_codes", [1024, 320, 100])
def test_nearest_code_is_the_first_argmax(n_codes):
    """Block maxima (1,024 and 320 codes) or torch's argmax (100: not a multiple of the block) give the first
    index of the largest score, ties included."""
    gen = torch.Generator().manual_seed(n_codes)
    scores = torch.randint(0, 6, (4, 50, n_codes), generator=gen).float()  # many ties for the largest
    assert torch.equal(nearest_code(scores), scores.argmax(-1))
    scores = torch.randn(4, 50, n_codes, generator=gen)
    assert torch.equal(nearest_code(scores), scores.argmax(-1))
    scores[0, 0, 7] = float("nan")  # NaN counts as the largest, as in torch.argmax
    assert torch.equal(nearest_code(scores), scores.argmax(-1))


def test_code_scores_never_build_the_difference_tensor():
    k, n, c, d = 2, 1024, 512, 8
    p, e = torch.randn(k, n, d), torch.randn(k, c, d)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        code_scores(p, e)
    largest = max(evt.cpu_memory_usage for evt in prof.events())
    # the (K, N, C) output is allowed; a (K, N, C, d) difference would be d times larger
    assert 0 < largest <= 2 * k * n * c * 4 < k * n * c * d * 4


def test_relaxed_code_choice_draws_each_code_with_its_softmax_probability():
    # C = 4 codes: fewer than the candidates, the dense draw over every code
    torch.manual_seed(0)
    e = torch.eye(4).unsqueeze(0)  # code c is the c-th unit vector, so quantised is the weights
    scores = torch.tensor([0.0, 1.0, 2.0, -1.0]).expand(1, 100_000, 4).contiguous().requires_grad_(True)
    weights, codes = relaxed_code_choice(scores, scores.softmax(-1), torch.zeros(1, 100_000, 4), e, tau=1.0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 100_000))
    # Gumbel-max: the argmax of scores + noise is a draw from softmax(scores) (sd of each share < 0.0016)
    shares = torch.bincount(codes[0], minlength=4) / 100_000
    torch.testing.assert_close(shares, torch.softmax(scores[0, 0], -1).detach(), atol=0.006, rtol=0)
    weights[0, :, 2].sum().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[0, :, 2].mean() > 0
    cold, _ = relaxed_code_choice(scores.detach()[:, :1000], scores.detach()[:, :1000].softmax(-1),
                                  torch.zeros(1, 1000, 4), e, tau=0.01)
    assert (cold.max(-1).values > 0.99).float().mean() > 0.95  # a low temperature gives near one-hot samples


def _draws(choose, p, e, tau, seed):
    """Many independent draws for one cell (its projection repeated): quantised, codes and the mean gradient."""
    p, e = p.clone().requires_grad_(), e.clone().requires_grad_()
    torch.manual_seed(seed)
    scores = code_scores(p, e)
    quantised, codes = choose(scores, scores.softmax(-1), p, e, tau)
    (quantised[..., :2] * torch.tensor([1.0, -2.0])).sum().div(p.shape[1]).backward()
    return quantised.detach(), codes, e.grad


def _dense_draw(scores, probs, p, e, tau):
    """The definition: softmax((s + g) / tau) over every code, every code perturbed."""
    weights = ((scores + (gumbel_perturbed(scores.detach()) - scores.detach())) / tau).softmax(-1)
    return torch.bmm(weights, e), weights.argmax(-1)


@pytest.mark.parametrize("tau", [0.01, 0.02, 1.0])
def test_relaxed_code_choice_has_the_distribution_of_the_dense_draw(tau, monkeypatch):
    # 64 codes, one cell drawn 100,000 times. At tau 0.01 and 0.02 the candidates are drawn top down (a few codes per
    # cell); at tau 1 every code is within the margin, more than the candidates, and every code is perturbed
    import pyro_scmodels.ndreamer.code_choice as choice

    fallbacks = []
    dense_choice = choice._dense_choice
    monkeypatch.setattr(choice, "_dense_choice", lambda *args: fallbacks.append(1) or dense_choice(*args))
    gen = torch.Generator().manual_seed(3)
    n = 100_000
    # codes: two random coordinates, then six one-hot ones, so quantised[..., 2:] holds the first six codes' weights
    e = torch.cat([torch.randn(1, 64, 2, generator=gen) * 0.3, torch.eye(64)[None, :, :6]], -1)
    p = (e[:, :1].clone() + 0.05 * torch.randn(1, 1, 8, generator=gen)).expand(1, n, 8).contiguous()
    ours = _draws(relaxed_code_choice, p, e, tau, seed=11)
    assert len(fallbacks) == (tau == 1.0)
    definition = _draws(_dense_draw, p, e, tau, seed=12)
    probs = code_scores(p[:, :1], e).softmax(-1)[0, 0]
    # the code of largest weight is a draw from softmax(scores): sd of each share < 0.0016
    for codes in (ours[1], definition[1]):
        torch.testing.assert_close(torch.bincount(codes[0], minlength=64) / n, probs, atol=0.006, rtol=0)
    # the first six codes' weights have the same distribution (two-sample Kolmogorov-Smirnov distance on a grid;
    # 0.0087 is the 0.1 % critical value for 100,000 draws each)
    grid = torch.linspace(0, 1, 201)
    for column in range(2, 8):
        ranked = [draws[0][0, :, column].sort().values for draws in (ours, definition)]
        distance = (torch.searchsorted(ranked[0], grid) - torch.searchsorted(ranked[1], grid)).abs().max().item() / n
        assert distance < 0.0087, (column, distance)


@pytest.mark.parametrize("tau", [0.01, 0.02])
def test_relaxed_code_choice_equals_the_dense_softmax_on_the_same_noise(tau):
    # the noise the top-down draw gives the candidates, every other code at -inf: the dense softmax of that is the
    # definition with those draws, and the sparse draw must give the same vector and gradients
    import pyro_scmodels.ndreamer.code_choice as choice

    gen = torch.Generator().manual_seed(5)
    p0, e0 = torch.randn(3, 400, 8, generator=gen), torch.randn(3, 64, 8, generator=gen)
    results = []
    for sparse in (True, False):
        p, e = p0.clone().requires_grad_(), e0.clone().requires_grad_()
        scores = code_scores(p, e)
        torch.manual_seed(21)
        if sparse:
            quantised, codes = relaxed_code_choice(scores, scores.softmax(-1), p, e, tau)
        else:
            margin = tau * (math.log(64) + 24 * math.log(2))
            noise, index, codes = choice._top_down_candidates(scores.detach().softmax(-1), margin, choice.CANDIDATES)
            full = torch.full_like(scores, -math.inf).scatter_reduce(-1, index, noise, "amax")
            quantised = torch.bmm(((scores + full) / tau).softmax(-1), e)
        (quantised * torch.linspace(-1, 1, quantised.numel()).view_as(quantised)).sum().backward()
        results.append((quantised.detach(), codes, p.grad, e.grad))
    assert torch.equal(results[0][1], results[1][1])
    for ours, definition in zip(results[0][0:1] + results[0][2:], results[1][0:1] + results[1][2:]):
        torch.testing.assert_close(ours, definition, rtol=1e-4, atol=1e-4 * definition.abs().max().item())


@pytest.mark.parametrize("tau", [0.01, 0.3])
def test_candidate_choice_gradient_equals_autograd_of_its_definition(tau):
    """The written-out backward of the candidates' weighted sum against autograd of the expression it replaces, in
    double precision: three codebooks stored non-contiguously, repeated candidates, padding (noise -inf), and
    with only the projections needing a gradient."""
    import pyro_scmodels.ndreamer.code_choice as choice

    gen = torch.Generator().manual_seed(8)
    k, n, c, d, m = 3, 40, 20, 8, 4
    p = torch.randn(k, n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    e = torch.randn(c, k, d, generator=gen, dtype=torch.float64).transpose(0, 1).requires_grad_()
    index = torch.randint(0, c, (k, n, m), generator=gen)
    index[:, :5, 1] = index[:, :5, 0]  # a code listed twice
    noise = torch.randn(k, n, m, generator=gen, dtype=torch.float64)
    noise[:, 10:, 3] = -math.inf  # padding
    scores = code_scores(p, e).detach().gather(-1, index)
    grad_out = torch.randn(k, n, d, generator=gen, dtype=torch.float64)

    chosen = e[torch.arange(k).view(-1, 1, 1), index]
    recomputed = 2 * (p.unsqueeze(2) * chosen).sum(-1) - chosen.pow(2).sum(-1)
    weights = ((scores + (recomputed - recomputed.detach()) + noise) / tau).softmax(-1)
    definition = (weights.unsqueeze(-1) * chosen).sum(2)
    expected = torch.autograd.grad(definition, (p, e), grad_out)

    ours = choice._CandidateChoice.apply(p, e, scores, noise, index, tau)
    assert torch.allclose(ours, definition)
    for a, b in zip(torch.autograd.grad(ours, (p, e), grad_out), expected):
        assert torch.allclose(a, b)
    (only_p,) = torch.autograd.grad(choice._CandidateChoice.apply(p, e.detach(), scores, noise, index, tau), p, grad_out)
    assert torch.allclose(only_p, expected[0])


def test_top_down_candidates_lie_within_the_margin_of_the_largest():
    import pyro_scmodels.ndreamer.code_choice as choice

    gen = torch.Generator().manual_seed(4)
    p, e = torch.randn(2, 3000, 8, generator=gen), torch.randn(2, 128, 8, generator=gen)
    scores = code_scores(p, e)
    torch.manual_seed(9)
    noise, index, codes = choice._top_down_candidates(scores.softmax(-1), margin=0.3, m=choice.CANDIDATES)
    assert noise.shape == index.shape == (2, 3000, choice.CANDIDATES)
    values = scores.gather(-1, index) + noise
    kept = torch.isfinite(noise)
    assert torch.equal(index[..., 0], codes) and kept[..., 0].all()
    largest = values[..., :1].expand_as(values)
    assert (values[kept] <= largest[kept] + 1e-4).all() and (values[kept] >= largest[kept] - 0.3 - 1e-4).all()
    assert kept[..., 1:].any()  # some cells have a second code within the margin
    chosen = torch.where(kept, index, -1 - torch.arange(choice.CANDIDATES))  # the kept codes of a cell are distinct
    assert (chosen.sort(-1).values.diff(dim=-1) != 0).all()
    # equal scores: most cells have more than one other code within a unit of their largest; at most 2 allowed
    flat = torch.zeros(2, 3000, 128)
    assert choice._top_down_candidates(flat.softmax(-1), margin=1.0, m=2) is None



def test_a_top_draw_rounded_onto_the_total_lands_on_a_code_that_can_be_drawn(monkeypatch):
    import pyro_scmodels.ndreamer.code_choice as choice

    torch.manual_seed(8)
    probs = torch.rand(1, 50, 64, generator=torch.Generator().manual_seed(7))
    probs[..., -10:] = 0.0  # the last codes cannot be drawn
    probs = probs / probs.sum(-1, keepdim=True)
    real = torch.rand_like
    calls = []

    def first_at_one(tensor, *args, **kwargs):  # the top code's uniform draw at 1: the value is the total itself
        calls.append(1)
        return torch.ones_like(tensor) if len(calls) == 1 else real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "rand_like", first_at_one)
    noise, index, codes = choice._top_down_candidates(probs, margin=0.3, m=choice.CANDIDATES)
    assert (probs.gather(-1, codes.unsqueeze(-1)) > 0).all() and torch.isfinite(noise[..., 0]).all()


def test_a_high_temperature_takes_the_dense_draw_for_every_cell(monkeypatch):
    # tau 3: every code is within the margin. A one-hot cell has no other candidate, but the flat cell beside it
    # has 64: the call must not draw the flat cell sparsely
    import pyro_scmodels.ndreamer.code_choice as choice

    fallbacks = []
    dense_choice = choice._dense_choice
    monkeypatch.setattr(choice, "_dense_choice", lambda *args: fallbacks.append(1) or dense_choice(*args))
    torch.manual_seed(10)
    e = torch.eye(64)[None].clone()
    p = torch.stack([torch.zeros(64), 100 * torch.eye(64)[0]])[None]  # a flat cell, a one-hot cell
    scores = code_scores(p, e)
    quantised, _ = relaxed_code_choice(scores, scores.softmax(-1), p, e, tau=3.0)
    assert fallbacks == [1]
    assert quantised[0, 0].max() < 0.5  # the flat cell's weights are spread at this temperature


def test_a_cell_with_nan_scores_passes_nan_on_instead_of_failing_in_the_poisson_draw():
    """A NaN projection (exploded weights) gave a NaN Poisson mean in the top-down draw: torch.poisson raised an
    unrelated "invalid Poisson rate" on the CPU (and on CUDA it need not raise). The NaN now reaches the output, where
    the training loop's non-finite check names it."""
    gen = torch.Generator().manual_seed(3)
    p, e = torch.randn(1, 50, 8, generator=gen), torch.randn(1, 1024, 8, generator=gen)
    p[0, 4] = float("nan")
    scores = code_scores(p, e)
    torch.manual_seed(0)
    quantised, codes = relaxed_code_choice(scores, scores.softmax(-1), p, e, tau=0.01)
    assert torch.isnan(quantised[0, 4]).all()
    assert torch.isfinite(quantised[0, :4]).all() and torch.isfinite(quantised[0, 5:]).all()
    assert codes.shape == (1, 50)
