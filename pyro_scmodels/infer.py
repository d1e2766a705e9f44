"""SVI on the package's one training loop (:class:`~pyro_scmodels.training.TrainingLoop`).

``SVITrainer`` fits a Pyro model/guide pair with Adam on the negative ELBO (``Trace_ELBO``, or the
same loss computed directly where the model and guide provide it: :class:`~pyro_scmodels.elbo.ELBOLoss`): minibatches from
:class:`~pyro_scmodels.data.CellData`, KL warm-up and a validation loss; the loop it inherits
adds gradient clipping, NaN/Inf detection that names the culprit, early stopping,
checkpoints with resume, a tqdm progress bar and a per-epoch history.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from pyro import poutine

from . import _constants as C
from . import _validation as V
from ._stacklevel import user_stacklevel
from .data import CellData, iterate_minibatches
from .data.on_disk import chunk_grouped_minibatches, chunk_shuffled_order, read_ahead_groups
from .elbo import ELBOLoss, check_compile_works
from .pyro_modules import PositiveSiteGuide
from .optimizers import fused_optimizer
from .training import LoopPlan, NonFiniteError, TrainingLoop  # noqa: F401  (NonFiniteError: its old import path)

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA device when there is one, else CPU; otherwise checked as given."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise V.ArgumentTypeError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available; use device='cpu' or 'auto'.")
        parsed = torch.device(device)
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
        return parsed
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.")


def split_cells(n_cells: int, train_size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random train / validation split of ``range(n_cells)`` (both sorted)."""
    train_size = V.fraction("train_size", train_size)
    if train_size < 1.0 and n_cells < 2:
        raise ValueError(f"{n_cells} cell cannot be split into training and validation cells (train_size={train_size}); "
                         "give more cells, or pass train_size=1.0 to train on it without validation.")
    permutation = rng.permutation(n_cells)
    n_train = n_cells if train_size == 1.0 else min(n_cells - 1, max(1, int(round(train_size * n_cells))))
    return np.sort(permutation[:n_train]), np.sort(permutation[n_train:])


def early_stopping_setting(asked: bool | None, n_validation: int) -> bool:
    """Whether a call stops early: it watches the validation loss, so it needs validation cells.

    Parameters
    ----------
    asked
        ``early_stopping`` as given: None (left out) means on when there are validation cells, and off, with one logged
        line, when there are none (``train_size=1.0``); True without validation cells is refused.
    n_validation
        The call's validation cells.

    Returns
    -------
    bool
        Whether to stop early.

    Raises
    ------
    ValueError
        ``asked`` is True and there are no validation cells.
    """
    if asked is None:
        if n_validation == 0:
            logger.warning("No validation cells (train_size=1.0): early stopping is off, and every epoch is trained.")
        return n_validation > 0
    asked = V.boolean("early_stopping", asked)
    if asked and n_validation == 0:
        # the loop would watch the training loss instead: a stop on another loss than the one asked for
        raise ValueError("early_stopping=True stops on the validation loss, and this call has no validation cells "
                         "(train_size=1.0): pass train_size below 1 (e.g. 0.9) to stop early, or early_stopping=False to train "
                         "every epoch on all cells.")
    return asked


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' default: ``min(400, round(20000 / n_cells * 400))``."""
    return int(min(C.MAX_EPOCHS_CAP, max(1, round(C.MAX_EPOCHS_CELL_BUDGET / n_cells * C.MAX_EPOCHS_CAP))))


