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

    def forward(self, h: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        for linear in self.linears:
            if self.n_covariates:
                # covariates are per cell; h may carry extra leading sample dimensions
                h = torch.cat([h, covariates.expand(*h.shape[:-1], -1)], dim=-1)
            h = self.dropout(F.relu(self.norm(linear(h))))
        return h


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
        return [linear.weight for linear in self.hidden.linears] + [self.output.weight]


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
