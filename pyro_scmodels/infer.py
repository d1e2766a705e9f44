"""The one SVI training loop every model uses.

``SVITrainer`` fits a Pyro model/guide pair with ``Trace_ELBO`` and a torch optimiser:
minibatches from :class:`~pyro_scmodels.data.CellData`, KL warm-up, gradient clipping,
NaN/Inf detection that names the culprit, early stopping on the validation loss,
checkpoints with resume, a tqdm progress bar and a per-epoch history.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from . import _constants as C
from .data import CellData, iterate_minibatches

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA device when there is one, else CPU; otherwise checked as given."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.")
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
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    permutation = rng.permutation(n_cells)
    n_train = n_cells if train_size == 1.0 else min(n_cells - 1, max(1, int(round(train_size * n_cells))))
    return np.sort(permutation[:n_train]), np.sort(permutation[n_train:])


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' default: ``min(400, round(20000 / n_cells * 400))``."""
    return int(min(C.MAX_EPOCHS_CAP, max(1, round(C.MAX_EPOCHS_CELL_BUDGET / n_cells * C.MAX_EPOCHS_CAP))))


class NonFiniteError(FloatingPointError):
    """Training produced NaN or Inf; the message names the site or parameter."""


@dataclass
class TrainingPlan:
    """Settings of one call to :meth:`SVITrainer.fit`."""

    max_epochs: int
    batch_size: int = C.BATCH_SIZE
    kl_warmup_epochs: int | None = C.KL_WARMUP_EPOCHS
    kl_warmup_steps: int | None = None
    early_stopping: bool = True
    patience: int = C.EARLY_STOPPING_PATIENCE
    min_delta: float = 0.0
    gradient_clip: float | None = C.GRADIENT_CLIP_NORM
    checkpoint_path: str | None = None
    checkpoint_every: int = 10
    progress_bar: bool = True

    def kl_weight(self, epoch: int, step: int) -> float:
        if self.kl_warmup_steps:
            weight = step / self.kl_warmup_steps
        elif self.kl_warmup_epochs:
            weight = epoch / self.kl_warmup_epochs
        else:
            weight = 1.0
        # poutine.scale needs a positive scale: the warm-up starts just above 0, not at 0
        return min(1.0, max(weight, C.MIN_KL_WEIGHT))


