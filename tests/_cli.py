"""What the command-line tests share: the tiny sizes and arguments, running ``main`` with its output captured,
the logger reset after each test, the input ``.h5ad`` and the ``--help`` entries."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re

import pandas as pd
import pytest

import pyro_scmodels as ps
from pyro_scmodels.cli import main


N_CELLS, N_GENES, N_LATENT = 300, 60, 10
BATCHES = ["batch_0", "batch_1", "batch_2"]
DEMO_ARGS = ["--n-cells", str(N_CELLS), "--n-genes", str(N_GENES), "--epochs", "3", "--batch-size", "128", "--quiet",
             "--write-normalized"]
FIT_ARGS = ["--batch-key", "batch", "--layer", "counts", "--batch-size", "128", "--quiet"]


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """``main`` adds a stream handler bound to the sys.stderr of the moment; drop it after each test
    so that a later test does not log into an earlier test's (closed) capture stream."""
    logger = logging.getLogger("pyro_scmodels")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def run_cli(argv) -> tuple[int, str, str]:
    """Run ``main`` capturing stdout and stderr (for module-scoped fixtures, where capsys is unavailable)."""
    logger = logging.getLogger("pyro_scmodels")
    handlers = list(logger.handlers)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
    finally:
        logger.handlers[:] = handlers
    return code, stdout.getvalue(), stderr.getvalue()


def history_table(out) -> pd.DataFrame:
    return pd.read_csv(os.path.join(out, "history.csv"), index_col=0)


@pytest.fixture(scope="module")
def input_h5ad(tmp_path_factory):
    adata = ps.datasets.simulate(n_cells=N_CELLS, n_genes=N_GENES, n_markers_per_type=4, n_responding_genes=4)
    path = str(tmp_path_factory.mktemp("input") / "data.h5ad")
    adata.write_h5ad(path)
    return path


def help_entries(text: str) -> dict[str, str]:
    """``--help`` output split into its option entries: first option string -> the entry's text, whitespace collapsed."""
    entries, current = {}, None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if indent == 2 and line.lstrip().startswith("-"):
            current = re.split(r"[ ,]", line.strip(), maxsplit=1)[0]
            entries[current] = line.strip()
        elif current is not None and indent > 2 and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return {option: " ".join(entry.split()) for option, entry in entries.items()}
