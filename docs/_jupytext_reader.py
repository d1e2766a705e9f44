"""Reads the tutorials (jupytext percent scripts) as Python notebooks for myst-nb."""

import jupytext


def read_percent(text: str):
    """A notebook from a percent script, marked as Python so code cells are highlighted."""
    notebook = jupytext.reads(text, fmt="py:percent")
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    return notebook
