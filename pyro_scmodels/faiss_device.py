"""Which device faiss searches on (SPEC 3.5); the only module that imports faiss.

A decision of its own, apart from torch's: torch on CUDA does not make faiss able to use the GPU (faiss-cpu, the
default install, has no GPU support). :func:`resolve_faiss_device` decides it for every search of
:mod:`pyro_scmodels.matching`, and :func:`faiss_module` is how that module gets faiss."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from ._validation import positive_int

logger = logging.getLogger("pyro_scmodels.matching")  # the messages belong to matching, which users configure

DEVICES = ("auto", "cpu", "cuda")
#: Largest k that faiss' GPU k-selection supports (``GPU_MAX_SELECTION_K`` in faiss/gpu/utils/DeviceDefs.cuh,
#: CUDA > 9.0): ``faiss.knn_gpu`` and GPU indexes reject larger k.
GPU_MAX_K = 2048
#: The pip package of Meta's faiss GPU build (CUDA 12; PyPI ``faiss-gpu`` >= 1.14.3, same versions as faiss-cpu).
FAISS_GPU_PACKAGE = "faiss-gpu"
GPU_INSTALL_HINT = (f"install the faiss GPU build instead of faiss-cpu (both provide the faiss module): "
                    f"pip uninstall faiss-cpu && pip install {FAISS_GPU_PACKAGE}")
#: A faiss GPU build must hold machine code for the GPU: faiss-gpu-cu12 1.14 has sm_70 and sm_80 only and aborts
#: on an H100 or H200 ("no kernel image is available"); faiss-gpu 1.15.1 has sm_70 to sm_90.
GPU_REBUILD_HINT = (f"install a faiss GPU build with code for this GPU: pip uninstall faiss-gpu-cu12 faiss-cpu && "
                    f"pip install '{FAISS_GPU_PACKAGE}>=1.15.1'")
#: The search :func:`gpu_search_runs` tries in a child process, and how long it may take (CUDA start-up included).
GPU_PROBE = """import numpy as np, faiss
x = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
_, found = faiss.knn_gpu(faiss.StandardGpuResources(), x, x, 1)
assert (found[:, 0] == np.arange(256)).all(), "faiss' GPU search found wrong neighbours"
"""
GPU_PROBE_TIMEOUT_S = 120

_cpu_fallback_logged = False  # the "runs on the CPU" message is logged once per process
_gpu_probe = None  # gpu_search_runs' answer, found once per process
_large_k_logged = False  # so is the one for k > GPU_MAX_K


def faiss_module():
    """The faiss module, imported on first use.

    Returns
    -------
    module
        faiss.

    Raises
    ------
    ImportError
        faiss is not installed; the message says what to install.
    """
    try:
        import faiss
    except ImportError as error:
        raise ImportError(f"pyro_scmodels.matching needs faiss: pip install faiss-cpu (or {FAISS_GPU_PACKAGE} for "
                          "CUDA GPUs, instead: only one can be installed).") from error
    return faiss


def _torch_sees_cuda() -> bool:
    """Whether torch sees a CUDA GPU (False without torch): what makes a CPU-only faiss worth a warning."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _gpu_problem() -> tuple[str, str] | None:
    """Why faiss cannot search on a GPU here and what to do about it, or None when it can."""
    try:
        faiss = faiss_module()
    except ImportError:
        return "faiss is not installed", f"pip install {FAISS_GPU_PACKAGE}"
    # faiss-cpu defines knn_gpu too (a Python wrapper), but not the GPU classes
    if not hasattr(faiss, "StandardGpuResources"):
        return "the installed faiss has no GPU support (faiss-cpu)", GPU_INSTALL_HINT
    if getattr(faiss, "get_num_gpus", lambda: 0)() < 1:
        return ("faiss has GPU support but sees no CUDA device (faiss.get_num_gpus() == 0)",
                "check that a CUDA GPU is visible (CUDA_VISIBLE_DEVICES) and that the driver supports faiss' CUDA")
    runs, failure = gpu_search_runs()
    if not runs:
        return f"faiss' GPU search fails on this GPU ({failure})", GPU_REBUILD_HINT
    return None


