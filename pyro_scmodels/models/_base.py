"""What every model class shares: training, devices, minibatch inference, save and load.

A model class subclasses :class:`PyroModelBase` and provides ``_build_module`` (its model and
guide) and ``_cell_data`` (its data access). Everything here works for any such pair. The
minibatches a query reads come from :class:`~pyro_scmodels.models.cell_batches.CellBatches`.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .. import _constants as C
from .. import _validation as V
from .._io import writable_folder
from .._stacklevel import user_stacklevel
from ..data import CellData
from ..data.source_state import backed_files, changes, counts_on_disk, source_state
from ._posterior import PosteriorMixin
from .cell_batches import CellBatches
from .posterior_queries import PosteriorQueries
from ..checkpoints import CHECKPOINT_FILE
from ..distributed import training_parallelism
from ..infer import SVITrainer, TrainingPlan, default_max_epochs, resolve_device, split_cells
from .describe import ModelDescription
from .evidence import EvidenceQueries
from .feature_correlation import FeatureCorrelationQueries
from .history import TrainingHistory, as_history
from .persistence import SavedModel
from .scvi_arguments import refuse_scvi_arguments
from .train_options import KL_WARMUP_DEFAULT, checked_settings, external_split, merge_plan_kwargs, stops_early, warmup_given
from ..seeding import seeded


class ModelAndGuide(torch.nn.Module):
    """The Pyro model and guide of one fitted model, kept together (one ``state_dict``)."""

    def __init__(self, model, guide):
        super().__init__()
        self.model = model
        self.guide = guide


class PyroModelBase(CellBatches, SavedModel, ModelDescription, EvidenceQueries, FeatureCorrelationQueries,
                    PosteriorQueries, PosteriorMixin):
    """Shared behaviour of the user-facing model classes."""

    #: whether the likelihood leaves out a cell's features where it has no counts (a multimodal model's cell without a
    #: modality): checks and summaries of observed counts then leave those cells out too
    masks_cells_without_counts = False

    def __init__(self):
        self.trainer: SVITrainer | None = None
        self.device = torch.device("cpu")
        self.is_trained = False

    # --- to be provided by the model class -------------------------------------------------
    def _cell_data(self, adata=None) -> CellData:  # pragma: no cover - abstract
        raise NotImplementedError

    def _held_cell_data(self) -> CellData:
        """The training data, read once, after checking that the data object has not changed since.

        Raises
        ------
        ValueError
            The cells, the counts or a covariate of ``self.adata`` changed in place after the model read it
            (the model would go on answering for the data as they were).
        """
        if self._data is None:
            # counts validated at setup are not validated again unless they changed since
            self._data = CellData.from_setup(self.adata, encoding=self.encoding, setup=self._setup)
            # the counts' sums were just taken by CellData, of the same matrices: not taken twice
            taken = [matrix.fingerprint for matrix in self._data.modalities.values()]
            self._data_state = source_state(self.adata, self._setup, self.encoding, count_fingerprints=taken)
            return self._data
        changed = changes(self._data_state, source_state(self.adata, self._setup, self.encoding, self._data_state))
        if changed:
            name = type(self).__name__
            setup = "setup_mudata" if hasattr(self.adata, "mod") else "setup_anndata"
            # the file's message only where every change is to counts read from a file (not to an in-memory layer
            # or modality beside it)
            files = backed_files(self.adata) if counts_on_disk(changed, self._setup.count_sources(self.adata)) else []
            if files:
                # no sum of the counts is taken on disk: a sample of the stored entries changed
                fix = (f"A sample of the counts stored in {', '.join(files)} differs from when the model read them "
                       "(e.g. sc.pp.log1p(adata, chunked=True) on a file opened with backed='r+'). Transform a copy of "
                       "the file, not the one the model reads; put the raw counts back in the file; or build a new model "
                       f"on the file as it is now ({name}.{setup}(...), then {name}(...)).")
            elif all(part.startswith("counts") for part in changed):
                fix = ("Put the raw counts back (normalise a copy, or keep the counts in a layer, e.g. "
                       "adata.layers['counts'] = adata.X.copy(), and set the model up on that layer), or build a new "
                       f"model on the data as they are now ({name}.{setup}(...), then {name}(...)).")
            else:
                fix = (f"Build a new model on the changed data ({name}.{setup}(...), then {name}(...)), or pass other "
                       "cells to a query as new data (adata=...).")
            raise ValueError(f"The model's data changed in place after the model read them ({', '.join(changed)}); "
                             f"the model would go on answering for the data as they were. {fix}")
        return self._data

    # --- training ---------------------------------------------------------------------------
    @property
    def priors(self):
        """The priors the model trains with, read back from its Pyro modules' buffers (in-place edits included).

        A :class:`~pyro_scmodels.RegularizedPriors` (one per modality for a multimodal model), read-only: edit the
        buffers (``model.module.model.priors``; ``model.module.model.block(m).priors`` for a multimodal model), or
        build a new model with ``priors=``. Edited buffers are checked against their sites' shapes before each
        ``train()`` and ``save``. A subclass whose ``sample_*`` method samples its own prior (``model_class``)
        samples what that method says; these are the buffers only.
        """
        return self._priors_in_use()

    @priors.setter
    def priors(self, value) -> None:
        raise AttributeError("model.priors is read back from the model's buffers: assigning it would change nothing. "
                             "Edit the buffers (model.module.model.priors, or model.module.model.block(m).priors for a "
                             "multimodal model), or build a new model with priors=...")

    @property
    def init_params(self) -> dict:
        """The constructor arguments that rebuild this model, with its priors as its Pyro modules hold them now.

        What :meth:`save` writes, :meth:`load` and query mapping pass back, and resuming compares: an in-place edit of a
        prior buffer is trained with, so it is also what is saved and checked.
        """
        params = dict(self._init_params)
        if getattr(self, "module", None) is not None:
            params["priors"] = self.priors
        return params

    @property
    def history(self) -> TrainingHistory:
        """Training history: one row per epoch (``train_loss``, ``validation_loss``, ``kl_weight``).

        A DataFrame that also answers scvi-tools' keys (``history["elbo_train"]``,
        ``history["elbo_validation"]``); see :class:`~pyro_scmodels.models.history.TrainingHistory`.
        """
        if self.trainer is None:
            return as_history(None if self.carried_training is None else self.carried_training[0])
        return as_history(self.trainer.history)

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = C.BATCH_SIZE,
        lr: float = C.LEARNING_RATE,
        train_size: float | None = None,
        early_stopping: bool | None = None,
        device: str = "auto",
        seed: int = 0,
        kl_warmup_epochs: int | None = KL_WARMUP_DEFAULT,
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
        global_lr_factor: float = 1.0,
        compile: bool = False,
        accelerator: str | None = None,
        devices: int | str | list | None = None,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        check_val_every_n_epoch: int = 1,
        strategy: str | None = None,
        **scvi_arguments,
    ) -> TrainingHistory:
        """Fit the model with stochastic variational inference.

        Parameters
        ----------
        max_epochs
            Passes over the training cells in this call (as in scvi-tools: a second call trains
            ``max_epochs`` more); default ``min(400, round(20000 / n_cells * 400))``. A call that
            resumes an interrupted run from ``checkpoint_dir`` completes that run: it trains until
            the run has ``max_epochs`` epochs in all.
        batch_size
            Cells per minibatch.
        lr, weight_decay, eps
            Adam settings.
        global_lr_factor
            The guides of the global sites (ambient background, feature scaling, dispersion rates) learn at
            ``global_lr_factor`` x ``lr``. 10 integrates real batches better (docs/models.md, "Integrating
            batches"); 1, the default, trains every parameter at ``lr``.
        compile
            Compute each training step's loss through ``torch.compile``: fused kernels in place of several
            hundred small operations a step, about 1.2-1.4x the cells per second on 2 CPU cores at batch 128 on
            the simulator (1.1-1.2x on PBMC; docs/posterior_queries.md, "Compiled training"). Compiling takes 11-50 s at the
            first step on 2 CPU cores (the lower end when torch's kernel cache already holds the kernels), so it
            pays back on long runs only. Needs a C++ compiler on the CPU and triton on a GPU: checked before training, with an error
            that says what is missing.
        train_size
            Fraction of cells used for training; the rest give the validation loss. None: 0.9 on the first
            call; a later call keeps the first call's split (and warns when given another fraction).
        early_stopping
            Stop when the validation loss has not improved by ``early_stopping_min_delta``
            (default ``n_genes * 2e-4``) for ``early_stopping_patience`` validated epochs of this call. None: on
            when there are validation cells, off (one logged line) with ``train_size=1.0``; True there is refused.
        device
            ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed
            Seeds the split, minibatch order and every sample: the same seed gives identical
            results on the CPU.
        kl_warmup_epochs, kl_warmup_steps
            Linear warm-up of the weight of the KL term of z, in epochs or (if given) steps, counted from the model's
            first epoch over all calls (``kl_warmup_epochs=20`` after 12 epochs goes on at 12/20). Left out (and not in
            ``plan_kwargs``), a new model warms up over 400 epochs and a trained one keeps its own warm-up: that of its
            last call, so a finished one stays at weight 1.
        gradient_clip
            Maximum global gradient norm (None turns clipping off).
        counts_on_device
            Keep the whole sparse count matrix on the device (fast on a GPU with enough memory).
        checkpoint_dir
            Write the full training state there every ``checkpoint_every`` epochs and at the end;
            if a checkpoint is already there, training resumes from it, as a second call to ``train``
            would continue: with this call's ``lr``, ``weight_decay``, ``eps`` and ``global_lr_factor``,
            and the checkpoint's train/validation split (a warning when this call asks for another). A
            checkpoint of other cells (or the same cells in another order), genes, counts, model settings,
            covariates or their labels, or priors is refused, naming what differs; so is one of another
            run when this model has already trained (it would be overwritten). A run that had stopped
            early is finished: the same call trains nothing more.
        progress_bar
            Show a tqdm progress bar with the running loss.
        accelerator, devices, strategy
            scvi-tools' names. ``accelerator``: ``"auto"``, ``"cpu"``, ``"gpu"`` or ``"cuda"``;
            ``devices``: devices (processes) on this node; ``strategy="ddp"``: data-parallel
            training on ``torch.distributed``, which needs one process per device started by
            ``torchrun`` (a script run under ``torchrun`` trains data-parallel by itself). Each
            rank takes its share of every minibatch of ``batch_size`` cells; only rank 0 writes
            checkpoints. See the distributed-training page of the documentation.
        plan_kwargs
            scvi-tools' training-plan settings, e.g. ``{"lr": 1e-3, "weight_decay": 1e-6,
            "n_epochs_kl_warmup": 400}`` (also ``eps``, ``n_steps_kl_warmup``, ``gradient_clip``,
            ``global_lr_factor``, ``optimizer="Adam"``); an unknown key raises ``ValueError`` listing the known ones.
        datasplitter_kwargs
            ``{"external_indexing": [train, validation(, test)]}`` fixes the split by cell
            positions (instead of ``train_size``); DataLoader options are refused (none is used).
        check_val_every_n_epoch
            Compute the validation loss every this many epochs (others record NaN).
        **scvi_arguments
            scvi-tools' ``train`` arguments that have no counterpart here are refused, each with what to use
            instead (``validation_size``, ``enable_progress_bar``, ...); their values that are what this
            package does (``shuffle_set_split=True``, ``load_sparse_tensor=False``,
            ``early_stopping_monitor="elbo_validation"``) are accepted.

        Returns
        -------
        TrainingHistory
            The training history (also in :attr:`history`).
        """
        refuse_scvi_arguments(scvi_arguments, "train", f"{type(self).__name__}.train")
        self.module.model.check_priors()  # buffers edited since the last call: before a trace fails on their shape
        if not any(parameter.requires_grad for parameter in self.module.parameters()):
            raise ValueError("Every parameter of this model is frozen: there is nothing to train. A query model whose "
                             "categories are all known to the reference is ready to use as it is (or build it with "
                             "load_query_data(..., freeze_encoder=False) to fine-tune the encoders).")
        data = self._cell_data()
        # every setting is checked before anything is trained
        max_epochs = default_max_epochs(data.n_cells) if max_epochs is None else V.positive_int("max_epochs", max_epochs)
        settings = checked_settings(merge_plan_kwargs(plan_kwargs, dict(
            lr=lr, weight_decay=weight_decay, eps=eps, kl_warmup_epochs=kl_warmup_epochs,
            kl_warmup_steps=kl_warmup_steps, gradient_clip=gradient_clip, global_lr_factor=global_lr_factor)))
        batch_size = V.positive_int("batch_size", batch_size)
        checkpoint_every = V.positive_int("checkpoint_every", checkpoint_every)
        validate_every = V.positive_int("check_val_every_n_epoch", check_val_every_n_epoch)
        early_stopping_patience = V.positive_int("early_stopping_patience", early_stopping_patience)
        early_stopping_min_delta = V.optional(V.non_negative_float, "early_stopping_min_delta", early_stopping_min_delta)
        asked_size = V.optional(V.fraction, "train_size", train_size)
        train_size = C.TRAIN_SIZE if asked_size is None else asked_size
        seed = V.seed("seed", seed)
        compile = V.boolean("compile", compile)
        checkpoint_dir = V.optional(V.file_path, "checkpoint_dir", checkpoint_dir)
        split = external_split(datasplitter_kwargs, data.n_cells)
        early_stopping = stops_early(early_stopping, self.trainer, split, train_size)  # True without validation: refused
        self.device, parallel = training_parallelism(device, accelerator, devices, strategy)
        if parallel.world_size > 1 and self.init_params.get("latent_independence", 0.0):
            # the penalty's MMD compares cells across the minibatch: each rank would see only its shard, and the
            # biased estimate grows as shards shrink (about 0.21, 0.33, 0.58 for 1, 2, 4 ranks on one example)
            raise ValueError(
                f"latent_independence={self.init_params['latent_independence']} cannot be trained data-parallel "
                f"({parallel.world_size} processes): its penalty compares cells across the whole minibatch, and each "
                "process would see only its share, which changes the objective with the number of processes. Train "
                "this model in one process, or build it with latent_independence=0."
            )
        self.module.to(self.device)
        data.to_device(self.device, counts_on_device=counts_on_device)
        self._prepare_trainer(data, train_size, seed, settings, split, asked_size is not None)
        warmup = self.trainer.call_warmup((settings["kl_warmup_epochs"], settings["kl_warmup_steps"]),
                                          warmup_given(kl_warmup_epochs, kl_warmup_steps, plan_kwargs))
        self.trainer.use_parallel(parallel)
        self.trainer.use_compiled_loss(compile, self.device)
        if early_stopping_min_delta is None:
            early_stopping_min_delta = data.n_features * C.EARLY_STOPPING_MIN_DELTA_PER_GENE
        # max_epochs counts this call's epochs; a run resumed from a checkpoint starts at 0 here and
        # continues from the checkpoint's epoch inside fit, so it completes to max_epochs in all; after Ctrl-C
        # they count from where the interrupted call started, which this call finishes
        self.trainer.reset_early_stopping()
        plan = TrainingPlan(
            max_epochs=self.trainer.call_start()[0] + max_epochs, batch_size=batch_size,
            kl_warmup_epochs=warmup[0], kl_warmup_steps=warmup[1],
            early_stopping=early_stopping, patience=early_stopping_patience, min_delta=early_stopping_min_delta,
            gradient_clip=settings["gradient_clip"], validate_every=validate_every,
            checkpoint_path=None if checkpoint_dir is None else os.path.join(checkpoint_dir, CHECKPOINT_FILE),
            checkpoint_every=checkpoint_every, progress_bar=progress_bar,
        )
        if checkpoint_dir is not None:
            # the last check before training, where rank 0 writes the checkpoints: its refusal is raised on every
            # rank (the others would go on and fail on the closed connection, or wait)
            parallel.from_writer(lambda: writable_folder("checkpoint_dir", checkpoint_dir))
        try:
            with seeded(seed, self.device):
                self.trainer.fit(plan, seed=seed)
        finally:
            # also after an interruption (Ctrl-C): the steps that ran are kept and count as training
            self.is_trained = self.is_trained or self.trainer.step > 0
        return self.history

    def _prepare_trainer(self, data: CellData, train_size: float, seed: int, settings: dict,
                         split: tuple[np.ndarray, np.ndarray] | None, size_asked: bool = True) -> None:
        """Create the trainer (split and optimiser settings) on the first call; update it on later ones."""
        adam = {key: settings[key] for key in ("lr", "eps", "weight_decay", "global_lr_factor")}
        if self.trainer is None:
            train, validation = split_cells(data.n_cells, train_size, np.random.default_rng(seed)) if split is None else split
            self.trainer = SVITrainer(self.module.model, self.module.guide, data, train, validation, **adam,
                                      fingerprint=self._fingerprint())
            self.trainer.split_asked = size_asked or split is not None  # a resume then says it keeps another split
            loaded, step = self.carried_training or (None, 0)
            if loaded is not None and len(loaded):
                # a saved model loaded onto other cells trains on: its history goes on (it was dropped) and its epochs
                # count (KL warm-up does not start again on a trained model), with a new split and optimiser
                self.trainer.history = loaded.copy()
                self.trainer.epoch, self.trainer.step = len(loaded), step
            self.carried_training = None
            return
        self.trainer.move_optimizer_state()
        # what the checkpoints of this call record: a prior buffer edited since the first call is part of it
        self.trainer.fingerprint = self._fingerprint()
        if split is not None:  # a further call continues training: the split stays, the optimiser takes new settings
            if not np.array_equal(split[0], np.sort(self.trainer.train_indices)):
                warnings.warn("external_indexing differs from the first call's split; the original split is kept.",
                              stacklevel=user_stacklevel())
        elif size_asked and abs(len(self.trainer.train_indices) / data.n_cells - train_size) > 1.0 / data.n_cells + 1e-9:
            # only a fraction the caller gave: the kept split may come from external_indexing, a load or a resume
            warnings.warn("train_size differs from the first call; the original train/validation split is kept.",
                          stacklevel=user_stacklevel())
        self.trainer.set_optimizer_settings(**adam)

    # --- inference in minibatches --------------------------------------------------------------
    def _check_trained(self) -> None:
        if not self.is_trained:
            warnings.warn("The model has not been trained; results reflect the initial parameters.", stacklevel=user_stacklevel())
        elif self.trainer is not None and self.trainer.interruption:
            warnings.warn(f"Training was interrupted: the model was {self.trainer.interruption}. Call train() again "
                          "with the same max_epochs to finish that call (it starts again from the last whole epoch).",
                          stacklevel=user_stacklevel())

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
            raise ValueError("The model has no train/validation split: it has not been trained in this session (a model "
                             "loaded for other cells keeps only its history).")
        return np.asarray(self.trainer.train_indices), np.asarray(self.trainer.validation_indices)

    def to_device(self, device: str | int) -> None:
        """Move the model's modules (and its optimiser state) to ``device``, as scvi-tools' ``to_device``.

        Parameters
        ----------
        device
            ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (a GPU when torch sees one) or a GPU index N
            (``"cuda:N"``, as scvi-tools takes it). Later queries run there; ``train(device=...)`` chooses
            its own device.
        """
        if isinstance(device, int) and not isinstance(device, bool):
            device = f"cuda:{device}"
        self._move_to(device)

    def _move_to(self, device: str) -> None:
        self.device = resolve_device(device)
        self.module.to(self.device)
        if self.trainer is not None:
            self.trainer.move_optimizer_state()
