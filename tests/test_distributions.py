"""GammaPoissonMean is Pyro's GammaPoisson(theta, theta / mu), and select_rows is table[index]."""

import numpy as np
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch

from pyro_scmodels.data.counts import CountMatrix, stored_positions
from pyro_scmodels.distributions import CountPositions, GammaPoissonMean, ZeroCountRowSums, select_rows


@pytest.mark.parametrize("grouped", [False, True])
def test_log_prob_equals_pyros_gamma_poisson(grouped):
    torch.manual_seed(0)
    mu = torch.rand(6, 9) * 20 + 1e-3
    theta = torch.rand(3 if grouped else 1, 9) * 10 + 0.05
    group = torch.tensor([0, 2, 1, 1, 0, 2]) if grouped else None
    x = torch.poisson(mu * 1.5)
    per_cell = theta[group] if grouped else theta.expand(6, 9)
    expected = dist.GammaPoisson(per_cell, per_cell / mu).log_prob(x)
    torch.testing.assert_close(GammaPoissonMean(mu, theta, group).log_prob(x), expected, rtol=1e-5, atol=1e-4)


def assert_equals_pyro(ours_dist, mu, theta, group, x) -> torch.Tensor:
    """ours_dist.log_prob(x) and its gradients in (mu, theta) equal Pyro's GammaPoisson's; returns ours."""
    ours = ours_dist.log_prob(x)
    ours_grads = torch.autograd.grad(ours.sum(), (mu, theta), retain_graph=True)
    per_cell = theta[group] if group is not None else theta.expand(mu.shape[-2], mu.shape[-1])
    expected = dist.GammaPoisson(per_cell, per_cell / mu).log_prob(x)
    expected_grads = torch.autograd.grad(expected.sum(), (mu, theta))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    for got, want in zip(ours_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return ours


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("leading", [(), (4,)])
def test_log_prob_and_gradients_on_mostly_zero_counts(grouped, leading):
    # the lgamma terms are computed only where x > 0: values and gradients must still be Pyro's
    torch.manual_seed(2)
    mu = (torch.rand(*leading, 7, 11) * 3 + 1e-3).requires_grad_()
    theta = (torch.rand(3 if grouped else 1, 11) * 5 + 0.05).requires_grad_()
    group = torch.tensor([0, 2, 1, 1, 0, 2, 2]) if grouped else None
    x = torch.poisson(mu.detach() * 0.3)
    assert 0.2 < (x == 0).float().mean() < 0.95
    assert_equals_pyro(GammaPoissonMean(mu, theta, group), mu, theta, group, x)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("leading", [(), (4,)])
@pytest.mark.parametrize("theta_per_cell", [False, True])
def test_per_cell_sum_equals_the_sum_of_log_prob(grouped, leading, theta_per_cell):
    # log_prob_sum_genes (what training uses) never forms the cells x genes terms: its values and gradients
    # must be log_prob(x).sum(-1)'s, in the sparse form and in the dense one (a theta per cell)
    torch.manual_seed(5)
    mu = (torch.rand(*leading, 7, 11) * 3 + 1e-3).requires_grad_()
    if theta_per_cell:
        grouped = False
        theta = (torch.rand(7, 11) * 5 + 0.05).requires_grad_()
    else:
        theta = (torch.rand(3 if grouped else 1, 11) * 5 + 0.05).requires_grad_()
    group = torch.tensor([0, 2, 1, 1, 0, 2, 2]) if grouped else None
    x = torch.poisson(mu.detach() * 0.3)
    assert 0.2 < (x == 0).float().mean() < 0.95
    distribution = GammaPoissonMean(mu, theta, group)
    per_cell = distribution.log_prob_sum_genes(x)
    expected = distribution.log_prob(x).sum(-1)
    assert per_cell.shape == (*leading, 7)
    torch.testing.assert_close(per_cell, expected, rtol=1e-5, atol=1e-4)
    weights = torch.rand(per_cell.shape)  # a weighted sum: each cell's gradient is its own
    got = torch.autograd.grad((per_cell * weights).sum(), (mu, theta))
    want = torch.autograd.grad((expected * weights).sum(), (mu, theta))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grouped", [False, True])
def test_positions_from_the_sparse_rows_give_pyros_values_and_gradients(grouped):
    # a minibatch of sparse counts says where its non-zeros are (rows in any order, a row twice);
    # the likelihood must then equal Pyro's, values and gradients
    rng = np.random.default_rng(4)
    counts = sp.random(40, 13, density=0.3, format="csr", random_state=4,
                       data_rvs=lambda n: rng.integers(1, 30, n)).astype(np.float32)
    rows, positions = CountMatrix(counts, validate=False).rows_and_positions(np.array([7, 2, 39, 2, 0, 18, 25]))
    assert positions is not None and np.array_equal(np.sort(positions[0]), np.flatnonzero(rows))
    torch.manual_seed(4)
    mu = (torch.rand(7, 13) * 10 + 1e-3).requires_grad_()
    theta = (torch.rand(3 if grouped else 1, 13) * 5 + 0.05).requires_grad_()
    group = torch.tensor([0, 2, 1, 1, 0, 2, 2]) if grouped else None
    x = torch.from_numpy(rows)
    given = CountPositions(tuple(torch.from_numpy(p) for p in positions), x)
    ours = assert_equals_pyro(GammaPoissonMean(mu, theta, group, positions=given), mu, theta, group, x)
    # the positions are what is used (not searched for again): one left out changes that entry only
    partial = CountPositions(tuple(torch.from_numpy(p[1:]) for p in positions), x)
    changed = GammaPoissonMean(mu, theta, group, positions=partial).log_prob(x) != ours
    assert changed.sum() == 1 and changed.reshape(-1)[int(positions[0][0])]
    # ... for the tensor they locate only: equal counts in another tensor are searched, not read off the positions
    assert torch.equal(GammaPoissonMean(mu, theta, group, positions=partial).log_prob(x.clone()), ours)


def test_positions_are_used_for_their_own_counts_only():
    # other counts of the same shape (conditioned on, replicated, replaced) were scored at the positions of the
    # minibatch's counts: their non-zeros elsewhere counted as zeros (a rolled minibatch: -77567 against -79839)
    torch.manual_seed(6)
    mu = torch.rand(8, 10) * 5 + 0.1
    theta = torch.rand(1, 10) * 3 + 0.2
    x = torch.poisson(mu * 0.5)
    block = sp.csr_matrix(x.numpy())
    positions = CountPositions(tuple(torch.from_numpy(p) for p in stored_positions(block)), x)
    other = torch.roll(x, 1, 0) + torch.eye(8, 10)  # non-zeros where x has none
    expected = dist.GammaPoisson(theta.expand(8, 10), theta / mu).log_prob(other)
    ours = GammaPoissonMean(mu, theta, positions=positions)
    torch.testing.assert_close(ours.log_prob(other), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.log_prob_sum_genes(other), expected.sum(-1), rtol=1e-5, atol=1e-3)
    with pytest.raises(TypeError, match="CountPositions"):  # bare positions cannot say which counts they locate
        GammaPoissonMean(mu, theta, positions=tuple(positions))


def test_a_copied_or_pickled_minibatch_keeps_its_positions_tied_to_its_own_counts():
    # CountPositions is a tuple holding its counts: tuple's own reduction rebuilt it without them (TypeError)
    import copy
    import pickle

    x = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    batch = {"x": x, "x_positions": CountPositions(tuple(torch.from_numpy(p) for p in
                                                         stored_positions(sp.csr_matrix(x.numpy()))), x)}
    for copied in (copy.deepcopy(batch), pickle.loads(pickle.dumps(batch))):
        positions = copied["x_positions"]
        assert isinstance(positions, CountPositions) and positions.counts is copied["x"]  # the copy's fast path
        assert all(torch.equal(a, b) for a, b in zip(positions, batch["x_positions"]))
    assert copy.copy(batch["x_positions"]).counts is x


def test_no_positions_for_counts_that_store_an_entry_twice():
    # an uncanonical CSR (the same entry stored twice) densifies to their sum: its stored entries are
    # not the non-zero positions, so none are given and the likelihood searches the dense rows
    block = sp.csr_matrix((np.array([1.0, 2.0, 5.0]), np.array([1, 1, 2]), np.array([0, 2, 3])), shape=(2, 3))
    assert stored_positions(block, unique=False) is None
    rows, positions = CountMatrix(block, validate=False).rows_and_positions(np.array([1, 0]))
    assert positions is None and rows.tolist() == [[0, 0, 5], [0, 3, 0]]
    # unsorted but distinct entries (common in files) keep their positions
    unsorted = sp.csr_matrix((np.array([1.0, 2.0, 5.0]), np.array([2, 0, 1]), np.array([0, 2, 3])), shape=(2, 3))
    assert not unsorted.has_canonical_format
    rows, positions = CountMatrix(unsorted, validate=False).rows_and_positions(np.array([1, 0]))
    assert sorted(positions[0].tolist()) == np.flatnonzero(rows).tolist()


def test_log_prob_with_a_theta_per_cell_and_gene():
    # a concentration that is neither per gene nor a grouped table takes the dense form
    torch.manual_seed(3)
    mu, theta = torch.rand(5, 6) * 4 + 0.01, torch.rand(5, 6) * 3 + 0.1
    x = torch.poisson(mu)
    torch.testing.assert_close(GammaPoissonMean(mu, theta).log_prob(x),
                               dist.GammaPoisson(theta, theta / mu).log_prob(x), rtol=1e-5, atol=1e-4)


def test_log_prob_with_draws_of_a_grouped_theta_and_unusual_shapes():
    # shapes outside the sparse form's (theta per gene, or one 2-D grouped table) take the dense form
    torch.manual_seed(4)
    mu = torch.rand(3, 5, 4) * 3 + 0.01
    theta = torch.rand(3, 2, 4) * 4 + 0.1  # three draws of a 2-group table
    group = torch.tensor([0, 1, 1, 0, 1])
    x = torch.poisson(mu * 0.5)
    per_cell = theta[:, group]
    torch.testing.assert_close(GammaPoissonMean(mu, theta, group).log_prob(x),
                               dist.GammaPoisson(per_cell, per_cell / mu).log_prob(x), rtol=1e-5, atol=1e-4)
    column = torch.rand(4, 1) + 0.5  # a theta per cell (4 cells) that happens to match 4 genes in size
    mu2 = torch.rand(4, 4) * 3 + 0.01
    x2 = torch.poisson(mu2)
    torch.testing.assert_close(GammaPoissonMean(mu2, column).log_prob(x2),
                               dist.GammaPoisson(column.expand(4, 4), column / mu2).log_prob(x2), rtol=1e-5, atol=1e-4)
    # a float64 mean with float32 counts and theta keeps float64, as the dense form did
    wide = GammaPoissonMean(mu2.double(), torch.rand(1, 4) + 0.5).log_prob(x2)
    assert wide.dtype == torch.float64


def test_moments_of_samples():
    torch.manual_seed(1)
    mu, theta = torch.tensor([[3.0, 40.0]]), torch.tensor([[2.0, 0.5]])
    draws = GammaPoissonMean(mu.expand(20000, 2), theta).sample()
    torch.testing.assert_close(draws.mean(0), mu[0], rtol=0.05, atol=0.1)
    torch.testing.assert_close(draws.var(0), (mu + mu**2 / theta)[0], rtol=0.1, atol=0.5)


def test_select_rows_is_indexing_with_weights():
    table = torch.randn(4, 5)
    index = torch.tensor([3, 0, 0, 2])
    weights = torch.rand(4)
    torch.testing.assert_close(select_rows(table, index), table[index])
    torch.testing.assert_close(select_rows(table, index, weights), weights[:, None] * table[index])
    torch.testing.assert_close(select_rows(table[:1], index, weights), weights[:, None] * table[:1].expand(4, 5))


@pytest.mark.parametrize("weights_shape", [None, (6,), (3, 6)])
def test_select_rows_gradient_is_the_derivative(weights_shape):
    # the gather's backward pass is written out (a one-hot product for the table, one product for the weights)
    torch.manual_seed(4)
    table = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([2, 0, 0, 1, 2, 2])
    if weights_shape is None:
        assert torch.autograd.gradcheck(lambda t: select_rows(t, index), (table,))
        return
    weights = torch.rand(weights_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w: select_rows(t, index, w), (table, weights))
    torch.testing.assert_close(select_rows(table, index, weights), weights.unsqueeze(-1) * table[index])
    # only what is asked for: a fixed table still gives the weights their gradient
    fixed = table.detach()
    (grad,) = torch.autograd.grad(select_rows(fixed, index, weights).sum(), weights)
    torch.testing.assert_close(grad, fixed[index].sum(-1).expand(weights_shape))


@pytest.mark.parametrize("grouped", [False, True])
def test_zero_count_row_sums_gradient_is_the_derivative(grouped):
    # the x = 0 term's gradient is written out by hand: finite differences in float64 must agree,
    # and a second backward pass (retain_graph) must give the same gradient as the first
    torch.manual_seed(2)
    group = torch.tensor([0, 2, 1, 1, 0]) if grouped else None
    mu = (torch.rand(5, 4, dtype=torch.float64) * 4 + 0.05).requires_grad_()
    theta = (torch.rand(3 if grouped else 1, 4, dtype=torch.float64) * 3 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, t: ZeroCountRowSums.apply(m, t, group), (mu, theta))
    spread = theta[group] if grouped else theta
    torch.testing.assert_close(ZeroCountRowSums.apply(mu, theta, group), (-spread * torch.log1p(mu / spread)).sum(-1))
    out = ZeroCountRowSums.apply(mu, theta, group).sum()
    first = torch.autograd.grad(out, (mu, theta), retain_graph=True)
    second = torch.autograd.grad(out, (mu, theta))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)



