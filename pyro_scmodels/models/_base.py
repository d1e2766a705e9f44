"""What every model class shares: training, devices, minibatch inference, save and load.

A model class subclasses :class:`PyroModelBase` and provides ``_build_module`` (its model and
guide) and ``_cell_data`` (its data access). Everything here works for any such pair.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import torch
from pyro import poutine

from .. import _constants as C
from .. import _validation as V
from .._atomic import atomic_path
from .._io import load_torch_file
from ..data import CellData, iterate_minibatches
from ._posterior import PosteriorMixin
from .posterior_queries import PosteriorQueries
from ..distributed import training_parallelism
from ..infer import SVITrainer, TrainingPlan, default_max_epochs, resolve_device, split_cells

MODEL_FILE = "model.pt"


class ModelAndGuide(torch.nn.Module):
    """The Pyro model and guide of one fitted model, kept together (one ``state_dict``)."""

    def __init__(self, model, guide):
        super().__init__()
        self.model = model
        self.guide = guide


class PyroModelBase(PosteriorQueries, PosteriorMixin):
    """Shared behaviour of the user-facing model classes."""

    def __init__(self):
        self.trainer: SVITrainer | None = None
        self.device = torch.device("cpu")
        self.is_trained = False

    # --- to be provided by the model class -------------------------------------------------
    def _cell_data(self, adata=None) -> CellData:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- training ---------------------------------------------------------------------------
    @property
    def history(self) -> pd.DataFrame:
        """Training history: one row per epoch (``train_loss``, ``validation_loss``, ``kl_weight``)."""
        if self.trainer is None:
            loaded = getattr(self, "_loaded_history", None)
            return pd.DataFrame(columns=["train_loss", "validation_loss", "kl_weight"]) if loaded is None else loaded.astype(float)
        return self.trainer.history.astype(float)

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = C.BATCH_SIZE,
        lr: float = C.LEARNING_RATE,
        train_size: float = C.TRAIN_SIZE,
        early_stopping: bool = True,
        device: str = "auto",
        seed: int = 0,
        kl_warmup_epochs: int | None = C.KL_WARMUP_EPOCHS,
        kl_warmup_steps: int | None = None,
        early_stopping_patience: int = C.EARLY_STOPPING_PATIENCE,
        early_stopping_min_delta: float | None = None,
        gradient_clip: float | None = C.GRADIENT_CLIP_NORM,
        weight_decay: float = C.WEIGHT_DECAY,
        eps: float = C.ADAM_EPS,
        counts_on_device: bool = False,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 10,
        progress_bar: bool = True,
        *,
        accelerator: str | None = None,
        devices: int | str | list | None = None,
        strategy: str | None = None,
    ) -> pd.DataFrame:
        """Fit the model with stochastic variational inference.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; default ``min(400, round(20000 / n_cells * 400))``
            as in scvi-tools. A second call continues training up to ``max_epochs`` in total.
        batch_size
            Cells per minibatch.
        lr, weight_decay, eps
            Adam settings.
        train_size
            Fraction of cells used for training; the rest give the validation loss.
        early_stopping
            Stop when the validation loss has not improved by ``early_stopping_min_delta``
            (default ``n_genes * 2e-4``) for ``early_stopping_patience`` epochs.
        device
            ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed
            Seeds the split, minibatch order and every sample: the same seed gives identical
            results on the CPU.
        kl_warmup_epochs, kl_warmup_steps
            Linear warm-up of the weight of the KL term of z, in epochs or (if given) steps.
        gradient_clip
            Maximum global gradient norm (None turns clipping off).
        counts_on_device
            Keep the whole sparse count matrix on the device (fast on a GPU with enough memory).
        checkpoint_dir
            Write the full training state there every ``checkpoint_every`` epochs and at the end;
            if a checkpoint is already there, training resumes from it.
        progress_bar
            Show a tqdm progress bar with the running loss.
        accelerator, devices, strategy
            scvi-tools' names. ``accelerator``: ``"auto"``, ``"cpu"``, ``"gpu"`` or ``"cuda"``;
            ``devices``: devices (processes) on this node; ``strategy="ddp"``: data-parallel
            training on ``torch.distributed``, which needs one process per device started by
            ``torchrun`` (a script run under ``torchrun`` trains data-parallel by itself). Each
            rank takes its share of every minibatch of ``batch_size`` cells; only rank 0 writes
            checkpoints. See the distributed-training page of the documentation.

        Returns
        -------
        pandas.DataFrame
            The training history (also in :attr:`history`).
        """
        data = self._cell_data()
        # every setting is checked before anything is trained
        max_epochs = default_max_epochs(data.n_cells) if max_epochs is None else V.positive_int("max_epochs", max_epochs)
        batch_size = V.positive_int("batch_size", batch_size)
        checkpoint_every = V.positive_int("checkpoint_every", checkpoint_every)
        early_stopping_patience = V.positive_int("early_stopping_patience", early_stopping_patience)
        lr, eps = V.positive_float("lr", lr), V.positive_float("eps", eps)
        kl_warmup_epochs = V.optional(V.non_negative_int, "kl_warmup_epochs", kl_warmup_epochs)
        kl_warmup_steps = V.optional(V.non_negative_int, "kl_warmup_steps", kl_warmup_steps)
        gradient_clip = V.optional(V.positive_float, "gradient_clip", gradient_clip)
        early_stopping_min_delta = V.optional(V.non_negative_float, "early_stopping_min_delta", early_stopping_min_delta)
        weight_decay = V.non_negative_float("weight_decay", weight_decay)
        train_size = V.fraction("train_size", train_size)
        seed = V.non_negative_int("seed", seed)
        self.device, parallel = training_parallelism(device, accelerator, devices, strategy)
        self.module.to(self.device)
        data.to_device(self.device, counts_on_device=counts_on_device)
        self._prepare_trainer(data, max_epochs, train_size, seed, lr, eps, weight_decay)
        self.trainer.use_parallel(parallel)
        if early_stopping_min_delta is None:
            early_stopping_min_delta = data.n_features * C.EARLY_STOPPING_MIN_DELTA_PER_GENE
        plan = TrainingPlan(
            max_epochs=max_epochs,
            batch_size=batch_size,
            kl_warmup_epochs=kl_warmup_epochs,
            kl_warmup_steps=kl_warmup_steps,
            early_stopping=early_stopping,
            patience=early_stopping_patience,
            min_delta=early_stopping_min_delta,
            gradient_clip=gradient_clip,
            checkpoint_path=None if checkpoint_dir is None else os.path.join(checkpoint_dir, "checkpoint.pt"),
            checkpoint_every=checkpoint_every,
            progress_bar=progress_bar,
        )
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                self.trainer.fit(plan, seed=seed)
        finally:
            # also after an interruption (Ctrl-C): the steps that ran are kept and count as training
            self.is_trained = self.is_trained or self.trainer.step > 0
        return self.trainer.history.astype(float)

    def _prepare_trainer(self, data: CellData, max_epochs: int, train_size: float, seed: int, lr: float, eps: float,
                         weight_decay: float) -> None:
        """Create the trainer (split and optimiser settings) on the first call; update it on later ones."""
        if self.trainer is None:
            train, validation = split_cells(data.n_cells, train_size, np.random.default_rng(seed))
            self.trainer = SVITrainer(self.module.model, self.module.guide, data, train, validation, lr, eps, weight_decay,
                                      fingerprint=self._fingerprint())
            return
        self.trainer.move_optimizer_state()
        if max_epochs <= self.trainer.epoch:
            warnings.warn(
                f"The model has already been trained for {self.trainer.epoch} epochs; max_epochs={max_epochs} counts "
                "all epochs, so nothing more is trained. Pass a larger max_epochs to continue.", stacklevel=3
            )
        # a further call continues training: the split stays, the optimiser takes the new settings
        if abs(len(self.trainer.train_indices) / data.n_cells - train_size) > 1.0 / data.n_cells + 1e-9:
            warnings.warn("train_size differs from the first call; the original train/validation split is kept.", stacklevel=3)
        self.trainer.set_optimizer_settings(lr=lr, eps=eps, weight_decay=weight_decay)

    # --- inference in minibatches --------------------------------------------------------------
    def _check_trained(self) -> None:
        if not self.is_trained:
            warnings.warn("The model has not been trained; results reflect the initial parameters.", stacklevel=4)
        elif self.trainer is not None and self.trainer.interruption:
            warnings.warn(f"Training was interrupted: the model was {self.trainer.interruption}. Call train() again "
                          "to continue.", stacklevel=4)

    @property
    def train_indices(self) -> np.ndarray:
        """Positions of the cells used for training (the split of the first :meth:`train` call)."""
        return self._split()[0]

    @property
    def validation_indices(self) -> np.ndarray:
        """Positions of the cells held out for the validation loss."""
        return self._split()[1]

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        if self.trainer is None:
            raise ValueError(
                "The model has no train/validation split: it has not been trained in this session (a model loaded "
                "for other cells keeps only its history)."
            )
        return np.asarray(self.trainer.train_indices), np.asarray(self.trainer.validation_indices)

    def _batches(self, adata=None, indices=None, batch_size=None):
        """Minibatches (on the model's device) of the chosen cells, in order."""
        for _, item in self._indexed_batches(adata, indices, batch_size):
            yield item

    def _indexed_batches(self, adata=None, indices=None, batch_size=None):
        """Like :meth:`_batches`, with each minibatch's cell positions."""
        data = self._cell_data(adata)
        data.to_device(self.device)
        indices = self._cell_positions(data.n_cells, indices)
        batch_size = C.BATCH_SIZE if batch_size is None else V.positive_int("batch_size", batch_size)
        for chunk in iterate_minibatches(indices, batch_size, shuffle=False):
            yield chunk, (data.minibatch(chunk), data.n_cells)

    @staticmethod
    def _cell_positions(n_cells: int, indices) -> np.ndarray:
        """``indices`` (None, integer positions or a boolean mask) as integer positions, checked."""
        if indices is None:
            return np.arange(n_cells)
        indices = np.asarray(indices)
        if indices.dtype == bool:
            if indices.shape != (n_cells,):
                raise ValueError(f"A boolean indices mask needs one entry per cell ({n_cells}), got shape {indices.shape}.")
            return np.flatnonzero(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= n_cells):
            raise IndexError(f"indices must lie in [0, {n_cells}); got range [{indices.min()}, {indices.max()}].")
        return indices

    def _guide_traces(self, batch: dict, n_obs: int, num_samples: int):
        """``num_samples`` traces of the guide on one minibatch (eval mode, no gradient)."""
        guide = self.module.guide
        with torch.no_grad():
            return [poutine.trace(guide).get_trace(batch, n_obs) for _ in range(num_samples)]

    # --- persistence ---------------------------------------------------------------------------
    def _save_payload(self) -> dict:  # pragma: no cover - provided by the model class
        raise NotImplementedError

    def save(self, dir_path: str, overwrite: bool = False) -> None:
        """Save the model (parameters, settings, gene names, categories, history) to ``dir_path``.

        Parameters
        ----------
        dir_path
            Folder to create; ``model.pt`` is written inside.
        overwrite
            Replace an existing saved model in ``dir_path``.
        """
        path = os.path.join(dir_path, MODEL_FILE)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        os.makedirs(dir_path, exist_ok=True)
        payload = self._save_payload()
        payload["state_dict"] = {k: v.cpu() for k, v in self.module.state_dict().items()}
        payload["trainer"] = None if self.trainer is None else self.trainer.state(include_modules=False)
        payload["is_trained"] = self.is_trained
        with atomic_path(path) as temporary:
            torch.save(payload, temporary)

    @staticmethod
    def _read_payload(dir_path: str) -> dict:
        return load_torch_file(os.path.join(dir_path, MODEL_FILE), "saved model")

    def _restore(self, payload: dict) -> None:
        self.module.load_state_dict(payload["state_dict"])
        self.is_trained = payload["is_trained"]
        saved = payload.get("trainer")
        if saved is not None:
            if saved["fingerprint"].get("cells") == self._fingerprint()["cells"]:
                self.trainer = SVITrainer(self.module.model, self.module.guide, self._cell_data(), saved["train_indices"],
                                          saved["validation_indices"], fingerprint=self._fingerprint())
                self.trainer.load_state(saved)
            else:
                # other cells than in training: the history is kept, the split and optimiser are not
                self.trainer = None
                self._loaded_history = saved["history"]
        self.module.eval()

    def _move_to(self, device: str) -> None:
        self.device = resolve_device(device)
        self.module.to(self.device)
        if self.trainer is not None:
            self.trainer.move_optimizer_state()

    def _fingerprint(self) -> dict:
        """What identifies this model's training data and settings (checked before resuming)."""
        data = self._cell_data()
        names = pd.util.hash_pandas_object(pd.Index(self.adata.obs_names), index=False).to_numpy()
        return {
            "cells": (data.n_cells, int(names.sum() % (2**61))),
            "features": tuple(m.n_features for m in data.modalities.values()),
            "settings": repr({k: v for k, v in self.init_params.items() if k != "priors"}),
        }

