"""NDreamer's pairwise terms (triplet, neighbourhood) on group blocks against their N x N definitions."""

from __future__ import annotations

import pytest
import torch

from pyro_scmodels.ndreamer.losses import group_blocks, neighbourhood_loss, triplet_loss


def _shuffled_groups(sizes, seed=0) -> torch.Tensor:
    """Group labels with the given sizes, in a random order (the blocks must not rely on sorted input)."""
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def _distances(a: torch.Tensor) -> torch.Tensor:
    return (a.unsqueeze(1) - a.unsqueeze(0)).pow(2).sum(-1).clamp_min(1e-12).sqrt()


def neighbourhood_by_definition(x, embedding, group, label_low, k, across=20.0):
    """Every cell against every other of its group: the pool is the union of the k nearest in each space,
    softmax(-distance) over the pool in each space, squared differences weighted for other clusters."""
    n = x.shape[0]
    dist_x, dist_z = _distances(x), _distances(embedding)
    per_cell = []
    for i in range(n):
        others = [j for j in range(n) if j != i and group[j] == group[i]]
        if not others:
            continue
        pool = set()
        for dist in (dist_x, dist_z.detach()):
            ranked = sorted(others, key=lambda j: float(dist[i, j]))
            pool |= set(ranked[:k])
        pool = sorted(pool)
        p_x = torch.softmax(-dist_x[i, pool], 0)
        p_z = torch.softmax(-dist_z[i, pool], 0)
        weight = 1.0 + across * (label_low[pool] != label_low[i]).to(x.dtype)
        per_cell.append(((p_x - p_z) * weight).pow(2).sum())
    return torch.stack(per_cell).mean()


@pytest.mark.parametrize("sizes", [(12, 12, 12, 12), (20, 16, 9, 3), (40, 4, 4)])
def test_group_blocks_hold_each_cell_once_with_its_group(sizes):
    group = _shuffled_groups(sizes)
    index, valid = group_blocks(group)
    assert sorted(index[valid].tolist()) == list(range(group.numel()))
    n, blocks = group.numel(), len(sizes)
    if blocks * max(sizes) ** 2 < n * n:
        assert index.shape == (blocks, max(sizes))
        for row, keep in zip(index, valid):
            assert group[row[keep]].unique().numel() == 1  # one group per block
    else:  # (40, 4, 4): blocks would hold more pairs than N x N, so one block holds every cell
        assert index.shape == (1, n) and bool(valid.all())


@pytest.mark.parametrize("sizes", [(12, 12, 12, 12), (20, 16, 9, 3), (40, 4, 4), (1, 5, 6)])
def test_neighbourhood_equals_its_definition(sizes):
    gen = torch.Generator().manual_seed(3)
    group = _shuffled_groups(sizes)
    n = group.numel()
    x = torch.rand(n, 30, generator=gen) * 3
    embedding = torch.randn(n, 6, generator=gen, dtype=torch.float64).requires_grad_()
    label_low = torch.randint(0, 3, (n,), generator=gen)
    blocked = neighbourhood_loss(x.double(), embedding, group, label_low, n_neighbours=4)
    expected = neighbourhood_by_definition(x.double(), embedding, group, label_low, k=4)
    (grad_blocked,) = torch.autograd.grad(blocked, embedding)
    (grad_expected,) = torch.autograd.grad(expected, embedding)
    assert blocked.item() == pytest.approx(expected.item(), rel=1e-9)
    assert torch.allclose(grad_blocked, grad_expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("sizes", [(3, 3, 3, 2, 3, 2, 3), (3,)])
@pytest.mark.parametrize("coarse", [False, True])
def test_triplet_equals_its_definition_when_the_triplets_are_fixed(sizes, coarse):
    """Groups of three cells labelled (a, a, b) give each of the two a-cells exactly one triplet (the other a,
    the b) and the b-cell none; groups of two (a, b) give none. With sizes 3 and 2 mixed, the blocks are padded;
    one group is one block. Coarse labels equal to the labels allow the same triplets."""
    gen = torch.Generator().manual_seed(5)
    group = _shuffled_groups(sizes, seed=1)
    labels = torch.empty_like(group)
    for g, size in enumerate(sizes):
        members = torch.nonzero(group == g).flatten()
        labels[members] = torch.tensor([0, 0, 1][:size] if size == 3 else [0, 1])
    embedding = torch.randn(group.numel(), 5, generator=gen, dtype=torch.float64).requires_grad_()
    value = triplet_loss(embedding, group, labels, margin=2.0, coarse_labels=labels.clone() if coarse else None)
    dist = _distances(embedding)
    terms = []
    for i in range(group.numel()):
        positive = [j for j in range(group.numel()) if j != i and group[j] == group[i] and labels[j] == labels[i]]
        negative = [j for j in range(group.numel()) if group[j] == group[i] and labels[j] != labels[i]]
        if positive and negative:
            terms.append(torch.relu(dist[i, positive[0]] - dist[i, negative[0]] + 2.0))
    expected = torch.stack(terms).mean()
    assert len(terms) == 2 * sum(size == 3 for size in sizes)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    (grad_value,) = torch.autograd.grad(value, embedding)
    (grad_expected,) = torch.autograd.grad(expected, embedding)
    assert torch.allclose(grad_value, grad_expected)


def test_triplet_draws_its_triplets_inside_each_group():
    """Cells far from every other group: a triplet crossing groups would reach the large distances."""
    group = _shuffled_groups((10, 10, 10, 10), seed=2)
    labels = torch.arange(40) % 2
    embedding = torch.randn(40, 3, generator=torch.Generator().manual_seed(0)) + 1000.0 * group.unsqueeze(1)
    value = triplet_loss(embedding, group, labels, margin=0.0, max_per_anchor=15)
    assert 0.0 < value.item() < 10.0
