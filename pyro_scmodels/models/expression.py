"""Normalised expression as scvi-tools' ``get_normalized_expression`` returns it, built on the posterior queries.

Expression here is rho = softplus(decoder(z, covariates)): free of the ambient background and
of feature scaling, in counts at a typical library size. Only the decoder-conditioning
covariates (``nn_conditioning_covariate_keys``) enter rho, so ``transform_batch`` switches those:
the ambient, feature-scaling, dispersion and library-size groups never enter rho, and there
is nothing of theirs to transform.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from .. import _validation as V
from .._selection import gene_positions
from .._stacklevel import user_stacklevel


def transform_covariates(model, transform_batch) -> list[dict | None]:
    """The decoder covariates to decode with, one dict ``{key: category}`` per decoding (averaged).

    Parameters
    ----------
    model
        A model of this package.
    transform_batch
        None (each cell's own covariates); a category of the decoder-conditioning key; a list (or tuple, array,
        ``pandas.Index`` or Series) of categories (expression averaged over decoding as each, as scvi-tools does); or a dict
        ``{key: category}`` (needed when several keys condition the decoder).

    Returns
    -------
    list
        ``[None]`` or a list of dicts, each checked later by ``model.nn_switch``.
    """
    if transform_batch is None:
        return [None]
    # any 1-d collection of categories is a list of them (an Index of categories was read as one category's name)
    listed = isinstance(transform_batch, (list, tuple, set, frozenset, pd.Index, pd.Series))
    items = list(np.ravel(transform_batch)) if isinstance(transform_batch, np.ndarray) else (
        list(transform_batch) if listed else [transform_batch])
    # a category named twice would count twice in the average; dicts are compared by their items
    items = list({repr(sorted(i.items())) if isinstance(i, dict) else str(i): i for i in items}.values())
    if not items:
        raise ValueError("transform_batch is an empty list; pass None or at least one category.")
    keys = list(model.keys.nn_conditioning)
    if not keys:
        return _no_conditioning(model, items)
    settings = [item if isinstance(item, dict) else {_key_of(model, keys, item): str(item)} for item in items]
    switched = {tuple(sorted(s)) for s in settings}
    if len(switched) > 1:
        # entries switching different keys would average "as b1 with its own tech" with "as t2 with its own
        # batch": neither the joint setting nor either alone, so it is refused rather than guessed
        raise ValueError(
            f"transform_batch={list(transform_batch)!r} switches different decoder-conditioning keys in its entries "
            f"({sorted(switched)}); a list averages over settings of the same keys. To decode as a combination, pass a "
            "dict such as {key_a: category_a, key_b: category_b}; to average over several, a list of such dicts."
        )
    return settings


def _key_of(model, keys: list[str], category) -> str:
    """The decoder-conditioning key that has ``category`` (it must be exactly one)."""
    if len(keys) == 1:
        return keys[0]
    holders = [k for k in keys if str(category) in model.encoding.categories[k]]
    if len(holders) != 1:
        where = "several keys" if holders else "no key"
        raise ValueError(
            f"transform_batch={category!r} is a category of {where} among the decoder-conditioning keys {keys}; "
            "pass a dict such as {key: category} instead."
        )
    return holders[0]


def _no_conditioning(model, items: list) -> list[None]:
    """A model whose decoder is conditioned on nothing: rho is the same for every batch."""
    known = {c for k in model.keys.categorical_keys() for c in model.encoding.categories[k]}
    unknown = [i for i in items if isinstance(i, dict) or str(i) not in known]
    if unknown:
        raise ValueError(
            f"transform_batch={unknown[0]!r}: the model's decoder is not conditioned on any covariate "
            "(nn_conditioning_covariate_keys is empty), and it is not a category of the model's covariates."
        )
    warnings.warn(
        "transform_batch changes nothing here: the decoder is not conditioned on covariates "
        "(nn_conditioning_covariate_keys), and the batch enters only through the ambient, scaling, dispersion and "
        "library terms, which normalised expression already leaves out.", stacklevel=user_stacklevel()
    )
    return [None]


def gene_columns(names: pd.Index, gene_list) -> np.ndarray | slice:
    """Columns of the genes asked for.

    Parameters
    ----------
    names
        The model's gene names, in its order.
    gene_list
        Names to pick, or None for every gene.

    Returns
    -------
    numpy.ndarray or slice
        Positions of ``gene_list`` in ``names``, in the model's order and each once (scvi-tools selects genes with a
        mask, so an unlabelled array's columns are in that order), or ``slice(None)``.

    Raises
    ------
    KeyError
        Naming the genes of ``gene_list`` that ``names`` lacks.
    """
    positions = gene_positions(names, gene_list)
    return slice(None) if positions is None else np.unique(positions)


def _check_library_size(library_size) -> None:
    if library_size is None or (isinstance(library_size, str) and library_size == "latent"):
        return
    if isinstance(library_size, (str, bool)) or np.ndim(library_size) != 0:
        raise ValueError(f"library_size must be None, 'latent' or a positive number, got {library_size!r}.")
    V.positive_float("library_size", library_size)  # finite and > 0; numpy scalars welcome


def normalized_expression(model, adata=None, indices=None, transform_batch=None, gene_list=None,
                          library_size: str | float | None = None, n_samples: int = 1, batch_size: int | None = None,
                          return_mean: bool = True, return_numpy: bool | None = None, modality: str | None = None,
                          seed: int | None = None):
    """rho per cell and feature; see ``RegularizedVI.get_normalized_expression`` for the arguments.

    Returns
    -------
    pandas.DataFrame or numpy.ndarray
        Cells x features; ``n_samples`` x cells x features (an array) when ``return_mean=False``
        and ``n_samples > 1``.
    """
    _check_library_size(library_size)
    n_samples = V.positive_int("n_samples", n_samples)
    return_mean = V.boolean("return_mean", return_mean)
    return_numpy = V.optional(V.boolean, "return_numpy", return_numpy)  # "False" returned an array
    modality = model.default_modality(modality)
    options = {} if modality is None else {"modality": modality}
    switches = [model.nn_switch(c) for c in transform_covariates(model, transform_batch)]
    names = model.feature_names(modality)
    columns = gene_columns(names, gene_list)
    decoder, guide = model.module.model, model.module.guide  # in evaluation mode while posterior_z_batches run
    parts = []

    def decoded(z, batch, switch):
        rho = decoder.decode(z, batch, None if switch is None else switch(batch["nn_onehot"]), **options)
        # at a fixed library size each decoding is rescaled before the average: the mean of the proportions, as
        # scvi-tools averages px_scale x library_size (rescaling the mean of rho instead differed by up to 5 %)
        if library_size is None or library_size == "latent":
            return rho
        return rho / rho.sum(-1, keepdim=True) * float(library_size)

    for _, batch, z in model.posterior_z_batches(adata, indices, batch_size, None if n_samples == 1 else n_samples, seed):
        with torch.no_grad():
            # a list of categories: the expression averaged over decoding as each (scvi-tools' transform_batch)
            rho = sum(decoded(z, batch, s) for s in switches) / len(switches)
            if library_size == "latent":
                rho = rho * guide.library_loc(batch, **options).exp().unsqueeze(-1)
                # a cell without counts in the modality has no library: its placeholder total of 1 gave expected counts
                # of about 0.2 % of a measured cell's, read as real; NaN, as its exported library size
                measured = model.measured_cells(batch, modality)
                if measured is not None:
                    rho = torch.where(measured.reshape(-1, 1), rho, torch.nan)
            if n_samples > 1 and return_mean:
                rho = rho.mean(0)
        parts.append(rho[..., columns].cpu())
    rho = torch.cat(parts, dim=-2).numpy()
    if rho.ndim == 3:
        if return_numpy is False:
            warnings.warn("return_mean=False with n_samples > 1 returns an array (samples x cells x features), "
                          "as in scvi-tools.", stacklevel=user_stacklevel())
        return rho
    if return_numpy:
        return rho
    obs_names = (model.adata if adata is None else adata).obs_names
    if indices is not None:
        obs_names = obs_names[np.asarray(indices)]
    return pd.DataFrame(rho, index=obs_names, columns=names[columns])
