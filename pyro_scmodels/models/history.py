"""The training history: a per-epoch DataFrame that also answers scvi-tools' history keys.

scvi-tools keeps ``model.history`` as a dict of one-column DataFrames (``history["elbo_train"]``);
this package keeps one DataFrame with a row per epoch. :class:`TrainingHistory` is that DataFrame,
and indexing it with an scvi-tools key returns what scvi-tools returns: a one-column DataFrame
named after the key and indexed by epoch.
"""

from __future__ import annotations

import pandas as pd

# scvi-tools key -> the column holding the same quantity
SCVI_KEYS = {
    "train_loss_epoch": "train_loss",
    "elbo_train": "train_loss",
    "elbo_validation": "validation_loss",
    "validation_loss": "validation_loss",
    "kl_weight": "kl_weight",
}
# keys answered with the epochs that were validated only (as scvi-tools logs them)
_VALIDATION_KEYS = {"elbo_validation", "validation_loss"}
# scvi-tools keys whose per-term breakdown this package does not record
_NOT_RECORDED = ("reconstruction_loss_train", "reconstruction_loss_validation", "kl_local_train",
                 "kl_local_validation", "kl_global_train", "kl_global_validation", "train_loss_step")


class TrainingHistory(pd.DataFrame):
    """One row per epoch (``train_loss``, ``validation_loss``, ``kl_weight``), plus scvi-tools' keys.

    It is a ``pandas.DataFrame``: ``history["train_loss"]`` is a column (a Series), and ``len``,
    ``iloc``, ``to_csv`` and plotting work as usual. Keys that are not columns but that scvi-tools
    uses return scvi-tools' shape, a one-column DataFrame indexed by ``epoch``:

    ========================== =====================================================================
    ``"elbo_train"``           negative ELBO per cell of the training minibatches (``train_loss``);
                               during KL warm-up it is the annealed loss, where scvi-tools reports
                               the un-annealed ELBO
    ``"train_loss_epoch"``     ``train_loss``
    ``"elbo_validation"``      ``validation_loss`` (full KL weight), validated epochs only
    ``"kl_weight"``            the KL weight of the epoch (a column here)
    ========================== =====================================================================

    ``"validation_loss"`` and ``"kl_weight"`` are columns, so they come back as Series (a
    one-column DataFrame is ``history[["validation_loss"]]``). Losses are per cell and positive
    (lower is better), as scvi-tools logs them.
    """

    @property
    def _constructor(self):
        # slices, copies and arithmetic give plain DataFrames
        return pd.DataFrame

    def __getitem__(self, key):
        if isinstance(key, str) and key not in self.columns:
            return self.scvi_key(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or key in SCVI_KEYS

    def scvi_key(self, key: str) -> pd.DataFrame:
        """The one-column DataFrame scvi-tools' ``model.history[key]`` holds.

        Parameters
        ----------
        key
            An scvi-tools history key, e.g. ``"elbo_train"`` or ``"elbo_validation"``.

        Returns
        -------
        pandas.DataFrame
            Indexed by ``epoch``, one column named ``key``.

        Raises
        ------
        KeyError
            An unknown key, a per-term key this package does not record, or a validation key of
            a model trained without validation cells.
        """
        if key not in SCVI_KEYS:
            known = sorted(set(self.columns) | set(SCVI_KEYS))
            detail = (" pyro_scmodels records the whole loss per epoch, not its reconstruction/KL terms; use "
                      "model.get_reconstruction_error() or model.get_elbo() after training."
                      if key in _NOT_RECORDED else "")
            raise KeyError(f"{key!r} is not in the training history. Available keys: {', '.join(known)}.{detail}")
        values = pd.DataFrame(self).get(SCVI_KEYS[key])
        values = pd.Series(dtype=float) if values is None else values.astype(float)
        if key in _VALIDATION_KEYS:
            values = values.dropna()
            if len(self) and values.empty:
                raise KeyError(f"{key!r}: no epoch was validated (train_size=1.0 leaves no validation cells, or "
                               "check_val_every_n_epoch is larger than the epochs run).")
        frame = values.to_frame(key)
        frame.index.name = "epoch"
        return frame


def as_history(table: pd.DataFrame | None, columns=("train_loss", "validation_loss", "kl_weight")) -> TrainingHistory:
    """A training-loop history (or None: not trained) as a float :class:`TrainingHistory`."""
    if table is None:
        table = pd.DataFrame(columns=list(columns))
        table.index.name = "epoch"
    return TrainingHistory(table.astype(float))
