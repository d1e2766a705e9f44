"""The package's one training loop, independent of what is trained.

:class:`TrainingLoop` owns everything a minibatch optimisation needs besides the loss itself:
the optimiser, gradient clipping, NaN/Inf detection that names the loss part or parameter
(:mod:`~pyro_scmodels.non_finite_checks`), checkpoints (atomic writes, fingerprint-checked
resume), per-epoch seeding (so a resumed run equals an uninterrupted one), Ctrl-C safety, early
stopping, a tqdm bar and a per-epoch ``history``. Subclasses fill in the hooks: which
minibatches an epoch draws (:meth:`~TrainingLoop.minibatches`), the loss of one
(:meth:`~TrainingLoop.minibatch_loss`), what happens after each step
(:meth:`~TrainingLoop.after_step`) and what an epoch records (:meth:`~TrainingLoop.end_epoch`).
:class:`~pyro_scmodels.infer.SVITrainer` (Pyro ELBO) and the NDreamer trainer are the two
specialisations.

Data-parallel training (:mod:`~pyro_scmodels.distributed`) plugs in through :attr:`TrainingLoop.parallel`:
the loop asks it whether any rank saw a NaN, for the epoch's loss over all ranks, whether this
process writes checkpoints, and for the checkpoint that the writing rank read.
"""

from __future__ import annotations

import logging
import math
import uuid
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import _constants as C
from . import _validation as V
from ._stacklevel import user_stacklevel
from ._allocator import reuse_freed_memory
from .checkpoints import LoopCheckpoints, refuse_other_data_on_other_ranks
from .distributed import SingleProcess
from .non_finite_checks import NonFiniteChecks, NonFiniteError, require_float32_default  # noqa: F401  (NonFiniteError: its import path)

logger = logging.getLogger(__name__)


@dataclass
class LoopPlan:
    """Settings of one call to :meth:`TrainingLoop.fit` (any object with these attributes works).

    Attributes
    ----------
    max_epochs
        Epochs counted over all calls (a resumed run counts the checkpoint's epochs).
    max_steps
        Optional cap on optimiser steps counted over all calls; the epoch it falls in is cut short.
    early_stopping, patience, min_delta
        Stop when the monitored loss (validation, else training) has not improved by more than
        ``min_delta`` for ``patience`` epochs.
    gradient_clip
        Maximum gradient norm; ``None`` for no clipping (and no gradient check).
    checkpoint_path, checkpoint_every
        Where to write the training state, and every how many epochs (also at the end).
    progress_bar
        Show a tqdm bar.
    """

    max_epochs: int
    max_steps: int | None = None
    early_stopping: bool = False
    patience: int = C.EARLY_STOPPING_PATIENCE
    min_delta: float = 0.0
    gradient_clip: float | None = C.GRADIENT_CLIP_NORM
    checkpoint_path: str | None = None
    checkpoint_every: int = 10
    progress_bar: bool = True

    def __post_init__(self):
        # every model trains here, so the settings are checked here once (a negative clip would flip the gradients)
        self.max_epochs = V.non_negative_int("max_epochs", self.max_epochs)
        self.max_steps = V.optional(V.non_negative_int, "max_steps", self.max_steps)
        # None: the subclass decides (SVI: on when there are validation cells)
        self.early_stopping = V.optional(V.boolean, "early_stopping", self.early_stopping)
        self.patience = V.positive_int("patience", self.patience)
        self.min_delta = V.non_negative_float("min_delta", self.min_delta)
        self.gradient_clip = V.optional(V.positive_float, "gradient_clip", self.gradient_clip)
        self.checkpoint_every = V.positive_int("checkpoint_every", self.checkpoint_every)
        self.progress_bar = V.boolean("progress_bar", self.progress_bar)


