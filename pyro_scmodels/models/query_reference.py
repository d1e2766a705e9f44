"""What a query model takes from its reference: settings, setup, genes and parameters (:class:`Reference`).

Read from a trained model of the class (its parameters copied, the model not changed) or from the folder it was
saved to, for :mod:`pyro_scmodels.models.query_mapping`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd
import torch

from .. import _validation as V
from ..data import CovariateKeys
from .persistence import file_prefix


@dataclass
class Reference:
    """What a query model takes from its reference: settings, setup, genes and parameters."""

    class_name: str
    init_params: dict
    layer: str | None
    keys: CovariateKeys
    categories: dict[str, list[str]]
    var_names: pd.Index
    state_dict: dict[str, torch.Tensor]
    is_trained: bool

    @classmethod
    def resolve(cls, reference, model_class, prefix: str | None = None) -> "Reference":
        """``reference`` (a model of ``model_class`` or the folder it was saved to) as a :class:`Reference`.

        Parameters
        ----------
        reference
            A model of ``model_class`` (its parameters are copied, it is not changed) or the
            folder passed to its ``save``.
        model_class
            The class the reference must be.
        prefix
            The prefix the folder was saved with (``save(..., prefix=)``); None: no prefix. Only for a folder.

        Returns
        -------
        Reference

        Raises
        ------
        ArgumentTypeError
            ``reference`` is neither.
        FileNotFoundError
            The folder holds no model saved under ``prefix``; the message names the files there and the prefixes saved.
        ValueError
            The saved model is of another class, or a ``prefix`` comes with a model (it names files of a folder).
        """
        prefix = file_prefix(prefix)
        if isinstance(reference, (str, os.PathLike)):
            return cls._from_folder(os.fspath(reference), model_class, prefix)
        if prefix:  # it would be ignored: the files it names are read only from a folder
            raise ValueError(f"prefix={prefix!r} names the files of a saved reference, but reference is a model, not "
                             "the folder it was saved to; pass the folder, or leave prefix out.")
        if isinstance(reference, model_class):
            built = model_class._module_classes()
            if type(reference) is not model_class and reference._module_classes() != built:
                # a subclass's edited site would silently take its default in the query model
                raise ValueError(f"reference is a {type(reference).__name__}, whose Pyro model and guide are "
                                 f"{reference._module_classes()}; {model_class.__name__} builds {built}. Map the query "
                                 f"with {type(reference).__name__}.load_query_data(...).")
            return cls(
                type(reference).__name__, dict(reference.init_params), reference.layer, reference.keys,
                {k: list(v) for k, v in reference.encoding.categories.items()}, pd.Index(reference.var_names),
                {k: v.detach().cpu().clone() for k, v in reference.module.state_dict().items()}, bool(reference.is_trained),
            )
        raise V.ArgumentTypeError(
            f"reference must be a trained {model_class.__name__} or the folder it was saved to, got {type(reference).__name__}."
        )

    @classmethod
    def _from_folder(cls, folder: str, model_class, prefix: str) -> "Reference":
        try:
            payload = model_class._read_payload(folder, prefix)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error} reference must be a trained model or the folder passed to its save().") from None
        if payload["class"] != model_class.__name__:
            raise ValueError(f"The model saved in {folder} is a {payload['class']}, not a {model_class.__name__}.")
        return cls(payload["class"], dict(payload["init_params"]), payload["layer"], CovariateKeys(**payload["keys"]),
                   payload["categories"], pd.Index(payload["var_names"]), payload["state_dict"], bool(payload["is_trained"]))

    def role_keys(self) -> dict[str, list[str]]:
        """The ``.obs`` keys whose categories index each per-level table, by covariate role.

        Returns
        -------
        dict
            ``{"ambient": [...], "feature_scaling": [...], "dispersion": [...], "library_size": [...]}``;
            an empty list where one level is shared by every cell.
        """
        keys = self.keys
        single = lambda key: [] if key is None else [key]  # noqa: E731
        return {"ambient": keys.ambient, "feature_scaling": keys.feature_scaling, "dispersion": single(keys.dispersion),
                "library_size": single(keys.library_size)}