@dataclass
class TrainingPlan(LoopPlan):
    """Settings of one call to :meth:`SVITrainer.fit`: the loop's settings plus minibatch size and KL warm-up.

    Early stopping (None: on when there are validation cells; see :func:`early_stopping_setting`) watches the
    validation loss, computed every ``validate_every`` epochs (scvi-tools' ``check_val_every_n_epoch``).
    """

    early_stopping: bool | None = None
    batch_size: int = C.BATCH_SIZE
    kl_warmup_epochs: int | None = C.KL_WARMUP_EPOCHS
    kl_warmup_steps: int | None = None
    validate_every: int = 1

    def kl_weight(self, epoch: int, step: int) -> float:
        """Weight of the KL terms at this epoch and step (linear warm-up, then 1)."""
        if self.kl_warmup_steps:
            weight = step / self.kl_warmup_steps
        elif self.kl_warmup_epochs:
            weight = epoch / self.kl_warmup_epochs
        else:
            weight = 1.0
        # poutine.scale needs a positive scale: the warm-up starts just above 0, not at 0
        return min(1.0, max(weight, C.MIN_KL_WEIGHT))


class SVITrainer(TrainingLoop):
    """Stochastic variational inference for a model/guide pair of ``LocalPyroModule``s.

    The Pyro ELBO specialisation of :class:`~pyro_scmodels.training.TrainingLoop`: an epoch is
    one shuffled pass over the training cells, the loss is the negative ELBO per cell, and
    each epoch also records the validation loss (monitored for early stopping) and KL weight.

    In a data-parallel run (:meth:`~pyro_scmodels.training.TrainingLoop.use_parallel`) every rank
    draws the same minibatches and takes its shard of each; the loss module is wrapped in
    ``DistributedDataParallel`` and the cell plate is rescaled so that the ranks' mean loss is
    the loss of the whole minibatch (see :mod:`~pyro_scmodels.distributed`).

    Parameters
    ----------
    model, guide
        Callables ``model(batch, n_obs, kl_weight)`` and ``guide(batch, n_obs, kl_weight)``.
    data
        The cells.
    train_indices, validation_indices
        Which cells train and which validate (the latter may be empty).
    lr, eps, weight_decay
        Adam settings.
    global_lr_factor
        The guides of the global sites (:class:`~pyro_scmodels.pyro_modules.PositiveSiteGuide`: ambient,
        feature scaling, dispersion) learn at ``global_lr_factor`` x ``lr``.
    fingerprint
        What a checkpoint must match to be resumed: cells, genes, sizes and settings.
    """

    data_parallel = True

    def __init__(self, model, guide, data: CellData, train_indices, validation_indices,
                 lr: float = C.LEARNING_RATE, eps: float = C.ADAM_EPS, weight_decay: float = C.WEIGHT_DECAY,
                 fingerprint: dict | None = None, global_lr_factor: float = 1.0):
        super().__init__({"model": model, "guide": guide}, fingerprint,
                         history_columns=("train_loss", "validation_loss", "kl_weight"))
        self.model, self.guide, self.data = model, guide, data
        self.train_indices = np.asarray(train_indices)
        self.validation_indices = np.asarray(validation_indices)
        self.elbo_loss = ELBOLoss(model, guide)
        self._step_loss, self._wrapped_for = self.elbo_loss, self.parallel  # the loss a step calls (DDP-wrapped)
        self.lr, self.eps, self.weight_decay, self.global_lr_factor = lr, eps, weight_decay, global_lr_factor
        # what this call asked for: a resumed checkpoint brings back its own, and after_resume takes these up again
        self._requested = dict(lr=lr, eps=eps, weight_decay=weight_decay, global_lr_factor=global_lr_factor)
        self._requested_split = (self.train_indices.copy(), self.validation_indices.copy())
        self._plan: TrainingPlan | None = None
        self._kl_weight = 1.0
        self._current: tuple | None = None  # (batch, n_obs, kl_weight) of the step in progress
        self.kl_warmup: tuple | None = None  # (epochs, steps) of the KL warm-up of the last call (call_warmup)

    def call_warmup(self, asked: tuple, given: bool) -> tuple:
        """The KL warm-up ``(epochs, steps)`` of a call to train(), recorded for the next call (and kept in the state).

        Parameters
        ----------
        asked
            ``(kl_warmup_epochs, kl_warmup_steps)`` of the call (the defaults when not given).
        given
            The call asked for a warm-up (:func:`~pyro_scmodels.models.train_options.warmup_given`): it is used as
            asked, counted over all the model's epochs (or steps), from its first one.

        Returns
        -------
        tuple
            ``asked`` when given or the model has not trained; else the model's own warm-up goes on: that of its last
            call, or (a state saved before it was recorded) none when the KL weight before this call had reached 1.
            A call that takes up an interrupted one, or a run resumed from a checkpoint, so repeats its warm-up.
        """
        if not given and self.kl_warmup is not None:
            asked = self.kl_warmup
        elif not given:
            weights = self.history["kl_weight"]
            before = weights[weights.index < self.call_start()[0]]
            if len(before) and before.iloc[-1] >= 1.0:
                asked = (0, None)
        self.kl_warmup = tuple(asked)
        return self.kl_warmup

    def set_optimizer_settings(self, lr: float, eps: float, weight_decay: float, global_lr_factor: float = 1.0) -> None:
        """Use new Adam settings from the next step on (the moment estimates are kept)."""
        self.lr, self.eps, self.weight_decay, self.global_lr_factor = lr, eps, weight_decay, global_lr_factor
        # the settings of the latest call: a checkpoint resumed after a first call that failed before its first
        # epoch must not bring that call's settings back
        self._requested = dict(lr=lr, eps=eps, weight_decay=weight_decay, global_lr_factor=global_lr_factor)
        if self.optimizer is None:
            return
        groups = self._parameter_groups()
        if len(groups) != len(self.optimizer.param_groups):  # one group <-> two: a new optimiser, same moments
            moments, self.optimizer = self.optimizer.state, self.build_optimizer()
            for parameter, state in moments.items():
                self.optimizer.state[parameter] = state
            return
        for group, settings in zip(self.optimizer.param_groups, groups):
            group.update(lr=settings.get("lr", lr), eps=eps, weight_decay=weight_decay)

    def use_compiled_loss(self, enabled: bool, device: torch.device) -> None:
        """Training steps compute the loss through ``torch.compile`` (:meth:`ELBOLoss.use_compiled`) or eagerly.

        Checks first that ``torch.compile`` works on ``device`` (:func:`~pyro_scmodels.elbo.check_compile_works`).
        """
        if enabled:
            check_compile_works(device)
        self.elbo_loss.use_compiled(enabled)

    def _parameter_groups(self) -> list[dict]:
        """Adam's parameter groups: all parameters, or, with a ``global_lr_factor`` other than 1, the global
        sites' guides apart, at that multiple of the learning rate (one group otherwise, as saved models have)."""
        parameters = self.parameters()
        if self.global_lr_factor == 1.0:
            return [{"params": parameters}]
        chosen = {id(p) for m in self.guide.modules() if isinstance(m, PositiveSiteGuide) for p in m.parameters()}
        return [{"params": [p for p in parameters if id(p) not in chosen]},
                {"params": [p for p in parameters if id(p) in chosen], "lr": self.lr * self.global_lr_factor}]

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the model's and the guide's parameters (:meth:`_parameter_groups`)."""
        # torch's default is a loop over the parameters on the CPU (it cost 5 ms of a 70 ms step at batch 128)
        return fused_optimizer(torch.optim.Adam, self._parameter_groups(), lr=self.lr, eps=self.eps,
                               weight_decay=self.weight_decay)

    def loss(self, batch: dict, n_obs: int, kl_weight: float) -> torch.Tensor:
        """Negative ELBO of a minibatch, per cell of the ``n_obs``-cell dataset."""
        return self.elbo_loss(batch, n_obs, kl_weight)

    # --- loop hooks ------------------------------------------------------------------------
    def prepare(self) -> None:
        """A first pass creates lazily-initialised parameters before the optimiser sees them."""
        with torch.no_grad():
            self.loss(self.data.minibatch(self.train_indices[: min(2, len(self.train_indices))]), len(self.train_indices), 1.0)

    def minibatches(self, plan: TrainingPlan, rng: np.random.Generator):
        """Shuffled minibatches of the training cells (their indices).

        Counts in memory: one random permutation. Counts on disk: shuffled chunks of neighbouring
        cells, shuffled again within buffers (:func:`~pyro_scmodels.data.on_disk.chunk_shuffled_order`),
        each buffer's rows read ahead in one pass, each minibatch's cells grouped by chunk so that a
        data-parallel rank's shards come from about 1 / W of the buffer's chunks.
        """
        self._plan, self._kl_weight = plan, 1.0
        if not self.data.on_disk:
            yield from iterate_minibatches(self.train_indices, plan.batch_size, shuffle=True, rng=rng)
            return
        order, chunk_rank = chunk_shuffled_order(self.train_indices, rng, return_chunk_rank=True)
        batches = chunk_grouped_minibatches(order, chunk_rank, plan.batch_size)
        try:
            for group in read_ahead_groups(batches):
                self.data.read_ahead(np.concatenate([self.parallel.shard(batch)[0] for batch in group]))
                yield from group
        finally:
            self.data.read_ahead(None)

    def minibatch_loss(self, indices: np.ndarray) -> tuple[torch.Tensor, dict]:
        """Negative ELBO per cell of one minibatch (this rank's shard of it) at the current KL weight."""
        n_obs = len(self.train_indices)
        self._kl_weight = self._plan.kl_weight(self.epoch, self.step)
        cells, local_factor = self.parallel.shard(indices)
        self._current = (self.data.minibatch(cells), n_obs, self._kl_weight)
        if self._wrapped_for is not self.parallel:
            # wrapped once the parameters exist; DDP hands rank 0's parameters to every rank
            self._step_loss, self._wrapped_for = self.parallel.wrap(self.elbo_loss), self.parallel
        return self._step_loss(*self._current, local_factor), {}

    def minibatch_weight(self, indices: np.ndarray) -> float:
        """Minibatches count by their number of cells."""
        return len(indices)

    def end_epoch(self, plan: TrainingPlan, train_loss: float, parts: dict) -> dict:
        """Training and validation loss and the epoch's last KL weight (validation every ``plan.validate_every`` epochs)."""
        # without validation cells the training loss is monitored, every epoch
        validated = len(self.validation_indices) == 0 or (self.epoch + 1) % plan.validate_every == 0
        # every rank takes the same decision, so the collective inside _validation_loss is reached by all
        validation_loss = self._validation_loss(plan.batch_size) if validated else float("nan")
        return {"train_loss": train_loss, "validation_loss": validation_loss, "kl_weight": self._kl_weight,
                "validated": validated}

    def extra_state(self) -> dict:
        """The train / validation split, and the global sites' learning-rate factor (Adam's groups follow it)."""
        return {"train_indices": self.train_indices, "validation_indices": self.validation_indices,
                "global_lr_factor": self.global_lr_factor, "kl_warmup": self.kl_warmup}

    def load_state(self, state: dict, source: str = "the saved state", check: bool = True) -> None:
        """As :meth:`TrainingLoop.load_state`, with Adam's groups built as they were saved."""
        self.global_lr_factor = state.get("global_lr_factor", 1.0)
        super().load_state(state, source, check)

    def load_extra_state(self, state: dict) -> None:
        """Restore the train / validation split."""
        self.train_indices, self.validation_indices = state["train_indices"], state["validation_indices"]
        self.kl_warmup = state.get("kl_warmup")  # None in states saved before it was recorded

    def after_resume(self) -> None:
        """A resumed run continues as a second call to ``train`` would: this call's Adam settings, the saved split.

        The checkpoint's optimiser state holds its learning rate and weight decay, and its split; without this the
        new call's ``lr``, ``weight_decay``, ``eps`` and ``global_lr_factor`` were silently dropped.
        """
        train, validation = self._requested_split
        # a call that asked for no split (train_size and external_indexing left out) is told nothing
        if getattr(self, "split_asked", True) and not (np.array_equal(np.sort(train), np.sort(self.train_indices))
                and np.array_equal(np.sort(validation), np.sort(self.validation_indices))):
            warnings.warn(
                f"The checkpoint's train/validation split ({len(self.train_indices)} / {len(self.validation_indices)} "
                f"cells) differs from the one this call asks for ({len(train)} / {len(validation)}: train_size, seed or "
                "external_indexing); the checkpoint's split is kept, as in a second call to train(). Remove the "
                "checkpoint to train with the new split.", stacklevel=user_stacklevel())
        self.set_optimizer_settings(**self._requested)

    # --- diagnostics -----------------------------------------------------------------------
    def diagnose(self, where: str, parts: dict) -> str:
        """Name the non-finite parameters, gradients and model/guide sites of the step in progress."""
        batch, n_obs, kl_weight = self._current
        problems = self._parameter_problems()
        try:
            with torch.no_grad():
                guide_trace = poutine.trace(self.guide).get_trace(batch, n_obs, kl_weight)
                model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(batch, n_obs, kl_weight)
            for label, trace in (("guide", guide_trace), ("model", model_trace)):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample":
                        continue
                    if not torch.isfinite(site["value"]).all():
                        problems.append(f"{label} site {name!r} (sampled value)")
                    elif not torch.isfinite(site["fn"].log_prob(site["value"])).all():
                        problems.append(f"{label} site {name!r} (log-probability)")
        except Exception as err:  # the diagnosis itself may fail on NaN inputs; say so
            problems.append(f"(tracing for diagnosis failed: {err})")
        return self._message(where, problems)

    @torch.no_grad()
    def evaluate(self, indices: np.ndarray, batch_size: int, kl_weight: float = 1.0) -> float:
        """Negative ELBO per cell of ``indices`` (eval mode, no gradient)."""
        if len(indices) == 0:
            return float("nan")
        return self._summed_loss(indices, len(indices), batch_size, kl_weight) / len(indices)

    def _validation_loss(self, batch_size: int) -> float:
        """Negative ELBO per validation cell, with the global terms weighted as in the training loss.

        Each cell's terms are averaged over the validation cells, and the global sites' prior terms are divided by the
        number of training cells, as in the training loss: divided by the (smaller) validation set, they lifted the
        validation curve by a few percent for no reason of fit. In a data-parallel run each rank takes a part and the
        sums are added.
        """
        n_obs = len(self.validation_indices)
        if n_obs == 0:
            return float("nan")
        part = self.parallel.split(self.validation_indices)
        n_train = max(len(self.train_indices), 1)
        return self.parallel.sum([self._summed_loss(part, n_train, batch_size, 1.0)])[0] / n_obs

    @torch.no_grad()
    def _summed_loss(self, indices: np.ndarray, n_obs: int, batch_size: int, kl_weight: float) -> float:
        """Sum over minibatches of ``indices`` of the per-cell loss of an ``n_obs``-cell set times the minibatch size."""
        self.model.eval()
        self.guide.eval()
        total = 0.0
        # counts on disk: in file order, so that a minibatch's cells come in a few contiguous runs
        order = np.sort(indices) if self.data.on_disk else indices
        for chunk in iterate_minibatches(order, batch_size, shuffle=False):
            # each minibatch estimates the whole set's ELBO; weight them by their share of cells
            total += self.loss(self.data.minibatch(chunk), n_obs, kl_weight).item() * len(chunk)
        return total

    def settle_plan(self, plan: TrainingPlan) -> None:
        """Early stopping as asked (None: on with validation cells), for the split trained: a checkpoint's, if resumed."""
        plan.early_stopping = early_stopping_setting(plan.early_stopping, len(self.validation_indices))
