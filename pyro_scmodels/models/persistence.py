"""Saving a fitted model to a folder and loading it back, and what identifies it for a checkpoint, shared by every
model class.

A model class provides ``_save_payload`` (its settings, setup and feature names) and
``_bind_saved`` (check that data suits a saved payload and set it up); :class:`SavedModel` writes
the parameters, the training state and optionally the data, atomically, and rebuilds the model.
"""

from __future__ import annotations

import os
import struct
import warnings
import zipfile

import torch

from .. import _validation as V
from .._stacklevel import user_stacklevel
from .._atomic import STAGED_PREFIX, refuse_foreign_files, staged_save, write_h5ad
from .._io import load_torch_file, read_h5ad, read_h5mu, writable_folder
from ..checkpoints import EQUIVALENT_FINGERPRINT_PARTS, UNCHECKED_EQUIVALENT_PARTS, StateMismatchError
from ..data.source_state import names_digest, setting_text, unordered_names_hash
from ..infer import SVITrainer
from ..priors import priors_fingerprint

MODEL_FILE = "model.pt"
DATA_FILES = {"anndata": "adata.h5ad", "mudata": "mdata.h5mu"}  # written by save(..., save_anndata=True)


def file_prefix(prefix) -> str:
    """``prefix`` checked as scvi-tools' ``save(..., prefix=)``: a string put before each saved file's name
    (``f"{prefix}model.pt"``), so that several models share one folder; None is no prefix.

    Raises
    ------
    TypeError
        Not a string.
    ValueError
        A path separator in it (the prefix names files inside ``dir_path``, not a subfolder), or the name of a
        save in progress.
    """
    if prefix is None:
        return ""
    if not isinstance(prefix, str):
        # save(dir_path, True) meant overwrite before prefix came second, as in scvi-tools
        raise V.ArgumentTypeError(f"prefix must be a string put before the saved files' names, got {prefix!r}; "
                                  "pass overwrite (and a model's save_anndata) by name, e.g. save(dir_path, "
                                  "overwrite=True).")
    separators = [s for s in {"/", os.sep, os.altsep} if s and s in prefix]
    if separators:
        raise ValueError(f"prefix={prefix!r} holds the path separator {separators[0]!r}: a prefix names files inside "
                         f"dir_path ({prefix}model.pt), not a subfolder. Put the folder in dir_path, e.g. "
                         f"save(os.path.join(dir_path, {os.path.dirname(prefix)!r}), "
                         f"prefix={os.path.basename(prefix)!r}).")
    if prefix.startswith(STAGED_PREFIX):
        raise ValueError(f"prefix={prefix!r} starts with {STAGED_PREFIX!r}, the name of a save in progress; choose "
                         "another prefix.")
    return prefix


#: keys every payload of :meth:`SavedModel.save` has, as the pickle inside ``model.pt`` spells them
PAYLOAD_KEYS = ("init_params", "is_trained", "state_dict")


