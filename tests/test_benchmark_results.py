"""The RESULTS.md writer of the benchmark scripts keeps what was written by hand and writes atomically."""

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(HERE, "..", "benchmarks", "_common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rerun_replaces_its_figures_and_keeps_the_subsections_written_by_hand(common, tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Bench A\n\nold figures\n\n### pbmc\n\nold table\n\n"
                    "### The run before (by hand)\n\nkeep me\n\n### kang\n\nold kang\n\n## Bench B\n\nother\n")
    common.update_results(path, "## Bench A\n\nnew figures\n\n### pbmc\n\nnew table\n\n### kang\n\nnew kang\n",
                          "## Bench A")
    text = path.read_text()
    assert text == ("# Benchmark results\n\n## Bench A\n\nnew figures\n\n### pbmc\n\nnew table\n\n### kang\n\n"
                    "new kang\n\n### The run before (by hand)\n\nkeep me\n\n## Bench B\n\nother\n")
    common.update_results(path, "## Bench C\n\nfirst run\n", "## Bench C")  # a new section goes at the end
    assert path.read_text() == text + "\n## Bench C\n\nfirst run\n"

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(path), "write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        common.update_results(path, "## Bench A\n\nlost\n", "## Bench A")
    monkeypatch.undo()
    assert path.read_text() == text + "\n## Bench C\n\nfirst run\n"  # the file as it was
    assert os.listdir(tmp_path) == ["RESULTS.md"]
