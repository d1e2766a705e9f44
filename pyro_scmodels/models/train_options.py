"""scvi-tools' ``train`` arguments, checked and turned into this package's settings.

``accelerator``/``devices`` become one torch device, ``plan_kwargs`` become the optimiser and
KL warm-up settings, and ``datasplitter_kwargs`` may fix the train / validation split. Every
check runs before anything is trained.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _constants as C
from .. import _validation as V
from ..infer import early_stopping_setting, resolve_device

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# plan_kwargs key (scvi-tools' name or ours) -> the train() setting it fills
PLAN_KWARGS = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "eps": "eps",
    "n_epochs_kl_warmup": "kl_warmup_epochs",
    "kl_warmup_epochs": "kl_warmup_epochs",
    "n_steps_kl_warmup": "kl_warmup_steps",
    "kl_warmup_steps": "kl_warmup_steps",
    "gradient_clip": "gradient_clip",
    "optimizer": "optimizer",
    "global_lr_factor": "global_lr_factor",
}
# the defaults of train(): an explicit argument that differs from its default must not be contradicted
TRAIN_DEFAULTS = {
    "lr": C.LEARNING_RATE, "weight_decay": C.WEIGHT_DECAY, "eps": C.ADAM_EPS,
    "kl_warmup_epochs": C.KL_WARMUP_EPOCHS, "kl_warmup_steps": None, "gradient_clip": C.GRADIENT_CLIP_NORM,
    "global_lr_factor": 1.0,
}


class _DefaultWarmup(int):
    """train()'s default ``kl_warmup_epochs`` (400), told apart from 400 passed: left out, a trained model keeps its
    own warm-up (:meth:`~pyro_scmodels.infer.SVITrainer.call_warmup`)."""


KL_WARMUP_DEFAULT = _DefaultWarmup(C.KL_WARMUP_EPOCHS)
_WARMUP_KEYS = [key for key, setting in PLAN_KWARGS.items() if setting in ("kl_warmup_epochs", "kl_warmup_steps")]


def _plain(value):
    """The default warm-up as a plain int (the checked settings hold no marker); any other value unchanged."""
    return int(value) if isinstance(value, _DefaultWarmup) else value


def warmup_given(kl_warmup_epochs, kl_warmup_steps, plan_kwargs: dict | None) -> bool:
    """Whether a call to train() asks for a KL warm-up: ``kl_warmup_epochs`` passed (even 400), ``kl_warmup_steps``,
    or a warm-up key of ``plan_kwargs`` (``n_epochs_kl_warmup``, ...)."""
    return (kl_warmup_epochs is not KL_WARMUP_DEFAULT or kl_warmup_steps is not None
            or any(key in (plan_kwargs if isinstance(plan_kwargs, dict) else {}) for key in _WARMUP_KEYS))


# DataLoader options of scvi-tools' splitter that have no counterpart here (no DataLoader is used)
_LOADER_OPTIONS = ("num_workers", "pin_memory", "persistent_workers", "drop_last", "shuffle", "load_sparse_tensor")
DISTRIBUTED_NOTE = ("one process trains on one device; several devices train data-parallel with one process each, "
                    "started by torchrun (docs/distributed.md): torchrun --nproc_per_node=N script.py, with devices=N.")


def training_device(device: str, accelerator: str | None, devices) -> torch.device:
    """The torch device from ``device`` or from scvi-tools' ``accelerator`` and ``devices``.

    Parameters
    ----------
    device
        This package's device argument (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``).
    accelerator
        scvi-tools' ``"auto"``, ``"cpu"``, ``"gpu"`` or ``"cuda"``; None when not given.
    devices
        ``"auto"``, ``1``, or a one-element list of a GPU index (``[1]`` -> ``cuda:1``); None when
        not given. Several devices are data-parallel training, decided before this function by
        :func:`pyro_scmodels.distributed.training_parallelism`.

    Returns
    -------
    torch.device
    """
    if accelerator is None and devices is None:
        return resolve_device(device)
    if device != "auto":
        raise ValueError(f"Pass either device (got {device!r}) or accelerator/devices (scvi-tools' names), not both.")
    accelerator = V.choice("accelerator", "auto" if accelerator is None else accelerator, ACCELERATORS)
    index = _device_index(devices)
    if accelerator == "cpu":
        if index is not None:
            raise ValueError(f"devices={devices!r} names a GPU index, but accelerator='cpu'.")
        return torch.device("cpu")
    if accelerator == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    return resolve_device("cuda" if index is None else f"cuda:{index}")


def load_device(device, accelerator: str | None) -> str | torch.device:
    """The device a model is loaded on: this package's ``device``, or scvi-tools' ``accelerator`` with ``device`` as
    scvi-tools reads it in ``load`` (``"auto"`` or a GPU index).

    Parameters
    ----------
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``; with ``accelerator``, ``"auto"`` or a GPU index.
    accelerator
        scvi-tools' ``"auto"``, ``"cpu"``, ``"gpu"`` or ``"cuda"``; None when not given.

    Returns
    -------
    str or torch.device
        ``device`` when no accelerator is given, else the torch device the two name.
    """
    if accelerator is None:
        return device
    if isinstance(device, str) and device != "auto":
        raise ValueError(f"With accelerator={accelerator!r}, device is scvi-tools' GPU index or 'auto' (got {device!r}); "
                         f"pass device={device!r} alone, without accelerator.")
    return training_device("auto", accelerator, None if device == "auto" else [device])


def _device_index(devices) -> int | None:
    """The GPU index named by ``devices`` (None for ``"auto"``, ``1`` or not given)."""
    if devices is None or devices == "auto":
        return None
    if isinstance(devices, (list, tuple)):
        if len(devices) != 1:
            raise ValueError(f"devices={devices!r}: {DISTRIBUTED_NOTE}")
        return V.non_negative_int("devices[0]", devices[0])
    count = V.integer("devices", devices, minimum=1, description="'auto', 1 or a one-element list of a GPU index")
    if count != 1:
        raise ValueError(f"devices={devices!r}: {DISTRIBUTED_NOTE}")
    return None


def merge_plan_kwargs(plan_kwargs: dict | None, explicit: dict) -> dict:
    """``explicit`` train() settings updated from scvi-tools' ``plan_kwargs``.

    Parameters
    ----------
    plan_kwargs
        E.g. ``{"lr": 1e-3, "weight_decay": 1e-6, "n_epochs_kl_warmup": 400}``; see
        :data:`PLAN_KWARGS` for every key understood.
    explicit
        The settings passed to train() (keys of :data:`TRAIN_DEFAULTS`).

    Returns
    -------
    dict
        ``explicit`` with the plan's values filled in.
    """
    if plan_kwargs is None:
        return dict(explicit)
    if not isinstance(plan_kwargs, dict):
        raise V.ArgumentTypeError(f"plan_kwargs must be a dict such as {{'lr': 1e-3}}, got {plan_kwargs!r}.")
    merged = dict(explicit)
    for key, value in plan_kwargs.items():
        if key not in PLAN_KWARGS:
            raise ValueError(
                f"plan_kwargs key {key!r} is not supported by pyro_scmodels' training plan. Supported keys: "
                f"{', '.join(sorted(PLAN_KWARGS))}."
            )
        setting = PLAN_KWARGS[key]
        if setting == "optimizer":
            if value != "Adam":
                raise ValueError(f"plan_kwargs['optimizer'] must be 'Adam' (the only optimiser here), got {value!r}.")
            continue
        given = explicit[setting]
        if given != TRAIN_DEFAULTS[setting] and given != value:
            raise ValueError(f"{setting}={given!r} and plan_kwargs[{key!r}]={value!r} contradict each other; pass one.")
        merged[setting] = value
    return merged


def checked_settings(settings: dict) -> dict:
    """The optimiser and warm-up settings of :func:`merge_plan_kwargs`, each checked and made canonical."""
    return {
        "lr": V.positive_float("lr", settings["lr"]),
        "eps": V.positive_float("eps", settings["eps"]),
        "weight_decay": V.non_negative_float("weight_decay", settings["weight_decay"]),
        "kl_warmup_epochs": V.optional(V.non_negative_int, "kl_warmup_epochs",
                                       _plain(settings["kl_warmup_epochs"])),
        "kl_warmup_steps": V.optional(V.non_negative_int, "kl_warmup_steps", settings["kl_warmup_steps"]),
        "gradient_clip": V.optional(V.positive_float, "gradient_clip", settings["gradient_clip"]),
        "global_lr_factor": V.positive_float("global_lr_factor", settings["global_lr_factor"]),
    }


def external_split(datasplitter_kwargs: dict | None, n_cells: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The train / validation cells fixed by ``datasplitter_kwargs["external_indexing"]``, if given.

    Parameters
    ----------
    datasplitter_kwargs
        scvi-tools' splitter options. Only ``external_indexing`` (a list of train, validation
        and optionally test cell positions) applies here; DataLoader options are refused with
        the reason.
    n_cells
        Number of cells of the training data.

    Returns
    -------
    tuple or None
        ``(train, validation)`` sorted integer positions, or None (use ``train_size``).
    """
    if datasplitter_kwargs is None:
        return None
    if not isinstance(datasplitter_kwargs, dict):
        raise V.ArgumentTypeError(f"datasplitter_kwargs must be a dict, got {datasplitter_kwargs!r}.")
    for key in datasplitter_kwargs:
        if key in _LOADER_OPTIONS:
            raise ValueError(
                f"datasplitter_kwargs[{key!r}] has no meaning here: pyro_scmodels reads minibatches straight from the "
                "count matrix, without a torch DataLoader. Supported key: 'external_indexing'."
            )
        if key != "external_indexing":
            raise ValueError(f"datasplitter_kwargs key {key!r} is not supported; supported key: 'external_indexing'.")
    parts = datasplitter_kwargs.get("external_indexing")
    if parts is None:
        return None
    if not isinstance(parts, (list, tuple)) or len(parts) not in (2, 3):
        raise ValueError("datasplitter_kwargs['external_indexing'] must be [train, validation] or [train, validation, "
                         f"test] arrays of cell positions, got {type(parts).__name__} of length {len(parts)}.")
    named = [_positions(f"external_indexing[{i}]", p, n_cells) for i, p in enumerate(parts)]
    every = np.concatenate(named)
    if len(np.unique(every)) != len(every):
        raise ValueError("datasplitter_kwargs['external_indexing']: the train, validation and test cells overlap.")
    if len(named[0]) == 0:
        raise ValueError("datasplitter_kwargs['external_indexing']: the train cells are empty.")
    return np.sort(named[0]), np.sort(named[1])


def stops_early(asked: bool | None, trainer, split, train_size: float) -> bool | None:
    """Whether a ``train`` call stops early (:func:`~pyro_scmodels.infer.early_stopping_setting`), decided before the
    trainer is made: its validation cells are the first call's (``trainer``), else ``split``'s, else ``train_size``'s.
    None (left out) stays None: the loop settles it on the split it trains, a resumed checkpoint's included.

    Raises
    ------
    ValueError
        ``asked`` is True and the call has no validation cells.
    """
    if asked is None:
        return None
    if trainer is not None:
        n_validation = len(trainer.validation_indices)
    else:
        n_validation = len(split[1]) if split is not None else int(train_size < 1.0)  # below 1: at least one cell
    return early_stopping_setting(asked, n_validation)


def _positions(name: str, values, n_cells: int) -> np.ndarray:
    values = np.asarray(values).ravel()
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise V.ArgumentTypeError(f"datasplitter_kwargs[{name!r}] must hold integer cell positions, got {values.dtype}.")
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() >= n_cells):
        raise ValueError(f"datasplitter_kwargs[{name!r}] must lie in [0, {n_cells}), got [{values.min()}, {values.max()}].")
    return values
