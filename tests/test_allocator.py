"""Transparent huge pages for torch's CPU tensors: set before torch is imported, never over the user's choice."""

import os
import subprocess
import sys

import pytest

REPORT = "import os, sys; {first}import pyro_scmodels; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"


def _fresh_interpreter(first: str, environment: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | environment
    done = subprocess.run([sys.executable, "-c", REPORT.format(first=first)], env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("first, environment, expected", [
    ("", {}, "1"),                                          # the package first: it switches huge pages on
    ("import torch; ", {}, "None"),                          # torch first: too late, so nothing is claimed
    ("", {"THP_MEM_ALLOC_ENABLE": "0"}, "0"),                # the user's choice stands
])
def test_huge_pages_are_requested_only_before_torch_and_never_over_the_user(first, environment, expected):
    assert _fresh_interpreter(first, environment) == expected


def _huge_pages_mode() -> str:
    """The system's transparent huge pages mode: 'always', 'madvise' (on request only) or 'never'."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            return handle.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(_huge_pages_mode() == "never" or not os.path.exists("/proc/self/smaps_rollup"),
                    reason="no transparent huge pages on this system")
@pytest.mark.parametrize("setting, huge", [(None, True), ("0", False)])
def test_torch_backs_large_tensors_with_huge_pages_when_the_package_comes_first(setting, huge):
    # a fresh 64 MB tensor, written: the process's anonymous huge pages show whether torch's allocator asked for them
    code = ("import pyro_scmodels, torch; t = torch.ones(16, 1024, 1024); "
            "print([int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0])")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    kilobytes = int(done.stdout.strip().splitlines()[-1])
    if huge:
        assert kilobytes >= 32 * 1024
    elif _huge_pages_mode() == "madvise":  # in 'always' mode the kernel uses them whatever torch asks
        assert kilobytes < 32 * 1024
