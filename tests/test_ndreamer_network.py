"""NDreamer network and losses on tiny sizes: shapes, determinism, codebooks and loss behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyro_scmodels.ndreamer import LossWeights, NDreamerNetwork
from pyro_scmodels.ndreamer.code_information import (
    SumXLogX,
    dependence_nmi,
    independence_and_dependence_nmi,
    independence_nmi,
    segmented_soft_nmi,
)
from pyro_scmodels.ndreamer.losses import (
    codebook_loss,
    group_index,
    kl_loss,
    neighbourhood_loss,
    reconstruction_loss,
    total_loss,
    triplet_loss,
)
from pyro_scmodels.ndreamer.code_choice import code_scores, gumbel_perturbed, nearest_code, relaxed_code_choice

G, K, C, D, Z, N = 50, 4, 16, 8, 16, 48


def make_net(**kwargs) -> NDreamerNetwork:
    torch.manual_seed(0)
    args = dict(
        n_genes=G, n_conditions=2, batch_sizes=[3], encoder_hidden=(64, 32), n_codebooks=K, codebook_size=C,
        codebook_dim=D, embedding_dim=32, z_dim=Z, decoder_hidden=(32, 64),
    )
    args.update(kwargs)
    return NDreamerNetwork(**args)


def make_batch(n: int = N, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    condition = torch.arange(n) % 2
    batches = (torch.arange(n) // 2 % 3).unsqueeze(1)
    label_low = torch.randint(0, 3, (n,), generator=gen)
    label_high = label_low * 2 + torch.randint(0, 2, (n,), generator=gen)
    # expression depends on the cell state so the toy problem has structure to learn
    centres = torch.rand(6, G, generator=gen) * 3
    x = (centres[label_high] + 0.3 * torch.rand(n, G, generator=gen)).clamp_min(0)
    return dict(x=x, condition=condition, batches=batches, label_low=label_low, label_high=label_high)


def test_output_shapes():
    net, b = make_net(), make_batch()
    out = net(b["x"], b["condition"], b["batches"])
    expected = {
        "reconstruction": (N, G), "mean": (N, Z), "logvar": (N, Z), "z": (N, Z), "codes": (N, K),
        "logits": (K, N, C), "probs": (K, N, C), "projections": (K, N, D), "quantised": (K, N, D),
        "nearest_vectors": (K, N, D),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert (out["reconstruction"] >= 0).all()
    assert net.embed(b["x"]).shape == (N, Z)
    assert net.embed(b["x"], batch_size=10).shape == (N, Z)


def test_no_batch_key_and_signed_output():
    net = make_net(batch_sizes=[], nonnegative_output=False)
    b = make_batch()
    out = net(b["x"], b["condition"], None)
    assert out["reconstruction"].shape == (N, G)
    assert (out["reconstruction"] < 0).any()


def test_eval_is_deterministic_and_uses_argmax():
    net, b = make_net(), make_batch()
    net(b["x"], b["condition"], b["batches"])  # one training pass moves the BatchNorm statistics
    net.eval()
    first = net(b["x"], b["condition"], b["batches"])
    second = net(b["x"], b["condition"], b["batches"])
    assert torch.equal(first["mean"], second["mean"]) and torch.equal(first["z"], first["mean"])
    assert torch.equal(first["reconstruction"], second["reconstruction"])
    assert torch.equal(first["codes"], first["logits"].argmax(-1).T)
    chosen = net.codebooks[torch.arange(K).unsqueeze(1), first["codes"].T]
    assert torch.equal(first["quantised"], chosen)
    # embed() is deterministic too and restores the previous mode
    net.train()
    e1, e2 = net.embed(b["x"]), net.embed(b["x"])
    assert torch.equal(e1, e2) and net.training


def test_training_is_stochastic():
    net, b = make_net(), make_batch()
    outs = [net(b["x"], b["condition"], b["batches"]) for _ in range(4)]
    assert not torch.equal(outs[0]["z"], outs[1]["z"])
    assert any(not torch.equal(outs[0]["codes"], o["codes"]) for o in outs[1:])
    # the relaxed sample is nearly one-hot at tau = 0.01: quantised vectors sit on codes
    gap = (outs[0]["quantised"] - net.codebooks[torch.arange(K).unsqueeze(1), outs[0]["codes"].T]).abs()
    assert gap.median() < 1e-3


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


def test_dead_code_reinitialisation_changes_only_unused_codes():
    net = make_net()
    before = net.codebooks.detach().clone()
    usage = torch.zeros(K, C)
    usage[:, : C // 2] = 10.0  # share 1/(C/2) > 1/C: alive
    usage[0, C // 2] = 0.01  # tiny share: dead, like the untouched rest
    net.code_usage.copy_(usage)
    projections = torch.randn(K, 64, D) + 100.0  # far from any initial code
    dead = net.reinitialise_dead_codes(projections)
    changed = (net.codebooks.detach() != before).any(-1)
    assert torch.equal(dead, usage < usage.sum(-1, keepdim=True) / C)
    assert torch.equal(changed, dead)
    assert (net.codebooks.detach()[dead] > 50).all()  # taken from the projections
    assert net.code_usage.sum() == 0


def test_code_usage_is_counted_in_training_mode_only():
    net, b = make_net(), make_batch()
    net(b["x"], b["condition"], b["batches"])
    assert torch.equal(net.code_usage.sum(-1), torch.full((K,), float(N)))
    net.eval()
    net(b["x"], b["condition"], b["batches"])
    assert torch.equal(net.code_usage.sum(-1), torch.full((K,), float(N)))


def test_loss_parts_finite_and_differentiable():
    net, b = make_net(), make_batch()
    out = net(b["x"], b["condition"], b["batches"])
    group = group_index(b["condition"], b["batches"])
    parts = {
        "reconstruction": sum(reconstruction_loss(b["x"], out["reconstruction"])),
        "kl": sum(kl_loss(out["mean"], out["logvar"])),
        "independence": independence_nmi(out["probs"], torch.cat([b["condition"][:, None], b["batches"]], 1)),
        "dependence": dependence_nmi(out["probs"], group, b["label_low"], b["label_high"]),
        "triplet": triplet_loss(out["mean"], group, b["label_high"]),
        "neighbourhood": neighbourhood_loss(b["x"], out["mean"], group, b["label_low"], n_neighbours=5),
        "codebook": codebook_loss(out["projections"], out["nearest_vectors"]),
    }
    for name, value in parts.items():
        assert value.ndim == 0 and torch.isfinite(value), name
        net.zero_grad()
        value.backward(retain_graph=True)
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads, name
        assert all(torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


def _one_hot_probs(codes: torch.Tensor, n_codes: int) -> torch.Tensor:
    # (K, N) hard codes -> slightly smoothed (K, N, C) assignment probabilities
    return F.one_hot(codes, n_codes).float() * 0.999 + 0.001 / n_codes


def test_independence_nmi_low_when_independent_high_when_equal():
    gen = torch.Generator().manual_seed(0)
    n = 4000
    labels = torch.randint(0, 3, (n, 2), generator=gen)
    random_codes = torch.randint(0, C, (2, n), generator=gen)
    assert independence_nmi(_one_hot_probs(random_codes, C), labels) < 0.02
    equal_codes = labels[:, :1].T.expand(2, n)  # codes reproduce the first label, not the second
    value = independence_nmi(_one_hot_probs(equal_codes, C), labels)
    assert 0.95 < value < 1.05


def test_dependence_is_average_of_groups():
    gen = torch.Generator().manual_seed(0)
    n = 90
    probs = torch.softmax(3 * torch.randn(K, n, C, generator=gen), -1)
    group = torch.randint(0, 4, (n,), generator=gen) * 3  # non-contiguous group ids
    low = torch.randint(0, 3, (n,), generator=gen)
    high = torch.randint(0, 7, (n,), generator=gen)
    together = dependence_nmi(probs, group, low, high)
    separate = [
        dependence_nmi(probs[:, group == g], group[group == g], low[group == g], high[group == g])
        for g in torch.unique(group)
    ]
    assert torch.allclose(together, torch.stack(separate).mean(), atol=1e-5)


def _nmi_by_loops(probs, labels):
    """NMI of each codebook with one label variable, its joint summed label by label (the definition)."""
    values = []
    for k in range(probs.shape[0]):
        joint = torch.stack([probs[k, labels == level].sum(0) for level in torch.unique(labels)]) / len(labels)
        p_code, p_label = joint.sum(0), joint.sum(1)

        def entropy(p):
            return -(p * p.clamp_min(1e-12).log()).sum()
        mutual = entropy(p_code) + entropy(p_label) - entropy(joint)
        values.append(2 * mutual.clamp_min(0) / (entropy(p_code) + entropy(p_label)))
    return torch.stack(values)


def test_segmented_nmi_matches_the_definition_in_value_and_gradient():
    gen = torch.Generator().manual_seed(3)
    n = 60
    logits = torch.randn(K, n, C, generator=gen).mul(4).requires_grad_()
    group = (torch.arange(n) < 22).long()  # segments of unequal sizes: 22 and 38 cells
    first, second = torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 5, (n,), generator=gen)
    # per group, two label variables: segments 2g (columns 8g..8g+2) and 2g + 1 (columns 8g+3..8g+7)
    columns = torch.stack([8 * group + first, 8 * group + 3 + second], dim=1)
    segments = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3])
    fast = segmented_soft_nmi(logits.softmax(-1), columns, segments)
    (grad_fast,) = torch.autograd.grad(fast.sum(), logits)
    probs = logits.softmax(-1)
    slow = torch.stack([_nmi_by_loops(probs[:, group == g], labels[group == g])
                        for g in (0, 1) for labels in (first, second)], dim=1)
    (grad_slow,) = torch.autograd.grad(slow.sum(), logits)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(grad_fast, grad_slow, atol=1e-6 * grad_slow.abs().max().item() + 1e-9)


def test_both_nmi_terms_from_one_table_equal_each_alone():
    gen = torch.Generator().manual_seed(7)
    n = 80
    logits = torch.randn(K, n, C, generator=gen).mul(3).requires_grad_()
    labels = torch.stack([torch.randint(0, 2, (n,), generator=gen), torch.randint(0, 3, (n,), generator=gen)], 1)
    group = labels[:, 0] * 3 + labels[:, 1]
    low, high = torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 9, (n,), generator=gen)
    together = independence_and_dependence_nmi(logits.softmax(-1), labels, group, low, high)
    (grad_together,) = torch.autograd.grad(together[0] - 2 * together[1], logits)
    alone = (independence_nmi(logits.softmax(-1), labels), dependence_nmi(logits.softmax(-1), group, low, high))
    (grad_alone,) = torch.autograd.grad(alone[0] - 2 * alone[1], logits)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad_together, grad_alone)


def test_sum_xlogx_matches_autograd_with_zeros():
    p = torch.tensor([[0.0, 0.2, 0.8, 1e-13], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    grad_out = torch.tensor([0.7, -1.3], dtype=torch.float64)
    fast = SumXLogX.apply(p)
    (grad_fast,) = torch.autograd.grad(fast, p, grad_out)
    slow = (p * p.clamp_min(1e-12).log()).sum(-1)
    (grad_slow,) = torch.autograd.grad(slow, p, grad_out)
    assert torch.allclose(fast, slow) and torch.isfinite(grad_fast).all()
    assert torch.allclose(grad_fast, grad_slow)


def test_triplet_zero_without_valid_triplet():
    emb = torch.randn(10, 4, requires_grad=True)
    same_label = triplet_loss(emb, torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long))
    alone = triplet_loss(emb, torch.arange(10), torch.arange(10) % 2)  # one cell per group
    for value in (same_label, alone):
        assert value.item() == 0.0
        value.backward()
        assert torch.isfinite(emb.grad).all()
    # well separated labels with the margin satisfied give 0, overlapping ones do not
    labels = torch.arange(10) % 2
    apart = labels[:, None].float() * torch.tensor([[100.0, 0, 0, 0]])
    assert triplet_loss(apart, torch.zeros(10, dtype=torch.long), labels).item() == 0.0
    assert triplet_loss(torch.zeros(10, 4), torch.zeros(10, dtype=torch.long), labels).item() == pytest.approx(5.0)


def test_reconstruction_and_neighbourhood_zero_when_perfect():
    b = make_batch()
    mse, cosine = reconstruction_loss(b["x"], b["x"].clone())
    assert mse.item() == 0.0 and cosine.item() == pytest.approx(0.0, abs=1e-6)
    group = group_index(b["condition"], b["batches"])
    same = neighbourhood_loss(b["x"], b["x"].clone(), group, b["label_low"], n_neighbours=5)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    shuffled = neighbourhood_loss(b["x"], b["x"][torch.randperm(N)], group, b["label_low"], n_neighbours=5)
    assert shuffled > 0.01


def test_total_loss_decreases():
    net, b = make_net(), make_batch(n=60)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    weights = LossWeights(n_neighbours=5)
    history = []
    for _ in range(30):
        out = net(b["x"], b["condition"], b["batches"])
        loss, parts = total_loss(out, b, weights)
        assert set(parts) == {"mse", "cosine", "kl", "correlation", "independence", "dependence", "triplet",
                              "neighbourhood", "codebook"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(torch.isfinite(torch.tensor(history)))
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5


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
