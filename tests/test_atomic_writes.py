"""Files appear complete under their final name or not at all; Ctrl-C in the CLI exits 130."""

import os

import anndata
import numpy as np
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels import _atomic, cli


def test_atomic_path_renames_only_a_finished_write(tmp_path):
    target = tmp_path / "results.h5ad"
    with _atomic.atomic_path(str(target)) as temporary:
        assert temporary.endswith(".h5ad") and os.path.dirname(temporary) == str(tmp_path)
        with open(temporary, "w") as handle:
            handle.write("complete")
    assert target.read_text() == "complete"
    assert os.listdir(tmp_path) == ["results.h5ad"]


def test_a_failed_write_leaves_neither_a_final_nor_a_partial_file(tmp_path, monkeypatch):
    def half_then_crash(self, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\x89HDF half a file")
        raise OSError("disk full")

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        _atomic.write_h5ad(anndata.AnnData(np.ones((2, 2), dtype=np.float32)), str(tmp_path / "results.h5ad"))
    assert os.listdir(tmp_path) == []


def test_an_earlier_file_survives_a_failed_rewrite(tmp_path):
    target = tmp_path / "settings.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with _atomic.atomic_path(str(target)) as temporary:
            with open(temporary, "w") as handle:
                handle.write("new but unfinished")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["settings.json"]


def test_a_model_save_stopped_while_writing_leaves_the_earlier_save_whole(tmp_path, monkeypatch):
    adata = ps.datasets.simulate(n_cells=120, n_genes=40, n_markers_per_type=4, seed=0)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    first = ps.RegularizedVI(adata, n_latent=3, n_hidden=8, seed=0)
    folder = str(tmp_path / "model")
    first.save(folder, save_anndata=True)
    other = adata[:50].copy()
    second = ps.RegularizedVI(other, n_latent=3, n_hidden=8, seed=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    for model, save_anndata in ((first, False), (second, True)):  # the data removed; other data written
        with pytest.raises(KeyboardInterrupt):
            model.save(folder, overwrite=True, save_anndata=save_anndata)
        assert sorted(os.listdir(folder)) == ["adata.h5ad", "model.pt"]  # no staged file left either
    monkeypatch.undo()
    loaded = ps.RegularizedVI.load(folder)
    assert loaded.adata.n_obs == 120
    np.testing.assert_array_equal(loaded.get_latent_representation(), first.get_latent_representation())
    second.save(folder, overwrite=True)  # a finished save without data removes the earlier save's data
    assert sorted(os.listdir(folder)) == ["model.pt"]


def test_ctrl_c_in_the_cli_exits_130_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    source = tmp_path / "in.h5ad"
    anndata.AnnData(np.ones((4, 3), dtype=np.float32)).write_h5ad(source)

    def interrupted(args, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_fit", interrupted)
    monkeypatch.setattr(cli, "check_arguments", lambda args: None)
    assert cli.main(["fit", str(source), "-o", str(tmp_path / "out")]) == 130
    assert "--resume" in capsys.readouterr().err


def test_sigterm_to_the_cli_stops_it_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    # a scheduler's SIGTERM (or a closed terminal's SIGHUP) ended the process where it stood: every epoch since the
    # last periodic checkpoint was lost. It now raises KeyboardInterrupt, on which the loops write their checkpoint
    import signal

    source = tmp_path / "in.h5ad"
    anndata.AnnData(np.ones((4, 3), dtype=np.float32)).write_h5ad(source)
    reached = []

    def stopped(args, folder):
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("after the signal")  # not reached: the handler raises at once

    monkeypatch.setattr(cli, "run_fit", stopped)
    monkeypatch.setattr(cli, "check_arguments", lambda args: None)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    assert cli.main(["fit", str(source), "-o", str(tmp_path / "out")]) == 130
    assert "--resume" in capsys.readouterr().err and reached == []
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before  # put back
    # started under nohup (SIGHUP ignored), the run outlives its terminal as before
    def hung_up(args, folder):
        os.kill(os.getpid(), signal.SIGHUP)
        reached.append("after the signal")

    monkeypatch.setattr(cli, "run_fit", hung_up)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert cli.main(["fit", str(source), "-o", str(tmp_path / "out2")]) == 0 and reached == ["after the signal"]
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_output_folders_are_checked_before_any_training(tmp_path):
    """checkpoint_dir and save's folder: an existing file, or a file among the parents, is named before any work."""
    import pyro_scmodels as ps
    from pyro_scmodels._io import OutputPathError
    from pyro_scmodels.ndreamer import NDreamer, network_preset

    adata = ps.datasets.simulate(n_cells=120, n_genes=40, n_markers_per_type=4, n_responding_genes=4, seed=1)
    ps.RegularizedVI.setup_anndata(adata, layer="counts")
    model = ps.RegularizedVI(adata, n_hidden=8, n_latent=2)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for folder, message in ((a_file, "is an existing file"), (a_file / "sub", "is a file, not a folder")):
        with pytest.raises(OutputPathError, match=f"checkpoint_dir .*{message}"):
            model.train(max_epochs=2, progress_bar=False, checkpoint_dir=str(folder))
        assert not model.is_trained and (model.trainer is None or model.trainer.epoch == 0)  # refused before any step
        with pytest.raises(OutputPathError, match=f"dir_path .*{message}"):
            model.save(str(folder))
    nd = NDreamer(adata, "condition", "control", device="cpu", **network_preset("small"))
    with pytest.raises(OutputPathError, match="checkpoint_dir .*is an existing file"):
        nd.train(n_epochs=1, progress_bar=False, checkpoint_dir=str(a_file))
    assert nd.trainer is None or nd.trainer.step == 0
    with pytest.raises(OutputPathError, match="dir_path .*is a file, not a folder"):
        nd.save(str(a_file / "nd"))


def test_a_save_removes_the_files_of_replaces_only_with_the_marker_there(tmp_path):
    # without the marker the files are not known to be a save's (a user's best_network.pt beside a prefixed save,
    # or a model's adata.h5ad): they stay
    from pyro_scmodels._atomic import staged_save

    folder = tmp_path / "unmarked"
    folder.mkdir()
    (folder / "training.pt").write_text("the user's")
    with staged_save(str(folder), "settings.json", replaces=("training.pt",)) as stage:
        with open(stage("settings.json"), "w") as handle:
            handle.write("{}")
    assert (folder / "training.pt").read_text() == "the user's" and (folder / "settings.json").exists()
    marked = tmp_path / "marked"  # with the marker there, the earlier save's files go in either case
    marked.mkdir()
    (marked / "training.pt").write_text("an earlier save's")
    (marked / "settings.json").write_text("{}")
    with staged_save(str(marked), "settings.json", replaces=("training.pt",)) as stage:
        with open(stage("settings.json"), "w") as handle:
            handle.write("{}")
    assert not (marked / "training.pt").exists()


def test_is_write_of_names_a_file_and_its_unfinished_writes_only(tmp_path):
    from pyro_scmodels._atomic import atomic_path, is_write_of

    with atomic_path(str(tmp_path / "results.h5ad")) as temporary:  # the name atomic_path itself writes under
        assert is_write_of(os.path.basename(temporary), "results.h5ad")
        open(temporary, "w").close()
    assert is_write_of("results.h5ad", "results.h5ad") and is_write_of("results.partial-12.h5ad", "results.h5ad")
    for other in ("results.partial-x.h5ad", "results.partial-12.h5ad.h5ad", "a_results.partial-12.h5ad", "results.npz"):
        assert not is_write_of(other, "results.h5ad")
