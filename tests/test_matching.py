"""Exact FAISS matching (pyro_scmodels.matching) against brute force and toys with a known answer."""

from __future__ import annotations

import itertools
import logging
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp

from pyro_scmodels import faiss_device, matching


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


@pytest.mark.skipif(matching.faiss_gpu_available(), reason="a GPU faiss is usable here")
def test_cuda_without_gpu_faiss_raises():
    with pytest.raises(ValueError, match="device='cuda' cannot be used: .*(no GPU support|no CUDA device)"):
        matching.knn(np.zeros((1, 2)), np.zeros((1, 2)), device="cuda")


def test_faiss_gpu_available_is_false_here():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU faiss is usable here")
    assert matching.faiss_gpu_available() is False


def test_missing_faiss_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        matching.knn(np.zeros((1, 2)), np.zeros((1, 2)), device="cpu")
    assert matching.faiss_gpu_available() is False


def test_faiss_gpu_available_needs_gpu_support_and_a_device(monkeypatch):
    # faiss-gpu on a CPU-only host: the GPU classes exist but there is no device
    fake = types.SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 0)
    monkeypatch.setattr(faiss_device, "faiss_module", lambda: fake)
    monkeypatch.setattr(faiss_device, "_gpu_probe", (True, ""))  # as if the GPU search ran
    assert matching.faiss_gpu_available() is False
    with pytest.raises(ValueError, match="sees no CUDA device"):
        matching.resolve_faiss_device("cuda")
    fake.get_num_gpus = lambda: 1
    assert matching.faiss_gpu_available() is True
    # faiss-cpu: no GPU classes (its Python knn_gpu wrapper does not count)
    monkeypatch.setattr(faiss_device, "faiss_module", lambda: types.SimpleNamespace(knn_gpu=None, get_num_gpus=lambda: 1))
    assert matching.faiss_gpu_available() is False


