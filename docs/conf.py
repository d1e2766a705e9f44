"""Sphinx configuration: myst-nb pages and API reference from the numpy-style docstrings."""

import glob
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)  # for _jupytext_reader

# the tutorials live in ../tutorials (jupytext percent scripts); Sphinx only reads its own tree,
# so they are copied here at build time (the copy is git-ignored)
_copies = os.path.join(HERE, "_tutorials")
shutil.rmtree(_copies, ignore_errors=True)
os.makedirs(_copies)
for _script in sorted(glob.glob(os.path.join(HERE, "..", "tutorials", "[0-9]*.py"))):
    shutil.copy(_script, _copies)

project = "pyro_scmodels"
author = "pyro_scmodels developers"
release = "0.1.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
autosummary_generate = True
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_typehints = "none"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
myst_enable_extensions = ["dollarmath", "amsmath"]
# tutorials are jupytext percent scripts; they are executed by the test suite, not by the docs build
nb_custom_formats = {".py": ["_jupytext_reader.read_percent", {}]}
nb_execution_mode = "off"
source_suffix = {".md": "myst-nb", ".py": "myst-nb"}
exclude_patterns = ["_build", "conf.py", "_jupytext_reader.py", "generated/*.py"]
html_theme = "furo"
html_title = "pyro_scmodels"
suppress_warnings = ["mystnb.unknown_mime_type"]
