"""``pyro-scmodels fit --devices N``: the command run again under torchrun, one process per device.

The launching process, once the command has checked the input, starts torchrun (:func:`launch_torchrun`) and
passes Ctrl-C on to it; each process prefixes its errors with its rank (:func:`rank_prefix`), stops on SIGTERM as
on Ctrl-C (:func:`stop_signals_as_interrupt`) and closes its process group at the end (:func:`leave_process_group`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading

from .distributed import launched_world_size

def launch_torchrun(argv: list[str], devices: int) -> int:
    """``fit --devices N`` outside torchrun: run the same command under ``torchrun --standalone`` with N processes.

    Parameters
    ----------
    argv
        The command's arguments, as given.
    devices
        Processes to start.

    Returns
    -------
    int
        torchrun's exit code.

    Raises
    ------
    KeyboardInterrupt
        After Ctrl-C, SIGTERM or SIGHUP, once torchrun has stopped (the command then says how to resume).

    torchrun runs in a session of its own, so that a terminal's Ctrl-C reaches this process only; this then sends
    torchrun one SIGINT, which it passes to the processes (they write their checkpoint and stop), and waits: the run
    has stopped, and its folder is no longer written, when the command returns. Killing torchrun, as
    ``subprocess.call`` does, left the processes training and writing on; a second SIGINT to torchrun, on top of the
    terminal's, cut its graceful stop short. A second Ctrl-C here stops it. SIGTERM and SIGHUP (a scheduler, a closed
    terminal) are passed on too, as SIGINT, and this waits for torchrun to stop.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
               "-m", "pyro_scmodels", *argv]
    print(f"Starting {devices} processes: {shlex.join(command[1:])}", file=sys.stderr)
    process = subprocess.Popen(command, start_new_session=True)

    stopped = []

    def forward(number, frame):
        # SIGTERM, SIGHUP no longer reach torchrun's own session unless passed on; passed on as SIGINT, the stop that
        # the processes turn into a checkpoint (torchrun hands its processes the signal it got)
        stopped.append(number)
        if len(stopped) == 1:  # once: a second SIGINT cuts torchrun's graceful stop short
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)

    with _stop_signals_handled_by(forward):
        try:
            code = process.wait()
        except KeyboardInterrupt:
            try:
                if stopped:  # SIGTERM or SIGHUP was passed on already: this is the second stop
                    raise
                stopped.append(signal.SIGINT)  # a SIGTERM or SIGHUP from now on sends no second SIGINT
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGINT)
                process.wait()
            except KeyboardInterrupt:
                process.terminate()
                process.wait()
            raise
    if stopped:  # the run was stopped, not finished: the command ends as after Ctrl-C (exit 130, how to resume)
        raise KeyboardInterrupt(f"signal {signal.Signals(stopped[0]).name}")
    return code


@contextlib.contextmanager
def _stop_signals_handled_by(handler):
    """Inside, ``handler`` receives SIGTERM and SIGHUP (a scheduler's stop, a closed terminal); the earlier handlers
    are restored after. Only in the main thread, where Python runs signal handlers. A signal the process was started
    with ignored stays ignored (``nohup`` ignores SIGHUP so that the run outlives its terminal), as Python leaves an
    ignored SIGINT alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(number) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for number, earlier in previous.items():
            signal.signal(number, earlier)


def stop_signals_as_interrupt():
    """A context inside which SIGTERM and SIGHUP raise ``KeyboardInterrupt``, as Ctrl-C does.

    The training loops write their checkpoint on ``KeyboardInterrupt`` and the command says how to resume; by default
    these signals ended the process where it stood, with every epoch since the last periodic checkpoint lost.
    """
    def interrupt(number, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(number).name}")

    return _stop_signals_handled_by(interrupt)


def rank_prefix() -> str:
    """``" (rank r)"`` in a distributed run, so that each process's error is told apart."""
    return f" (rank {os.environ['RANK']})" if launched_world_size() > 1 else ""


def leave_process_group() -> None:
    """Close the torch.distributed process group that training started (a torchrun launch)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def read_for_the_launch_check(path: str, backed: bool, layer: str | None):
    """The input as ``fit --devices N`` checks it before the launch: backed, so that its counts are checked a chunk
    at a time, unless the processes will read it whole anyway (no ``--backed``, counts in a CSC X, which a backed
    setup refuses).

    Parameters
    ----------
    path
        The input ``.h5ad``.
    backed, layer
        ``fit``'s ``--backed`` and ``--layer``.

    Returns
    -------
    anndata.AnnData
        The data, backed or in memory.
    """
    from anndata import read_h5ad

    adata = read_h5ad(path, backed="r")
    try:
        csc = not backed and layer is None and getattr(adata.X, "format", None) == "csc"
    except KeyError:  # no X in the file: the setup names the problem
        csc = False
    if csc:
        adata.file.close()
        adata = read_h5ad(path)
    return adata
