"""Every tutorial script runs top to bottom in quick mode (PYRO_SCMODELS_QUICK=1), on the shared data
when it is there and on the package simulator when it is not."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
SCRIPTS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 180  # each takes 8-17 s on two CPU cores in quick mode


def _run(script: Path, cwd: Path, **env) -> None:
    env = {**os.environ, "PYRO_SCMODELS_QUICK": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", **env}
    # cwd is a temporary folder: the scripts write only under tutorials/figures (git-ignored)
    result = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, (f"{script.name} failed (rc {result.returncode})\n--- stdout (tail) ---\n"
                                    f"{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
    assert not list(cwd.iterdir()), f"{script.name} wrote into the working directory: {list(cwd.iterdir())}"


def test_all_tutorials_are_found():
    assert len(SCRIPTS) == 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_tutorial_runs_in_quick_mode(script, tmp_path):
    _run(script, tmp_path)


@pytest.mark.parametrize("script", SCRIPTS[:4], ids=[s.stem for s in SCRIPTS[:4]])
def test_tutorial_falls_back_to_the_simulator(script, tmp_path):
    """Without ../shared/data (here: PYRO_SCMODELS_DATA pointing at a missing folder)."""
    work = tmp_path / "work"
    work.mkdir()
    _run(script, work, PYRO_SCMODELS_DATA=str(tmp_path / "no_such_folder"))