@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("sparse_rows", [False, True])
def test_count_terms_kept_for_many_means_give_the_same_log_prob_to_the_bit(grouped, sparse_rows):
    # importance ratios score many draws of the mean against one minibatch's counts at one theta: the terms without
    # the mean, computed once, give every draw the log p computed without them
    rng = np.random.default_rng(7)
    counts = sp.random(30, 11, density=0.3, format="csr", random_state=7,
                       data_rvs=lambda n: rng.integers(1, 40, n)).astype(np.float32)
    rows, positions = CountMatrix(counts, validate=False).rows_and_positions(np.arange(30))
    x = torch.from_numpy(rows)
    given = CountPositions(tuple(torch.from_numpy(p) for p in positions), x) if sparse_rows else None
    theta = torch.rand(3 if grouped else 1, 11) * 5 + 0.05
    group = torch.from_numpy(rng.integers(0, 3, 30)) if grouped else None
    fixed = GammaPoissonMean.count_terms(x, theta, group, given)
    assert fixed is not None and fixed.x.numel() == int((rows > 0).sum())
    for _ in range(3):
        mean = GammaPoissonMean(torch.rand(30, 11) * 10 + 1e-3, theta, group, positions=given)
        assert torch.equal(mean.log_prob(x, fixed=fixed), mean.log_prob(x))
        assert torch.equal(mean.log_prob_sum_genes(x, fixed=fixed), mean.log_prob_sum_genes(x))
    # terms of other counts or of another theta would be a silent wrong answer: refused
    with pytest.raises(ValueError, match="count terms of other counts, theta or group"):
        mean.log_prob(x.clone(), fixed=fixed)
    with pytest.raises(ValueError, match="count terms of other counts, theta or group"):
        GammaPoissonMean(torch.rand(30, 11), theta.clone(), group).log_prob_sum_genes(x, fixed=fixed)
    # a theta of the dense form keeps nothing
    assert GammaPoissonMean.count_terms(x, torch.rand(30, 11) + 0.1) is None
