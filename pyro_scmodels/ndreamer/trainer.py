"""NDreamer training on the package's one loop (:class:`~pyro_scmodels.training.TrainingLoop`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..data.source_state import names_digest, setting_text, unordered_names_hash
from ..optimizers import fused_optimizer
from ..training import TrainingLoop
from . import _constants as K
from .losses import LossWeights, total_loss
from .network import NDreamerNetwork

# the unweighted parts total_loss reports, one history column each
LOSS_PARTS = ("mse", "cosine", "kl", "correlation", "independence", "dependence", "triplet", "neighbourhood", "codebook")


class NDreamerTrainer(TrainingLoop):
    """AdamW on :func:`~pyro_scmodels.ndreamer.losses.total_loss` with balanced group draws (SPEC 3.4).

    An epoch is one pass: ``ceil(n_cells / batch_size)`` steps (at least one), each drawing
    ``max(2, batch_size // n_groups)`` cells from every batch x condition group (with
    replacement for groups smaller than that); with fewer cells than ``batch_size``, a pass is one
    step that draws more cells than the data hold.

    Dead codes are re-initialised (:meth:`NDreamerNetwork.reinitialise_dead_codes`) on a schedule
    of data seen, not of steps: once ``reset_every`` cells have been drawn since the last reset,
    where ``reset_every`` is ``DEAD_CODE_RESET_CELLS`` (30 default minibatches) or
    ``DEAD_CODE_RESET_PASSES`` (10) passes over the data, whichever is smaller. A fixed step count
    never came round on small data: with fewer than about 2,000 cells, the default 15 passes are
    fewer than 30 steps. Once per pass resets too often (see ``_constants``).
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
        # the caller's object, not a copy: NDreamer keeps its own copy and trains, saves and fingerprints with it
        self.loss_weights = LossWeights() if loss_weights is None else loss_weights
        self.members = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups)]
        self.per_group = max(K.MIN_CELLS_PER_GROUP_DRAW, batch_size // len(self.members))
        self.n_cells, self.batch_size = len(groups), batch_size
        self.steps_per_pass = max(1, math.ceil(self.n_cells / batch_size))
        # cells drawn in a pass (more than the data hold when they are fewer than one batch)
        cells_per_pass = self.steps_per_pass * self.per_group * len(self.members)
        self.reset_every = min(K.DEAD_CODE_RESET_CELLS, K.DEAD_CODE_RESET_PASSES * cells_per_pass)
        self.cells_since_reset = 0
        self.resets = 0  # dead-code checks run so far
        self._projections: torch.Tensor | None = None

    def steps_for(self, passes: float) -> int:
        """Optimiser steps in ``passes`` passes (epochs of ``steps_per_pass`` steps; at least one step).

        A whole number of passes is a whole number of the loop's epochs, so that ``train(2)`` twice is
        ``train(4)``, a run resumed after whole passes repeats the uninterrupted one, and the history has one
        row per pass. (Counting ``passes * n_cells / batch_size`` steps instead ended most calls inside an
        epoch whenever ``n_cells`` is not a multiple of ``batch_size``.)
        """
        return max(1, math.ceil(passes * self.steps_per_pass - 1e-9))

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the network's parameters."""
        return fused_optimizer(torch.optim.AdamW, self.network.parameters(), lr=self.lr)

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
        """Dead-code bookkeeping: count the cells drawn, re-initialise rarely used codes when due."""
        self.cells_since_reset += len(cells)
        if self.cells_since_reset >= self.reset_every:
            self.network.reinitialise_dead_codes(self._projections)
            self.cells_since_reset = 0
            self.resets += 1
        self._projections = None

    def extra_state(self) -> dict:
        """The dead-code schedule's counters (not part of the network's state_dict)."""
        return {"cells_since_reset": self.cells_since_reset, "resets": self.resets}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state` (a checkpoint from the step-count schedule restarts the count)."""
        self.cells_since_reset = int(state.get("cells_since_reset", 0))
        self.resets = int(state.get("resets", 0))


def training_fingerprint(cells: pd.Index, genes: pd.Index, settings: dict, loss_weights: LossWeights,
                         conditions: list, labels: list, expression_summary: str) -> dict:
    """What an NDreamer's training depends on: a checkpoint or a saved training state resumes only if it matches.

    Parameters
    ----------
    cells, genes
        The cell and gene names, in order.
    settings
        The NDreamer's settings (how effects are read off the matches is left out: training does not depend
        on it, so a checkpoint resumes across it).
    loss_weights
        The loss weights.
    conditions
        The condition names, in the order of their codes.
    labels
        Per-cell integer arrays the network is trained with: condition codes, batch codes and the pseudo
        cell-state labels (None entries are skipped).
    expression_summary
        A text that changes with the expression (:func:`expression_summary`).

    Returns
    -------
    dict
        Parts compared one by one, so that a refused resume names what differs.
    """
    skipped = ("factual", "min_cells_per_group")
    label_codes = [np.asarray(values, dtype=np.int64).ravel() for values in labels if values is not None]
    return {"cells": (len(cells), unordered_names_hash(cells)), "genes": (len(genes), unordered_names_hash(genes)),
            "settings": {k: repr(v) for k, v in settings.items() if k not in skipped},
            "loss_weights": {k: repr(v) for k, v in dataclasses.asdict(loss_weights).items()},
            # added later (ADDED_FINGERPRINT_PARTS): a relabelled design, or other data under the same names
            "cell order": names_digest(cells),
            # the network's gene rows are by position: the same genes in another order resumed without a word
            "gene order": names_digest(genes),
            "cell labels": f"{[str(c) for c in conditions]} {setting_text(np.concatenate(label_codes))}",
            "expression": expression_summary}


def expression_summary(expression, block_cells: int = 100_000) -> str:
    """Shape and the sum of the log-normalised values of NDreamer's expression.

    Summed over the values themselves, a block of cells at a time, so that the same data held as a float32 CSR (in
    memory) or as counts with size factors (from a backed input) read the same.
    """
    total = 0.0
    for start in range(0, expression.shape[0], block_cells):
        total += float(np.sum(expression[start : start + block_cells].data, dtype=np.float64))
    return f"{tuple(int(n) for n in expression.shape)}, sum {total:.12g}"
