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
    mark = common.GENERATED
    assert text == (f"# Benchmark results\n\n## Bench A\n\nnew figures\n\n### pbmc\n{mark}\n\nnew table\n\n### kang\n"
                    f"{mark}\n\nnew kang\n\n### The run before (by hand)\n\nkeep me\n\n## Bench B\n\nother\n")
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


def test_a_partial_rerun_marks_the_parts_it_did_not_run_as_an_earlier_runs(common, tmp_path):
    # a rerun on one dataset kept the other datasets' subsections under its own new header and date
    path = tmp_path / "RESULTS.md"
    common.update_results(path, "## Bench A\n\nrun 1, both\n\n### pbmc\n\npbmc 1\n\n### kang\n\nkang 1\n", "## Bench A")
    common.update_results(path, "## Bench A\n\nrun 2, pbmc only\n\n### pbmc\n\npbmc 2\n", "## Bench A")
    mark, earlier = common.GENERATED, common.EARLIER_RUN
    text = path.read_text()
    assert text == (f"# Benchmark results\n\n## Bench A\n\nrun 2, pbmc only\n\n### pbmc\n{mark}\n\npbmc 2\n\n"
                    f"### kang{earlier}\n\nkang 1\n")
    # a third run of pbmc keeps kang as it is: said once, and kept like a subsection written by hand
    common.update_results(path, "## Bench A\n\nrun 3, pbmc only\n\n### pbmc\n\npbmc 3\n", "## Bench A")
    assert path.read_text() == text.replace("run 2", "run 3").replace("pbmc 2", "pbmc 3")
    # a full rerun writes kang anew; the earlier run's copy, under its marked heading, stays as history
    common.update_results(path, "## Bench A\n\nrun 4\n\n### pbmc\n\npbmc 4\n\n### kang\n\nkang 4\n", "## Bench A")
    assert path.read_text().count(f"### kang\n{mark}\n\nkang 4") == 1 and f"### kang{earlier}\n\nkang 1" in path.read_text()
