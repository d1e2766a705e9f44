"""Turn the tutorial scripts into executed Jupyter notebooks (``tutorials/*.ipynb``, beside the scripts).

Usage::

    python tutorials/build_notebooks.py [--quick] [NAME ...]

Each jupytext percent script is converted to a notebook and run top to bottom in a fresh Python
kernel (from the tutorials folder, as a user opening it would); ``--quick`` sets
``PYRO_SCMODELS_QUICK=1`` for the quick versions. The notebooks are written beside ``_setup.py``, which their first
cell imports, so that they run again where they are; their figures are kept (inline, matplotlib's default in a
kernel).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def build(script: Path, output_dir: Path, timeout: int = 1800) -> Path:
    """Convert ``script`` to a notebook, execute it and write it to ``output_dir``; returns the path."""
    notebook = jupytext.read(script, fmt="py:percent")
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / (script.stem + ".ipynb")
    nbformat.write(notebook, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="tutorial names (default: all)")
    parser.add_argument("--quick", action="store_true", help="run the quick versions")
    parser.add_argument("--output", default=str(HERE), help="folder of the notebooks (default: the tutorials "
                        "folder, where they import _setup.py)")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["PYRO_SCMODELS_QUICK"] = "1"  # inherited by the kernels
    scripts = sorted(HERE.glob("[0-9]*.py"))
    if args.names:
        scripts = [s for s in scripts if any(s.stem.startswith(n) for n in args.names)]
        if not scripts:
            parser.error(f"no tutorial matches {args.names}")
    for script in scripts:
        print(f"{script.name} -> {build(script, Path(args.output))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
