"""Helpers shared by the benchmark scripts: machine facts and the RESULTS.md section writer."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to :func:`platform.processor`).

    Returns
    -------
    str
        The first ``model name`` entry, or a best-effort description.
    """
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_memory_gib() -> float | None:
    """Total physical memory in GiB from ``/proc/meminfo``, or None where unavailable."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except (OSError, ValueError, IndexError):
        pass
    return None


def package_version(distribution: str) -> str | None:
    """Installed version of ``distribution``, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def update_results(path: Path, section: str, title: str) -> None:
    """Replace (or append) the ``title`` section of ``path``, keeping the others.

    Parameters
    ----------
    path
        The markdown file; created (with a title) when missing.
    section
        The new section, starting with ``title``.
    title
        The section's heading line (every benchmark script has its own).
    """
    if path.exists():
        lines = path.read_text().splitlines()
    else:
        lines = ["# Benchmark results", ""]
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        before, after = lines, []
    else:
        # the section ends at the next level-2 (or level-1) heading
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith(("## ", "# "))), len(lines))
        before, after = lines[:start], lines[end:]
    while before and not before[-1].strip():
        before.pop()
    text = "\n".join(before) + ("\n\n" if before else "") + section.rstrip("\n") + "\n"
    if after:
        text += "\n" + "\n".join(after).rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
