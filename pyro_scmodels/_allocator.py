"""Freed memory kept for reuse while a model trains, so that large CPU tensors do not start from fresh pages.

glibc's ``malloc`` serves every allocation above 32 MB (above 128 KB until its threshold adapts) with a fresh
``mmap`` and gives it back to the kernel when freed. A training step allocates and frees the same large tensors
every time (NDreamer's codebooks x cells x codes tensors are 128 MB each; a PBMC minibatch of 1,024 cells x 11,221
genes is 46 MB), so each step paid a page fault per 4 KB page of each of them, often more than the arithmetic
writing them. :func:`reuse_freed_memory` switches ``mmap`` off and keeps freed memory in the heap for the duration
of a training loop, then switches ``mmap`` back on and hands the free memory back (``malloc_trim``). On two CPU
cores this made NDreamer's passes 1.2-1.3x faster and RegularizedVI on PBMC at batch 1,024 1.21-1.26x faster
(benchmarks/RESULTS.md, "Training: freed memory reused"). torch asks for 64-byte aligned blocks, which a freed block
of exactly the same size cannot give, so the heap grows over the first steps until freed blocks merge; after that
a step faults almost no fresh pages.

It does nothing where the C library is not glibc, when the user tunes ``malloc`` through the environment
(``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``), or when
``PYRO_SCMODELS_REUSE_MEMORY=0``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ctypes.util
import logging
import os
import platform
import threading

logger = logging.getLogger(__name__)

OPT_OUT = "PYRO_SCMODELS_REUSE_MEMORY"
USER_TUNING = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
# mallopt parameters and glibc's defaults (malloc.h, malloc.c)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_MMAP_MAX = 65536
RESTORED_TRIM_THRESHOLD = 64 * 2**20  # 2 x DEFAULT_MMAP_THRESHOLD_MAX (32 MB), as glibc's adaptive setting reaches
NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: the heap is trimmed only beyond 2 GB of free top

_lock = threading.Lock()
_depth = 0  # blocks inside (nested loops, other threads): the first in switches it on, the last out off
_applied = False


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library, if it is glibc (``mallopt`` and ``malloc_trim`` as glibc defines them); else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def reuse_wanted() -> bool:
    """Whether :func:`reuse_freed_memory` changes anything here: glibc, and neither the opt-out nor the user's
    own ``malloc`` settings in the environment."""
    if os.environ.get(OPT_OUT, "1") == "0" or any(name in os.environ for name in USER_TUNING):
        return False
    return _glibc() is not None


@contextlib.contextmanager
def reuse_freed_memory():
    """Within the block, large allocations come from the heap and freed memory stays there for reuse.

    The first block to enter switches it on and the last to leave (threads and nested loops count) switches it off:
    glibc's ``M_MMAP_MAX`` default (65,536) is restored, the trim threshold set to 64 MB (twice glibc's largest
    adaptive ``mmap`` threshold, where a process that has freed large blocks ends up), and the free memory is handed
    back to the kernel, so the process's resident memory falls back as before. glibc stops adapting its ``mmap``
    threshold after any ``mallopt`` call; it keeps the value it had grown to.
    """
    global _depth, _applied
    with _lock:
        _depth += 1
        if _depth == 1 and reuse_wanted():
            libc = _glibc()
            # the trim threshold first: once large blocks come from the heap, freeing one must not return it
            if libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1 or libc.mallopt(M_MMAP_MAX, 0) != 1:
                logger.debug("mallopt refused a setting; freed memory may not be kept for reuse")
            _applied = True
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _applied:
                libc = _glibc()
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, RESTORED_TRIM_THRESHOLD)
                libc.malloc_trim(0)
                _applied = False


M_MMAP_THRESHOLD = -3
#: glibc's starting threshold: blocks above it get their own mapping, given back to the kernel when freed
FIXED_MMAP_THRESHOLD = 128 * 2**10
_mapped = False  # map_large_blocks has fixed the threshold (it stays fixed for the process)


def map_large_blocks() -> None:
    """From now on, every block above 128 KB gets its own ``mmap`` and goes back to the kernel when freed.

    glibc raises its ``mmap`` threshold (up to 32 MB) each time a mapped block is freed; blocks below it then come
    from the heaps, where torch's 64-byte aligned requests do not fit the freed blocks of the same size. How far the
    threshold has risen when a query's loop starts depends on what ran before it, so the same latent of 10^6 cells
    peaked at 1.1 GiB in most runs and at 2.0-6.9 GiB in others (benchmarks/RESULTS.md, "RegularizedVI's latent at
    10^6 cells"). A fixed threshold stops the adapting for the rest of the process (glibc keeps no other
    state to go back to); training switches ``mmap`` off in its own loop either way (:func:`reuse_freed_memory`).
    Nothing changes where :func:`reuse_wanted` is False (not glibc, or the user tunes ``malloc``).
    """
    global _mapped
    with _lock:
        if _mapped or not reuse_wanted():
            return
        if _glibc().mallopt(M_MMAP_THRESHOLD, FIXED_MMAP_THRESHOLD) != 1:
            logger.debug("mallopt refused the mmap threshold")
        _mapped = True
