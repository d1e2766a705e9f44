"""Saving an NDreamer to a folder and loading it back (the folder's files: :mod:`._persistence`)."""

from __future__ import annotations

import warnings

import pandas as pd

from .. import _validation as V
from .._stacklevel import user_stacklevel
from ..checkpoints import StateMismatchError
from ..models.persistence import file_prefix
from ._persistence import read_ndreamer, write_ndreamer
from .design import design_from_obs


class NDreamerSaveLoad:
    """``save`` and ``load`` of :class:`~pyro_scmodels.ndreamer.NDreamer` (mixed into it)."""

    def save(self, dir_path: str, prefix: str | None = None, overwrite: bool = False) -> None:
        """Write settings, results, matching state and the network (if any) into ``dir_path`` only.

        A ``from_model`` NDreamer stores its latent (in the results) but not the model itself; the model can be
        saved into the same folder (``model.save(dir_path, prefix=...)``: its file names differ from these).

        Parameters
        ----------
        dir_path
            Target folder (created if absent).
        prefix
            Put before the name of each file written (``f"{prefix}settings.json"``, ``f"{prefix}results.h5ad"``,
            ...), as scvi-tools' ``save(..., prefix=)``: NDreamers saved with different prefixes share ``dir_path``,
            and :meth:`load` takes the same prefix. None: no prefix. It may not hold a path separator.
        overwrite
            Replace an NDreamer saved in ``dir_path`` under the same prefix (those of other prefixes stay): of the
            files there, only those its settings file lists as written by it are removed.

        Raises
        ------
        TypeError
            ``prefix`` is not a string, e.g. ``save(dir_path, True)`` meaning ``overwrite`` (pass it by name).
        FileExistsError
            An NDreamer is saved there under this prefix, or a file of its names is someone else's, and not
            ``overwrite``.
        """
        prefix = file_prefix(prefix)  # before anything is changed or written
        self._sync_loss_weights()
        if self.network is not None and self.trainer is None and not self._saved_network:
            self._make_trainer()  # an untrained network is saved with a training state of no steps, to load as such
        elif self.trainer is not None:  # the saved training state records the loss weights and names as they are now
            self.trainer.fingerprint = self._fingerprint()
        write_ndreamer(self, dir_path, overwrite, prefix)

    @classmethod
    def load(cls, dir_path: str, device: str = "auto", model=None, prefix: str | None = None):
        """Load an NDreamer written by :meth:`save`.

        Parameters
        ----------
        dir_path, device
            The folder; torch device.
        model
            For a ``from_model`` NDreamer: the same trained model, re-attached so that
            :meth:`estimate_model_ite` works (without it that method raises). Its cells must be
            the saved ones. Matching-based methods work without it (the latent is stored).
        prefix
            The prefix it was saved with (``save(..., prefix=)``); None: no prefix.

        Returns
        -------
        NDreamer

        Raises
        ------
        TypeError
            An AnnData in place of ``device`` (scvi-tools' ``Model.load(dir_path, adata)``), or a ``prefix`` that is
            not a string.
        FileNotFoundError
            No NDreamer saved in ``dir_path`` under ``prefix``; the message names the files there and the prefixes
            of the NDreamers saved.
        """
        if not isinstance(device, str) and hasattr(device, "obs") and hasattr(device, "var_names"):
            # scvi-tools' Model.load(dir_path, adata): an NDreamer saves its cells and expression with it
            raise V.ArgumentTypeError("NDreamer.load(dir_path, device='auto', model=None) takes no AnnData: the cells and "
                                      "the expression it needs are saved in the folder. Pass the trained model as model= "
                                      "for a from_model NDreamer.")
        saved = read_ndreamer(dir_path, model, file_prefix(prefix))
        nd = cls.__new__(cls)  # built through the one constructor path, as every instance is
        obs = saved.results.obs.copy()
        nd._setup(saved.settings, obs, saved.expression, pd.Index(saved.results.var_names), device, labels=saved.labels,
                  loss_weights=saved.loss_weights, latent=saved.latent, model=model,
                  design=design_from_obs(obs, saved.settings, saved=True))
        if nd.network is not None:  # read_ndreamer has checked that the network file is there
            nd.network.load_state_dict(saved.network_state)
            nd.network.eval()
            # trained, unless its training state says it never took a step (a save made before training)
            nd._saved_network = saved.training_state is None or saved.training_state.get("step", 1) > 0
            if saved.training_state is not None:  # the history, optimiser and passes: a further train() goes on
                try:
                    nd._make_trainer().load_state(saved.training_state, source=f"The training state in {dir_path}")
                except StateMismatchError as error:  # the folder's files were edited: the network and results load
                    nd.trainer = None
                    warnings.warn(f"The training state in {dir_path} does not match the saved results "
                                  f"({', '.join(error.parts)} differ): loaded without it. The network "
                                  "and the results are the saved ones; a further train() starts with a new optimiser "
                                  "and history.", UserWarning, stacklevel=user_stacklevel())
        nd.results = saved.results
        if saved.effects_file is not None:
            nd.effects.load(saved.effects_file)
        return nd