def gpu_search_runs() -> tuple[bool, str]:
    """Whether a small faiss GPU search runs and is right here, tried once per process in a child process.

    faiss stops the whole process (abort, not a Python exception) when its GPU code cannot run, for
    example a build without machine code for this GPU. A child process takes that instead of the
    caller's session (a trained model, unsaved results): about a second, once, on machines where faiss
    has GPU support and sees a GPU.

    Returns
    -------
    tuple of (bool, str)
        Whether :data:`GPU_PROBE` ran and found each point itself, and if not the child's last error line.
    """
    global _gpu_probe
    if _gpu_probe is None:
        # the child imports the faiss this process would: same interpreter, same module search path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        try:
            child = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True, env=env,
                                   timeout=GPU_PROBE_TIMEOUT_S)
            lines = [line.strip() for line in child.stderr.splitlines() if line.strip()]
            _gpu_probe = (child.returncode == 0,
                          "" if child.returncode == 0 else (lines[-1] if lines else f"exit status {child.returncode}")[-300:])
        except subprocess.TimeoutExpired:
            _gpu_probe = (False, f"a test search did not finish within {GPU_PROBE_TIMEOUT_S} s")
    return _gpu_probe


def faiss_gpu_available() -> bool:
    """Whether exact searches can run on a GPU.

    Returns
    -------
    bool
        True only if faiss was built with GPU support, ``faiss.get_num_gpus() > 0`` (faiss-gpu
        imports on CPU-only hosts, where ``index_cpu_to_all_gpus`` silently gives an empty index) and a
        small GPU search runs (:func:`gpu_search_runs`).
    """
    return _gpu_problem() is None


def _log_cpu_fallback(problem: str, fix: str) -> None:
    """Say once per process why ``device="auto"`` searches on the CPU: WARNING if torch sees a GPU, else INFO."""
    global _cpu_fallback_logged
    if _cpu_fallback_logged:
        return
    _cpu_fallback_logged = True
    if _torch_sees_cuda():  # a GPU machine whose faiss cannot use it: worth fixing, so say how
        logger.warning("Nearest-neighbour search (matching) runs on the CPU although torch sees a CUDA GPU: %s. "
                       "To match on the GPU, %s.", problem, fix)
    else:
        logger.info("Nearest-neighbour search (matching) runs on the CPU: %s.", problem)


def resolve_faiss_device(device: str = "auto", k: int = 1) -> str:
    """The device of faiss' exact search: decided here, independently of the device torch runs on.

    Parameters
    ----------
    device
        ``"auto"``: ``"cuda"`` when :func:`faiss_gpu_available` (faiss built with GPU support and
        ``faiss.get_num_gpus() > 0``) and ``k <= GPU_MAX_K``, else ``"cpu"``; why it is the CPU is
        logged once per process (logger ``pyro_scmodels.matching``; WARNING with the fix when torch sees a
        CUDA GPU that faiss cannot use, else INFO). ``"cpu"``: always the CPU. ``"cuda"``: the GPU, or an error.
    k
        Neighbours per query that will be searched (after clamping to the base size): faiss' GPU
        k-selection supports at most :data:`GPU_MAX_K`.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda"``.

    Raises
    ------
    ValueError
        ``device`` not in :data:`DEVICES`; ``device="cuda"`` without a usable GPU faiss (the message says
        what is missing and how to install the GPU build) or with ``k > GPU_MAX_K``.
    ImportError
        faiss is not installed.
    """
    global _large_k_logged
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(map(repr, DEVICES))}, got {device!r}.")
    k = positive_int("k", k)
    faiss_module()  # no faiss at all: the ImportError saying what to install, whatever the device
    if device == "cpu":
        return "cpu"
    problem = _gpu_problem()
    if device == "cuda" and problem is not None:
        raise ValueError(f"device='cuda' cannot be used: {problem[0]}. To match on the GPU, {problem[1]}; "
                         "or pass device='auto' (the GPU when usable, else the CPU) or device='cpu'.")
    if problem is not None:
        _log_cpu_fallback(*problem)
        return "cpu"
    if k > GPU_MAX_K:
        if device == "cuda":
            raise ValueError(f"device='cuda' cannot search k={k} neighbours: faiss' GPU search supports at most "
                             f"k={GPU_MAX_K}. Pass a smaller k, or device='auto' or 'cpu' (exact on the CPU).")
        if not _large_k_logged:
            logger.info("Nearest-neighbour search runs on the CPU: k=%d exceeds faiss' GPU limit k=%d.", k, GPU_MAX_K)
            _large_k_logged = True
        return "cpu"
    return "cuda"
