"""Helpers shared by the benchmark scripts.

Machine facts, the per-process memory marks read from ``/proc/self/status``, running one
measurement in a fresh Python process, and the RESULTS.md section writer.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import time
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


def hardware_facts() -> dict:
    """CPU model, logical CPU count and total memory, as human-readable strings."""
    memory = total_memory_gib()
    return {
        "CPU": cpu_model(),
        "logical CPUs": str(os.cpu_count()),
        "memory": f"{memory:.1f} GiB" if memory else "unknown",
    }


def package_version(distribution: str) -> str | None:
    """Installed version of ``distribution``, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


#: the hidden line under each subsection heading a script writes (markdown renders no comment)
GENERATED = "<!-- written by a benchmark script -->"
#: added to such a heading when a partial rerun keeps it under the new run's header
EARLIER_RUN = " (from an earlier run)"
#: the heading under which a rerun keeps the text before a section's first subsection when no script wrote it
KEPT_LEAD = "### Kept from before this run"


def update_results(path: Path, section: str, title: str) -> None:
    """Replace (or append) the generated part of the ``title`` section of ``path``, keeping everything else.

    The section runs from ``title`` to the next level-2 heading. Its subsections (``### ``) that the new section writes
    are replaced; the others stay, after the new section and in their order: those written by hand (earlier runs,
    notes), and those of a partial rerun's other parts (e.g. the datasets it did not run). Each subsection this
    writes carries a hidden marker (:data:`GENERATED`) under its heading, so that when a later, partial rerun keeps
    it, its heading is marked as an earlier run's (:data:`EARLIER_RUN`) instead of reading as part of the new run.
    The text between the title and the first subsection is marked the same way under the title: a rerun replaces it
    when a script wrote it, and otherwise (written by hand, or by a script before the marker existed) keeps it under
    :data:`KEPT_LEAD`, so that nothing written by hand is lost.
    The file is written under a temporary name and renamed, so that a crash never leaves half a file.

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
        # the section ends at the next level-2 (or level-1) heading; of its subsections, those the new section writes
        # itself are replaced, and the others (written by hand: earlier runs, notes) kept after it, in their order
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith(("## ", "# "))), len(lines))
        own = {line.strip() for line in section.splitlines() if line.startswith("### ")}
        first = next((j for j in range(start + 1, end) if lines[j].startswith("### ")), end)
        lead = lines[start + 1 : first]
        kept = []
        if any(line.strip() for line in lead) and lead[0].strip() != GENERATED:
            # text no script marked as its own: kept under a heading of its own (a later rerun keeps that subsection)
            text_start = next(j for j, line in enumerate(lead) if line.strip())
            text_end = max(j for j, line in enumerate(lead) if line.strip()) + 1
            kept = [KEPT_LEAD, "", *lead[text_start:text_end], ""]
        keep = False
        for line in lines[first:end]:
            if line.startswith("### "):
                keep = line.strip() not in own
            if keep and line.strip() == GENERATED and kept and kept[-1].startswith("### "):
                kept[-1] += EARLIER_RUN  # another run's part, kept: no longer this run's (and said once)
                continue
            if keep:
                kept.append(line)
        while kept and not kept[-1].strip():
            kept.pop()
        before, after = lines[:start], kept + ([""] if kept and end < len(lines) else []) + lines[end:]
    while before and not before[-1].strip():
        before.pop()
    section = "\n".join(line + ("\n" + GENERATED if line.startswith("### ") or line.strip() == title else "")
                        for line in section.splitlines())
    text = "\n".join(before) + ("\n\n" if before else "") + section.rstrip("\n") + "\n"
    if after:
        text += "\n" + "\n".join(after).rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except BaseException:
        if temporary.exists():
            temporary.unlink()
        raise


def status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` field (``VmHWM``, ``VmRSS``) in MiB, or None where unavailable."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_in_child(command: list[str], result_path: Path, workdir: Path, failure: dict) -> dict:
    """Run ``command`` (a measured child process) in ``workdir`` and read its JSON result.

    Parameters
    ----------
    command
        The child's command line; it writes its result as JSON to ``result_path``.
    result_path
        Where the child writes its result.
    workdir
        The child's working directory.
    failure
        Fields of the returned dict when the child fails; ``"error"`` (exit code and the last
        15 lines of its output) is added to them.

    Returns
    -------
    dict
        The child's result, or ``failure`` with ``"error"``.
    """
    completed = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if completed.returncode != 0 or not result_path.exists():
        tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-15:])
        return {**failure, "error": f"exit code {completed.returncode}\n{tail}"}
    with open(result_path) as handle:
        return json.load(handle)


def section_header(title: str, when: str, facts: dict) -> str:
    """Start of a RESULTS.md section: its title, the date and the machine facts as a list."""
    fact_lines = "\n".join(f"- {key}: {value}" for key, value in facts.items())
    return f"{title}\n\nMeasured {when}.\n\n{fact_lines}\n\n"


def note_lines(notes: list[str]) -> str:
    """Notes as a markdown list preceded by a blank line, or ``""`` when there are none."""
    return ("\n\n" + "\n".join(f"- {note}" for note in notes)) if notes else ""


def write_section(output: Path, title: str, section: str) -> None:
    """Update the ``title`` section of ``output`` and say so."""
    update_results(output, section, title)
    print(f"\nWrote the '{title[3:]}' section of {output}")


def now() -> str:
    """The local date and time with its zone, as RESULTS.md sections give it."""
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def run_single_threaded(command: list[str], cwd: str | None = None) -> tuple[float, float]:
    """Run ``command`` with one thread per numeric library; its wall seconds and peak RSS in MiB.

    The peak is the child's ``ru_maxrss`` from ``os.wait4``. On Linux that includes the parent's
    size at exec time, so a driver that measures this way keeps its own memory small.

    Parameters
    ----------
    command
        The program and its arguments.
    cwd
        Working directory of the child (default: this process's).

    Returns
    -------
    tuple
        ``(seconds, peak_rss_mib)``.

    Raises
    ------
    RuntimeError
        The child failed; the message holds the tail of its output.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n" + "\n".join(output.strip().splitlines()[-15:]))
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
