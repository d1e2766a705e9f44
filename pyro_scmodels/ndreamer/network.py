"""NDreamer network: an encoder with K discrete codebooks, a Gaussian embedding head and a decoder.

Shapes used throughout: ``N`` cells, ``G`` genes, ``K`` codebooks, ``C`` codes per codebook,
``d`` code dimension. Code-related tensors are laid out codebook first, ``(K, N, ...)``, so
that all codebooks are handled by one batched matrix product.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as V
from . import _constants as K
from .code_choice import code_scores, nearest_code, relaxed_code_choice


class ResidualBlock(nn.Module):
    """Pre-normalised residual feed-forward block ``h + W2 relu(W1 LayerNorm(h))``.

    Parameters
    ----------
    width
        Input and output width.
    expansion
        Inner width is ``expansion * width``.
    """

    def __init__(self, width: int, expansion: int = K.RESIDUAL_EXPANSION):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, expansion * width)
        self.outer = nn.Linear(expansion * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``h`` ``(N, width)``."""
        return h + self.outer(F.relu(self.inner(self.norm(h))))


def checked_sizes(**sizes) -> dict:
    """The network's sizes, checked before any preprocessing: positive integers, and lists of them for
    ``encoder_hidden`` / ``decoder_hidden`` (layer widths).

    Returns
    -------
    dict
        The sizes, with the hidden widths as lists of ``int``.
    """
    checked = {}
    for name, value in sizes.items():
        if name.endswith("_hidden"):
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise V.ArgumentTypeError(f"{name} must be a list of layer widths, e.g. (256, 128); got {value!r}.")
            checked[name] = [V.positive_int(f"{name}[{i}]", width) for i, width in enumerate(value)]
        else:
            checked[name] = V.positive_int(name, value)
    return checked


