"""The documentation builds with warnings treated as errors (API pages from the docstrings)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", os.path.join(ROOT, "docs"), str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for page in ("index.html", "api.html", "models.html", "performance.html"):
        assert (tmp_path / page).exists()
    assert "RegularizedVI" in (tmp_path / "api.html").read_text()
