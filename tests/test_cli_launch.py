"""``pyro-scmodels fit --devices N``: the command run again under torchrun (checked before any process starts),
its processes stopped and resumed after Ctrl-C, and torchrun's signals passed on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pyro_scmodels as ps

from .test_distributed import _cells

# --- the command line under torchrun: killed after its first checkpoint, then resumed ----------
FIT = ["--batch-key", "batch", "--layer", "counts", "--max-epochs", "8", "--checkpoint-every", "2", "--batch-size", "40",
       "--n-hidden", "16", "--n-latent", "4", "--quiet"]


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line holds ``text`` (a unique temporary path)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if text.encode() in handle.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_interrupted_two_process_fit_stops_its_processes_and_resumes_from_its_checkpoint(tmp_path):
    data = str(tmp_path / "cells.h5ad")
    _cells(160, seed=5).write_h5ad(data)
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(ps.__file__)), env.get("PYTHONPATH", "")])
    def epochs(n: int) -> list[str]:
        return [*FIT[:FIT.index("--max-epochs")], "--max-epochs", str(n), *FIT[FIT.index("--max-epochs") + 2:]]

    # the interrupted run asks for many epochs, so that it is still training when it is interrupted (at its first
    # checkpoint, epoch 2); the resumed one for 40
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pyro_scmodels",
                "fit", data, "-o", out, *epochs(40)]
    options = epochs(1000)
    # `pyro-scmodels fit --devices 2`, stopped once it checkpointed: torchrun runs in a session of its own, so that the
    # launcher alone receives a stop (Ctrl-C, SIGTERM) and passes it on
    launcher = [sys.executable, "-m", "pyro_scmodels", "fit", data, "-o", out, *options, "--devices", "2"]
    # SIGINT at its default, as in a terminal: a process started in the background of a shell script (a CI job) has
    # it ignored, and Python then never raises KeyboardInterrupt
    first = subprocess.Popen(launcher, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = os.path.join(out, "checkpoint", "checkpoint.pt")
    deadline = time.time() + 240
    while not os.path.exists(checkpoint) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(checkpoint), first.communicate()[1][-3000:]
    # SIGTERM (a scheduler's stop): passed on as SIGINT, which torchrun hands its processes; they write their
    # checkpoint (SIGTERM itself killed them where they stood, with every epoch since the last checkpoint lost)
    os.kill(first.pid, signal.SIGTERM)
    error = first.communicate(timeout=120)[1]
    # the command returns once torchrun's processes have stopped: killed, torchrun left them training and writing
    assert first.returncode == 130 and "interrupted." in error, error[-3000:]
    assert _processes_mentioning(out) == [] and not os.path.exists(os.path.join(out, "results.h5ad"))
    assert 2 <= torch.load(checkpoint, weights_only=False)["epoch"] < 40  # whole: written before the processes stopped

    # without --quiet: the resume is reported at INFO level
    resumed = subprocess.run([*(a for a in torchrun if a != "--quiet"), "--resume"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs = [int(e) for e in re.findall(r"Resumed from .*checkpoint\.pt at epoch (\d+)", resumed.stderr)]
    assert len(epochs) == 1 and epochs[0] >= 2, resumed.stderr[-3000:]  # rank 0 read it, for both ranks
    assert resumed.stdout.count("Wrote ") == 1  # only rank 0 writes
    history = pd.read_csv(os.path.join(out, "history.csv"), index_col=0)
    assert list(history.index) == list(range(40)) and history["validation_loss"].notna().all()
    assert os.path.exists(os.path.join(out, "results.h5ad")) and os.path.exists(os.path.join(out, "model", "model.pt"))


def test_fit_devices_starts_torchrun_with_the_same_command(monkeypatch, tmp_path):
    """``pyro-scmodels fit --devices 2`` outside torchrun runs the same command under ``torchrun --standalone``."""
    from pyro_scmodels import cli, cli_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    started = []

    class Launched:  # torchrun, as subprocess.Popen starts it
        def __init__(self, command, start_new_session=False):
            assert start_new_session  # a terminal's Ctrl-C reaches the launcher only, which passes one SIGINT on
            started.append(command)
            self.signals = []

        def wait(self):
            return 0

    monkeypatch.setattr(cli_launch.subprocess, "Popen", Launched)
    cells = str(tmp_path / "cells.h5ad")
    _cells(40).write_h5ad(cells)
    argv = ["fit", cells, "-o", str(tmp_path / "out"), "--devices", "2", "--max-epochs", "3"]
    assert cli.main(argv) == 0
    assert started == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "pyro_scmodels", *argv]]
    assert not (tmp_path / "out").exists()  # checked by the launcher, left to the ranks to fill (not left empty)
    assert cli.main(["fit", cells, "-o", str(tmp_path / "out"), "--devices", "0"]) == 2  # checked first
    # the input file and the output folder are checked before any process starts (inside them, a refusal came
    # with torchrun's traceback and exit code 1)
    assert cli.main(["fit", str(tmp_path / "missing.h5ad"), "-o", str(tmp_path / "out"), "--devices", "2"]) == 2
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.h5ad").write_text("earlier")
    assert cli.main(["fit", cells, "-o", str(tmp_path / "done"), "--devices", "2"]) == 2
    # so are the options the processes would refuse: a layer or a key not in the file, the device, static conflicts
    not_h5ad, few_genes = tmp_path / "droplets.txt", tmp_path / "few_genes.h5ad"
    not_h5ad.write_text("barcode,count\n")
    _cells(40)[:, :5].copy().write_h5ad(few_genes)
    for options, message in ((["--layer", "nope"], "Layer 'nope' not found"),
                             (["--batch-key", "nope"], "'nope'"),
                             (["--device", "cuda"], "cuda"),
                             (["--latent-independence", "5"], "--latent-independence 5.0 cannot be trained with --devices 2"),
                             (["--backed", "--write-normalized"], "--write-normalized writes a dense"),
                             # empty droplets that are not an h5ad, or lack the data's genes: read before the launch
                             (["--empty-droplets", str(not_h5ad)], "--empty-droplets"),
                             (["--empty-droplets", str(few_genes)], "--empty-droplets")):
        code, error = _cli_error(cli, ["fit", cells, "-o", str(tmp_path / "out2"), "--devices", "2", *options])
        assert code == 2 and message in error and error.count("\n") == 1, (options, error)
    assert len(started) == 1 and not (tmp_path / "out2").exists()
    # a file whose counts are in a layer only (no X) is a valid input: launched
    cells_only_layer = _cells(40)
    layer_only = anndata.AnnData(obs=cells_only_layer.obs, var=cells_only_layer.var,
                                 layers={"counts": cells_only_layer.layers["counts"]})
    layer_only.write_h5ad(tmp_path / "layer_only.h5ad")
    assert cli.main(["fit", str(tmp_path / "layer_only.h5ad"), "-o", str(tmp_path / "out3"), "--devices", "2",
                     "--layer", "counts", "--batch-key", "batch"]) == 0
    assert len(started) == 2
    # every cell is checked before the launch: a fractional count in cell 1,100 (the launcher checked the first
    # 1,000 cells, and the processes found it with torchrun's traceback), in X read in memory and in a layer
    many = _cells(1_200)
    counts = many.layers["counts"].astype(np.float32)
    counts = counts.toarray() if hasattr(counts, "toarray") else counts
    counts[1_100, np.argmax(counts[1_100])] += 0.5
    many.X, many.layers["counts"] = sp.csr_matrix(counts), sp.csr_matrix(counts)
    many.write_h5ad(tmp_path / "late_bad.h5ad")
    for options in ([], ["--layer", "counts"]):
        code, error = _cli_error(cli, ["fit", str(tmp_path / "late_bad.h5ad"), "-o", str(tmp_path / "out4"), "--devices",
                                       "2", "--batch-key", "batch", *options])
        assert code == 2 and "non-integer values" in error and error.count("\n") == 1, (options, error)
    assert len(started) == 2 and not (tmp_path / "out4").exists()


def _cli_error(cli, argv) -> tuple[int, str]:
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    return code, stderr.getvalue()


def test_ctrl_c_of_a_launched_fit_stops_torchrun_and_waits_for_it(monkeypatch, tmp_path):
    """Ctrl-C passes SIGINT to torchrun and waits: killing it left the processes training and writing the folder."""
    from pyro_scmodels import cli, cli_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    events = []

    class Launched:
        def __init__(self, command, start_new_session=False):
            self.waits = 0

        def wait(self):
            self.waits += 1
            events.append(f"wait {self.waits}")
            if self.waits == 1:
                raise KeyboardInterrupt  # Ctrl-C while the processes train
            return -2

        def send_signal(self, number):
            events.append(f"signal {signal.Signals(number).name}")

        def kill(self):
            events.append("kill")

    monkeypatch.setattr(cli_launch.subprocess, "Popen", Launched)
    cells = str(tmp_path / "cells.h5ad")
    _cells(40).write_h5ad(cells)
    code, error = _cli_error(cli, ["fit", cells, "-o", str(tmp_path / "out"), "--devices", "2", "--overwrite"])
    assert code == 130 and events == ["wait 1", "signal SIGINT", "wait 2"]
    # SIGTERM (a scheduler) and SIGHUP (a closed terminal) reach torchrun's session only through the launcher
    events.clear()

    class Terminated(Launched):
        def wait(self):
            self.waits += 1
            events.append(f"wait {self.waits}")
            if self.waits == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the launcher while it waits
                return -15
            return 0

    monkeypatch.setattr(cli_launch.subprocess, "Popen", Terminated)
    handler = signal.getsignal(signal.SIGTERM)
    # passed on as SIGINT, once: the stop that torchrun's processes turn into a checkpoint (SIGTERM killed them where
    # they stood); the command then ends as after Ctrl-C
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        cli_launch.launch_torchrun(["fit"], 2)
    assert events == ["wait 1", "signal SIGINT"]
    # Ctrl-C, then SIGTERM (a scheduler) while torchrun stops: no second SIGINT, which cuts its stop short (SIGTERM,
    # not SIGHUP: under nohup, as in a CI job, SIGHUP is ignored and would test nothing)
    events.clear()

    class ClosedAfterCtrlC(Launched):
        def wait(self):
            self.waits += 1
            events.append(f"wait {self.waits}")
            if self.waits == 1:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            return -2

    monkeypatch.setattr(cli_launch.subprocess, "Popen", ClosedAfterCtrlC)
    with pytest.raises(KeyboardInterrupt):
        cli_launch.launch_torchrun(["fit"], 2)
    assert events == ["wait 1", "signal SIGINT", "wait 2"]
    assert signal.getsignal(signal.SIGTERM) is handler  # put back
    # the hint of a run started with --overwrite: --resume with --overwrite is refused
    assert "Rerun the same command without --overwrite and with --resume" in error


def test_a_csc_file_is_launched_unless_backed(monkeypatch, tmp_path):
    """The check before ``--devices 2`` reads the file backed; a CSC X, which each process reads whole without
    ``--backed``, was refused there as if it were to be read from disk."""
    import scipy.sparse as sp

    from pyro_scmodels import cli, cli_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    started = []

    class Launched:
        def __init__(self, command, start_new_session=False):
            started.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr(cli_launch.subprocess, "Popen", Launched)
    cells = _cells(40)
    cells.X = sp.csc_matrix(cells.X)
    path = str(tmp_path / "csc.h5ad")
    cells.write_h5ad(path)
    assert cli.main(["fit", path, "-o", str(tmp_path / "out"), "--devices", "2", "--max-epochs", "2"]) == 0
    assert len(started) == 1
    code, error = _cli_error(cli, ["fit", path, "-o", str(tmp_path / "out2"), "--devices", "2", "--backed"])
    assert code == 2 and "stored on disk as CSC" in error and "leave out --backed" in error, error
    assert len(started) == 1