class NDreamerNetwork(nn.Module):
    """Discrete-code autoencoder that separates cell state from condition and batch.

    Encoder ``G -> hidden... -> hidden[-1]`` (Linear, BatchNorm, ReLU between layers), then for each
    of ``K`` codebooks a ``Linear -> BatchNorm`` projection to ``d`` dimensions that picks one of
    ``C`` codes. The chosen codes are concatenated (``K * d``), passed through
    ``Linear -> ReLU -> ResidualBlock`` (width ``embedding_dim``) and two heads giving the mean and
    log-variance of the ``z_dim``-dimensional embedding; the mean is the effect-modifier embedding.
    The decoder maps ``z`` to ``decoder_hidden[0]``, adds a learnt condition embedding and one
    embedding per batch key before the ReLU, then continues to ``G`` genes.

    Code choice. Training: Gumbel-softmax with temperature ``tau`` as a *soft* relaxation (not
    straight-through): the quantised vector is ``y @ codebook`` with ``y`` the relaxed sample,
    nearly one-hot at the default ``tau = 0.01`` (computed on the few codes that carry weight at float32
    precision: :mod:`~pyro_scmodels.ndreamer.code_choice`). Evaluation (``model.eval()``): the nearest code
    (argmax of the logits), and the embedding mean instead of a sample, so inference is
    deterministic.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_conditions
        Number of condition categories.
    batch_sizes
        Number of categories of each batch key (empty for no batch key).
    encoder_hidden
        Hidden widths of the encoder; its output width is ``encoder_hidden[-1]``.
    n_codebooks
        ``K``.
    codebook_size
        ``C``.
    codebook_dim
        ``d``.
    embedding_dim
        Width of the layers after the concatenated codes.
    z_dim
        Width of the embedding.
    decoder_hidden
        Hidden widths of the decoder; embeddings are added at ``decoder_hidden[0]``.
    tau
        Gumbel-softmax temperature.
    nonnegative_output
        Final ReLU on the reconstruction (data that cannot be negative, e.g. log1p counts).
    reset_threshold
        Codes whose share of assignments since the last check is below this are re-initialised;
        ``None`` means ``1 / C``. When the check runs is the trainer's schedule
        (:class:`~pyro_scmodels.ndreamer.NDreamerTrainer`).
    """

    def __init__(
        self,
        n_genes: int,
        n_conditions: int,
        batch_sizes: Sequence[int] = (),
        encoder_hidden: Sequence[int] = K.ENCODER_HIDDEN,
        n_codebooks: int = K.N_CODEBOOKS,
        codebook_size: int = K.CODEBOOK_SIZE,
        codebook_dim: int = K.CODEBOOK_DIM,
        embedding_dim: int = K.EMBEDDING_DIM,
        z_dim: int = K.Z_DIM,
        decoder_hidden: Sequence[int] = K.DECODER_HIDDEN,
        tau: float = K.GUMBEL_TAU,
        nonnegative_output: bool = True,
        reset_threshold: float | None = None,
    ):
        super().__init__()
        if len(encoder_hidden) < 1 or len(decoder_hidden) < 1:
            raise ValueError("encoder_hidden and decoder_hidden need at least one width each.")
        self.n_genes = n_genes
        self.n_conditions = n_conditions
        self.batch_sizes = [int(b) for b in batch_sizes]
        self.n_codebooks = n_codebooks
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.z_dim = z_dim
        self.tau = tau
        self.nonnegative_output = nonnegative_output
        self.reset_threshold = 1.0 / codebook_size if reset_threshold is None else reset_threshold

        layers: list[nn.Module] = []
        widths = [n_genes, *encoder_hidden]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.BatchNorm1d(w_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], widths[-1]))
        self.encoder = nn.Sequential(*layers)

        # K separate Linear(h -> d) + BatchNorm1d(d) are exactly one Linear(h -> K d) followed by
        # BatchNorm1d(K d): the weight rows and the per-feature statistics are disjoint per codebook.
        self.projection = nn.Linear(widths[-1], n_codebooks * codebook_dim)
        self.projection_norm = nn.BatchNorm1d(n_codebooks * codebook_dim)
        self.codebooks = nn.Parameter(torch.randn(n_codebooks, codebook_size, codebook_dim))
        self.register_buffer("code_usage", torch.zeros(n_codebooks, codebook_size))

        self.post_codes = nn.Sequential(
            nn.Linear(n_codebooks * codebook_dim, embedding_dim), nn.ReLU(), ResidualBlock(embedding_dim)
        )
        self.mean_head = nn.Linear(embedding_dim, z_dim)
        self.logvar_head = nn.Linear(embedding_dim, z_dim)

        self.decoder_in = nn.Linear(z_dim, decoder_hidden[0])
        self.condition_embedding = nn.Embedding(n_conditions, decoder_hidden[0])
        self.batch_embeddings = nn.ModuleList(nn.Embedding(b, decoder_hidden[0]) for b in self.batch_sizes)
        rest: list[nn.Module] = []
        dec_widths = list(decoder_hidden)
        for w_in, w_out in zip(dec_widths[:-1], dec_widths[1:]):
            rest += [nn.Linear(w_in, w_out), nn.ReLU()]
        rest.append(nn.Linear(dec_widths[-1], n_genes))
        self.decoder_out = nn.Sequential(*rest)

    # ------------------------------------------------------------------ encoder side
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``x`` (N, G) to the codebook projections ``(K, N, d)``."""
        h = self.projection_norm(self.projection(self.encoder(x)))
        return h.view(x.shape[0], self.n_codebooks, self.codebook_dim).transpose(0, 1)

    def quantise(self, projections: torch.Tensor) -> dict[str, torch.Tensor]:
        """Choose a code per cell and codebook.

        Parameters
        ----------
        projections
            ``(K, N, d)`` from :meth:`project`.

        Returns
        -------
        dict
            ``logits`` and ``probs`` (``(K, N, C)``; the logits are minus the squared distances to the
            codes up to a constant per cell, probs = softmax of logits without noise),
            ``codes`` (``(N, K)`` index of the code used), ``quantised`` (``(K, N, d)``, the vector
            passed on), ``nearest_vectors`` (``(K, N, d)``, the closest code of each projection,
            differentiable with respect to the codebooks; used by the codebook loss).
        """
        logits = code_scores(projections, self.codebooks)  # the logits up to a constant per cell
        k_index = torch.arange(self.n_codebooks, device=logits.device).unsqueeze(1)
        nearest = nearest_code(logits.detach())  # (K, N)
        nearest_vectors = self.codebooks[k_index, nearest]
        probs = logits.softmax(-1)
        if self.training:
            quantised, codes = relaxed_code_choice(logits, probs, projections, self.codebooks, self.tau)
            with torch.no_grad():
                self.code_usage.scatter_add_(1, codes, torch.ones_like(codes, dtype=self.code_usage.dtype))
        else:
            codes = nearest
            quantised = nearest_vectors
        return {
            "logits": logits,
            "probs": probs,
            "codes": codes.transpose(0, 1),
            "quantised": quantised,
            "nearest_vectors": nearest_vectors,
        }

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the encoder side: projections, codes and the embedding distribution.

        Parameters
        ----------
        x
            ``(N, G)`` expression.

        Returns
        -------
        dict
            Everything :meth:`quantise` returns plus ``projections`` ``(K, N, d)``, ``mean`` and
            ``logvar`` ``(N, z_dim)`` and ``z`` (a reparameterised sample when training, the mean
            in evaluation mode).
        """
        projections = self.project(x)
        out = self.quantise(projections)
        concatenated = out["quantised"].transpose(0, 1).reshape(x.shape[0], -1)  # (N, K d)
        h = self.post_codes(concatenated)
        mean = self.mean_head(h)
        # bounded so exp(logvar) can neither overflow nor vanish early in training
        logvar = self.logvar_head(h).clamp(*K.LOGVAR_BOUNDS)
        if self.training:
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        else:
            z = mean
        out.update(projections=projections, mean=mean, logvar=logvar, z=z)
        return out

    # ------------------------------------------------------------------ decoder side
    def decode(self, z: torch.Tensor, condition: torch.Tensor, batches: torch.Tensor | None = None) -> torch.Tensor:
        """Decode embeddings under given condition and batch labels.

        Parameters
        ----------
        z
            ``(N, z_dim)``.
        condition
            ``(N,)`` integer condition codes.
        batches
            ``(N, B)`` integer codes, one column per batch key; ``None`` when there is no batch key.

        Returns
        -------
        torch.Tensor
            ``(N, G)`` reconstruction.
        """
        h = self.decoder_in(z) + self.condition_embedding(condition)
        if self.batch_sizes:
            if batches is None:
                raise ValueError(f"batches is required: the network has {len(self.batch_sizes)} batch key(s).")
            batches = batches.reshape(z.shape[0], -1)
            for i, embedding in enumerate(self.batch_embeddings):
                h = h + embedding(batches[:, i])
        out = self.decoder_out(F.relu(h))
        return F.relu(out) if self.nonnegative_output else out

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor, batches: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Encode, quantise and decode a minibatch.

        Parameters
        ----------
        x
            ``(N, G)`` expression.
        condition
            ``(N,)`` integer condition codes.
        batches
            ``(N, B)`` integer batch codes or ``None``.

        Returns
        -------
        dict
            ``reconstruction`` ``(N, G)``, ``mean``, ``logvar``, ``z`` ``(N, z_dim)``, ``codes``
            ``(N, K)``, ``logits`` and ``probs`` ``(K, N, C)``, ``projections``, ``quantised`` and
            ``nearest_vectors`` ``(K, N, d)``.
        """
        out = self.encode(x)
        out["reconstruction"] = self.decode(out["z"], condition, batches)
        return out

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Deterministic effect-modifier embedding (the posterior mean, argmax codes).

        The network is put in evaluation mode for the call and restored afterwards.

        Parameters
        ----------
        x
            ``(N, G)`` expression.
        batch_size
            Cells per forward pass; ``None`` for all at once.

        Returns
        -------
        torch.Tensor
            ``(N, z_dim)``.
        """
        was_training = self.training
        self.eval()
        try:
            step = x.shape[0] if batch_size is None else batch_size
            parts = [self.encode(x[i : i + step])["mean"] for i in range(0, x.shape[0], max(step, 1))]
            return torch.cat(parts) if parts else x.new_zeros(0, self.z_dim)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ dead codes
    @torch.no_grad()
    def reinitialise_dead_codes(self, projections: torch.Tensor) -> torch.Tensor:
        """Replace rarely used codes by random current projections and restart usage counting.

        A code is dead when its share of its codebook's assignments since the last call is
        below ``reset_threshold`` (default ``1 / C``).

        Parameters
        ----------
        projections
            ``(K, N, d)`` projections of a recent minibatch (e.g. ``outputs["projections"]``).

        Returns
        -------
        torch.Tensor
            ``(K, C)`` boolean mask of the codes that were re-initialised.
        """
        totals = self.code_usage.sum(-1, keepdim=True)
        dead = (self.code_usage < self.reset_threshold * totals) & (totals > 0)
        if dead.any():
            n_cells = projections.shape[1]
            pick = torch.randint(n_cells, (self.n_codebooks, self.codebook_size), device=projections.device)
            k_index = torch.arange(self.n_codebooks, device=projections.device).unsqueeze(1)
            candidates = projections.detach()[k_index, pick].to(self.codebooks.dtype)  # (K, C, d)
            self.codebooks.copy_(torch.where(dead.unsqueeze(-1), candidates, self.codebooks))
        self.code_usage.zero_()
        return dead