def is_saved_model(path: str) -> bool:
    """Whether ``path`` is a ``model.pt`` written by :meth:`SavedModel.save` (and not, e.g., a user's own torch
    checkpoint named ``best_model.pt``): its pickle holds the payload's keys. Read as bytes, never unpickled, and
    without the tensors' data."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            data = archive.read(pickled) if pickled is not None else b""
    except (OSError, zipfile.BadZipFile):
        return False
    # a string as pickle writes it: BINUNICODE (protocol 2, torch's) or SHORT_BINUNICODE (protocol 4 and later)
    spelled = lambda key: (b"X" + struct.pack("<I", len(key)) + key.encode(),  # noqa: E731
                           b"\x8c" + bytes([len(key)]) + key.encode())
    return all(any(form in data for form in spelled(key)) for key in PAYLOAD_KEYS)


def saved_prefixes(dir_path: str, marker: str = MODEL_FILE, is_save=None) -> tuple[list[str], list[str]]:
    """The files in ``dir_path`` and the prefixes of the saves among them: each ``f"{prefix}{marker}"`` (``marker``:
    ``model.pt`` for a model, ``settings.json`` for an NDreamer) that ``is_save(path)`` takes for a save (by default
    :func:`is_saved_model`); another file of that name (a user's ``best_model.pt``) is no save."""
    is_save = is_saved_model if is_save is None else is_save
    names = sorted(os.listdir(dir_path)) if os.path.isdir(dir_path) else []
    prefixes = [n[: -len(marker)] for n in names
                if n.endswith(marker) and not n.startswith(STAGED_PREFIX) and ".partial-" not in n
                and is_save(os.path.join(dir_path, n))]
    return names, prefixes


def no_saved(dir_path: str, prefix: str, marker: str = MODEL_FILE, what: str = "saved model",
             is_save=None) -> FileNotFoundError:
    """The error for a folder without ``f"{prefix}{marker}"``: it names the files there and the prefixes saved.

    Parameters
    ----------
    dir_path
        The folder read.
    prefix
        The prefix asked for (checked by :func:`file_prefix`).
    marker
        The file that marks a complete save (``model.pt``; an NDreamer's ``settings.json``).
    what
        What is saved, for the message (``"saved model"``, ``"saved NDreamer"``).
    is_save
        Whether a file named ``f"{prefix}{marker}"`` is a save (see :func:`saved_prefixes`).

    Returns
    -------
    FileNotFoundError
    """
    if not os.path.isdir(dir_path):
        return FileNotFoundError(f"No {what} at {dir_path}: the folder does not exist.")
    names, prefixes = saved_prefixes(dir_path, marker, is_save)
    shown = names[:20] + ([f"... {len(names) - 20} more"] if len(names) > 20 else [])
    if not prefixes:
        hint = f"no {what} is there (a save writes <prefix>{marker})"
    elif len(prefixes) == 1:
        hint = f"the one {what} there has prefix={prefixes[0] or None!r}; load it with that prefix"
    else:
        hint = f"the {what}s there have the prefixes {[p or None for p in prefixes]}; pass one as prefix="
    return FileNotFoundError(f"No {what} at {os.path.join(dir_path, prefix + marker)} (prefix={prefix or None!r})."
                             f" Files found: {shown}; {hint}.")


class SavedModel:
    """Save and load for a model class (mixed into :class:`~pyro_scmodels.models._base.PyroModelBase`)."""

    #: a query model's origin: a digest of its reference's parameters and the freezing it was mapped with (set by
    #: ``load_query_data``); None for a model trained from scratch, and for a query saved before 2026-12-06. Saved,
    #: and compared before a checkpoint resumes.
    query_reference: str | None = None
    #: the history and steps of a saved model loaded onto other cells than it trained on (its split and optimiser are
    #: not restored): :attr:`history` shows them and the next ``train()`` continues them; None otherwise
    carried_training: tuple | None = None

    def _save_payload(self) -> dict:  # pragma: no cover - provided by the model class
        raise NotImplementedError

    def save(self, dir_path: str, prefix: str | None = None, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Save the model (parameters, settings, gene names, categories, history) to ``dir_path``.

        Parameters
        ----------
        dir_path
            Folder to create; ``model.pt`` is written inside.
        prefix
            Put before the name of each file written (``f"{prefix}model.pt"``, ``f"{prefix}adata.h5ad"``), as in
            scvi-tools: models saved with different prefixes share ``dir_path``, and :meth:`load` takes the same
            prefix. None: no prefix. It may not hold a path separator.
        overwrite
            Replace an existing saved model of the same prefix in ``dir_path`` (those of other prefixes stay).
        save_anndata
            Also write the training data (``adata.h5ad``, or ``mdata.h5mu`` for a MuData), so that
            :meth:`load` needs no data argument.
        """
        prefix = file_prefix(prefix)
        marker = f"{prefix}{MODEL_FILE}"
        path = os.path.join(dir_path, marker)
        save_anndata = V.boolean("save_anndata", save_anndata)
        overwrite = V.boolean("overwrite", overwrite)  # a string "False" from a config file read as True
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        if not overwrite:  # the user's own adata.h5ad in the folder was removed (or replaced) by a save
            refuse_foreign_files(dir_path, marker, [prefix + self._data_file()] if save_anndata else [], "a saved model")
        writable_folder("dir_path", dir_path)
        self.module.model.check_priors()  # a buffer of a shape its site cannot take would save a model that cannot load
        payload = self._save_payload()
        payload["state_dict"] = {k: v.cpu() for k, v in self.module.state_dict().items()}
        payload["trainer"] = None if self.trainer is None else self.trainer.state(include_modules=False)
        payload["is_trained"] = self.is_trained
        payload["data backed"] = bool(save_anndata and getattr(self.adata, "isbacked", False))
        payload["module classes"] = self._module_classes()
        payload["query reference"] = self.query_reference
        # model.pt marks the save: written last, after the data, so that a save stopped while writing leaves the
        # earlier one whole, and data saved with an earlier model is removed (never loaded with this one)
        # (the files of another prefix are another model's: neither replaced nor removed)
        with staged_save(dir_path, marker, replaces=tuple(prefix + name for name in DATA_FILES.values())) as stage:
            if save_anndata and hasattr(self.adata, "mod"):
                self.adata.write(stage(prefix + self._data_file()))  # MuData.write is write_h5mu
            elif save_anndata:
                write_h5ad(self.adata, stage(prefix + self._data_file()))  # a backed AnnData stays backed by its own file
            torch.save(payload, stage(marker))

    def _data_file(self) -> str:
        return DATA_FILES["mudata" if hasattr(self.adata, "mod") else "anndata"]

    @staticmethod
    def _saved_data(dir_path: str, kind: str, backed: bool = False, prefix: str = ""):
        """The data saved next to a model with ``save_anndata=True`` (opened backed when the model's were); ``ValueError``
        saying what to do if absent."""
        path = os.path.join(dir_path, prefix + DATA_FILES[kind])
        if not os.path.exists(path):
            what = "mdata" if kind == "mudata" else "adata"
            raise ValueError(
                f"No {what} was passed and none was saved in {dir_path} ({prefix}{DATA_FILES[kind]} is absent). Pass the data "
                f"the model should work on ({what}=...), or save the model with save(..., save_anndata=True)."
            )
        # a model of data on disk gets its copy on disk: read into memory, the copy of a file chosen because it does
        # not fit there filled memory
        return read_h5mu(path) if kind == "mudata" else read_h5ad(path, backed="r" if backed else None)

    @classmethod
    def _read_payload(cls, dir_path: str, prefix: str = "") -> dict:
        path = os.path.join(dir_path, prefix + MODEL_FILE)
        if not os.path.isfile(path):
            raise no_saved(dir_path, prefix)
        payload = load_torch_file(path, "saved model")
        # a multimodal model records its modalities; a single-modality one its layer
        if ("modalities" in payload) != hasattr(cls, "setup_mudata"):
            saved = payload.get("class", "model of another kind")
            raise ValueError(f"{dir_path} holds a saved {saved}, not a {cls.__name__}; load it with {saved}.load(...).")
        return payload

    @classmethod
    def _module_classes(cls) -> str:
        """The classes of the Pyro model and guide built (a modeller's subclass edits sites the state dict cannot
        show)."""
        return f"{cls.model_class.__name__} / {cls.guide_class.__name__}"

    def _legacy_module_classes(self) -> tuple[str, bool] | None:
        """How saves and checkpoints before 2026-12-06 recorded the module classes, where that differs, and whether
        such a record checks everything this class builds (None: the record has not changed). A record that does
        not is taken up with a warning."""
        return None

    def _restore(self, payload: dict) -> None:
        saved_classes, legacy = payload.get("module classes"), self._legacy_module_classes()
        if saved_classes is not None and legacy is not None and saved_classes == legacy[0]:
            if not legacy[1]:
                # (the one such record so far: a multimodal model's, before its blocks were recorded)
                warnings.warn(f"This folder was saved before the classes of a multimodal model's blocks were recorded "
                              f"({saved_classes}); it is loaded with {type(self).__name__}'s blocks "
                              f"({self._module_classes()}), which cannot be checked against it.", UserWarning,
                              stacklevel=user_stacklevel())
        elif saved_classes is not None and saved_classes != self._module_classes():
            raise ValueError(f"This folder was saved by a {payload.get('class', 'model')} whose Pyro model and guide are "
                             f"{saved_classes}; {type(self).__name__} builds {self._module_classes()}, so an edited site "
                             f"would silently take its default. Load it with {payload.get('class', 'that class')}.load(...).")
        self.module.load_state_dict(payload["state_dict"])
        self.is_trained = payload["is_trained"]
        self.query_reference = payload.get("query reference")  # before the fingerprint below, which holds it
        saved = payload.get("trainer")
        if saved is not None:
            now, then = self._fingerprint(), saved["fingerprint"]
            # the split is kept as positions: it needs the same cells in the same order (an older save lacks the order)
            same_cells = then.get("cells") == now["cells"] and then.get("cell order", now["cell order"]) == now["cell order"]
            self.trainer = None
            if same_cells:
                trainer = SVITrainer(self.module.model, self.module.guide, self._cell_data(), saved["train_indices"],
                                     saved["validation_indices"], fingerprint=now)
                try:
                    trainer.load_state(saved)
                    self.trainer = trainer
                except StateMismatchError as error:  # the same cells with other counts or covariates: other data
                    warnings.warn(f"The data differ from those the model was trained on ({', '.join(error.parts)} "
                                  "differ): the model is loaded with its parameters and history, and a further train() "
                                  "starts a new split and optimiser.", UserWarning, stacklevel=user_stacklevel())
            if self.trainer is None:
                # other cells than in training: the history and the steps taken are kept, the split and optimiser not
                self.carried_training = (saved["history"], int(saved.get("step", 0)))
        self.module.eval()

    @classmethod
    def _bind_saved(cls, payload: dict, data) -> None:  # pragma: no cover - provided by the model class
        """Check that ``data`` has the saved model's features and set it up with the saved setup."""
        raise NotImplementedError

    @classmethod
    def _load(cls, dir_path: str, data, device: str, kind: str, prefix: str | None = None):
        """The model saved in ``dir_path`` under ``prefix``, bound to ``data`` (None: the data saved beside it), on
        ``device``."""
        prefix = file_prefix(prefix)
        payload = cls._read_payload(dir_path, prefix)
        if data is None:
            data = cls._saved_data(dir_path, kind, payload.get("data backed", False), prefix)
        cls._bind_saved(payload, data)
        model = cls(data, **payload["init_params"], _categories=payload["categories"])
        model._restore(payload)
        model._move_to(device)
        return model

    def _legacy_priors(self):
        """The priors as an earlier version fingerprinted them, where that differs (None: it does not)."""
        return None

    def _legacy_settings(self, settings: dict) -> dict | None:
        """The settings (``init_params`` less the priors) as earlier versions recorded them, where that differs from
        ``settings`` (None: it does not)."""
        return None

    def _fingerprint(self) -> dict:
        """What identifies this model's training data and settings (checked before resuming)."""
        data = self._cell_data()
        params, legacy = self.init_params, self._legacy_priors()  # each reads the priors back from the buffers: once
        settings = {k: v for k, v in params.items() if k != "priors"}
        legacy_settings = self._legacy_settings(settings)
        return {
            "cells": (data.n_cells, unordered_names_hash(self.adata.obs_names)),
            "features": tuple(m.n_features for m in data.modalities.values()),
            # the names, modality by modality in the model's order: the per-gene tables and the decoders' rows
            # belong to them (other genes, or the modalities swapped, resumed silently onto the wrong features)
            "feature names": {"genes" if m is None else f"{i}: {m}": names_digest(self.feature_names(m))
                              for i, m in enumerate(getattr(self, "modalities", None) or [None])},
            "model settings": {k: setting_text(v) for k, v in settings.items()},
            **({} if legacy_settings is None else {EQUIVALENT_FINGERPRINT_PARTS["model settings"]: {
                k: setting_text(v) for k, v in legacy_settings.items()}}),
            # the two parts of checkpoints written before the finer ones above (compared only for those)
            "settings": repr(settings if legacy_settings is None else legacy_settings),
            "covariates": repr({"keys": self.keys.to_dict(), "categories": self.encoding.categories}),
            # the covariate keys and their categories size the model's tables: another setup cannot resume
            # (dicts, so that the refusal names the role or the column that differs)
            "covariate keys": {role: repr(keys) for role, keys in self.keys.to_dict().items()},
            "covariate categories": {key: repr(list(cats)) for key, cats in self.encoding.categories.items()},
            # the priors are buffers of the checkpoint's modules: resuming would silently put the old ones back
            "priors": priors_fingerprint(params.get("priors")),
            **({} if legacy is None else {EQUIVALENT_FINGERPRINT_PARTS["priors"]: priors_fingerprint(legacy)}),
            # a subclass's edited site is not in the state dict: another model class resumed silently with the default
            "module classes": self._module_classes(),
            # checkpoints that recorded the module classes as before: taken up, with a warning where that leaves
            # something unchecked (checkpoints.UNCHECKED_EQUIVALENT_PARTS)
            **({} if (legacy_classes := self._legacy_module_classes()) is None else
               {(EQUIVALENT_FINGERPRINT_PARTS if legacy_classes[1] else UNCHECKED_EQUIVALENT_PARTS)["module classes"]:
                legacy_classes[0]}),
            # a query's checkpoint holds the frozen reference parameters it was mapped onto: resumed onto a query of
            # another reference, the model took one reference's decoder and the other's tables
            "query reference": self.query_reference,
            # added later (ADDED_FINGERPRINT_PARTS): the split is kept as positions, so the cells' order counts; other
            # counts or relabelled cells under the same names resumed silently
            "cell order": names_digest(self.adata.obs_names),
            "cell covariates": {role: setting_text(values.numpy()) for role, values in data.covariates.items()},
            # counts on disk are summed in one pass (recorded as None before 2026-12-06, matching any: other counts
            # under the same names resumed silently; such a saved None is taken up with a warning)
            "counts": {name: matrix.content_summary() for name, matrix in data.modalities.items()},
        }