class TrainingLoop(LoopCheckpoints, NonFiniteChecks):
    """Minibatch gradient descent on named torch modules, with the hooks a subclass fills in.

    Parameters
    ----------
    modules
        Name -> module; their parameters are optimised, their state is checkpointed under these
        names, and NaN messages name parameters as ``"<name>.<parameter>"``.
    fingerprint
        What a checkpoint must match to be resumed (cells, genes, sizes, settings).
    history_columns
        Columns of :attr:`history` (one row per epoch), filled from :meth:`end_epoch`.
    """

    description = "Training"
    # whether the loss of a minibatch can be split across ranks (set by subclasses that support it)
    data_parallel = False

    def __init__(self, modules: dict[str, torch.nn.Module], fingerprint: dict | None = None,
                 history_columns: Iterable[str] = ("train_loss",)):
        self.modules = dict(modules)
        self.fingerprint = fingerprint or {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.history = pd.DataFrame(columns=list(history_columns))
        self.history.index.name = "epoch"
        self.epoch = 0
        self.step = 0
        self.interruption: str | None = None  # set by Ctrl-C during fit: how far training got
        # where the interrupted call started, and the state after its last whole epoch: the next call finishes it
        self._interrupted_call: dict | None = None
        self.seed: int | None = None  # the seed of the last call to fit (its epochs' draws), kept with the state
        self.run_id = uuid.uuid4().hex  # which run a checkpoint belongs to (a resume takes the checkpoint's)
        # a loop resumes a checkpoint until it has run an epoch or had a state restored (its epoch count may start
        # above 0: a saved model's history carried onto other cells)
        self._epochs_run = 0
        self._state_restored = False
        self._best = math.inf
        self._epochs_without_improvement = 0
        self.parallel = SingleProcess()

    def use_parallel(self, parallel) -> None:
        """Train in one process (:class:`~pyro_scmodels.distributed.SingleProcess`) or as one rank of several.

        Parameters
        ----------
        parallel
            A :class:`~pyro_scmodels.distributed.SingleProcess` or
            :class:`~pyro_scmodels.distributed.DataParallel`.
        """
        if parallel.world_size > 1 and not self.data_parallel:
            raise ValueError(f"{type(self).__name__} trains in one process only; drop devices/strategy or start one "
                             "process (not torchrun with several).")
        if parallel.world_size > 1:
            refuse_other_data_on_other_ranks(parallel, self.fingerprint)
        self.parallel = parallel

    # --- hooks -----------------------------------------------------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser over :meth:`parameters` (called once, lazily)."""
        raise NotImplementedError

    def minibatches(self, plan, rng: np.random.Generator) -> Iterator:
        """The minibatches of one epoch, drawn with ``rng`` (the epoch's seeded generator)."""
        raise NotImplementedError

    def minibatch_loss(self, item) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of one minibatch and its named parts (used for NaN messages and history)."""
        raise NotImplementedError

    def minibatch_weight(self, item) -> float:
        """Weight of a minibatch in the epoch's mean training loss (default: 1)."""
        return 1.0

    def after_step(self, item) -> None:
        """Called after every optimiser step (default: nothing)."""

    def end_epoch(self, plan, train_loss: float, parts: dict[str, float]) -> dict:
        """The epoch's history row (keys: :attr:`history` columns).

        ``validation_loss`` is monitored for early stopping if present; a row with
        ``"validated": False`` (validation skipped this epoch) is not monitored.
        """
        return {"train_loss": train_loss, **parts}

    def prepare(self) -> None:
        """Called before the optimiser is built (e.g. to create lazily initialised parameters)."""

    def extra_state(self) -> dict:
        """Subclass state that a checkpoint must also hold."""
        return {}

    def state(self, include_modules: bool = True) -> dict:
        """As :meth:`LoopCheckpoints.state`, with an interruption (Ctrl-C) and the call it cut short, so that a model
        saved after one warns after loading and its next ``train()`` finishes that call, as in memory."""
        state = super().state(include_modules)
        state["seed"] = self.seed
        if self.interruption:
            state["interruption"], state["interrupted call"] = self.interruption, self._interrupted_call
        return state

    def load_state(self, state: dict, source: str = "the saved state", check: bool = True) -> None:
        """As :meth:`LoopCheckpoints.load_state`, with the interruption :meth:`state` kept (None when it has none)."""
        super().load_state(state, source, check)
        self.interruption, self._interrupted_call = state.get("interruption"), state.get("interrupted call")
        self.seed = state.get("seed")

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`."""

    # --- parameters and modes --------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        """Every optimised parameter, module by module."""
        return [p for module in self.modules.values() for p in module.parameters()]

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``("<module>.<parameter>", parameter)`` pairs."""
        for prefix, module in self.modules.items():
            yield from ((f"{prefix}.{name}", p) for name, p in module.named_parameters())

    def _set_training(self, mode: bool) -> None:
        for module in self.modules.values():
            module.train(mode)

    def _make_optimizer(self) -> None:
        if self.optimizer is None:
            self.optimizer = self.build_optimizer()

    # --- one pass --------------------------------------------------------------------------
    @staticmethod
    def seed_epoch(seed: int, epoch: int) -> np.random.Generator:
        """Seed torch for one epoch; return its minibatch-order generator.

        Seeding per epoch makes a run resumed from a checkpoint identical to an uninterrupted one.
        Python's and numpy's global generators are left alone.
        """
        state = np.random.SeedSequence([seed, epoch]).generate_state(2)
        torch.manual_seed(int(state[0]))
        return np.random.default_rng(int(state[1]))

    def _train_epoch(self, plan, rng: np.random.Generator) -> tuple[float, dict[str, float]]:
        self._set_training(True)
        total, weights, sums = 0.0, 0.0, {}
        max_steps = plan.max_steps
        for item in self.minibatches(plan, rng):
            if max_steps is not None and self.step >= max_steps:
                break
            loss, parts = self._checked_loss(item)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # a NaN loss gives NaN gradients, never applied: the checks below stop first
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), plan.gradient_clip) if plan.gradient_clip else None
            # one copy to the host per step: on a GPU each .item() or bool() waits for the queued kernels
            values = self._to_host(loss, norm, parts)
            finite = math.isfinite(values[0])
            # every rank asks, so that one rank's NaN stops all of them (with that rank's message)
            if self.parallel.any(not finite):
                raise NonFiniteError(self.parallel.first_message(None if finite else self.diagnose("the loss", parts)))
            if norm is not None and not math.isfinite(values[1]):
                raise NonFiniteError(self.diagnose("the gradient", parts))
            self.optimizer.step()
            self.step += 1
            self.after_step(item)
            weight = self.minibatch_weight(item)
            total += values[0] * weight
            weights += weight
            for name, value in zip(parts, values[2:]):
                sums[name] = sums.get(name, 0.0) + value * weight
        # each rank's loss is its share of the global minibatch's: the epoch's loss is their mean
        total, *means = self.parallel.mean([total, *sums.values()])
        scale = 1.0 / weights if weights else math.nan
        return total * scale, {name: value * scale for name, value in zip(sums, means)}

    @staticmethod
    def _to_host(loss: torch.Tensor, norm: torch.Tensor | None, parts: dict) -> list[float]:
        """``[loss, gradient norm (NaN if none), *parts]`` as floats, in one device-to-host copy."""
        device, dtype = loss.device, loss.dtype
        scalars = [loss.detach(), torch.full((), math.nan, device=device, dtype=dtype) if norm is None else norm]
        scalars += [torch.as_tensor(value, device=device, dtype=dtype).detach() for value in parts.values()]
        return torch.stack([scalar.reshape(()).to(dtype) for scalar in scalars]).tolist()

    def _done(self, plan) -> bool:
        max_steps = plan.max_steps
        return self.epoch >= plan.max_epochs or (max_steps is not None and self.step >= max_steps)

    # --- the loop --------------------------------------------------------------------------
    def fit(self, plan, seed: int = 0) -> pd.DataFrame:
        """Train until ``plan.max_epochs`` / ``plan.max_steps`` (counted over all calls) or early stopping.

        A checkpoint at ``plan.checkpoint_path`` is resumed when this loop has not trained yet.
        On Ctrl-C the state after the last whole epoch is checkpointed (when checkpointing is on; the
        interrupted epoch's steps are trained again on resume, so the resumed run repeats the
        uninterrupted one), the modules keep the last step's parameters and are put back in eval
        mode, and ``KeyboardInterrupt`` is raised again.
        """
        require_float32_default()
        # each step frees and allocates the same large tensors: fresh pages for them cost more than the arithmetic
        with reuse_freed_memory():
            return self._fit(plan, seed)

    def settle_plan(self, plan) -> None:  # noqa: B027 (a hook)
        """Fill in what ``plan`` leaves to the loop (settings given as None), once a checkpoint, if any, is resumed."""

    def call_start(self) -> tuple[int, int]:
        """(epoch, step) that a call's number of epochs counts from: where an interrupted call started (the next
        call takes it up and finishes it), else where training stands."""
        call = self._interrupted_call
        return (call["epoch"], call["step"]) if self.interruption and call is not None else (self.epoch, self.step)

    def _fit(self, plan, seed: int) -> pd.DataFrame:
        call, self._interrupted_call = self._interrupted_call, None
        if self.interruption and call is not None and call["boundary"] is not None:
            # the interrupted epoch's steps are undone: the state after the last whole epoch, then those steps again,
            # as a resume from the checkpoint does (the run then repeats the uninterrupted one)
            self.load_state(call["boundary"], check=False)
            self.after_resume()  # this call's optimiser settings, as after a resume
            if self.parallel.is_writer:
                logger.info("Taking up the interrupted call from epoch %d, its last whole one.", self.epoch)
        self.interruption = None
        start = (self.epoch, self.step) if call is None else (call["epoch"], call["step"])
        resuming = bool(plan.checkpoint_path) and self._epochs_run == 0 and not self._state_restored
        if resuming:
            self._resume(plan.checkpoint_path)
        self.settle_plan(plan)  # after a resume: the checkpoint's split is the one trained
        if resuming:
            if self._state_restored and self.seed is not None and self.seed != seed and self.parallel.is_writer:
                # the split is the checkpoint's and the epochs left draw with this seed: a run of neither seed
                warnings.warn(f"The checkpoint at {plan.checkpoint_path} was trained with seed {self.seed}; this call's "
                              f"seed {seed} draws its remaining epochs, so the run repeats neither seed's. Pass "
                              f"seed={self.seed} to finish that run, or use another checkpoint folder.", UserWarning,
                              stacklevel=user_stacklevel())
            if self.epoch > plan.max_epochs and self.parallel.is_writer:
                logger.warning("The checkpoint holds %d epochs, more than the %d asked for: nothing is trained, and the "
                               "model is the checkpoint's.", self.epoch, plan.max_epochs)
            if plan.early_stopping and self._epochs_without_improvement >= plan.patience:
                # the checkpoint's run already stopped early: running the same call again finds it finished
                # (without this, each re-run trained one more epoch before the same test stopped it again)
                logger.info("The checkpoint's run stopped early at epoch %d; nothing left to train.", self.epoch)
                return self.history
        elif plan.checkpoint_path:
            self._refuse_another_runs_checkpoint(plan.checkpoint_path)
        if self.optimizer is None:
            self.prepare()
            self._make_optimizer()
        self.seed = seed
        writer = self.parallel.is_writer
        # the state at the last epoch boundary: what Ctrl-C writes (so that --resume repeats the uninterrupted run)
        # and what the next call starts from; kept by every rank, so that they all take the interrupted call up alike
        boundary = self._boundary_state()
        written = None  # the epoch whose state was last written (the end of the run need not write it again)
        bar = tqdm(total=plan.max_epochs, initial=min(self.epoch, plan.max_epochs), desc=self.description,
                   disable=not (plan.progress_bar and writer), unit="epoch")
        try:
            while not self._done(plan):
                rng = self.seed_epoch(seed, self.epoch)
                self.parallel.seed(seed, self.epoch)
                train_loss, parts = self._train_epoch(plan, rng)
                record = self.end_epoch(plan, train_loss, parts)
                self.history.loc[self.epoch] = [record.get(c, math.nan) for c in self.history.columns]
                self.epoch += 1
                self._epochs_run += 1
                bar.update(1)
                validation_loss = record.get("validation_loss", math.nan)
                # a loop without validation cells (NDreamer) shows no validation loss rather than nan
                shown = {"loss": f"{train_loss:.4g}"}
                if not math.isnan(validation_loss):
                    shown["val"] = f"{validation_loss:.4g}"
                bar.set_postfix(**shown)
                # an epoch whose validation was skipped (check_val_every_n_epoch) neither improves nor counts;
                # the stop test runs before the state is kept, so that a checkpoint holds its counters
                monitored = record.get("validated", True)
                stop = plan.early_stopping and monitored and self._should_stop(validation_loss, train_loss, plan)
                boundary = self._boundary_state()
                if plan.checkpoint_path and writer and self.epoch % plan.checkpoint_every == 0:
                    self._write_state(boundary, plan.checkpoint_path)
                    written = self.epoch
                if stop:
                    logger.info("Early stopping at epoch %d: no improvement > %.3g for %d epochs.", self.epoch, plan.min_delta, plan.patience)
                    break
        except KeyboardInterrupt:
            self.interruption = f"trained for {self.epoch} of {plan.max_epochs} epochs (interrupted at step {self.step})"
            self._interrupted_call = {"epoch": start[0], "step": start[1], "boundary": boundary}
            if plan.checkpoint_path and writer:
                # the last whole epoch's state, not the interrupted step's: a resumed run then repeats the
                # uninterrupted one bit for bit (the steps of the interrupted epoch are trained again)
                self._write_state(boundary, plan.checkpoint_path)
                logger.warning("Interrupted: %s; the state after epoch %d (the last whole one) written to %s.",
                               self.interruption, boundary["epoch"], plan.checkpoint_path)
            else:
                logger.warning("Interrupted: %s; the parameters of the last step are kept until the next call, which "
                               "starts again from epoch %d.", self.interruption, boundary["epoch"])
            raise
        finally:
            bar.close()
            self._set_training(False)
        if plan.checkpoint_path and writer and written != self.epoch:
            self.save_checkpoint(plan.checkpoint_path)
        return self.history

    def reset_early_stopping(self) -> None:
        """Forget the best loss so far: a new call to ``fit`` watches its own epochs (a checkpoint restores it)."""
        self._best = math.inf
        self._epochs_without_improvement = 0

    def _should_stop(self, validation_loss: float, train_loss: float, plan) -> bool:
        monitored = train_loss if math.isnan(validation_loss) else validation_loss
        if monitored < self._best - plan.min_delta:
            self._best = monitored
            self._epochs_without_improvement = 0
        else:
            self._epochs_without_improvement += 1
        return self._epochs_without_improvement >= plan.patience
