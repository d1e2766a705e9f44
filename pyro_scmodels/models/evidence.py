"""How well a fitted model explains cells: ELBO, reconstruction error and marginal likelihood.

scvi-tools' ``get_elbo``, ``get_reconstruction_error`` and ``get_marginal_ll``, computed from Pyro
traces of the model and guide that training uses (no second likelihood is written): the guide
is traced on a minibatch, the model is replayed on the guide's draws, and the per-cell terms are
read off the sites inside the cell plate. Global sites are held at their posterior medians (the
point estimates scvi-tools' parameters correspond to), so every number is per cell and the
global prior terms are left out, as in scvi-tools.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import torch
from pyro import poutine

from .. import _validation as V
from ..elbo import declares_direct_elbo
from ..seeding import seed_or_fresh, seeded
from .cell_noise import CellNoise

#: numpy spawn key that sets the library draws' seed apart from z's (``CellNoise(seed)``) in log_importance_ratios
LIBRARY_STREAM = 0x11B


def library_noise(seed: int, n_samples: int, device) -> CellNoise:
    """Per-cell standard-normal noise of the library draws that go with the z draws of ``seed``
    (:meth:`EvidenceQueries.log_importance_ratios`): its own stream, derived from ``seed``, apart from z's."""
    sequence = np.random.SeedSequence(int(seed), spawn_key=(LIBRARY_STREAM,))
    return CellNoise(int(sequence.generate_state(1, np.uint64)[0] % (2**63 - 1)), n_samples, device)


def _in_cell_plate(site: dict) -> bool:
    return site["type"] == "sample" and any(frame.name == "cells" for frame in site["cond_indep_stack"])


def _per_cell(site: dict) -> torch.Tensor:
    """The site's log-density per cell: unscaled (no N/B or KL weight), with its mask applied."""
    log_p = site["unscaled_log_prob"]
    mask = site["mask"]
    return log_p if mask is None else torch.where(torch.as_tensor(mask, device=log_p.device), log_p, 0.0)


