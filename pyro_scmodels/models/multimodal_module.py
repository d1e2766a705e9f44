"""RegularizedMultimodalVI as a Pyro model/guide pair (SPEC 2).

Each modality m is a RegularizedVI block (its own dispersion, rate, ambient and/or feature
scaling, library prior and decoder; sites suffixed ``_m``); every decoder reads the joint z::

    concatenation:   z_m ~ Normal(0, I) per modality (site z_m), z = [z_1; ...; z_M]
    weighted_mean:   z ~ Normal(0, I); guide Normal(sum_m w_m loc_m, sqrt(sum_m w_m^2 scale_m^2))
    single_encoder:  z ~ Normal(0, I); guide from one encoder of all modalities
    for each modality m and cell n (masked where cell n has no counts in m):
      l_{n,m} ~ LogNormal(...);  x_{n,m} ~ GammaPoisson(theta_m, theta_m / mu_{n,m})
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from ..pyro_modules import LocalPyroModule, refuse_outer_plates
from ..nn import GaussianEncoder
from .regularizedvi_guide import RegularizedVIGuide
from .regularizedvi_module import RegularizedVIModel

LATENT_MODES = ("concatenation", "weighted_mean", "single_encoder")
WEIGHT_MODES = ("equal", "universal", "cell")


def has_counts(batch: dict, key: str) -> torch.Tensor:
    """Boolean per cell: does the cell have any counts in this modality?"""
    return batch[key].sum(-1) > 0


class RegularizedMultimodalVIModel(LocalPyroModule):
    """p(x_1..x_M, z, l, globals): one RegularizedVI block per modality sharing z.

    Parameters
    ----------
    blocks
        Modality name -> :class:`RegularizedVIModel` (with its site suffix and counts key).
    latent_sizes
        Modality name -> latent dimensions (concatenation), or one shared size otherwise.
    latent_mode
        One of ``LATENT_MODES``.
    """

    def __init__(self, blocks: dict[str, RegularizedVIModel], latent_sizes: dict[str, int], latent_mode: str):
        super().__init__()
        self.modalities = list(blocks)
        self.latent_sizes = dict(latent_sizes)
        self.latent_mode = latent_mode
        for name, block in blocks.items():
            setattr(self, f"block_{name}", block)

    def block(self, name: str) -> RegularizedVIModel:
        """The RegularizedVI model block of modality ``name``."""
        return getattr(self, f"block_{name}")

    def check_priors(self) -> None:
        """Refuse each block's prior buffers edited to a shape their sites cannot take (see
        :meth:`RegularizedVIModel.check_priors`)."""
        for name in self.modalities:
            self.block(name).check_priors(where=f"model.module.model.block({name!r}).priors")

    def decode(self, z: torch.Tensor, batch: dict, nn_onehot: torch.Tensor | None = None, modality: str | None = None):
        """Expression rho of one modality (or of each, as a dict) decoded from the joint z.

        Parameters
        ----------
        z, batch, nn_onehot
            As in :meth:`RegularizedVIModel.decode`; z is the joint latent state.
        modality
            The modality decoded; None decodes every modality.
        """
        if modality is not None:
            return self.block(modality).decode(z, batch, nn_onehot)
        return {m: self.block(m).decode(z, batch, nn_onehot) for m in self.modalities}

    def forward(self, batch: dict, n_obs: int, kl_weight: float = 1.0):
        refuse_outer_plates(self)
        globals_ = {m: self.block(m).global_sites() for m in self.modalities}
        present = {m: has_counts(batch, self.block(m).dims.counts_key) for m in self.modalities}
        n = batch["index"].shape[0]
        with pyro.plate("cells", n_obs, subsample=batch["index"]):
            with poutine.scale(scale=kl_weight):
                if self.latent_mode == "concatenation":
                    parts = []
                    for m in self.modalities:
                        with poutine.mask(mask=present[m]):  # no counts in m: no KL for z_m
                            prior = dist.Normal(torch.zeros(n, self.latent_sizes[m], device=batch["index"].device), 1.0)
                            parts.append(pyro.sample(f"z_{m}", prior.to_event(1)))
                    z = torch.cat(parts, -1)
                else:
                    size = next(iter(self.latent_sizes.values()))
                    z = pyro.sample("z", dist.Normal(torch.zeros(n, size, device=batch["index"].device), 1.0).to_event(1))
            for m in self.modalities:
                self.block(m).local_sites(z, batch, globals_[m], mask=present[m])
        return z

    # --- the ELBO without Pyro's tracing (elbo.ELBOLoss checks it against Trace_ELBO) ---------
    #: :meth:`log_joint` scores exactly the sites of :meth:`forward` (not inherited by a subclass)
    direct_elbo = True

    def direct_elbo_parts(self) -> list[RegularizedVIModel]:
        """The blocks whose methods :meth:`log_joint` calls: each must declare the direct form too."""
        return [self.block(m) for m in self.modalities]

    def log_joint(self, values: dict, batch: dict, n_obs: int, kl_weight: float = 1.0,
                  local_factor: float = 1.0) -> torch.Tensor:
        """log p of every modality's sites and z at ``values``, each weighted as ``Trace_ELBO`` weights it.

        As :meth:`RegularizedVIModel.log_joint`, with ``values["modalities"][m]`` holding modality m's
        global values and library sizes, and ``values["z"]`` the joint z (``values["z_parts"]``, per
        modality, in concatenation mode). A cell without counts in a modality has no terms of that modality (nor
        of its part of z in concatenation mode).
        """
        present = {m: has_counts(batch, self.block(m).dims.counts_key) for m in self.modalities}
        z = values["z"]
        cells = local_factor * n_obs / z.shape[0]
        per_modality = values["modalities"]
        log_p = sum(self.block(m).global_log_density(per_modality[m]) for m in self.modalities)
        standard = dist.Normal(z.new_zeros(()), 1.0)
        if self.latent_mode == "concatenation":
            for m in self.modalities:
                prior = standard.log_prob(values["z_parts"][m]).sum(-1)
                log_p = log_p + kl_weight * cells * torch.where(present[m], prior, prior.new_zeros(())).sum()
        else:
            log_p = log_p + kl_weight * cells * standard.log_prob(z).sum()
        for m in self.modalities:
            log_p = log_p + cells * self.block(m).local_log_density(z, per_modality[m], batch, mask=present[m]).sum()
        return log_p


class RegularizedMultimodalVIGuide(LocalPyroModule):
    """q(z, l, globals): per-modality encoders combined by ``latent_mode``.

    Parameters
    ----------
    blocks
        Modality name -> :class:`RegularizedVIGuide` (z encoders unused in ``single_encoder`` mode).
    latent_sizes, latent_mode
        As for the model.
    weights
        ``weighted_mean`` only: ``"equal"``, ``"universal"`` (one learned softmax) or ``"cell"``
        (a per-cell softmax from a linear layer of the modalities' encoders' latent means, started at
        zero so that every cell starts at equal weights, its logits bounded by ``max_weight_logit``).
    n_hidden, n_layers, dropout_rate
        The joint encoder (``single_encoder`` mode).
    """

    def __init__(self, blocks: dict[str, RegularizedVIGuide], latent_sizes: dict[str, int], latent_mode: str,
                 weights: str = "equal", n_hidden: int = 128, n_layers: int = 1, dropout_rate: float = 0.1):
        super().__init__()
        self.modalities = list(blocks)
        self.latent_sizes = dict(latent_sizes)
        self.latent_mode = latent_mode
        self.weights = weights
        for name, block in blocks.items():
            setattr(self, f"block_{name}", block)
        n_inputs = sum(block.n_input for block in blocks.values())
        size = next(iter(latent_sizes.values()))
        if latent_mode == "single_encoder":
            self.joint_encoder = GaussianEncoder(n_inputs, size, n_hidden, n_layers, dropout_rate)
        if latent_mode == "weighted_mean" and weights == "universal":
            self.weight_logits = nn.Parameter(torch.zeros(len(blocks)))
        if latent_mode == "weighted_mean" and weights == "cell":
            self.weight_layer = nn.Linear(len(blocks) * size, len(blocks))
            nn.init.zeros_(self.weight_layer.weight)
            nn.init.zeros_(self.weight_layer.bias)
        # a save from before 2026-12-06 23:00 UTC read the raw encoder inputs (its layer has their width): see
        # _load_from_state_dict
        self.legacy_weight_input = False

    #: bound on |logit| of the per-cell weights (c tanh(logit / c)): with two modalities a weight stays in
    #: [1 / (1 + e^{2c}), 1 / (1 + e^{-2c})], about [0.05, 0.95] at c = 1.5
    max_weight_logit = 1.5

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # saves before 2026-12-06 23:00 UTC: the layer read the concatenated encoder inputs (log1p counts), unbounded; such a
        # save keeps that layer and its answers (the new layer's width is M x n_latent, the old one's the inputs')
        weight = state_dict.get(prefix + "weight_layer.weight")
        if weight is not None and getattr(self, "weight_layer", None) is not None \
                and weight.shape != self.weight_layer.weight.shape:
            device = self.weight_layer.weight.device
            self.weight_layer = nn.Linear(weight.shape[1], weight.shape[0]).to(device)
            self.legacy_weight_input = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def block(self, name: str) -> RegularizedVIGuide:
        """The RegularizedVI guide block of modality ``name``."""
        return getattr(self, f"block_{name}")

    # --- posterior queries ------------------------------------------------------------------
    def z_posterior(self, batch: dict, modality: str | None = None) -> dist.Normal:
        """q(z_n | x_n) of each cell (cells x latent).

        Parameters
        ----------
        batch
            The cells' minibatch.
        modality
            None: the joint z that the decoders read (the modalities' blocks side by side in
            concatenation mode). A modality: its own encoder's posterior (its block of z in
            concatenation mode); not available with a single encoder.
        """
        if modality is not None:
            if self.latent_mode == "single_encoder":
                raise ValueError("latent_mode='single_encoder' has one joint encoder: there is no per-modality posterior.")
            return self.block(modality).z_posterior(batch)
        _, _, loc, scale = self.latent(batch)
        if self.latent_mode == "concatenation":
            loc = torch.cat([loc[m] for m in self.modalities], -1)
            scale = torch.cat([scale[m] for m in self.modalities], -1)
        return dist.Normal(loc, scale)

    def library_loc(self, batch: dict, modality: str) -> torch.Tensor:
        """Posterior median of log l_{n,m} per cell for ``modality``."""
        return self.block(modality).library_loc(batch)

    def global_medians(self) -> dict[str, torch.Tensor]:
        """Posterior medians of every modality's global sites, by suffixed site name (``ambient_rna``)."""
        return {f"{name}_{m}": value for m in self.modalities for name, value in self.block(m).global_medians().items()}

    def modality_weights(self, inputs: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                         locs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Weights of the modalities per cell (cells x M), zero for a modality without counts.

        Parameters
        ----------
        inputs
            Each modality's encoder input (see :meth:`RegularizedVIGuide.encoder_input`).
        present
            Each modality's mask of cells with counts.
        locs
            Each modality's encoder latent mean, which ``"cell"`` weights read (computed when None).
        """
        n = next(iter(inputs.values())).shape[0]
        if self.weights == "equal":
            logits = torch.zeros(n, len(self.modalities), device=next(iter(inputs.values())).device)
        elif self.weights == "universal":
            logits = self.weight_logits.expand(n, -1)
        elif self.legacy_weight_input:
            logits = self.weight_layer(torch.cat([inputs[m] for m in self.modalities], -1))
        else:
            if locs is None:
                locs = {m: self.block(m).z_posterior(None, inputs[m]).loc for m in self.modalities}
            # the latent means are O(1) whatever the number of features: the raw log1p counts (thousands of
            # inputs) let the logits grow by ~n_features x lr per step and saturate the softmax at 0/1
            logits = self.weight_layer(torch.cat([locs[m] for m in self.modalities], -1))
            c = self.max_weight_logit
            logits = c * torch.tanh(logits / c) if c is not None else logits
        available = torch.stack([present[m] for m in self.modalities], -1)
        # a cell with no counts anywhere keeps equal weights rather than dividing by zero
        available = available | ~available.any(-1, keepdim=True)
        return F.softmax(logits.masked_fill(~available, float("-inf")), dim=-1)

    def latent(self, batch: dict) -> tuple[dict, dict, torch.Tensor, torch.Tensor | dict]:
        """Encoder inputs, presence masks, and the guide's z location and scale (per modality in concatenation)."""
        inputs = {m: self.block(m).encoder_input(batch) for m in self.modalities}
        present = {m: has_counts(batch, self.block(m).dims.counts_key) for m in self.modalities}
        if self.latent_mode == "single_encoder":
            loc, scale = self.joint_encoder(torch.cat([inputs[m] for m in self.modalities], -1))
            return inputs, present, loc, scale
        # each block's own q(z | x) (a block guide's override of z_posterior, as RegularizedVI's guide uses it)
        encoded = {m: (q.loc, q.scale) for m in self.modalities
                   for q in (self.block(m).z_posterior(batch, inputs[m]),)}
        if self.latent_mode == "concatenation":
            return inputs, present, {m: e[0] for m, e in encoded.items()}, {m: e[1] for m, e in encoded.items()}
        w = self.modality_weights(inputs, present, {m: e[0] for m, e in encoded.items()})
        locs = torch.stack([encoded[m][0] for m in self.modalities], -1)
        scales = torch.stack([encoded[m][1] for m in self.modalities], -1)
        loc = (locs * w.unsqueeze(-2)).sum(-1)
        scale = (scales.pow(2) * w.unsqueeze(-2).pow(2)).sum(-1).sqrt()
        return inputs, present, loc, scale

    def forward(self, batch: dict, n_obs: int, kl_weight: float = 1.0):
        refuse_outer_plates(self)
        library_weights = {m: self.block(m).global_sites() for m in self.modalities}
        inputs, present, loc, scale = self.latent(batch)
        with pyro.plate("cells", n_obs, subsample=batch["index"]):
            with poutine.scale(scale=kl_weight):
                if self.latent_mode == "concatenation":
                    for m in self.modalities:
                        with poutine.mask(mask=present[m]):
                            pyro.sample(f"z_{m}", dist.Normal(loc[m], scale[m]).to_event(1))
                else:
                    pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            for m in self.modalities:
                self.block(m).library_site(inputs[m], batch, library_weights[m], mask=present[m])
        return loc

    # --- the ELBO without Pyro's tracing (elbo.ELBOLoss checks it against Trace_ELBO) ---------
    #: :meth:`draw` draws exactly the sites of :meth:`forward`, in the same order
    direct_elbo = True

    def direct_elbo_parts(self) -> list[RegularizedVIGuide]:
        """The blocks whose methods :meth:`draw` calls: each must declare the direct form too."""
        return [self.block(m) for m in self.modalities]

    def draw(self, batch: dict, n_obs: int, kl_weight: float = 1.0, local_factor: float = 1.0) -> tuple[dict, torch.Tensor]:
        """One draw of every site from q and log q of the draw, each site weighted as ``Trace_ELBO`` weights it.

        As :meth:`RegularizedVIGuide.draw`, for :meth:`RegularizedMultimodalVIModel.log_joint`; the random
        numbers are drawn in the order of :meth:`forward`.
        """
        per_modality, log_q = {}, 0.0
        for m in self.modalities:
            per_modality[m], site_log_q = self.block(m).draw_globals()
            log_q = log_q + site_log_q
        values = {"modalities": per_modality}
        inputs, present, loc, scale = self.latent(batch)
        n = batch["index"].shape[0]
        cells = local_factor * n_obs / n
        if self.latent_mode == "concatenation":
            values["z_parts"] = {}
            for m in self.modalities:
                q_z = dist.Normal(loc[m], scale[m])
                values["z_parts"][m] = part = q_z.rsample()
                density = q_z.log_prob(part).sum(-1)
                log_q = log_q + kl_weight * cells * torch.where(present[m], density, density.new_zeros(())).sum()
            values["z"] = torch.cat([values["z_parts"][m] for m in self.modalities], -1)
        else:
            q_z = dist.Normal(loc, scale)
            values["z"] = q_z.rsample()
            log_q = log_q + kl_weight * cells * q_z.log_prob(values["z"]).sum()
        for m in self.modalities:
            q_library = self.block(m).library_posterior(inputs[m], batch, per_modality[m]["library_residual_weight"])
            per_modality[m]["library"] = library = q_library.rsample()
            density = q_library.log_prob(library)
            log_q = log_q + cells * torch.where(present[m], density, density.new_zeros(())).sum()
        return values, log_q
