"""The networks of a query model: input columns for the categories its reference was not trained on.

The decoder reads the one-hot of the ``nn_conditioning_covariate_keys`` (injected into every hidden layer), the z
and library encoders the one-hot of the ``encoder_covariate_keys`` (appended to their input). A query model is built
over the reference's categories followed by the new ones, so each of these networks reads a wider one-hot than its
reference. As in scArches (scvi-tools' ``load_query_data``), the reference's weights load into the columns of the
categories they were trained on, and the columns of the new categories keep the query model's freshly initialised
values: scvi-tools concatenates the new model's own initial columns (PyTorch's default ``nn.Linear`` initialisation,
uniform in +-1/sqrt(fan_in)) to the loaded weights; so does this module. The networks hold the new columns as
parameters of their own (:meth:`~pyro_scmodels.nn.FullyConnected.extend_covariates`), so that
:mod:`.query_freezing` can freeze the reference's columns as whole tensors and train only the new ones.

Where scvi-tools differs: its hooks train every covariate column of the first layer of each network (old categories
included) and none of the deeper layers'; here only the new categories' columns learn, in every layer that reads
them, and every reference weight stays bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch

from ..nn import FullyConnected
from .query_reference import Reference

#: the setup option of each network's covariate keys, by :class:`~pyro_scmodels.data.CovariateKeys` field
NETWORK_OPTIONS = {"nn_conditioning": "nn_conditioning_covariate_keys", "encoder": "encoder_covariate_keys"}


def new_columns(keys: list[str], categories: dict[str, list[str]], known: dict[str, list[str]]) -> np.ndarray:
    """Positions, in the one-hot stacked over ``keys`` (query categories), of the categories new to the reference.

    Parameters
    ----------
    keys
        The covariate keys the one-hot stacks, in order.
    categories
        The query model's categories per key (the reference's first, then the new ones).
    known
        The reference's categories per key.

    Returns
    -------
    numpy.ndarray
        Column positions (int64), ascending.
    """
    positions, offset = [], 0
    for key in keys:
        positions += [offset + i for i, category in enumerate(categories[key]) if category not in known[key]]
        offset += len(categories[key])
    return np.asarray(positions, dtype=np.int64)


def _refuse(network, option: str, key_names: list[str], new: dict[str, list[str]]) -> None:
    keys = [key for key in key_names if key in new]
    raise ValueError(
        f"The query has categories {new[keys[0]][:5]} of {keys[0]!r}, one of the reference's {option}, and the "
        f"reference's network that reads them ({type(network).__name__}) cannot take input columns for new categories "
        "(only the package's FullyConnected stacks can: GaussianEncoder, SoftplusDecoder). Give those cells a category "
        "the reference knows, or build the subclass's network on FullyConnected."
    )


def extend_networks(module: torch.nn.Module, reference: Reference, categories: dict[str, list[str]],
                    new: dict[str, list[str]]) -> dict[str, int]:
    """Give the query module's networks their own weights for the columns of categories new to the reference.

    Parameters
    ----------
    module
        The freshly built query module (``model`` and ``guide``), before the reference's state is loaded.
    reference
        The reference.
    categories
        The query model's categories per key.
    new
        The categories new to the reference, per key (keys without any left out).

    Returns
    -------
    dict
        Per state-dict key of a weight that now has new columns, how many: the reference's entry is that many
        columns narrower (the network's load hook fills the rest with the new columns' initial values).

    Raises
    ------
    ValueError
        A network reading a key with new categories is not one that can be extended (a subclass's own).
    """
    keys = reference.keys
    decoder_columns = new_columns(keys.nn_conditioning, categories, reference.categories)
    encoder_columns = new_columns(keys.encoder, categories, reference.categories)
    if decoder_columns.size:
        decoder = module.model.decoder
        if not callable(getattr(decoder, "extend_covariates", None)):
            _refuse(decoder, NETWORK_OPTIONS["nn_conditioning"], keys.nn_conditioning, new)
        decoder.extend_covariates(decoder_columns)
    if encoder_columns.size:
        guide = module.guide
        # the encoders' input: log1p counts, continuous covariates, then the encoder one-hot
        offset = guide.n_input - guide.dims.n_encoder_covariates
        for name in ("encoder", "library_encoder"):
            network = getattr(guide, name, None)
            if network is None:
                continue
            if not callable(getattr(network, "extend_inputs", None)):
                _refuse(network, NETWORK_OPTIONS["encoder"], keys.encoder, new)
            network.extend_inputs(offset + encoder_columns)
    return {f"{name}.linears.{index}.weight": int(weight.shape[1]) for name, stack in module.named_modules()
            if isinstance(stack, FullyConnected) for index, weight in stack.new_weights.items()}


def new_network_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the networks' columns of new categories (empty when no network was extended).

    Parameters
    ----------
    module
        A query module.

    Returns
    -------
    list
        The parameters, in module order.
    """
    return [p for stack in module.modules() if isinstance(stack, FullyConnected) for p in stack.new_parameters()]
