"""FAISS device choice (pyro_scmodels.faiss_device via matching): auto, cpu and cuda on every faiss build and GPU,
the GPU search probe, and the GPU k limit; a GPU is faked where the machine has none."""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest

from pyro_scmodels import faiss_device, matching

from .test_matching import brute_force, random_points, translated_copies  # noqa: F401 (the fixtures)


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