class SVITrainer:
    """Stochastic variational inference for a model/guide pair of ``LocalPyroModule``s.

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
    """

    def __init__(self, model, guide, data: CellData, train_indices, validation_indices,
                 lr: float = C.LEARNING_RATE, eps: float = C.ADAM_EPS, weight_decay: float = C.WEIGHT_DECAY,
                 fingerprint: dict | None = None):
        self.model, self.guide, self.data = model, guide, data
        # what a checkpoint must match to be resumed: cells, genes, sizes and settings
        self.fingerprint = fingerprint or {}
        self.train_indices = np.asarray(train_indices)
        self.validation_indices = np.asarray(validation_indices)
        self.elbo = Trace_ELBO()
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.optimizer: torch.optim.Optimizer | None = None
        self.history = pd.DataFrame(columns=["train_loss", "validation_loss", "kl_weight"])
        self.history.index.name = "epoch"
        self.epoch = 0
        self.step = 0
        self._best = math.inf
        self._epochs_without_improvement = 0

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters()) + list(self.guide.parameters())

    def set_optimizer_settings(self, lr: float, eps: float, weight_decay: float) -> None:
        """Use new Adam settings from the next step on (the moment estimates are kept)."""
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group.update(lr=lr, eps=eps, weight_decay=weight_decay)

    def _make_optimizer(self) -> None:
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, eps=self.eps, weight_decay=self.weight_decay)

    def loss(self, batch: dict, n_obs: int, kl_weight: float) -> torch.Tensor:
        """Negative ELBO of a minibatch, per cell of the ``n_obs``-cell dataset."""
        # the data were validated once at setup; per-step support checks only cost time
        with pyro.settings.context(validate_distributions_pyro=False, validate_distributions_torch=False):
            return self.elbo.differentiable_loss(self.model, self.guide, batch, n_obs, kl_weight) / n_obs

    # --- diagnostics -----------------------------------------------------------------------
    def _diagnose(self, batch: dict, n_obs: int, kl_weight: float, where: str) -> str:
        problems = [f"{name} (value)" for name, p in self._named_parameters() if not torch.isfinite(p).all()]
        problems += [
            f"{name} (gradient)" for name, p in self._named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
        ]
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
        found = "; ".join(problems) or "no single site or parameter identified"
        return (
            f"Training stopped at epoch {self.epoch}, step {self.step}: {where} is NaN or Inf. Non-finite: {found}. "
            "Try a lower learning rate (lr), a smaller gradient_clip, or check the input for extreme values."
        )

    def _named_parameters(self):
        yield from (("model." + n, p) for n, p in self.model.named_parameters())
        yield from (("guide." + n, p) for n, p in self.guide.named_parameters())

    # --- one pass --------------------------------------------------------------------------
    @staticmethod
    def seed_epoch(seed: int, epoch: int) -> np.random.Generator:
        """Seed torch (Pyro samples with torch's generator) for one epoch; return its minibatch-order generator.

        Seeding per epoch makes a run resumed from a checkpoint identical to an uninterrupted one.
        Python's and numpy's global generators are left alone.
        """
        state = np.random.SeedSequence([seed, epoch]).generate_state(2)
        torch.manual_seed(int(state[0]))
        return np.random.default_rng(int(state[1]))

    def _train_epoch(self, plan: TrainingPlan, rng: np.random.Generator) -> tuple[float, float]:
        self.model.train()
        self.guide.train()
        n_obs = len(self.train_indices)
        total, kl_weight = 0.0, 1.0
        for indices in iterate_minibatches(self.train_indices, plan.batch_size, shuffle=True, rng=rng):
            batch = self.data.minibatch(indices)
            kl_weight = plan.kl_weight(self.epoch, self.step)
            loss = self.loss(batch, n_obs, kl_weight)
            if not torch.isfinite(loss):
                raise NonFiniteError(self._diagnose(batch, n_obs, kl_weight, "the loss"))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if plan.gradient_clip:
                norm = torch.nn.utils.clip_grad_norm_(self.parameters(), plan.gradient_clip)
                if not torch.isfinite(norm):
                    raise NonFiniteError(self._diagnose(batch, n_obs, kl_weight, "the gradient"))
            self.optimizer.step()
            self.step += 1
            total += loss.item() * len(indices)
        return total / n_obs, kl_weight

    @torch.no_grad()
    def evaluate(self, indices: np.ndarray, batch_size: int, kl_weight: float = 1.0) -> float:
        """Negative ELBO per cell of ``indices`` (eval mode, no gradient)."""
        if len(indices) == 0:
            return float("nan")
        self.model.eval()
        self.guide.eval()
        n_obs, total = len(indices), 0.0
        for chunk in iterate_minibatches(indices, batch_size, shuffle=False):
            # each minibatch estimates the whole set's ELBO; weight them by their share of cells
            total += self.loss(self.data.minibatch(chunk), n_obs, kl_weight).item() * len(chunk)
        return total / n_obs

    # --- the loop --------------------------------------------------------------------------
    def fit(self, plan: TrainingPlan, seed: int = 0) -> pd.DataFrame:
        """Train until ``plan.max_epochs`` (counted over all calls) or early stopping."""
        if plan.checkpoint_path and os.path.exists(plan.checkpoint_path) and self.epoch == 0:
            self.load_checkpoint(plan.checkpoint_path)
            logger.info("Resumed from %s at epoch %d.", plan.checkpoint_path, self.epoch)
        # a first pass creates lazily-initialised parameters before the optimiser sees them
        if self.optimizer is None:
            with torch.no_grad():
                self.loss(self.data.minibatch(self.train_indices[: min(2, len(self.train_indices))]), len(self.train_indices), 1.0)
            self._make_optimizer()
        bar = tqdm(total=plan.max_epochs, initial=self.epoch, desc="Training", disable=not plan.progress_bar, unit="epoch")
        try:
            while self.epoch < plan.max_epochs:
                train_loss, kl_weight = self._train_epoch(plan, self.seed_epoch(seed, self.epoch))
                validation_loss = self.evaluate(self.validation_indices, plan.batch_size)
                self.history.loc[self.epoch] = [train_loss, validation_loss, kl_weight]
                self.epoch += 1
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4g}", val=f"{validation_loss:.4g}")
                if plan.checkpoint_path and self.epoch % plan.checkpoint_every == 0:
                    self.save_checkpoint(plan.checkpoint_path)
                if plan.early_stopping and self._should_stop(validation_loss, train_loss, plan):
                    logger.info("Early stopping at epoch %d: no improvement > %.3g for %d epochs.", self.epoch, plan.min_delta, plan.patience)
                    break
        finally:
            bar.close()
            self.model.eval()
            self.guide.eval()
        if plan.checkpoint_path:
            self.save_checkpoint(plan.checkpoint_path)
        return self.history

    def _should_stop(self, validation_loss: float, train_loss: float, plan: TrainingPlan) -> bool:
        monitored = train_loss if math.isnan(validation_loss) else validation_loss
        if monitored < self._best - plan.min_delta:
            self._best = monitored
            self._epochs_without_improvement = 0
        else:
            self._epochs_without_improvement += 1
        return self._epochs_without_improvement >= plan.patience

    # --- checkpoints -----------------------------------------------------------------------
    def state(self, include_modules: bool = True) -> dict:
        """Everything needed to continue training (the modules' parameters optionally left out)."""
        modules = {"model": self.model.state_dict(), "guide": self.guide.state_dict()} if include_modules else {}
        return {
            **modules,
            "fingerprint": self.fingerprint,
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "best": self._best,
            "epochs_without_improvement": self._epochs_without_improvement,
            "train_indices": self.train_indices,
            "validation_indices": self.validation_indices,
        }

    def load_state(self, state: dict, source: str = "the saved state") -> None:
        """Restore :meth:`state`; a state from other cells, genes or settings raises ``ValueError``."""
        saved = state.get("fingerprint", {})
        differing = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if differing:
            raise ValueError(
                f"{source} was written for different data or settings ({', '.join(differing)} differ); "
                "remove it or choose another checkpoint_dir."
            )
        if "model" in state:
            self.model.load_state_dict(state["model"])
            self.guide.load_state_dict(state["guide"])
        if state.get("optimizer") is not None:
            self._make_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = state["history"]
        self._best, self._epochs_without_improvement = state["best"], state["epochs_without_improvement"]
        self.train_indices, self.validation_indices = state["train_indices"], state["validation_indices"]

    def save_checkpoint(self, path: str) -> None:
        """Write the full training state (atomically: a crash never leaves half a file)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str) -> None:
        self.load_state(torch.load(path, map_location="cpu", weights_only=False), source=f"Checkpoint {path}")

    def move_optimizer_state(self) -> None:
        """After the modules moved device, move Adam's moment estimates with them."""
        if self.optimizer is not None:
            # load_state_dict casts each state tensor to its parameter's device
            self.optimizer.load_state_dict(self.optimizer.state_dict())
