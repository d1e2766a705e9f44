"""Data-parallel training on ``torch.distributed``: one process per device, launched by ``torchrun``.

Every process (rank) holds the whole model and draws the same global minibatches as a single
process would (the same seeded permutation); each rank computes the loss of its shard of every
minibatch, and PyTorch's ``DistributedDataParallel`` averages the gradients in ``backward``.
The training loop asks a :class:`SingleProcess` (the default) or a :class:`DataParallel` for
everything that differs between the two: which cells this rank takes, whether any rank saw a
NaN, the epoch's loss over all ranks, who writes files, and how the loss module is wrapped.

Plate scaling. In one process a minibatch B of the N training cells scales the cell plate by
N / |B| and counts the global sites once. Rank r takes the shard B_r of B, and DDP averages
the W ranks' gradients, so rank r's loss is::

    -(log p(globals) + (W |B_r| / |B|) (N / |B_r|) log p(shard B_r))

i.e. the cell plate is scaled by an extra ``W |B_r| / |B|`` (:class:`LocalScale` for Pyro's
``Trace_ELBO``; the ``local_factor`` argument of the direct form, ``guide.draw`` and
``model.log_joint``): the mean over ranks is the single-process loss of B, globals once and
cells N / |B|.
"""

from __future__ import annotations

import inspect
import logging
import os

import numpy as np
import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger

from . import _validation as V

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
CELL_PLATE = "cells"
LAUNCH_HINT = (
    "Data-parallel training runs one process per device, started by torchrun: "
    "`torchrun --nproc_per_node={n} your_script.py` (or `pyro-scmodels fit --devices {n} ...`). "
    "See docs/distributed.md."
)


class LocalScale(Messenger):
    """Multiply the scale of every site inside the cell plate by ``factor`` (globals untouched).

    Parameters
    ----------
    factor
        ``W |B_r| / |B|`` for rank r's shard (0 for a rank whose shard is only padding).
    plate
        Name of the plate whose sites are local.
    """

    def __init__(self, factor: float, plate: str = CELL_PLATE):
        super().__init__()
        self.factor, self.plate = float(factor), plate

    def _process_message(self, msg):
        if msg["type"] == "sample" and any(frame.name == self.plate for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


def shard(indices: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, float]:
    """Rank ``rank``'s share of a global minibatch and the factor of its cell plate.

    The minibatch is cut into ``world_size`` contiguous pieces whose sizes differ by at most one.
    A rank left without cells (a last minibatch smaller than ``world_size``) takes the first cell
    with factor 0: it still runs the step that every rank must run, and adds nothing local.

    Parameters
    ----------
    indices
        The global minibatch (cell positions), the same on every rank.
    rank, world_size
        This process and the number of processes.

    Returns
    -------
    (numpy.ndarray, float)
        The cells of this rank and ``world_size * len(shard) / len(indices)``.
    """
    indices = np.asarray(indices)
    piece = np.array_split(indices, world_size)[rank]
    if len(piece) == 0:
        return indices[:1], 0.0
    return piece, world_size * len(piece) / len(indices)


class SingleProcess:
    """The answers of a loop that runs in one process (every collective is the identity)."""

    rank = 0
    world_size = 1
    is_writer = True

    def shard(self, indices: np.ndarray) -> tuple[np.ndarray, float]:
        """This process's cells of a global minibatch and its plate factor (all of them, 1)."""
        return np.asarray(indices), 1.0

    def split(self, indices: np.ndarray) -> np.ndarray:
        """This process's part of a set of cells evaluated without gradient (all of them)."""
        return np.asarray(indices)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process."""
        return bool(flag)

    def first_message(self, message: str | None) -> str | None:
        """The message of the first process that has one."""
        return message

    def mean(self, values: list[float]) -> list[float]:
        """Each value averaged over processes."""
        return list(values)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over processes."""
        return list(values)

    def from_writer(self, read):
        """``read()`` on the writing process, handed to every process (its exception raised on all)."""
        return read()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward computes the loss, wrapped for gradient averaging (unchanged)."""
        return module

    def seed(self, seed: int, epoch: int) -> None:
        """Seed this process's sampling for an epoch (one process keeps the loop's seeding)."""


class DataParallel(SingleProcess):
    """One rank of an initialised ``torch.distributed`` process group.

    Parameters
    ----------
    device
        This rank's device (``cuda:LOCAL_RANK`` or the CPU).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_writer = self.rank == 0

    def shard(self, indices):
        return shard(indices, self.rank, self.world_size)

    def split(self, indices):
        return np.array_split(np.asarray(indices), self.world_size)[self.rank]

    def _reduce(self, values, op) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.cpu()

    def any(self, flag):
        return bool(self._reduce([1.0 if flag else 0.0], dist.ReduceOp.MAX)[0] > 0)

    def first_message(self, message):
        messages = [None] * self.world_size
        dist.all_gather_object(messages, message)
        rank, first = next(((r, m) for r, m in enumerate(messages) if m is not None), (None, None))
        return None if first is None else f"(rank {rank} of {self.world_size}) {first}"

    def mean(self, values):
        return (self._reduce(list(values), dist.ReduceOp.SUM) / self.world_size).tolist() if values else []

    def sum(self, values):
        return self._reduce(list(values), dist.ReduceOp.SUM).tolist() if values else []

    def from_writer(self, read):
        box = [None]
        if self.is_writer:
            try:
                box[0] = ("value", read())
            except Exception as err:  # handed to every rank, so that all stop with the same error
                box[0] = ("error", err)
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def wrap(self, module):
        from torch.nn.parallel import DistributedDataParallel

        # the graph is the same at every step (static_graph: parameters unused by a model are
        # handled once); buffers are constants (priors), so they are not re-synchronised per step
        # (newer torch renames broadcast_buffers to forward_sync_buffers)
        names = inspect.signature(DistributedDataParallel.__init__).parameters
        buffers = {"forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers": False}
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, static_graph=True, **buffers)

    def seed(self, seed, epoch):
        # every rank draws the same minibatch order, but its own noise (z, dropout) for its own cells
        state = np.random.SeedSequence([seed, epoch, self.rank]).generate_state(1)
        torch.manual_seed(int(state[0]))


