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
    # the lead no script marked (written by hand, or before the marker) is kept under a heading of its own
    assert text == (f"# Benchmark results\n\n## Bench A\n{mark}\n\nnew figures\n\n### pbmc\n{mark}\n\nnew table\n\n"
                    f"### kang\n{mark}\n\nnew kang\n\n{common.KEPT_LEAD}\n\nold figures\n\n"
                    "### The run before (by hand)\n\nkeep me\n\n## Bench B\n\nother\n")
    # the next rerun replaces the lead it marked, and keeps what was kept once
    common.update_results(path, "## Bench A\n\nnewer figures\n\n### pbmc\n\nnew table\n\n### kang\n\nnew kang\n",
                          "## Bench A")
    assert path.read_text() == text.replace("new figures", "newer figures")
    text = path.read_text()
    common.update_results(path, "## Bench C\n\nfirst run\n", "## Bench C")  # a new section goes at the end
    assert path.read_text() == text + f"\n## Bench C\n{mark}\n\nfirst run\n"

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(path), "write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        common.update_results(path, "## Bench A\n\nlost\n", "## Bench A")
    monkeypatch.undo()
    assert path.read_text() == text + f"\n## Bench C\n{mark}\n\nfirst run\n"  # the file as it was
    assert os.listdir(tmp_path) == ["RESULTS.md"]


def test_a_partial_rerun_marks_the_parts_it_did_not_run_as_an_earlier_runs(common, tmp_path):
    # a rerun on one dataset kept the other datasets' subsections under its own new header and date
    path = tmp_path / "RESULTS.md"
    common.update_results(path, "## Bench A\n\nrun 1, both\n\n### pbmc\n\npbmc 1\n\n### kang\n\nkang 1\n", "## Bench A")
    common.update_results(path, "## Bench A\n\nrun 2, pbmc only\n\n### pbmc\n\npbmc 2\n", "## Bench A")
    mark, earlier = common.GENERATED, common.EARLIER_RUN
    text = path.read_text()
    assert text == (f"# Benchmark results\n\n## Bench A\n{mark}\n\nrun 2, pbmc only\n\n### pbmc\n{mark}\n\npbmc 2\n\n"
                    f"### kang{earlier}\n\nkang 1\n")
    # a third run of pbmc keeps kang as it is: said once, and kept like a subsection written by hand
    common.update_results(path, "## Bench A\n\nrun 3, pbmc only\n\n### pbmc\n\npbmc 3\n", "## Bench A")
    assert path.read_text() == text.replace("run 2", "run 3").replace("pbmc 2", "pbmc 3")
    # a full rerun writes kang anew; the earlier run's copy, under its marked heading, stays as history
    common.update_results(path, "## Bench A\n\nrun 4\n\n### pbmc\n\npbmc 4\n\n### kang\n\nkang 4\n", "## Bench A")
    assert path.read_text().count(f"### kang\n{mark}\n\nkang 4") == 1 and f"### kang{earlier}\n\nkang 1" in path.read_text()


def test_a_lead_written_by_hand_under_a_sections_tables_survives_a_rerun(common, tmp_path):
    # bench_ambient.py's rerun removed the 46 hand-written lines of "Ambient: simulator" (its design, its reading)
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Ambient: simulator\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                    "Design: four batches at 3, 8, 15 and 25 %.\n\nReading: the seed's fractions barely move.\n\n"
                    "## Next\n\nx\n")
    common.update_results(path, "## Ambient: simulator\n\nMeasured today.\n\n| a | b |\n|---|---|\n| 3 | 4 |\n",
                          "## Ambient: simulator")
    text = path.read_text()
    assert "| 3 | 4 |" in text and "| 1 | 2 |" in text
    assert text.index("Measured today") < text.index(common.KEPT_LEAD) < text.index("Design: four batches")
    assert "Reading: the seed's fractions barely move." in text and text.endswith("## Next\n\nx\n")
    common.update_results(path, "## Ambient: simulator\n\nMeasured again.\n\n| a | b |\n|---|---|\n| 5 | 6 |\n",
                          "## Ambient: simulator")
    again = path.read_text()
    assert again == text.replace("Measured today", "Measured again").replace("| 3 | 4 |", "| 5 | 6 |")
    assert again.count("Design: four batches") == 1


def _fake_public_ndreamer(tmp_path, rows, values):
    """An 'interpreter' standing in for the public NDreamer's: it writes the worker's output file with these rows."""
    import sys

    import numpy as np

    np.savez(tmp_path / "answer.npz", rows=rows, ite=values)
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nimport shutil, sys, numpy as np\n"
                    f"a = np.load({str(tmp_path / 'answer.npz')!r})\n"
                    "genes = np.array(['gene_%d' % j for j in range(a['ite'].shape[1])])\n"
                    "np.savez(sys.argv[3], rows=a['rows'], ite=a['ite'], genes=genes, seconds=1.0, epochs=1)\n")
    fake.chmod(0o755)
    return str(fake)


def test_the_public_row_scores_every_stimulated_cell_or_refuses(tmp_path, monkeypatch):
    # cells the public tool left out were scored as a zero effect (its row looked worse than it was)
    import numpy as np

    import pyro_scmodels as ps
    from pyro_scmodels import metrics as M

    monkeypatch.syspath_prepend(os.path.join(HERE, "..", "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_effects", os.path.join(HERE, "..", "benchmarks", "bench_effects.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    adata = ps.datasets.simulate(n_cells=300, n_genes=60, n_markers_per_type=4, n_responding_genes=6, seed=1,
                                 effect_modifier=1.0)
    truth = adata.layers["true_ite"]
    truth = np.asarray(truth.todense() if hasattr(truth, "todense") else truth, dtype=np.float32)
    treated = np.flatnonzero(adata.obs["condition"].to_numpy() == "stimulated")
    row = bench.public_row(adata, 0, _fake_public_ndreamer(tmp_path, treated, truth[treated]))["public NDreamer"]
    expected = M.effect_recovery(adata, truth)
    assert row["per_cell_r"] == pytest.approx(expected["per_cell_r"]) and row["cate_r"] == pytest.approx(1.0)
    kept = treated[5:]
    with pytest.raises(RuntimeError, match=f"no ITE for 5 of the {treated.size} stimulated cells"):
        bench.public_row(adata, 0, _fake_public_ndreamer(tmp_path, kept, truth[kept]))


def test_the_scale_bench_refuses_a_stage_whose_input_no_earlier_stage_writes(tmp_path, monkeypatch):
    # `--stages match` on a fresh store ran every earlier stage's processes, then failed on a missing latent file
    monkeypatch.syspath_prepend(os.path.join(HERE, "..", "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_scale", os.path.join(HERE, "..", "benchmarks", "bench_scale.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    problems = bench.missing_inputs(tmp_path, [500], ["match"])
    assert len(problems) == 1 and "latent_500.npy" in problems[0] and "add 'infer' before 'match'" in problems[0]
    assert bench.missing_inputs(tmp_path, [500], ["train", "infer", "match"]) == []
    assert len(bench.missing_inputs(tmp_path, [500], ["infer", "ndreamer"])) == 2  # both read the trained model
    (tmp_path / "latent_500.npy").write_bytes(b"")
    assert bench.missing_inputs(tmp_path, [500], ["match"]) == []  # an earlier run's output in the store
    assert bench.table({("train", 500): {"epoch_s": 1.0, "peak_rss_gib": 0.5}}, [500])[2].endswith("| - |")
