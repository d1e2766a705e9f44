"""Exact FAISS matching (pyro_scmodels.matching) against brute force and toys with a known answer: the exact search
and its float32 safeguards, input checks, kernel weights and group matching (device choice: test_matching_device.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from pyro_scmodels import matching


def brute_force(query, base, k):
    """Indices and Euclidean distances of the k nearest base rows, from all pairwise distances (float64)."""
    pairwise = np.linalg.norm(query[:, None, :].astype(np.float64) - base[None, :, :], axis=2)
    order = np.argsort(pairwise, axis=1)[:, :k]
    return np.take_along_axis(pairwise, order, axis=1), order


@pytest.fixture
def random_points():
    """60 query and 300 base points in 8 dimensions, standard normal."""
    rng = np.random.default_rng(0)
    query = rng.normal(size=(60, 8)).astype(np.float32)
    base = rng.normal(size=(300, 8)).astype(np.float32)
    return query, base


@pytest.mark.parametrize("k", [1, 5])
def test_knn_agrees_with_brute_force(random_points, k):
    query, base = random_points
    expected_distances, expected_indices = brute_force(query, base, k + 1)
    # the data must have no near-ties among the k + 1 nearest, or the comparison would be luck
    assert np.diff(expected_distances, axis=1).min() > 1e-4
    distances, indices = matching.knn(query, base, k=k, device="cpu")
    assert distances.shape == indices.shape == (60, k)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    np.testing.assert_array_equal(indices, expected_indices[:, :k])
    np.testing.assert_allclose(distances, expected_distances[:, :k], atol=1e-4)


def test_knn_distance_to_itself_is_zero(random_points):
    _, base = random_points
    distances, indices = matching.knn(base, base, k=2, device="cpu")
    np.testing.assert_array_equal(indices[:, 0], np.arange(len(base)))
    # faiss' squared distances are ~1e-6 off here; sqrt of them would be ~1e-3 from 0
    assert np.abs(distances[:, 0]).max() < 1e-6


def test_knn_is_exact_for_large_batches_far_from_the_origin():
    # batches this large make faiss rank by |x|^2 + |y|^2 - 2 x.y (BLAS); at an offset of 100 that
    # cancellation alone mis-ranks ~1% of neighbours and puts distances ~0.1 off
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(3)
    base = (rng.normal(size=(500, 50)) + 100.0).astype(np.float32)
    query = (base[rng.integers(0, 500, 3000)] + rng.normal(scale=0.3, size=(3000, 50))).astype(np.float32)
    expected_distances, expected_indices = cKDTree(base.astype(np.float64)).query(query.astype(np.float64), k=4)
    assert np.diff(expected_distances, axis=1).min() > 1e-5  # no near-ties
    distances, indices = matching.knn(query, base, k=3, device="cpu")
    np.testing.assert_array_equal(indices, expected_indices[:, :3])
    np.testing.assert_allclose(distances, expected_distances[:, :3], atol=1e-4)
    self_distances, self_indices = matching.knn(np.tile(base, (6, 1)), base, k=1, device="cpu")
    np.testing.assert_array_equal(self_indices[:, 0], np.tile(np.arange(500), 6))
    assert np.abs(self_distances).max() < 1e-6


def _float64_neighbours(query, base, k):
    q, b = query.astype(np.float64), base.astype(np.float64)
    squared = (q * q).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * q @ b.T  # float64: exact enough here
    return np.argsort(squared, axis=1, kind="stable")[:, :k], np.sort(squared, axis=1)[:, :k + 1]


def test_exact_search_ranks_neighbours_that_float32_blas_cannot_far_from_the_centre(caplog):
    # two clusters at +-400 with unit spread: faiss' BLAS form rounds by ~1.5 in squared distance, next to
    # neighbours at ~3.5, and returned all three neighbours right for 62 % of the queries. faiss ranks by direct
    # differences below 128,000 queries x dimensions: 20,000 queries x 10 take its BLAS form
    rng = np.random.default_rng(0)
    centres = np.full((2, 10), 400.0) * np.array([[1.0], [-1.0]])
    base = (centres[rng.integers(0, 2, 1000)] + rng.normal(size=(1000, 10))).astype(np.float32)
    query = (centres[rng.integers(0, 2, 20000)] + rng.normal(size=(20000, 10))).astype(np.float32)
    expected, squared = _float64_neighbours(query, base, 3)
    clear = np.diff(squared, axis=1).min(axis=1) > 1e-3  # no near-tie at float64's resolution
    assert clear.mean() > 0.95
    with caplog.at_level("INFO", logger="pyro_scmodels.matching"):
        _, indices = matching.knn(query, base, k=3, device="cpu", method="exact")
    np.testing.assert_array_equal(indices[clear], expected[clear])
    assert "re-ranked 20000 of 20000 queries by direct differences" in caplog.text


def test_exact_search_settles_a_dense_group_beside_a_sparse_one_by_its_own_distances():
    # a tight cluster (spread 0.01 at coordinates 15) beside a unit cloud: judged against every query's median
    # distance, 2,770 of 2,924 of the cluster's queries came back with wrong neighbours, without a word
    # (15,000 queries x 10: above faiss' switch to its BLAS form)
    rng = np.random.default_rng(5)
    n = 18000
    dense = rng.random(n) < 0.2
    points = np.where(dense[:, None], 15.0 + 0.01 * rng.normal(size=(n, 10)), rng.normal(size=(n, 10))).astype(np.float32)
    base, query = points[:3000], points[3000:]
    expected, squared = _float64_neighbours(query, base, 3)
    clear = np.diff(squared, axis=1).min(axis=1) > 1e-3 * squared[:, -1]  # no near-tie at 0.1 %
    _, indices = matching.knn(query, base, k=3, device="cpu", method="exact")
    assert (clear & dense[3000:]).sum() > 1000
    np.testing.assert_array_equal(indices[clear], expected[clear])
    # a cell that is its own neighbour (distance 0) is settled: not searched again
    _, own = matching.knn(base, base, k=1, device="cpu", method="exact")
    np.testing.assert_array_equal(own[:, 0], np.arange(len(base)))


def test_exact_search_of_a_typical_latent_is_not_searched_twice(monkeypatch, caplog):
    from pyro_scmodels import ivf_search

    calls = []
    monkeypatch.setattr(ivf_search, "_exact_search", lambda *a: calls.append(a) or None)
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5000, 10)).astype(np.float32)
    query = rng.normal(size=(2000, 10)).astype(np.float32)
    with caplog.at_level("INFO", logger="pyro_scmodels.matching"):
        _, indices = matching.knn(query, base, k=5, device="cpu", method="exact")
    assert calls == [] and "re-ranked" not in caplog.text
    np.testing.assert_array_equal(indices, _float64_neighbours(query, base, 5)[0])


def test_knn_accepts_float64_and_non_contiguous_input(random_points):
    query, base = random_points
    expected = matching.knn(query, base, k=3)
    strided_base = np.repeat(base.astype(np.float64), 2, axis=1)[:, ::2]
    assert not strided_base.flags.c_contiguous
    got = matching.knn(np.asfortranarray(query.astype(np.float64)), strided_base, k=3)
    np.testing.assert_array_equal(got[1], expected[1])


def test_base_of_one_cell_and_k_larger_than_base():
    query = np.array([[0.0, 0.0], [3.0, 4.0]])
    distances, indices = matching.knn(query, np.array([[0.0, 0.0]]), k=1)
    np.testing.assert_array_equal(indices, [[0], [0]])
    np.testing.assert_allclose(distances, [[0.0], [5.0]])
    # k is clamped to the base size: every base cell once, nearest first
    base = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0]])
    distances, indices = matching.knn(query[:1], base, k=10)
    np.testing.assert_array_equal(indices, [[0, 1, 2, 3]])
    np.testing.assert_allclose(distances, [[1.0, 2.0, 3.0, 4.0]])


@pytest.mark.parametrize(
    "query, base, message",
    [
        (np.zeros(3), np.zeros((2, 3)), "query must be a 2-d array"),
        (np.zeros((2, 3)), np.zeros((2, 3, 1)), "base must be a 2-d array"),
        (np.zeros((2, 3)), np.zeros((4, 5)), r"query \(2, 3\) and base \(4, 5\)"),
        (np.array([[0.0, np.nan]]), np.zeros((2, 2)), "query contains NaN"),
        (np.zeros((1, 2)), np.array([[np.inf, 0.0]]), "base contains NaN or infinite"),
        (np.zeros((1, 2)), np.array([[1e300, 0.0]]), "base contains NaN or infinite"),
        (np.zeros((1, 2)), np.zeros((0, 2)), "base is empty"),
    ],
)
def test_knn_rejects_bad_input(query, base, message):
    with pytest.raises(ValueError, match=message):
        matching.knn(query, base)


def test_knn_rejects_bad_k_and_device():
    with pytest.raises(ValueError, match="k must be a positive integer"):
        matching.knn(np.zeros((1, 2)), np.zeros((1, 2)), k=0)
    with pytest.raises(ValueError, match="device must be one of"):
        matching.knn(np.zeros((1, 2)), np.zeros((1, 2)), device="gpu")


def test_kernel_weights():
    distances = np.array([[1.0, 2.0, 4.0], [0.0, 0.5, 0.6]])
    weights = matching.kernel_weights(distances, bandwidth=2.0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    expected = np.exp(-np.array([0.0, 0.5, 1.5]))  # exp(-(d - 1) / 2)
    np.testing.assert_allclose(weights[0], expected / expected.sum())
    assert (weights.argmax(axis=1) == 0).all()
    np.testing.assert_array_equal(matching.kernel_weights(np.array([[3.7], [0.0]])), [[1.0], [1.0]])
    # only differences of distances matter: adding a constant to a row changes nothing
    np.testing.assert_allclose(matching.kernel_weights(distances + 100.0, 2.0), weights)
    # far neighbours would underflow exp(-d / bandwidth) alone; relative to d_min they do not
    np.testing.assert_allclose(matching.kernel_weights(np.array([[1e4, 1e4]]), 1.0), [[0.5, 0.5]])


@pytest.mark.parametrize("bandwidth", [0.0, -1.0])
def test_kernel_weights_rejects_non_positive_bandwidth(bandwidth):
    with pytest.raises(ValueError, match="bandwidth must be a positive number"):
        matching.kernel_weights(np.ones((2, 2)), bandwidth=bandwidth)


def test_kernel_weights_rejects_bad_distances():
    with pytest.raises(ValueError, match="distances must be a finite 2-d array"):
        matching.kernel_weights(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="distances must be a finite 2-d array"):
        matching.kernel_weights(np.ones(3))


@pytest.fixture
def translated_copies():
    """Group A: a 3 x 3 x 3 grid (spacing 1); group B: A shifted by 0.1 ish; cells shuffled.

    Each cell's nearest cell in the other group is its copy (0.11 away, every other cell >= 0.88).
    """
    grid = np.array(list(itertools.product(range(3), repeat=3)), dtype=np.float64)
    shift = np.array([0.1, 0.05, 0.02])
    points = np.vstack([grid, grid + shift])
    labels = np.array(["A"] * 27 + ["B"] * 27)
    copy = np.concatenate([np.arange(27, 54), np.arange(27)])  # position of each cell's copy
    order = np.random.default_rng(1).permutation(54)  # cell i of the shuffled data is cell order[i]
    position = np.argsort(order)
    rng = np.random.default_rng(2)
    counts = sp.random(54, 40, density=0.3, format="csr", random_state=rng, dtype=np.float64)
    counts.data = np.round(counts.data * 10.0)
    return points[order], labels[order], position[copy[order]], counts


def test_match_groups_finds_translated_copies(translated_copies):
    embedding, labels, copy_of, counts = translated_copies
    matches = matching.match_groups(embedding, labels, k=1, device="cpu")
    assert list(matches) == list(dict.fromkeys(labels))
    for label, match in matches.items():
        assert match.indices.shape == match.distances.shape == match.weights.shape == (54, 1)
        own = labels == label
        # cells of the group find themselves, the others their copy (positions in the full array)
        np.testing.assert_array_equal(match.indices[own, 0], np.flatnonzero(own))
        np.testing.assert_array_equal(match.indices[~own, 0], copy_of[~own])
        np.testing.assert_allclose(match.distances[own, 0], 0.0, atol=1e-6)
        np.testing.assert_allclose(match.distances[~own, 0], np.linalg.norm([0.1, 0.05, 0.02]), rtol=1e-5)
        np.testing.assert_array_equal(match.weights, 1.0)
        # the matched expression reproduces the copied cells, dense and sparse alike
        sparse_average = matching.weighted_average(counts, match.indices, match.weights)
        dense_average = matching.weighted_average(counts.toarray(), match.indices, match.weights)
        assert sp.isspmatrix_csr(sparse_average) and isinstance(dense_average, np.ndarray)
        np.testing.assert_array_equal(dense_average, counts.toarray()[match.indices[:, 0]])
        np.testing.assert_array_equal(sparse_average.toarray(), dense_average)


def test_match_groups_with_k_neighbours_and_kernel_weights(translated_copies):
    embedding, labels, _, counts = translated_copies
    matches = matching.match_groups(embedding, labels, target_groups=["B"], k=4, bandwidth=0.5)
    assert list(matches) == ["B"]
    match = matches["B"]
    assert (labels[match.indices] == "B").all()
    for row in range(54):  # agrees with brute force within group B
        members = np.flatnonzero(labels == "B")
        distances, local = brute_force(embedding[row : row + 1], embedding[members], 4)
        np.testing.assert_allclose(match.distances[row], distances[0], atol=1e-5)
        np.testing.assert_allclose(match.weights[row], matching.kernel_weights(distances, 0.5)[0], atol=1e-5)
    dense = counts.toarray()
    expected = np.einsum("qk,qkg->qg", match.weights, dense[match.indices])
    np.testing.assert_allclose(matching.weighted_average(dense, match.indices, match.weights), expected)
    sparse_average = matching.weighted_average(counts, match.indices, match.weights)
    np.testing.assert_allclose(sparse_average.toarray(), expected)


def test_match_groups_single_cell_group_missing_labels_and_errors():
    embedding = np.array([[0.0], [1.0], [2.0], [10.0]])
    labels = np.array(["a", "a", None, "b"], dtype=object)
    matches = matching.match_groups(embedding, labels, k=3)
    assert set(matches) == {"a", "b"}  # a missing label is no group
    np.testing.assert_array_equal(matches["b"].indices, [[3], [3], [3], [3]])  # k clamped to 1
    np.testing.assert_array_equal(matches["a"].indices[:, 0], [0, 1, 1, 1])  # cell 2 is still queried
    with pytest.raises(ValueError, match=r"target_groups \['c'\] do not occur"):
        matching.match_groups(embedding, labels, target_groups=["a", "c"])
    with pytest.raises(ValueError, match="one label per cell"):
        matching.match_groups(embedding, labels[:3])
    with pytest.raises(ValueError, match="embedding contains NaN"):
        matching.match_groups(np.array([[np.nan], [1.0], [2.0], [3.0]]), labels)


def test_weighted_average_defaults_and_errors():
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    indices = np.array([[0, 1], [3, 3]])
    average = matching.weighted_average(values, indices)  # equal weights by default
    assert average.dtype == np.float32
    np.testing.assert_allclose(average, [[1.5, 2.5, 3.5], [9.0, 10.0, 11.0]])
    # weights are normalised per row, and a per-cell vector works too
    np.testing.assert_allclose(matching.weighted_average(np.arange(4.0), indices, [[3.0, 1.0], [1.0, 1.0]]), [0.25, 3.0])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        matching.weighted_average(values, np.array([[4]]))
    with pytest.raises(ValueError, match="indices must be a 2-d integer array"):
        matching.weighted_average(values, np.array([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        matching.weighted_average(values, indices, np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        matching.weighted_average(values, indices, [[1.0, -1.0], [1.0, 1.0]])


def test_one_target_group_given_as_a_string_is_one_label():
    embedding = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
    groups = np.array(["a"] * 20 + ["b"] * 30 + ["ab"] * 10)
    assert list(matching.match_groups(embedding, groups, target_groups="ab", k=2)) == ["ab"]  # it read the letters a and b
