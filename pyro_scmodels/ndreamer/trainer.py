"""NDreamer training on the package's one loop (:class:`~pyro_scmodels.training.TrainingLoop`)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..training import TrainingLoop
from . import _constants as K
from .losses import LossWeights, total_loss
from .network import NDreamerNetwork

# the unweighted parts total_loss reports, one history column each
LOSS_PARTS = ("mse", "cosine", "kl", "correlation", "independence", "dependence", "triplet", "neighbourhood", "codebook")


class NDreamerTrainer(TrainingLoop):
    """AdamW on :func:`~pyro_scmodels.ndreamer.losses.total_loss` with balanced group draws (SPEC 3.4).

    An epoch is one pass: ``ceil(n_cells / batch_size)`` steps, each drawing
    ``max(2, batch_size // n_groups)`` cells from every batch x condition group (with
    replacement for groups smaller than that). After every step the network counts the step
    and re-initialises dead codes on its schedule (:meth:`NDreamerNetwork.step_end`).
    History: one row per pass with the mean training loss and the mean of every loss part.

    Parameters
    ----------
    network
        The network to train.
    minibatch
        ``cells -> batch dict`` for :func:`total_loss` (``x``, ``condition``, ``batches``, labels).
    groups
        Batch x condition group of every cell.
    batch_size, lr, loss_weights
        Cells per step (before balancing), AdamW learning rate, loss weights.
    fingerprint
        What a checkpoint must match to be resumed.
    """

    description = "NDreamer"

    def __init__(self, network: NDreamerNetwork, minibatch: Callable[[np.ndarray], dict], groups: np.ndarray,
                 batch_size: int = K.BATCH_SIZE, lr: float = K.LEARNING_RATE, loss_weights: LossWeights | None = None,
                 fingerprint: dict | None = None):
        super().__init__({"network": network}, fingerprint, history_columns=("train_loss", *LOSS_PARTS))
        self.network, self.minibatch, self.lr = network, minibatch, lr
        self.loss_weights = loss_weights or LossWeights()
        self.members = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups)]
        self.per_group = max(K.MIN_CELLS_PER_GROUP_DRAW, batch_size // len(self.members))
        self.n_cells, self.batch_size = len(groups), batch_size
        self.steps_per_pass = max(1, math.ceil(self.n_cells / batch_size))
        self._projections: torch.Tensor | None = None

    def steps_for(self, passes: float) -> int:
        """Optimiser steps in ``passes`` passes over the data (at least one)."""
        return max(1, math.ceil(passes * self.n_cells / self.batch_size))

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the network's parameters."""
        return torch.optim.AdamW(self.network.parameters(), lr=self.lr)

    def minibatches(self, plan, rng: np.random.Generator):
        """One pass of balanced draws: the same number of cells from every group per step."""
        for _ in range(self.steps_per_pass):
            yield np.concatenate([rng.choice(m, self.per_group, replace=len(m) < self.per_group) for m in self.members])

    def minibatch_loss(self, cells: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:func:`total_loss` of the network on ``cells``."""
        batch = self.minibatch(cells)
        outputs = self.network(batch["x"], batch["condition"], batch["batches"])
        self._projections = outputs["projections"].detach()
        return total_loss(outputs, batch, self.loss_weights)

    def after_step(self, cells: np.ndarray) -> None:
        """Dead-code bookkeeping: count the step, re-initialise rarely used codes on schedule."""
        self.network.step_end(self._projections)
        self._projections = None

    def extra_state(self) -> dict:
        """The network's step counter of the dead-code schedule (not part of its state_dict)."""
        return {"steps_since_reset": self.network.steps_since_reset}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`."""
        self.network.steps_since_reset = state["steps_since_reset"]
