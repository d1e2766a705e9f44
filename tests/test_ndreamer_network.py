"""NDreamer network and losses on tiny sizes: shapes, determinism, codebooks and loss behaviour."""

from __future__ import annotations

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
