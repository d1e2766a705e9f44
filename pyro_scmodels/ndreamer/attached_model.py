"""A trained model re-attached to a saved ``from_model`` NDreamer: is it the one the NDreamer was built from?

:func:`model_digest` fingerprints a model's parameters when ``NDreamer.from_model`` builds on it;
:func:`check_attached_model` refuses, at load, a model with other cells, genes, parameters or counts.
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd

from .._labels import names_as_text
from ..data.source_state import state_digest
from ..nn import is_legacy_identity_entry

#: the obsm key of NDreamer's stored representation (the results' embedding)
EMBEDDING_KEY = "X_effect_modifier_space"
#: cells whose latent a re-attached model must reproduce, and by how much it may differ: 2 % of each dimension's
#: spread, at least this much
ATTACHED_LATENT_CHECK_CELLS = 1_000
ATTACHED_LATENT_TOLERANCE = 1e-3


def model_digest(model) -> str:
    """A digest of a trained model's parameters and buffers: the same model, saved and loaded, gives the same one.

    Parameters
    ----------
    model
        A model of this package (its ``module``, the Pyro model and guide).

    Returns
    -------
    str
        A SHA-256 hex digest.
    """
    # a standardiser at its identity is what a model saved before it existed amounted to: the same digest
    return state_digest(model.module.state_dict(), skip=is_legacy_identity_entry)


def check_attached_model(model, settings: dict, results: anndata.AnnData) -> None:
    """Refuse a model re-attached to a saved ``from_model`` NDreamer that is not the one it was built from.

    Its cells and genes (names and order) must be the saved ones: the model ITE is written by position into layers
    named by the saved genes. Its parameters must be the saved model's (a digest recorded by ``from_model``; not
    checked for NDreamers saved before it was recorded): a model trained further, or another with the same cell
    names, decodes other effects than the stored latent was matched in.
    """
    # as text: integer names come back from h5ad as strings
    if not names_as_text(model.adata.obs_names).equals(names_as_text(results.obs_names)):
        raise ValueError("model.adata holds other cells than the saved NDreamer; pass the model it was built from.")
    source = _attached_counts(model, settings.get("modality"))
    genes = None if source is None else names_as_text(source.var_names)
    if genes is None or not genes.equals(results.var_names):
        differ = "no counts_source()" if genes is None else (
            f"{len(genes)} genes against the saved {results.n_vars}" if len(genes) != results.n_vars else
            "the first difference at position {0}: {1!r} against the saved {2!r}".format(
                *next((i, a, b) for i, (a, b) in enumerate(zip(genes, results.var_names)) if a != b)))
        raise ValueError(f"model has other genes than the saved NDreamer ({differ}): its model ITE would be filed "
                         "under the wrong gene names. Pass the model it was built from.")
    saved = settings.get("model_digest")
    if saved is not None and saved != model_digest(model):
        raise ValueError("model's parameters differ from those of the model this NDreamer was built from (trained "
                         "further, or another model with the same cells and genes): its model ITE would not belong to "
                         "the stored latent. Pass the model it was built from (e.g. as saved beside it), or build a "
                         "new NDreamer with NDreamer.from_model(model, ...).")
    if EMBEDDING_KEY in results.obsm:
        _check_attached_latent(model, np.asarray(results.obsm[EMBEDDING_KEY]), results.obs_names)


def _attached_counts(model, modality):
    """The AnnData a re-attached model reads the saved ``modality`` from (None: its default, as saved before the
    modality was kept); None without ``counts_source()``."""
    try:
        return model.counts_source(modality)[0] if callable(getattr(model, "counts_source", None)) else None
    except ValueError as err:  # a RegularizedVI for a multimodal NDreamer, or a model without the saved modality
        raise ValueError(f"The saved NDreamer reads the expression of modality {modality!r}, which model cannot give "
                         f"({err}). Pass the model it was built from.") from err


def _check_attached_latent(model, stored: np.ndarray, names: pd.Index) -> None:
    """Refuse a model whose data hold other counts under the saved cell names: its latent is not the stored one.

    Checked on up to :data:`ATTACHED_LATENT_CHECK_CELLS` cells spread over the data (rows of a file rebuilt in
    another order kept every name, label and parameter, and each cell got another cell's model ITE).
    """
    cells = np.unique(np.linspace(0, len(names) - 1, min(len(names), ATTACHED_LATENT_CHECK_CELLS)).round().astype(int))
    now = np.asarray(model.get_latent_representation(indices=cells), dtype=np.float64)
    # relative to each dimension's spread (another cell's latent differs by about that; a GPU's TF32 matmuls by far
    # less), with a floor for a dimension that barely varies
    tolerance = np.maximum(ATTACHED_LATENT_TOLERANCE, 0.02 * np.asarray(stored, dtype=np.float64).std(axis=0))
    gap = (np.abs(now - stored[cells]) / tolerance).max(axis=1)
    if (gap > 1).any():
        first = int(np.argmax(gap > 1))
        raise ValueError(
            f"model.adata holds other counts than the data this NDreamer was built from: the model's latent of cell "
            f"{names[cells[first]]!r} differs from the stored one by {gap[first]:.3g} times the tolerance ({int((gap > 1).sum())} "
            f"of {len(cells)} cells checked differ; e.g. the file's rows in another order). Load the model onto the "
            "data it was built on.")
