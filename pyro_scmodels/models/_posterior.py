"""Posterior summaries of every site, their export into AnnData, and the model graph.

Everything here works for any model/guide pair of the package through a few hooks of the model
class: ``observation_sites``, ``derived_sites``, ``_indexed_batches`` and ``site_levels``.
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from .. import _validation as V
from .._atomic import atomic_path
from .._labels import quantile_label, stored_column_names
from ..priors import prior_record
from ..seeding import seeded


class PosteriorMixin:
    """Posterior summaries of every site, their export, and the model graph."""

    #: observation sites of the model and the minibatch key of the counts each one observes
    observation_sites: dict[str, str] = {"obs": "x"}
    #: functions of sampled sites summarised as sites of their own: name -> (site, function)
    derived_sites: dict = {}
    #: per-cell sites of a modality (base names) that a cell without counts in it has no fitted value of
    sites_of_measured_cells: tuple[str, ...] = ("library",)
    #: the sites whose guide is a point estimate (a Delta), found by the last :meth:`sample_posterior`
    point_estimate_sites: frozenset = frozenset()

    # --- posterior summaries -----------------------------------------------------------------
    @torch.no_grad()
    def sample_posterior(self, num_samples: int = 100, adata=None, indices=None, batch_size: int | None = None,
                         quantiles: tuple[float, float] = (0.05, 0.95), seed: int | None = None) -> dict:
        """Summaries of the posterior of every latent site, from samples of the guide.

        Parameters
        ----------
        num_samples
            Guide samples per minibatch.
        adata, indices, batch_size
            Cells for the local (per-cell) sites; globals are summarised once.
        quantiles
            The lower and upper quantiles reported.
        seed
            Seeds the guide's draws (the caller's random state is left as it was); None draws from torch's
            global generator, as Pyro does. The draws repeat for the same cells, ``indices`` and
            ``batch_size``; other minibatches draw other noise, so a cell's summary then moves within its
            Monte Carlo error (about sd / sqrt(num_samples)). The getters (latent, expression) draw each
            cell's noise from its own seeded stream instead, and do not move.

        Returns
        -------
        dict
            ``{"means": {site: array}, "stds": ..., "q05": ..., "q95": ...}`` (the quantile keys
            follow ``quantiles``). Per-cell sites have the cells along the first axis; global
            sites keep their shape (categories x genes). A multimodal model's library size of a modality is
            NaN for the cells without counts in it (their library term is masked: the draws are not fitted).

        Notes
        -----
        The spread is the guide's, not a full posterior's:

        - sites whose guide is a point estimate (a Delta: by default the ambient profile, the feature
          scaling, the dispersion rate and the library's residual weight) have sd 0 and every quantile equal
          to the mean. That is no certainty, only a guide without a spread; their names are in
          :attr:`point_estimate_sites` after a call (and in ``export_posterior``'s ``.uns``);
        - the mean-field factors of the other global sites are over-confident: on
          ``datasets.simulate(2000, 300)`` (two seeds) the 90 % interval of the overdispersion (theta) held
          the true value for 67-68 % of genes x batches, 40-51 % for genes of mean count below 1, while its
          posterior mean ranked the genes well (Spearman 0.91-0.95).
        """
        self._check_trained()
        num_samples = V.positive_int("num_samples", num_samples)
        if num_samples < 2:  # one draw would report every sd as 0 and every quantile as the draw itself
            raise ValueError(f"num_samples={num_samples}: the posterior's sd and quantiles need at least 2 draws.")
        try:  # a bare number (quantiles=0.5, np.array(0.5)) or a non-number in the list failed unnamed
            if isinstance(quantiles, (str, bytes)):
                raise TypeError
            quantiles = tuple(float(q) for q in list(quantiles))  # a 0-d array is not iterable either
        except (TypeError, ValueError):
            raise V.ArgumentTypeError(f"quantiles must be a sequence of numbers in (0, 1), e.g. (0.05, 0.95); got "
                                      f"{quantiles!r}.") from None
        labels = [quantile_label(q) for q in quantiles]
        if len(set(labels)) != len(labels) or not all(0.0 < q < 1.0 for q in quantiles):
            raise ValueError(f"quantiles must be distinct numbers in (0, 1), got {quantiles}.")
        seed = V.optional(V.seed, "seed", seed)
        with seeded(seed, self.device):
            level = torch.tensor(quantiles)
            summaries = {key: {} for key in ("means", "stds", *labels)}
            local_parts: dict[str, list] = {}
            self._local_sites = set()
            self.point_estimate_sites = set()
            for i, (batch, n_obs) in enumerate(self._batches(adata, indices, batch_size)):
                traces = self._guide_traces(batch, n_obs, num_samples)
                site_draws = {}
                for name, site in prune_subsample_sites(traces[0]).nodes.items():
                    if site["type"] != "sample" or site["is_observed"]:
                        continue
                    is_local = any(frame.name == "cells" for frame in site["cond_indep_stack"])
                    if _is_point_estimate(site["fn"]):
                        self.point_estimate_sites.add(name)
                    if is_local or i == 0:  # globals are the same in every minibatch: summarise once
                        site_draws[name] = (torch.stack([t.nodes[name]["value"] for t in traces]).float().cpu(), is_local)
                for name, (source, function) in self.derived_sites.items():
                    if source in site_draws:
                        site_draws[name] = (function(site_draws[source][0]), site_draws[source][1])
                        if source in self.point_estimate_sites:
                            self.point_estimate_sites.add(name)
                for name, (draws, is_local) in site_draws.items():
                    if name in self.point_estimate_sites:
                        # every draw is the one value: summarised exactly (the float32 mean of equal draws drifted
                        # by an ulp, below q05, and the sd came out 1e-7)
                        # (copies: not views of the stacked draws, nor one array shared by the mean and quantiles)
                        stats = [draws[0].clone() for _ in range(2 + len(quantiles))]
                        stats[1].zero_()
                    else:
                        stats = [draws.mean(0), draws.std(0) if num_samples > 1 else torch.zeros_like(draws[0])]
                        stats += list(torch.quantile(draws, level.to(draws.dtype), dim=0))
                    if is_local:
                        stats = self._unmeasured_as_nan(name, batch, stats)
                        self._local_sites.add(name)
                        local_parts.setdefault(name, []).append(stats)
                    else:
                        for key, value in zip(summaries, stats):
                            summaries[key][name] = value.numpy()
            for name, parts in local_parts.items():
                for j, key in enumerate(summaries):
                    summaries[key][name] = torch.cat([p[j] for p in parts]).numpy()
        return summaries

    def _unmeasured_as_nan(self, site: str, batch: dict, stats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The summaries of a per-cell site with NaN for the cells not measured in the site's modality (a site of
        :attr:`sites_of_measured_cells` only; the others, and a single-modality model's, as they are)."""
        modality = self.site_modality(site)
        if modality is None or self._site_base_name(site) not in self.sites_of_measured_cells:
            return stats
        measured = self.measured_cells(batch, modality)
        if measured is None:
            return stats
        measured = measured.cpu()
        return [torch.where(measured.reshape(-1, *[1] * (s.ndim - 1)), s, torch.nan) for s in stats]

    def export_posterior(self, adata=None, num_samples: int = 100, batch_size: int | None = None,
                         quantiles: tuple[float, float] = (0.05, 0.95), seed: int | None = None):
        """Write posterior means, sd and quantiles of every site into an AnnData.

        The cell2location convention: per-cell sites go to ``.obsm["<stat>_<site>"]`` (1-d ones
        to ``.obs``), per-gene sites to ``.varm["<stat>_<site>"]`` as genes x categories
        DataFrames (a category's ``/`` written ``%2F`` and ``%`` ``%25``, as an h5ad needs; ``urllib.parse.unquote``
        gives the name back), the remaining globals (a site with one value per category, the dispersion rate, as a
        table indexed by the categories when there are several, else a nested list) and the model's settings to
        ``.uns["<model class>"]`` (``settings["priors"]``: per prior its family and parameter values, a dict). ``<stat>`` is ``means``, ``stds``, ``q05``, ``q95``. Per-cell
        results of the model class (:meth:`exported_cell_quantities`, e.g. ``ambient_fraction``)
        go to ``.obs`` too. ``.uns["<model class>"]["point_estimates"]`` names the sites whose guide is a point
        estimate: their sd is 0 and their quantiles equal their mean (see :meth:`sample_posterior`'s notes).

        Parameters
        ----------
        adata
            AnnData of the model's cells and genes; default the training data.
        num_samples, batch_size, quantiles, seed
            As in :meth:`sample_posterior`.

        Returns
        -------
        anndata.AnnData
            ``adata``, with the results added.
        """
        adata = self.adata if adata is None else adata
        summaries = self.sample_posterior(num_samples, adata=adata, batch_size=batch_size, quantiles=quantiles, seed=seed)
        self._drop_other_quantiles(adata, list(summaries["means"]), [stat for stat in summaries if stat.startswith("q")])
        globals_out = {}
        for stat, sites in summaries.items():
            for name, value in sites.items():
                key = f"{stat}_{name}"
                if name in self._local_sites:
                    if value.ndim == 1:
                        adata.obs[key] = value
                    else:
                        adata.obsm[key] = pd.DataFrame(value, index=adata.obs_names,
                                                       columns=[f"{name}_{j}" for j in range(value.shape[1])])
                elif value.ndim == 2 and value.shape[-1] == len(self._feature_table(name, adata).var_names):
                    table = self._feature_table(name, adata)
                    table.varm[key] = stored_column_names(pd.DataFrame(value.T, index=table.var_names,
                                                                       columns=self.site_levels(name, value.shape[0])))
                elif value.ndim == 1 and value.shape[0] == len(self._feature_table(name, adata).var_names):
                    # one value per gene (e.g. a site a subclass adds): a one-column table, not a list in .uns
                    table = self._feature_table(name, adata)
                    table.varm[key] = pd.DataFrame({name: value}, index=table.var_names)
                elif value.ndim == 2 and value.shape[1] == 1 and value.shape[0] > 1:
                    # one value per category (the dispersion rate per dispersion group): a table named by them
                    globals_out[key] = pd.DataFrame({name: np.asarray(value[:, 0], dtype=np.float64)},
                                                    index=pd.Index(self.site_levels(name, value.shape[0]), name="level"))
                else:
                    globals_out[key] = np.asarray(value, dtype=np.float64).tolist()
        for name, values in self.exported_cell_quantities(adata, batch_size).items():
            adata.obs[name] = values
        settings = {k: (v if isinstance(v, (int, float, str, bool)) else repr(v)) for k, v in self.init_params.items()
                    if v is not None}
        settings["priors"] = prior_record(self.priors)  # each prior's family and values (torch's text omits them)
        adata.uns[type(self).__name__] = {
            "settings": settings,
            "num_samples": int(num_samples),
            "quantiles": list(quantiles),
            # sd 0 and quantiles equal to the mean there: the guide's point estimate, not a certainty
            "point_estimates": sorted(self.point_estimate_sites),
            "globals": globals_out,
        }
        return adata

    def _drop_other_quantiles(self, adata, sites: list[str], labels: list[str]) -> None:
        """Remove the quantiles of an earlier export at other levels (``q05_<site>`` beside a new ``q10_<site>``):
        they would read as this export's, from another fit of the model."""
        for name in sites:
            stale = re.compile(rf"q[0-9][0-9.e+-]*_{re.escape(name)}")
            tables = [(adata.obs, "columns"), (adata.obsm, "keys")]
            feature_table = self._feature_table(name, adata)
            tables.append((feature_table.varm, "keys"))
            for table, names in tables:
                keys = list(table.columns) if names == "columns" else list(table.keys())
                for key in keys:
                    if stale.fullmatch(str(key)) and str(key).split("_", 1)[0] not in labels:
                        del table[key]

    def exported_cell_quantities(self, adata=None, batch_size: int | None = None) -> dict:
        """Per-cell results besides the sites that :meth:`export_posterior` writes to ``.obs`` (name -> values)."""
        return {}

    def _feature_table(self, site: str, adata):
        """The AnnData whose features a per-feature site runs over (a modality's, for several)."""
        return adata

    def render_model(self, filename: str | None = None, render_distributions: bool = True):
        """Draw the model with its plates (``pyro.render_model``).

        Parameters
        ----------
        filename
            Also write the drawing there, in the format of its extension (e.g. ``model.png``); needs the
            Graphviz binaries (e.g. ``apt-get install graphviz``; without them Graphviz's
            ``ExecutableNotFound`` is raised). Checked before anything is drawn; the file is written
            atomically and nothing else is left beside it.
        render_distributions
            Label each site with its distribution.

        Returns
        -------
        graphviz.Digraph
        """
        try:
            import graphviz
        except ImportError as err:
            raise ImportError(
                "render_model needs the `graphviz` Python package: `pip install graphviz` "
                "(and the Graphviz binaries, e.g. `apt-get install graphviz`, to write a file)."
            ) from err
        if filename is not None:
            filename = V.output_path("filename", filename)
            file_format = os.path.splitext(filename)[1].lstrip(".").lower()
            if file_format not in graphviz.FORMATS:
                raise ValueError(f"filename {filename}: the drawing's format comes from the extension, and "
                                 f"{file_format or 'none'!r} is not one Graphviz writes (e.g. png, pdf, svg).")
            if shutil.which("dot") is None:  # Graphviz's own error, as drawing would raise it, but before the work
                raise graphviz.ExecutableNotFound(["dot"])
        batch, n_obs = next(self._batches(indices=np.arange(min(2, self.adata.n_obs))))
        (guide_trace,) = self._guide_traces(batch, n_obs, 1)
        # latent values replayed from the guide: pyro's provenance tracking cannot draw from
        # some torch distributions (Exponential.rsample calls Tensor.new(shape))
        model = poutine.replay(self.module.model, trace=guide_trace)
        graph = pyro.render_model(model, model_args=(batch, n_obs), render_distributions=render_distributions)
        if filename is not None:  # piped and written atomically: no source file beside it
            with atomic_path(filename) as temporary, open(temporary, "wb") as handle:
                handle.write(graph.pipe(format=file_format))
        return graph


def _is_point_estimate(fn) -> bool:
    """Whether a guide site's distribution is a Delta, under any ``to_event`` or mask wrappers."""
    while isinstance(fn, (pyro.distributions.Independent, pyro.distributions.MaskedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, pyro.distributions.Delta)
