"""The command line's output folder across runs: --resume continues an interrupted run, --overwrite starts anew and
removes what the earlier run wrote, and neither touches results it should not."""

import logging
import os
import shutil

import anndata
import numpy as np
import pytest

from pyro_scmodels.cli import main

from . import _cli
from ._cli import FIT_ARGS, N_CELLS, history_table

# the shared fixtures of tests/_cli.py, bound here for pytest to find
_restore_package_logger = _cli._restore_package_logger
input_h5ad = _cli.input_h5ad


def test_fit_resume_continues_and_overwrite_starts_fresh(input_h5ad, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="pyro_scmodels")
    out = str(tmp_path / "out")
    assert main(["fit", input_h5ad, "-o", out, "--max-epochs", "2", *FIT_ARGS]) == 0
    first = history_table(out)
    assert len(first) == 2
    # an interrupted run leaves only its checkpoint behind
    os.remove(os.path.join(out, "results.h5ad"))
    os.remove(os.path.join(out, "history.csv"))
    shutil.rmtree(os.path.join(out, "model"))
    assert os.listdir(os.path.join(out, "checkpoint"))
    # the checkpoint alone counts as earlier results
    capsys.readouterr()
    assert main(["fit", input_h5ad, "-o", out, "--max-epochs", "4", *FIT_ARGS]) == 2
    assert "--resume" in capsys.readouterr().err
    caplog.clear()

    # without --quiet: the resume is reported at INFO level
    loud = [a for a in FIT_ARGS if a != "--quiet"]
    assert main(["fit", input_h5ad, "-o", out, "--resume", "--max-epochs", "4", *loud]) == 0
    assert "Resumed from" in caplog.text and "at epoch 2" in caplog.text
    resumed = history_table(out)
    assert len(resumed) == 4
    assert list(resumed.index) == [0, 1, 2, 3]
    # the first two epochs are those of the interrupted run, not retrained
    np.testing.assert_allclose(resumed["train_loss"].iloc[:2].to_numpy(), first["train_loss"].to_numpy())
    assert os.path.isfile(os.path.join(out, "results.h5ad"))

    # --overwrite discards the checkpoint: 2 epochs give 2 rows (a resume would keep all 4)
    caplog.clear()
    assert main(["fit", input_h5ad, "-o", out, "--overwrite", "--max-epochs", "2", *loud]) == 0
    assert "Resumed from" not in caplog.text
    fresh = history_table(out)
    assert len(fresh) == 2
    # same seed, fresh start: the same losses as the first run
    np.testing.assert_allclose(fresh["train_loss"].to_numpy(), first["train_loss"].to_numpy(), rtol=1e-5)


def test_resume_without_a_checkpoint_says_it_starts_afresh(input_h5ad, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pyro_scmodels")
    out = str(tmp_path / "out")
    assert main(["fit", input_h5ad, "-o", out, "--resume", "--max-epochs", "1", *FIT_ARGS]) == 0
    assert "--resume: no checkpoint in" in caplog.text and "starts from the beginning" in caplog.text


def test_resume_with_another_setup_is_refused_by_name(input_h5ad, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["fit", input_h5ad, "-o", out, "--max-epochs", "1", *FIT_ARGS]) == 0
    other = [a if a != "batch" else "condition" for a in FIT_ARGS]  # another covariate: other tables in the model
    capsys.readouterr()
    assert main(["fit", input_h5ad, "-o", out, "--resume", "--max-epochs", "2", *other]) == 2
    said = capsys.readouterr().err
    # the roles and the columns that differ are named (the batch key sets the ambient, dispersion and library keys)
    assert "written for different data or settings (" in said
    assert "covariate keys.ambient" in said and "covariate categories.condition" in said


def test_overwrite_keeps_the_checkpoint_of_a_run_refused_for_its_input(input_h5ad, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["fit", input_h5ad, "-o", out, "--max-epochs", "1", *FIT_ARGS]) == 0
    before = sorted(os.listdir(os.path.join(out, "checkpoint")))
    assert before
    bad = [a if a != "counts" else "no_such_layer" for a in FIT_ARGS]
    assert main(["fit", input_h5ad, "-o", out, "--overwrite", "--max-epochs", "1", *bad]) == 2
    assert "no_such_layer" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(out, "checkpoint"))) == before