def test_auto_device_logs_the_cpu_fallback_once(monkeypatch, caplog):
    if matching.faiss_gpu_available():
        pytest.skip("a GPU faiss is usable here")
    monkeypatch.setattr(faiss_device, "_cpu_fallback_logged", False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # torch on a GPU would make it a WARNING
    with caplog.at_level(logging.INFO, logger="pyro_scmodels.matching"):
        matching.knn(np.zeros((1, 2)), np.zeros((1, 2)), device="auto")
        matching.knn(np.zeros((1, 2)), np.zeros((1, 2)), device="auto")
        matching.knn(np.zeros((1, 2)), np.zeros((1, 2)), device="cpu")
    records = [r for r in caplog.records if r.name == "pyro_scmodels.matching"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "runs on the CPU" in records[0].getMessage()


@pytest.fixture
def gpu_build_with_one_gpu(monkeypatch):
    """A faiss GPU build seeing one GPU, torch on CUDA, and no GPU search tried yet in this process."""
    monkeypatch.setattr(faiss_device, "faiss_module", lambda: types.SimpleNamespace(StandardGpuResources=object,
                                                                          get_num_gpus=lambda: 1))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(faiss_device, "_gpu_probe", None)
    monkeypatch.setattr(faiss_device, "_cpu_fallback_logged", False)


def test_a_gpu_build_that_aborts_on_this_gpu_falls_back_to_the_cpu(gpu_build_with_one_gpu, monkeypatch, caplog):
    # as faiss-gpu-cu12 1.14 on an H200: the GPU search kills its process
    abort = "import sys, os; sys.stderr.write('Faiss assertion failed: CUDA error 209 no kernel image\\n'); os.abort()"
    monkeypatch.setattr(faiss_device, "GPU_PROBE", abort)
    with caplog.at_level(logging.INFO, logger="pyro_scmodels.matching"):
        assert matching.resolve_faiss_device("auto") == "cpu"  # this process lives on
    assert matching.faiss_gpu_available() is False
    warning = [r for r in caplog.records if r.name == "pyro_scmodels.matching"][0]
    assert warning.levelno == logging.WARNING and "no kernel image" in warning.getMessage()
    assert "faiss-gpu>=1.15.1" in warning.getMessage()
    with pytest.raises(ValueError, match="device='cuda' cannot be used: faiss' GPU search fails on this GPU"):
        matching.resolve_faiss_device("cuda")


def test_the_gpu_search_is_tried_once_per_process(gpu_build_with_one_gpu, monkeypatch, tmp_path):
    tries = tmp_path / "tries"
    monkeypatch.setattr(faiss_device, "GPU_PROBE", f"open({str(tries)!r}, 'a').write('x')")
    assert matching.resolve_faiss_device("auto") == "cuda" and matching.resolve_faiss_device("cuda") == "cuda"
    assert matching.faiss_gpu_available() is True
    assert tries.read_text() == "x"


def test_a_gpu_search_that_hangs_is_given_up(gpu_build_with_one_gpu, monkeypatch):
    monkeypatch.setattr(faiss_device, "GPU_PROBE", "import time; time.sleep(30)")
    monkeypatch.setattr(faiss_device, "GPU_PROBE_TIMEOUT_S", 1)
    runs, failure = matching.gpu_search_runs()
    assert not runs and "did not finish within 1 s" in failure


@pytest.fixture
def faiss_setup(monkeypatch):
    """Forces each FAISS device decision on any machine by patching torch and the real faiss module.

    Call it as ``faiss_setup(torch_cuda=..., gpu_build=..., n_gpus=...)``; it returns the list of the
    ``faiss.knn_gpu`` calls (query rows, base rows, k). The fake ``knn_gpu`` answers with faiss' CPU
    ``faiss.knn``, so the GPU dispatch is tested without a GPU; faiss-cpu's own ``knn_gpu`` is replaced
    too, so a search wrongly sent to the GPU path is recorded rather than crashing.
    """
    import faiss

    class Calls(list):
        resources = None  # the fake StandardGpuResources class, counting its instances

    cpu_knn, calls = faiss.knn, Calls()

    def fake_knn_gpu(resources, xq, xb, k, *args, **kwargs):
        assert isinstance(resources, FakeGpuResources)
        calls.append((xq.shape[0], xb.shape[0], k))
        return cpu_knn(xq, xb, k)

    class FakeGpuResources:
        created = 0

        def __init__(self):
            FakeGpuResources.created += 1

    def setup(torch_cuda: bool, gpu_build: bool, n_gpus: int):
        monkeypatch.setattr("torch.cuda.is_available", lambda: torch_cuda)
        if gpu_build:
            monkeypatch.setattr(faiss, "StandardGpuResources", FakeGpuResources, raising=False)
        else:
            monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: n_gpus)
        monkeypatch.setattr(faiss, "knn_gpu", fake_knn_gpu)
        calls.resources = FakeGpuResources
        return calls

    # a fresh process as far as matching is concerned: nothing logged yet, no GPU resources
    monkeypatch.setattr(faiss_device, "_cpu_fallback_logged", False)
    monkeypatch.setattr(faiss_device, "_large_k_logged", False)
    monkeypatch.setattr(matching, "_gpu_resources", None)
    monkeypatch.setattr(faiss_device, "_gpu_probe", (True, ""))  # the child-process search, as if it ran
    return setup


def matching_records(caplog):
    return [r for r in caplog.records if r.name == "pyro_scmodels.matching"]


@pytest.mark.parametrize("gpu_build, n_gpus", [(False, 0), (False, 1), (True, 0)])
def test_auto_without_a_usable_gpu_faiss_is_the_cpu(faiss_setup, caplog, random_points, gpu_build, n_gpus):
    calls = faiss_setup(torch_cuda=False, gpu_build=gpu_build, n_gpus=n_gpus)
    query, base = random_points
    with caplog.at_level(logging.DEBUG, logger="pyro_scmodels.matching"):
        assert matching.resolve_faiss_device() == "cpu"
        assert matching.resolve_faiss_device("auto", k=5) == "cpu"
        distances, indices = matching.knn(query, base, k=3, device="auto")
    assert calls == []
    np.testing.assert_array_equal(indices, brute_force(query, base, 3)[1])
    records = matching_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.INFO  # no GPU anywhere: nothing to fix
    assert "runs on the CPU" in records[0].getMessage()


def test_auto_with_torch_on_cuda_but_faiss_cpu_warns_once_and_matches_on_the_cpu(faiss_setup, caplog, random_points):
    # the reported crash: torch runs on CUDA, faiss is the default faiss-cpu
    calls = faiss_setup(torch_cuda=True, gpu_build=False, n_gpus=0)
    query, base = random_points
    with caplog.at_level(logging.DEBUG, logger="pyro_scmodels.matching"):
        assert matching.resolve_faiss_device("auto") == "cpu"
        distances, indices = matching.knn(query, base, k=2, device="auto")
        matches = matching.match_groups(base, np.arange(300) % 2, k=2, device="auto")
        assert matching.resolve_faiss_device("auto") == "cpu"
    assert calls == []
    np.testing.assert_array_equal(indices, brute_force(query, base, 2)[1])
    assert set(matches) == {0, 1}
    records = matching_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING  # once per process, for every entry point
    message = records[0].getMessage()
    assert "runs on the CPU" in message and "torch sees a CUDA GPU" in message
    assert "no GPU support (faiss-cpu)" in message and f"pip install {matching.FAISS_GPU_PACKAGE}" in message
    assert matching.FAISS_GPU_PACKAGE == "faiss-gpu"


def test_auto_with_gpu_faiss_and_a_gpu_dispatches_to_knn_gpu(faiss_setup, caplog, random_points, translated_copies):
    calls = faiss_setup(torch_cuda=True, gpu_build=True, n_gpus=1)
    query, base = random_points
    expected = matching.knn(query, base, k=4, device="cpu")
    assert calls == []  # device="cpu" is always the CPU
    with caplog.at_level(logging.DEBUG, logger="pyro_scmodels.matching"):
        assert matching.resolve_faiss_device("auto") == matching.resolve_faiss_device("cuda") == "cuda"
        for device in ("auto", "cuda"):
            got = matching.knn(query, base, k=4, device=device)
            np.testing.assert_array_equal(got[1], expected[1])
            np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
        embedding, labels, copy_of, _ = translated_copies
        matches = matching.match_groups(embedding, labels, k=30, device="auto")  # groups of 27: k clamped to 27
    assert calls == [(60, 300, 4), (60, 300, 4), (54, 27, 27), (54, 27, 27)]
    assert calls.resources.created == 1  # GPU scratch memory allocated once, then reused
    assert matching_records(caplog) == []  # the GPU is used: nothing to say
    for label, match in matches.items():
        np.testing.assert_array_equal(match.indices[labels != label, 0], copy_of[labels != label])


@pytest.mark.parametrize("torch_cuda", [False, True])
def test_explicit_cuda_without_gpu_faiss_names_the_problem_and_the_fix(faiss_setup, torch_cuda):
    calls = faiss_setup(torch_cuda=torch_cuda, gpu_build=False, n_gpus=0)
    for call in (lambda: matching.resolve_faiss_device("cuda"),
                 lambda: matching.knn(np.zeros((1, 2)), np.zeros((1, 2)), device="cuda"),
                 lambda: matching.match_groups(np.zeros((2, 2)), ["a", "b"], device="cuda")):
        with pytest.raises(ValueError, match=r"device='cuda' cannot be used: .*no GPU support \(faiss-cpu\)") as info:
            call()
        assert "pip uninstall faiss-cpu && pip install faiss-gpu" in str(info.value)
        assert "device='auto'" in str(info.value)
    assert calls == []


def test_cpu_is_always_the_cpu_and_bad_arguments_are_rejected(faiss_setup):
    calls = faiss_setup(torch_cuda=True, gpu_build=True, n_gpus=2)
    assert matching.resolve_faiss_device("cpu") == "cpu"
    assert matching.resolve_faiss_device("cpu", k=10 * matching.GPU_MAX_K) == "cpu"
    matching.match_groups(np.arange(6.0)[:, None], [0, 0, 1, 1, 2, 2], k=2, device="cpu")
    assert calls == []
    with pytest.raises(ValueError, match="device must be one of 'auto', 'cpu', 'cuda', got 'gpu'"):
        matching.resolve_faiss_device("gpu")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        matching.resolve_faiss_device("auto", k=0)


def test_k_beyond_the_gpu_limit(faiss_setup, caplog):
    calls = faiss_setup(torch_cuda=True, gpu_build=True, n_gpus=1)
    limit = matching.GPU_MAX_K
    assert limit == 2048  # GPU_MAX_SELECTION_K of faiss' CUDA k-selection
    rng = np.random.default_rng(4)
    base = rng.normal(size=(limit + 3, 2)).astype(np.float32)
    query = rng.normal(size=(2, 2)).astype(np.float32)
    assert matching.resolve_faiss_device("auto", k=limit) == matching.resolve_faiss_device("cuda", k=limit) == "cuda"
    # at the limit: still the GPU
    distances, _ = matching.knn(query, base, k=limit, device="cuda")
    assert calls == [(2, limit + 3, limit)] and distances.shape == (2, limit)
    # k is clamped to the base size first: a huge k on a small base is no problem for the GPU
    _, indices = matching.knn(query, base[:10], k=10 * limit, device="cuda")
    assert calls[-1] == (2, 10, 10) and indices.shape == (2, 10)
    calls.clear()
    # beyond it: auto searches on the CPU (the same exact answer, said once), cuda raises
    with caplog.at_level(logging.DEBUG, logger="pyro_scmodels.matching"):
        assert matching.resolve_faiss_device("auto", k=limit + 1) == "cpu"
        distances, indices = matching.knn(query, base, k=limit + 1, device="auto")
        matches = matching.match_groups(base, np.zeros(limit + 3), k=limit + 2, device="auto")
    assert calls == []
    assert distances.shape == indices.shape == (2, limit + 1)
    np.testing.assert_array_equal(indices[:, :5], brute_force(query, base, 5)[1])
    assert matches[0.0].indices.shape == (limit + 3, limit + 2)
    records = matching_records(caplog)
    assert len(records) == 1 and f"k={limit + 1} exceeds faiss' GPU limit k={limit}" in records[0].getMessage()
    with pytest.raises(ValueError, match=f"device='cuda' cannot search k={limit + 1} neighbours: .*at most k={limit}"):
        matching.resolve_faiss_device("cuda", k=limit + 1)
    with pytest.raises(ValueError, match=f"at most k={limit}"):
        matching.knn(query, base, k=limit + 1, device="cuda")
    with pytest.raises(ValueError, match=f"at most k={limit}"):
        matching.match_groups(base, np.zeros(limit + 3), k=limit + 1, device="cuda")
    assert calls == []


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
