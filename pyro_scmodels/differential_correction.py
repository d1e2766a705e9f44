"""Batch correction of differential expression: the decoder covariates each group's cells are decoded as.

scvi-tools' ``batch_correction`` with ``batchid1`` / ``batchid2``: every cell is decoded as each chosen category of a
decoder-conditioning key, and the two groups' draws pair within a category (the same categories for both) or across
all of them (disjoint ones). :func:`pyro_scmodels.differential.differential_expression` uses :func:`correction_strata`.
"""

from __future__ import annotations

import warnings

import numpy as np

from . import _validation as V
from ._stacklevel import user_stacklevel


def correction_key(model, batch_correction) -> str | None:
    """The decoder-conditioning key every cell is decoded as each category of, or None without correction."""
    if batch_correction is False or batch_correction is None:
        return None
    keys = list(model.keys.nn_conditioning)
    if isinstance(batch_correction, str):
        if batch_correction not in keys:
            raise ValueError(f"batch_correction={batch_correction!r} is not a decoder-conditioning key of the model "
                             f"(nn_conditioning_covariate_keys={keys}).")
        return batch_correction
    if V.boolean("batch_correction", batch_correction) and len(keys) == 1:
        return keys[0]
    if not keys:
        warnings.warn("batch_correction=True changes nothing here: the decoder is not conditioned on covariates, and rho "
                      "already leaves out the ambient, scaling, dispersion and library terms.",
                      stacklevel=user_stacklevel())
        return None
    raise ValueError(f"The decoder is conditioned on several keys {keys}; name the one to correct for, "
                     "e.g. batch_correction='batch'.")


def _chosen_categories(name: str, chosen, key: str, categories: list) -> list:
    """``batchid1`` / ``batchid2`` checked against the key's categories, in the order given, without repeats."""
    chosen = [chosen] if isinstance(chosen, str) or np.ndim(chosen) == 0 else list(chosen)
    by_text = {str(category): category for category in categories}
    unknown = [category for category in chosen if str(category) not in by_text]
    if not chosen or unknown:
        raise ValueError(f"{name}={chosen!r}: {'names no category' if not chosen else f'{unknown} not among'} the "
                         f"categories of {key!r} ({list(categories)}).")
    return list(dict.fromkeys(by_text[str(category)] for category in chosen))


def correction_strata(model, batch_correction, batchid1=None, batchid2=None) -> tuple[list, list, bool]:
    """Decoder covariates to decode each group's cells with (one stratum each), and whether rows pair within strata.

    Without correction each group has the one stratum None (the cells' own covariates). With it, both groups are
    decoded as every category of the key and paired within a category; ``batchid1`` / ``batchid2`` narrow the
    categories of each group: the same ones pair within each, disjoint ones pair across all (case and control
    decoded as batches of their own)."""
    key = correction_key(model, batch_correction)
    if key is None:
        if (batchid1 is not None or batchid2 is not None) and batch_correction:
            raise ValueError("batchid1 / batchid2 choose categories of the decoder-conditioning key to decode the "
                             "groups as, and this model's decoder is conditioned on no covariate: there are none.")
        if batchid1 is not None or batchid2 is not None:
            raise ValueError("batchid1 / batchid2 choose the categories the groups are decoded as, which needs "
                             "batch_correction=True (or the key's name); without it each cell keeps its own.")
        return [None], [None], True
    categories = list(model.encoding.categories[key])
    first = categories if batchid1 is None else _chosen_categories("batchid1", batchid1, key, categories)
    second = categories if batchid2 is None else _chosen_categories("batchid2", batchid2, key, categories)
    shared = set(map(str, first)) & set(map(str, second))
    if set(map(str, first)) == set(map(str, second)):
        second, paired = first, True
    elif not shared:
        paired = False
    else:
        # scvi-tools warns here and pools; a pooled comparison mixes same- and cross-batch pairs without saying which
        raise ValueError(f"batchid1 {first} and batchid2 {second} share {sorted(shared)} but differ: pass the same "
                         "categories (pairs within each) or disjoint ones (case and control decoded as batches of "
                         "their own). A batchid left out means every category of " + repr(key) + ".")
    return [{key: category} for category in first], [{key: category} for category in second], paired
