"""Neural blocks shared by every model: the fully connected stack, encoders and decoders.

Every hidden layer is ``Linear -> LayerNorm (no affine) -> ReLU -> Dropout`` (no BatchNorm, so
a cell's output never depends on the other cells of its minibatch). Covariates given as a
one-hot matrix are concatenated to the input of every hidden layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._constants import SCALE_EPS


class FullyConnected(nn.Module):
    """``n_layers`` hidden layers of width ``n_hidden``, with covariates injected into each.

    Parameters
    ----------
    n_input
        Width of the input (without covariates).
    n_hidden
        Width of each hidden layer.
    n_layers
        Number of hidden layers (at least 1).
    n_covariates
        Width of the one-hot covariates concatenated to every layer's input (0 for none).
    dropout_rate
        Dropout after each hidden layer.
    """

    def __init__(self, n_input: int, n_hidden: int, n_layers: int = 1, n_covariates: int = 0, dropout_rate: float = 0.0):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}.")
        self.n_covariates = n_covariates
        widths = [n_input] + [n_hidden] * n_layers
        self.linears = nn.ModuleList(
            nn.Linear(widths[i] + n_covariates, widths[i + 1]) for i in range(n_layers)
        )
        self.norm = nn.LayerNorm(n_hidden, elementwise_affine=False)
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()

        #: per extended layer (by index, as text), the weights of its input columns new to its reference
        self.new_weights = nn.ParameterDict()
        self.register_state_dict_post_hook(_whole_weights)
        self.register_load_state_dict_pre_hook(_split_weights)

    def forward(self, h: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden stack's output for the input ``h`` (cells x ``n_input``, with any leading sample dimensions) and
        the cells' one-hot ``covariates``.

        A plain layer is called as its ``nn.Linear`` module, so hooks registered on ``linears[i]`` fire. A layer
        extended for a query model (:meth:`extend_covariates`, :meth:`extend_inputs`) multiplies by its whole
        weight (:meth:`layer_weight`: the reference's columns and the new ones, put in order at each call), so
        ``linears[i]``'s hooks do not fire for it; hook the stack itself there.
        """
        extended = self.new_weights  # empty outside query models
        for index, linear in enumerate(self.linears):
            if self.n_covariates:
                # covariates are per cell; h may carry extra leading sample dimensions
                h = torch.cat([h, covariates.expand(*h.shape[:-1], -1)], dim=-1)
            if extended and str(index) in extended:
                h = F.linear(h, self.layer_weight(index), linear.bias)
            else:
                h = linear(h)
            h = self.dropout(F.relu(self.norm(h)))
        return h

    # --- categories new to a reference (a query model: models/query_networks.py) ------------------------------------
    def layer_weight(self, index: int) -> torch.Tensor:
        """The whole weight matrix of layer ``index`` (outputs x inputs), new columns included when extended."""
        linear = self.linears[index]
        new = self.new_weights[str(index)] if str(index) in self.new_weights else None
        if new is None:
            return linear.weight
        # the reference's columns and the new ones side by side, then put back in the order of the layer's input
        return torch.cat([linear.weight, new], 1)[:, getattr(self, f"column_order_{index}")]

    def extend_covariates(self, new_columns) -> None:
        """Give the covariate columns ``new_columns`` weights of their own in every layer.

        For a query model on a reference: ``new_columns`` are the positions, in the one-hot this stack is injected
        with, of categories the reference was not trained on. Afterwards each layer's ``linear.weight`` holds only
        the other columns (the reference's shape, so it can be frozen as a tensor and loaded from the reference)
        and ``new_weights[str(layer)]`` the new ones, which keep this stack's initial values.

        Parameters
        ----------
        new_columns
            Positions among the ``n_covariates`` covariate columns.
        """
        columns = torch.as_tensor(new_columns, dtype=torch.long).reshape(-1)
        if columns.numel() and (not self.n_covariates or int(columns.max()) >= self.n_covariates or int(columns.min()) < 0):
            raise ValueError(f"new_columns {columns.tolist()} are not among the {self.n_covariates} covariate columns.")
        for index, linear in enumerate(self.linears):
            self._hold_new_columns(index, linear.in_features - self.n_covariates + columns)

    def extend_inputs(self, new_columns) -> None:
        """Give the columns ``new_columns`` of the first layer's input weights of their own.

        As :meth:`extend_covariates`, for covariates appended to the input (an encoder's one-hot) rather than
        injected into every layer: ``new_columns`` are positions in the first layer's input.

        Parameters
        ----------
        new_columns
            Positions among the first layer's ``in_features - n_covariates`` input columns.
        """
        columns = torch.as_tensor(new_columns, dtype=torch.long).reshape(-1)
        n_input = self.linears[0].in_features - self.n_covariates
        if columns.numel() and (int(columns.max()) >= n_input or int(columns.min()) < 0):
            raise ValueError(f"new_columns {columns.tolist()} are not among the {n_input} input columns.")
        self._hold_new_columns(0, columns)

    def new_parameters(self) -> list[nn.Parameter]:
        """The weights of the columns new to the reference (empty when this stack was not extended)."""
        return list(self.new_weights.values())

    def _hold_new_columns(self, index: int, columns: torch.Tensor) -> None:
        if not columns.numel():
            return
        if str(index) in self.new_weights:
            raise ValueError(f"Layer {index} already has weights for new columns; extend a stack once.")
        linear = self.linears[index]
        is_new = torch.zeros(linear.in_features, dtype=torch.bool)
        is_new[columns] = True
        new, kept = torch.nonzero(is_new).flatten(), torch.nonzero(~is_new).flatten()
        order = torch.empty(linear.in_features, dtype=torch.long)
        order[kept] = torch.arange(len(kept))
        order[new] = len(kept) + torch.arange(len(new))
        device, weight = linear.weight.device, linear.weight.detach()
        for name, value in (("column_order", order), ("kept_columns", kept), ("new_columns", new)):
            self.register_buffer(f"{name}_{index}", value.to(device), persistent=False)
        self.new_weights[str(index)] = nn.Parameter(weight[:, new.to(device)].clone())
        linear.weight = nn.Parameter(weight[:, kept.to(device)].clone(), requires_grad=linear.weight.requires_grad)


