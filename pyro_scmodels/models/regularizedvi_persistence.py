"""Save and load of :class:`~pyro_scmodels.RegularizedVI`: its payload, and binding a saved model to an AnnData."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from .._stacklevel import user_stacklevel
from .train_options import load_device
from ..data import SETUP_UNS_KEY, check_var_names, read_setup, refuse_mudata, setup_arguments

if TYPE_CHECKING:  # the class this mixin is part of (the return type of load)
    from .regularizedvi import RegularizedVI


class RegularizedVIPersistence:
    """The single-modality parts of save and load (mixed into :class:`~pyro_scmodels.RegularizedVI`, before
    :class:`~pyro_scmodels.models._base.PyroModelBase`)."""

    def _save_payload(self) -> dict:
        return {
            "class": type(self).__name__,
            "init_params": self.init_params,
            "layer": self.layer,
            "keys": self.keys.to_dict(),
            "categories": self.encoding.categories,
            "var_names": list(self.var_names),
        }

    @classmethod
    def load(cls, dir_path: str, adata=None, device: str = "auto", prefix: str | None = None,
             accelerator: str | None = None) -> "RegularizedVI":
        """Load a model saved with :meth:`save`, bound to ``adata``.

        Parameters
        ----------
        dir_path
            The folder written by :meth:`save`.
        adata
            AnnData with the model's genes in the same order and only categories seen in
            training; if it was not set up, the saved setup is applied. None: the AnnData saved
            with ``save(..., save_anndata=True)``.
        device
            ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; with
            ``accelerator``, scvi-tools' meaning: ``"auto"`` or a GPU index.
        prefix
            The prefix the model was saved with (``save(..., prefix=)``; scvi-tools' meaning): the files read are
            ``f"{prefix}model.pt"`` and ``f"{prefix}adata.h5ad"``. None: no prefix.
        accelerator
            scvi-tools' ``"auto"``, ``"cpu"``, ``"gpu"`` or ``"cuda"`` (as in its ``load``); None: ``device`` decides.

        Returns
        -------
        RegularizedVI

        Raises
        ------
        FileNotFoundError
            No ``f"{prefix}model.pt"`` in ``dir_path``; the message names the files there and the prefixes saved.
        """
        refuse_mudata(adata, f"{cls.__name__}.load")
        return cls._load(dir_path, adata, load_device(device, accelerator), "anndata", prefix)

    @classmethod
    def _bind_saved(cls, payload: dict, adata) -> None:
        check_var_names(payload["var_names"], adata)
        saved_setup = (payload["layer"], payload["keys"])
        if SETUP_UNS_KEY in adata.uns:
            current = read_setup(adata)
            if (current.layer, current.keys.to_dict()) != saved_setup:
                warnings.warn(
                    "adata was set up differently from the saved model; the model's setup "
                    f"(layer={payload['layer']!r}, keys={payload['keys']}) is applied instead.",
                    stacklevel=user_stacklevel(),
                )
        cls.setup_anndata(adata, layer=payload["layer"], **setup_arguments(payload["keys"]))