@pytest.mark.parametrize("command", ["fit", "ndreamer"])
def test_an_input_where_the_results_go_is_refused(input_h5ad, tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    data = out / "results.h5ad"
    shutil.copyfile(input_h5ad, data)
    size = data.stat().st_size
    arguments = (["--backed", "--batch-key", "batch", "--quiet"] if command == "fit" else
                 ["--condition-key", "condition", "--control", "control", "--batch-key", "batch", "--quiet"])
    assert main([command, str(data), "-o", str(out), "--overwrite", *arguments]) == 2
    assert "is where this command writes its results" in capsys.readouterr().err
    assert data.stat().st_size == size and anndata.read_h5ad(data).n_obs == N_CELLS
    # another name in the same folder is an input like any other
    other = out / "data.h5ad"
    shutil.copyfile(input_h5ad, other)
    assert main(["fit", str(other), "-o", str(out), "--overwrite", "--max-epochs", "1", *FIT_ARGS]) == 0


def test_overwrite_removes_what_an_earlier_run_wrote_and_keeps_other_files(input_h5ad, tmp_path):
    out = tmp_path / "out"
    assert main(["fit", input_h5ad, "-o", str(out), "--max-epochs", "1", *FIT_ARGS]) == 0
    # an earlier ndreamer run's optional outputs in the same folder, and a file of the user's
    earlier = {"cate_stimulated.csv", "ite_heatmap_stimulated.png", "effects.h5ad",
               # a saved NDreamer, and a file of an interrupted save of one
               "effects.npz", "network.pt", "training.pt", "settings.json", ".staged-network.pt"}
    for name in (*earlier, "notes.txt"):
        (out / name).write_text("earlier")
    assert main(["fit", input_h5ad, "-o", str(out), "--max-epochs", "1", "--overwrite", *FIT_ARGS]) == 0
    left = set(os.listdir(out))
    assert not left & earlier  # they stayed beside the new results
    assert {"notes.txt", "results.h5ad", "model", "history.csv"} <= left


def test_resume_into_finished_results_without_a_checkpoint_is_refused(input_h5ad, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["fit", input_h5ad, "-o", str(out), "--max-epochs", "1", *FIT_ARGS]) == 0
    shutil.rmtree(out / "checkpoint")  # e.g. removed to save space
    before = (out / "results.h5ad").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["fit", input_h5ad, "-o", str(out), "--max-epochs", "2", "--resume", *FIT_ARGS]) == 2
    said = capsys.readouterr().err
    assert "holds results" in said and "no checkpoint to resume from" in said and "--overwrite" in said
    assert (out / "results.h5ad").stat().st_mtime_ns == before  # a new run replaced them


def test_resume_after_a_run_stopped_in_its_first_epoch_starts_afresh(input_h5ad, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pyro_scmodels")
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)  # made before the first epoch; the run was killed before writing into it
    assert main(["fit", input_h5ad, "-o", str(out), "--resume", "--max-epochs", "1", *FIT_ARGS]) == 0
    assert "no checkpoint in" in caplog.text and "starts from the beginning" in caplog.text


def test_ndreamer_resume_removes_the_earlier_runs_outputs_it_does_not_write_again(input_h5ad, tmp_path, caplog):
    # the first run's CATE tables and heatmaps stayed beside the resumed run's results, up to 0.66 log units off them
    out = str(tmp_path / "nd")
    args = ["ndreamer", input_h5ad, "--condition-key", "condition", "--control", "control", "--batch-key", "batch",
            "--layer", "counts", "--batch-size", "128", "--network", "small", "--device", "cpu", "-o", out, "--quiet"]
    assert main([*args, "--epochs", "1", "--cate-groupby", "cell_type"]) == 0
    assert os.path.exists(os.path.join(out, "cate_stimulated.csv"))
    with open(os.path.join(out, "notes.txt"), "w") as handle:  # a file of the user's
        handle.write("mine")
    with caplog.at_level(logging.WARNING, logger="pyro_scmodels"):
        assert main([*args, "--epochs", "2", "--resume"]) == 0
    assert "removed the earlier run's cate_stimulated.csv, ite_heatmap_stimulated.png" in caplog.text
    assert not os.path.exists(os.path.join(out, "cate_stimulated.csv"))
    assert not os.path.exists(os.path.join(out, "ite_heatmap_stimulated.png"))
    assert os.path.exists(os.path.join(out, "results.h5ad")) and os.path.exists(os.path.join(out, "notes.txt"))
    assert main([*args, "--epochs", "3", "--resume", "--cate-groupby", "cell_type"]) == 0  # written again: kept
    assert os.path.exists(os.path.join(out, "cate_stimulated.csv"))