def _whole_weights(module: FullyConnected, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook of :class:`FullyConnected`: an extended layer's weight is stored whole, as a plain
    layer's, so that a saved query model loads as an ordinary model."""
    for index, new in module.new_weights.items():
        key = f"{prefix}linears.{index}.weight"
        state_dict[key] = torch.cat([state_dict[key], state_dict.pop(f"{prefix}new_weights.{index}")], 1)[
            :, getattr(module, f"column_order_{index}")]


def _split_weights(module: FullyConnected, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of :class:`FullyConnected`: an extended layer takes a whole weight apart into the
    reference's and the new columns; a weight of the reference's width (no new columns) loads into the former, the
    new columns keeping their values."""
    for index, new in module.new_weights.items():
        key, new_key = f"{prefix}linears.{index}.weight", f"{prefix}new_weights.{index}"
        if key not in state_dict or new_key in state_dict:
            continue
        weight = state_dict[key]
        if weight.shape[-1] == module.linears[int(index)].in_features:
            state_dict[new_key] = weight[:, getattr(module, f"new_columns_{index}").to(weight.device)]
            state_dict[key] = weight[:, getattr(module, f"kept_columns_{index}").to(weight.device)]
        else:
            state_dict[new_key] = new.detach().clone()


class GaussianEncoder(nn.Module):
    """Amortised Normal guide: input -> hidden -> (loc, scale).

    Parameters
    ----------
    n_input, n_output
        Input and output widths.
    n_hidden, n_layers, dropout_rate
        Hidden stack (see :class:`FullyConnected`).
    input_dropout_rate
        Probability of masking each input feature before the first layer (0 turns it off).
    n_dropout_features
        Only the first this many input columns (the features, not appended covariates) are
        masked; None masks every column.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        input_dropout_rate: float = 0.0,
        n_dropout_features: int | None = None,
    ):
        super().__init__()
        self.n_dropout_features = n_dropout_features
        self.input_dropout = nn.Dropout(input_dropout_rate) if input_dropout_rate > 0 else nn.Identity()
        self.hidden = FullyConnected(n_input, n_hidden, n_layers, dropout_rate=dropout_rate)
        self.loc = nn.Linear(n_hidden, n_output)
        self.raw_scale = nn.Linear(n_hidden, n_output)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n_dropout_features
        if n is not None and n < h.shape[-1] and not isinstance(self.input_dropout, nn.Identity):
            # mask the features only, not the appended covariates (a copy of the input, so only when masking)
            h = torch.cat([self.input_dropout(h[..., :n]), h[..., n:]], -1)
        else:
            h = self.input_dropout(h)
        h = self.hidden(h)
        return self.loc(h), F.softplus(self.raw_scale(h)) + SCALE_EPS

    def extend_inputs(self, new_columns) -> None:
        """Weights of their own for the input columns ``new_columns`` (see :meth:`FullyConnected.extend_inputs`)."""
        self.hidden.extend_inputs(new_columns)


class SoftplusDecoder(nn.Module):
    """Non-negative expression decoder: ``c * softplus(W h + b)`` (not a softmax over features).

    ``c`` is a per-feature buffer: 1 (SPEC 1.2's plain softplus, the bias starting at softplus^-1 of each feature's
    mean), or each feature's mean / log 2 with the bias starting at 0 (:meth:`init_output` with ``gene_scaled``): the
    output then moves in units of the feature's own level, so that one fold change is the same move of ``W h`` for a
    rare and an abundant gene (on the plain linear scale an abundant gene's fold change needs large weights).

    Parameters
    ----------
    n_input
        Width of the latent input (z plus continuous covariates).
    n_output
        Number of features.
    n_hidden, n_layers
        Hidden stack.
    n_covariates
        Width of the one-hot covariates injected into every hidden layer.
    dropout_rate
        Dropout in the hidden stack (0 by default, as for scVI's decoder).
    """

    def __init__(self, n_input: int, n_output: int, n_hidden: int = 128, n_layers: int = 1, n_covariates: int = 0, dropout_rate: float = 0.0):
        super().__init__()
        self.hidden = FullyConnected(n_input, n_hidden, n_layers, n_covariates, dropout_rate)
        self.output = nn.Linear(n_hidden, n_output)
        self.register_buffer("output_scale", torch.ones(n_output))

    def forward(self, z: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return F.softplus(self.output(self.hidden(z, covariates))) * self.output_scale

    def extend_covariates(self, new_columns) -> None:
        """Weights of their own for the covariate columns ``new_columns`` (see :meth:`FullyConnected.extend_covariates`)."""
        self.hidden.extend_covariates(new_columns)

    def init_output(self, mean_expression: torch.Tensor, gene_scaled: bool = False) -> None:
        """Start the output at ``mean_expression`` per feature: through the bias (inverse softplus of the mean), or,
        ``gene_scaled``, through the scale (the mean / log 2, with the bias at 0: softplus(0) = log 2)."""
        mean = mean_expression.clamp_min(1e-6)
        with torch.no_grad():
            if gene_scaled:
                self.output_scale.copy_(mean / math.log(2.0))
                self.output.bias.zero_()
            else:
                self.output_scale.fill_(1.0)
                # softplus^-1(m) = log(expm1(m)), written stably for large m
                self.output.bias.copy_(mean + torch.log(-torch.expm1(-mean)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a decoder saved before the scale existed (2026-12-06) was the plain softplus: scale 1
        state_dict.setdefault(prefix + "output_scale", torch.ones_like(self.output_scale))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def is_identity_entry(name: str, value: torch.Tensor) -> bool:
        """Whether a state-dict entry is a decoder's ``output_scale`` at 1: what a decoder saved before the scale
        existed amounted to."""
        return name.endswith(".output_scale") and bool((value == 1).all())

    def weights(self) -> list[torch.Tensor]:
        """The weight matrices (not biases): what a weight prior applies to."""
        return [self.hidden.layer_weight(i) for i in range(len(self.hidden.linears))] + [self.output.weight]


class Standardiser(nn.Module):
    """Columns standardised by the mean and standard deviation of the cells the model was built on: ``(x - loc) / scale``.

    The continuous covariates enter the encoders and the decoder through it. Raw, a column on a scale of tens (a
    percentage of mitochondrial counts) outweighs the log counts next to it in a cell's layer-normalised hidden units,
    and the latent lost the cell types. ``loc`` and ``scale`` are buffers: saved with the model, and taken over by a
    query model from its reference, so that every cell is standardised as the model's own cells were.

    Parameters
    ----------
    n_columns
        Columns (continuous covariates); with none it passes its (empty) input through.
    """

    def __init__(self, n_columns: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(n_columns))
        self.register_buffer("scale", torch.ones(n_columns))

    def fit(self, values: torch.Tensor) -> "Standardiser":
        """Set ``loc`` and ``scale`` from the model's cells (cells x columns); a constant column keeps scale 1."""
        values = torch.as_tensor(values, dtype=torch.float64)
        if values.shape[-1] and len(values):
            scale = values.std(0, unbiased=False) if len(values) > 1 else torch.ones(values.shape[-1], dtype=values.dtype)
            self.loc.copy_(values.mean(0))
            self.scale.copy_(torch.where(scale > 0, scale, torch.ones_like(scale)))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if not x.shape[-1] else (x - self.loc) / self.scale

    #: the buffers' values that leave the input as it is: what a model saved before the standardiser had
    IDENTITY = {"loc": 0.0, "scale": 1.0}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a model saved before the covariates were standardised trained on them raw: it keeps them raw
        for name, value in self.IDENTITY.items():
            state_dict.setdefault(prefix + name, torch.full_like(getattr(self, name), value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def is_identity_entry(cls, name: str, value: torch.Tensor) -> bool:
        """Whether a state-dict entry is a standardiser buffer (``<...>.continuous_scaling.loc``/``.scale``) at its
        identity value: what a model without the standardiser (saved before 2026-12-06) amounted to."""
        owner, _, buffer = name.rpartition(".")
        return (owner.rpartition(".")[2] == STANDARDISER_NAME and buffer in cls.IDENTITY
                and bool((value == cls.IDENTITY[buffer]).all()))

    @classmethod
    def is_entry(cls, name: str) -> bool:
        """Whether a state-dict key names a standardiser buffer of a model's or guide's ``continuous_scaling``."""
        owner, _, buffer = name.rpartition(".")
        return owner.rpartition(".")[2] == STANDARDISER_NAME and buffer in cls.IDENTITY


def is_legacy_identity_entry(name: str, value: torch.Tensor) -> bool:
    """Whether a state-dict entry is a buffer added since models were first saved, at the value that earlier models
    amounted to (a standardiser's identity, a decoder scale of 1): left out of a model's digest, so that a model saved
    before keeps its digest."""
    return Standardiser.is_identity_entry(name, value) or SoftplusDecoder.is_identity_entry(name, value)


#: the attribute the Pyro model and guide hold their :class:`Standardiser` under
STANDARDISER_NAME = "continuous_scaling"