class EvidenceQueries:
    """``get_elbo``, ``get_reconstruction_error`` and ``get_marginal_ll`` on any model/guide pair.

    Needs of the model class: ``module`` (model and guide; the guide answers ``global_medians()``),
    ``device``, ``observation_sites``, ``_indexed_batches`` and ``_check_trained``; for
    :meth:`decode_samples_with_ratios` also ``default_modality`` and ``nn_switch`` (``PosteriorQueries``).
    """

    #: why :meth:`log_importance_ratios` is not offered for this model class (None: it is)
    importance_ratio_refusal: str | None = None

    def _local_terms(self, batch: dict, n_obs: int, fixed: dict | None = None) -> dict[str, torch.Tensor]:
        """One draw from the guide for a minibatch: per-cell log p (model), log q (guide) and log p(x | z, l);
        ``fixed``: values of local sites given instead of drawn (e.g. ``{"z": z}``)."""
        medians = self.module.guide.global_medians()
        fixed = fixed or {}
        # both given the fixed values (replay takes only drawn sites); their log densities stay in the terms
        guide = poutine.condition(self.module.guide, data={**medians, **fixed})
        model = poutine.condition(self.module.model, data={**medians, **fixed})
        guide_trace = poutine.trace(guide).get_trace(batch, n_obs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch, n_obs)
        guide_trace.compute_log_prob(lambda name, site: _in_cell_plate(site))
        model_trace.compute_log_prob(lambda name, site: _in_cell_plate(site))
        terms = {"model": 0.0, "guide": 0.0}
        for label, trace in (("model", model_trace), ("guide", guide_trace)):
            for name, site in trace.nodes.items():
                if not _in_cell_plate(site):
                    continue
                value = _per_cell(site)
                terms[label] = terms[label] + value
                if label == "model" and site["is_observed"] and name not in fixed:
                    terms[f"obs:{name}"] = value
                    if site["mask"] is not None:  # the cells with counts in this modality
                        terms[f"measured:{name}"] = torch.as_tensor(site["mask"], device=value.device).expand_as(value)
        return terms

    def _evidence_batches(self, adata, indices, batch_size, n_samples: int, seed: int):
        """Per minibatch, a list of ``n_samples`` term dicts (see :meth:`_local_terms`), seeded."""
        self._check_trained()
        seed = V.seed("seed", seed)  # as every getter's seed (-1 was taken by torch)
        with seeded(seed, self.device), torch.no_grad():
            for _, (batch, n_obs) in self._indexed_batches(adata, indices, batch_size):
                yield [self._local_terms(batch, n_obs) for _ in range(n_samples)]

    @staticmethod
    def _reduce(parts: list[torch.Tensor], return_mean: bool, measured: list[torch.Tensor | None] | None = None):
        """Per-cell values, or their mean; with ``measured`` (per part a mask, or None for every cell), the cells
        outside it are NaN and the mean is over the cells in it (a NaN of a measured cell stays in the mean)."""
        values = torch.cat(parts).cpu().numpy().astype(np.float64)
        keep = np.ones(len(values), dtype=bool)
        if measured is not None:
            keep = np.concatenate([np.ones(len(p), dtype=bool) if m is None else m.cpu().numpy()
                                   for p, m in zip(parts, measured)])
            values[~keep] = np.nan
        if not return_mean:
            return values
        return float(values[keep].mean()) if keep.any() else float("nan")

    def get_elbo(self, adata=None, indices=None, batch_size: int | None = None, return_mean: bool = True,
                 seed: int = 0):
        """Evidence lower bound per cell: E_q[log p(x, z, l | globals) - log q(z, l | x)], one draw.

        As in scvi-tools this is the ELBO itself (higher is better), not the loss; the global
        sites are held at their posterior medians and their prior terms are left out.

        Parameters
        ----------
        adata, indices, batch_size
            Cells: data with the model's features (default the training data), positions or a
            boolean mask, minibatch size.
        return_mean
            Return the mean over cells; else one value per cell.
        seed
            Seeds the guide's draw; as for ``sample_posterior``, the draw repeats for the same cells,
            ``indices`` and ``batch_size`` (a one-draw estimate: other minibatches give another draw).

        Returns
        -------
        float or numpy.ndarray
        """
        return_mean = V.boolean("return_mean", return_mean)  # a string "False" read as True returned the mean
        parts = [draws[0]["model"] - draws[0]["guide"] for draws in self._evidence_batches(adata, indices, batch_size, 1, seed)]
        return self._reduce(parts, return_mean)

    def get_reconstruction_error(self, adata=None, indices=None, batch_size: int | None = None, return_mean: bool = True,
                                 seed: int = 0) -> dict:
        """Negative log-likelihood of the counts given one posterior draw of z and l, per cell.

        Parameters
        ----------
        adata, indices, batch_size, return_mean, seed
            As in :meth:`get_elbo`.

        Returns
        -------
        dict
            ``{"reconstruction_loss": value}`` (lower is better, scvi-tools' key); a multimodal
            model adds ``"reconstruction_loss_<modality>"`` per modality, NaN for a cell without counts
            in that modality and averaged over the cells with counts (the total holds the modalities
            each cell has).
        """
        return_mean = V.boolean("return_mean", return_mean)
        per_site: dict[str, list] = {}
        measured: dict[str, list] = {}
        for draws in self._evidence_batches(adata, indices, batch_size, 1, seed):
            terms = draws[0]
            for key, value in terms.items():
                if key.startswith("obs:"):
                    site = key[len("obs:"):]
                    per_site.setdefault(site, []).append(-value)
                    measured.setdefault(site, []).append(terms.get(f"measured:{site}"))
        result = {"reconstruction_loss": self._reduce([sum(parts) for parts in zip(*per_site.values())], return_mean)}
        if len(per_site) > 1:
            for site, parts in per_site.items():
                modality = self.site_modality(site)
                result[f"reconstruction_loss_{modality or site}"] = self._reduce(parts, return_mean, measured[site])
        return result

    def get_marginal_ll(self, adata=None, indices=None, n_mc_samples: int = 1000, batch_size: int | None = None,
                        return_mean: bool = True, seed: int = 0):
        """Importance-sampled log p(x_n) per cell, with the guide as proposal.

        ``log p(x) ~ logsumexp_k [log p(x, z_k, l_k) - log q(z_k, l_k | x)] - log K`` over
        ``K = n_mc_samples`` draws: a lower bound that tightens towards log p(x) as K grows and is
        never below the ELBO in expectation (higher is better, as in scvi-tools).

        Parameters
        ----------
        adata, indices, batch_size, return_mean, seed
            As in :meth:`get_elbo`.
        n_mc_samples
            Importance samples per cell (each is one pass of the model and guide).

        Returns
        -------
        float or numpy.ndarray
        """
        n_mc_samples = V.positive_int("n_mc_samples", n_mc_samples)
        return_mean = V.boolean("return_mean", return_mean)
        parts = []
        for draws in self._evidence_batches(adata, indices, batch_size, n_mc_samples, seed):
            log_weights = torch.stack([d["model"] - d["guide"] for d in draws])
            parts.append(torch.logsumexp(log_weights.double(), 0) - math.log(n_mc_samples))
        return self._reduce(parts, return_mean)

    def log_importance_ratios(self, adata=None, indices=None, n_samples: int = 1, seed: int = 0,
                              batch_size: int | None = None) -> np.ndarray:
        """log p(x, z_k, l_k) - log q(z_k, l_k | x) per cell, for the z draws that :meth:`decode_samples` decodes.

        The z of each draw is the one ``posterior_z_batches(..., n_samples, seed)`` gives (the same seed: the same z,
        so these ratios belong to the expression ``decode_samples`` decodes from it); the library size l is drawn
        from the guide's q(l | x) beside it with per-cell noise of its own stream (:func:`library_noise`), so that, as
        z, it depends only on the cell, ``seed`` and the draw, not on ``batch_size`` or the other cells asked for; the
        global sites are held at their posterior medians, as in
        :meth:`get_marginal_ll`. Exponentiated and normalised over a cell's draws they are self-normalised importance
        weights of its z draws towards the model's posterior p(z | x) (what
        ``differential_expression(weights="importance")`` resamples by; it takes them, with the decoded draws, from
        :meth:`decode_samples_with_ratios` in one pass: this method runs the encoder again for every draw).

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_elbo`.
        n_samples, seed
            Draws per cell and their seed, as in :meth:`posterior_z_batches`.

        Returns
        -------
        numpy.ndarray
            ``n_samples`` x cells, float64.

        See Also
        --------
        decode_samples_with_ratios : the same ratios beside the decoded expression, in one pass (what DE uses).

        Raises
        ------
        NotImplementedError
            The model class does not offer it (``importance_ratio_refusal`` says why).
        """
        if self.importance_ratio_refusal is not None:
            raise NotImplementedError(f"{type(self).__name__}: importance ratios of z are not available: "
                                      f"{self.importance_ratio_refusal}.")
        n_obs = (self.adata if adata is None else adata).n_obs
        seed = seed_or_fresh(V.optional(V.seed, "seed", seed))  # None: fresh draws, as for z
        guide = self.module.guide
        library_site = guide.dims.site("library")
        noise = library_noise(seed, V.positive_int("n_samples", n_samples), self.device)
        parts = []
        for cells, batch, z in self.posterior_z_batches(adata, indices, batch_size, n_samples, seed):
            with torch.no_grad():
                # l = exp(loc + scale * noise) of the guide's LogNormal, the noise each cell's own (as z's): the ratios
                # depend only on the cell, the seed and the draw, not on the minibatch or the other cells asked for
                q_library = guide.library_posterior(guide.encoder_input(batch), batch, guide.residual_weight_estimate())
                library = noise.log_normal_draws(q_library, cells)
                terms = [self._local_terms(batch, n_obs, {"z": z_k, library_site: l_k}) for z_k, l_k in zip(z, library)]
            parts.append(torch.stack([t["model"] - t["guide"] for t in terms]).double().cpu())
        return torch.cat(parts, dim=1).numpy()

    def decode_samples_with_ratios(self, adata=None, indices=None, batch_size: int | None = None, n_samples: int = 1,
                                   seed: int | None = 0, nn_covariates=(None,), modality: str | None = None):
        """Expression rho of posterior draws of z beside each draw's log importance ratio, one minibatch at a time.

        What :meth:`decode_samples` (once per entry of ``nn_covariates``) and :meth:`log_importance_ratios` give for
        the same ``seed``, in one pass: per minibatch the encoders run once, z and l are drawn once from the same
        per-cell noise as there (so the draws depend neither on ``batch_size`` nor on the other cells asked for), each
        draw is decoded once per entry of ``nn_covariates``, and the log joint is scored from the rho decoded under
        the cells' own covariates (the entry None, or one more decoding when there is none). For a model class whose
        model and guide declare ``direct_elbo`` the per-cell terms are computed directly
        (:meth:`~pyro_scmodels.models.regularizedvi_log_density.RegularizedVILogDensity.cell_log_joint`, the sum a
        trace gives); otherwise each draw is traced as in :meth:`log_importance_ratios`.

        Parameters
        ----------
        adata, indices, batch_size, n_samples, seed
            As in :meth:`log_importance_ratios`.
        nn_covariates
            A sequence of ``{key: category}`` (or None: the cells' own covariates), as :meth:`decode_samples`' own
            argument: rho is decoded under each in turn (the strata of batch-corrected DE).
        modality
            As in :meth:`decode_samples` (a model that offers the ratios models one count matrix: None).

        Yields
        ------
        tuple
            ``(cell_positions, rhos, log_ratios)``: ``rhos`` a list with one ``n_samples`` x cells x features tensor
            per entry of ``nn_covariates`` (on the model's device), ``log_ratios`` the draws' log p(x, z, l) - log
            q(z, l | x), ``n_samples`` x cells, float64 on the CPU.

        Raises
        ------
        NotImplementedError
            The model class does not offer the ratios (``importance_ratio_refusal`` says why).
        """
        if self.importance_ratio_refusal is not None:
            raise NotImplementedError(f"{type(self).__name__}: importance ratios of z are not available: "
                                      f"{self.importance_ratio_refusal}.")
        self.default_modality(modality)
        self._check_trained()
        n_samples = V.positive_int("n_samples", n_samples)
        seed = seed_or_fresh(V.optional(V.seed, "seed", seed))
        switches = [self.nn_switch(covariates) for covariates in nn_covariates]  # checked before any draw
        guide, model = self.module.guide, self.module.model
        direct = declares_direct_elbo(model) and declares_direct_elbo(guide)
        z_noise, l_noise = CellNoise(seed, n_samples, self.device), library_noise(seed, n_samples, self.device)
        library_site = guide.dims.site("library")
        with torch.no_grad():
            medians = guide.global_medians()
            theta = medians["inverse_sqrt_theta"].pow(-2)  # one tensor for every minibatch's count terms
        for cells, (batch, n_obs) in self._indexed_batches(adata, indices, batch_size):
            with torch.no_grad():
                h = guide.encoder_input(batch)  # the input both encoders share
                q_z = guide.z_posterior(batch, h)
                z = z_noise.normal_draws(q_z, cells)  # posterior_z_batches' draw
                q_library = guide.library_posterior(h, batch, guide.residual_weight_estimate())
                library = l_noise.log_normal_draws(q_library, cells)  # log_importance_ratios' draw
                rhos = [model.decode(z, batch, None if switch is None else switch(batch["nn_onehot"]))
                        for switch in switches]
                if direct:
                    own = rhos[switches.index(None)] if None in switches else model.decode(z, batch)
                    # log q in the guide trace's order (z, then l), each draw as a cells-long row, as traced; without
                    # the distributions' argument checks (a fifth of the time): the counts were checked when read, z
                    # and l are the guide's own draws, and the values are the same
                    with pyro.validation_enabled(False):
                        # the counts' terms that no draw changes (lgamma(x + theta), lgamma(x + 1), the positions of
                        # the non-zero counts): once for the minibatch, not once per draw
                        fixed = model.count_terms(theta, batch)
                        ratios = [model.cell_log_joint(z_k, {**medians, "library": l_k}, batch, rho_k, fixed)
                                  - (q_z.to_event(1).log_prob(z_k) + q_library.log_prob(l_k))
                                  for z_k, l_k, rho_k in zip(z, library, own)]
                else:  # a model or guide with sites of its own: the traces say what they score
                    terms = [self._local_terms(batch, n_obs, {"z": z_k, library_site: l_k}) for z_k, l_k in zip(z, library)]
                    ratios = [t["model"] - t["guide"] for t in terms]
            yield cells, rhos, torch.stack(ratios).double().cpu()