# --- set-up --------------------------------------------------------------------------------
def launched_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_writer() -> bool:
    """Whether this process writes outputs: rank 0 of a distributed run, or the only process.

    Scripts launched with ``torchrun`` guard their own writes with it (``if is_writer(): model.save(...)``).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _checked_devices(devices) -> int | None:
    """``devices`` as a count (None for ``"auto"`` / not given); a list counts its entries."""
    if devices is None or devices == "auto":
        return None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return V.positive_int("devices", devices)


def _rank_device(accelerator: str | None, device: str) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for a GPU run, else the CPU.

    ``device`` is checked as in one process: a misspelt name, or ``"cuda"`` without CUDA, is refused (a node whose
    CUDA failed would otherwise train on its CPU without a word), and so is ``device`` together with ``accelerator``.
    """
    from .infer import resolve_device  # imported here: infer imports this module (through elbo)

    device = str(device)
    if device != "auto" and accelerator not in (None, "auto"):
        raise ValueError(f"Pass either device (got {device!r}) or accelerator (got {accelerator!r}), not both.")
    if device != "auto":
        # raises for a name it does not know and for "cuda" without CUDA; each rank then takes cuda:LOCAL_RANK
        wants_gpu = resolve_device(device).type == "cuda"
    else:
        wants_gpu = accelerator in (None, "auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                             "start at most one process per GPU (torchrun --nproc_per_node).")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if accelerator in ("gpu", "cuda"):
        raise ValueError(f"accelerator={accelerator!r} was requested but CUDA is not available; use accelerator='cpu'.")
    return torch.device("cpu")


def _single_device(device: str, accelerator: str | None, devices) -> torch.device:
    """The device of a one-process run, decided where the user classes decide it (scvi-tools' names included)."""
    from .models.train_options import training_device  # imported here: the models import this module

    return training_device(device, accelerator, devices)


def training_parallelism(device: str, accelerator: str | None, devices, strategy: str | None):
    """Whether a ``train`` call runs data-parallel, and on which device this process trains.

    Data-parallel when ``strategy="ddp"``, when ``devices`` asks for more than one device, or when
    the process was started by ``torchrun`` with ``WORLD_SIZE > 1``; it then needs ``torchrun``'s
    environment, and initialises the process group (gloo on the CPU, NCCL on GPUs) unless the
    caller already did.

    Parameters
    ----------
    device
        This package's device argument; used as given when not data-parallel.
    accelerator
        ``"auto"``, ``"cpu"``, ``"gpu"`` or ``"cuda"`` (scvi-tools' name); None when not given.
    devices
        Devices on this node: ``"auto"``, an int, or a list (its length counts); None when not given.
    strategy
        ``"auto"`` or ``"ddp"``; None when not given.

    Returns
    -------
    (torch.device, SingleProcess)
        The device this process trains on and the loop's parallel context.
    """
    if accelerator is not None:
        accelerator = V.choice("accelerator", accelerator, ACCELERATORS)
    if strategy is not None:
        strategy = V.choice("strategy", strategy, STRATEGIES)
    wanted = _checked_devices(devices)
    world = launched_world_size()
    if strategy != "ddp" and (wanted or 1) == 1 and world == 1:
        return _single_device(device, accelerator, devices), SingleProcess()
    if "WORLD_SIZE" not in os.environ and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"devices={devices!r}, strategy={strategy!r}: this process was not started by torchrun "
                         "(WORLD_SIZE is not set). " + LAUNCH_HINT.format(n=wanted or 2))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if wanted is not None and wanted != local_world:
        raise ValueError(f"devices={devices!r} but torchrun started {local_world} process(es) on this node; "
                         f"pass devices={local_world} (or 'auto'), or launch with --nproc_per_node={wanted}.")
    rank_device = _rank_device(accelerator, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if rank_device.type == "cuda" else "gloo")
        logger.info("Rank %d of %d joined the process group (%s).", dist.get_rank(), dist.get_world_size(), rank_device)
    return rank_device, DataParallel(rank_device)
