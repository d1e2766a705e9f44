"""The posterior queries shared by every model class.

Every getter, differential expression, the predictive checks and the model-based
counterfactual are built on two queries of the model's Pyro modules: the guide's
``z_posterior(batch)`` and the model's ``decode(z, batch, nn_onehot)``. This mixin runs them over
minibatches: :meth:`PosteriorQueries.posterior_z` (the mean of z or seeded samples) and
:meth:`PosteriorQueries.decode_samples` (rho decoded from those z).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import _validation as V
from .. import differential, predictive
from . import expression
from .cell_noise import CellNoise
from .global_site_tables import GlobalSiteTables
from .scvi_arguments import refuses_scvi_arguments
from ..differential import PSEUDOCOUNT
from ..seeding import seed_or_fresh


class PosteriorQueries(GlobalSiteTables):
    """Posterior of z, decoded expression, global-site tables, DE and predictive draws.

    Needs of the model class: ``module`` (model and guide), ``device``, ``adata``, ``keys``,
    ``encoding``, ``_indexed_batches`` and ``_check_trained`` (see ``PyroModelBase``) and
    ``feature_names(modality)``. The tables of the per-feature global sites come from
    :class:`~pyro_scmodels.models.global_site_tables.GlobalSiteTables`.
    """

    # --- features and modalities (a multimodal model overrides these) ---------------------------
    def default_modality(self, modality: str | None = None) -> str | None:
        """The modality a query runs on: None for a single-modality model (which takes no modality)."""
        if modality is not None:
            raise ValueError(f"{type(self).__name__} models one count matrix; modality must be None, got {modality!r}.")
        return None

    def feature_names(self, modality: str | None = None) -> pd.Index:
        """Names of the modelled features (genes), in the model's order."""
        self.default_modality(modality)
        return self.var_names

    def measured_cells(self, batch: dict, modality: str | None = None) -> torch.Tensor | None:
        """Which cells of a minibatch have counts in ``modality``: a boolean per cell, or None when the model
        fits every cell's counts (a single-modality model). A multimodal model masks the likelihood of a cell
        without counts in a modality, so what it reports of that modality for the cell is not fitted."""
        return None

    def minibatches(self, adata=None, indices=None, batch_size: int | None = None):
        """The chosen cells in order, one minibatch at a time, on the model's device.

        Yields
        ------
        tuple
            ``(cell_positions, (minibatch, n_cells))``: the minibatch dict that the model and guide
            take, and the number of cells of the data set it comes from. The modules' training modes are
            left as they are (a loop of one's own sets them).
        """
        return self._cell_batches(adata, indices, batch_size)

    def check_trained(self) -> None:
        """Warn when the model has not been trained (results then reflect the initial parameters)."""
        self._check_trained()

    def counts_source(self, modality: str | None = None, adata=None) -> tuple:
        """Where the model reads the counts of ``modality``: ``(AnnData, layer)``; layer None is ``.X``.

        ``adata``: other data with the model's layout (default the training data).
        """
        self.default_modality(modality)
        return (self.adata if adata is None else adata), self.layer

    # --- the posterior queries every getter, DE, check and counterfactual is built on ----------
    def posterior_z_batches(self, adata=None, indices=None, batch_size: int | None = None, n_samples: int | None = None,
                            seed: int | None = 0, modality: str | None = None):
        """The posterior of z, one minibatch at a time: its mean, or seeded samples.

        Parameters
        ----------
        adata
            Data with the model's features and known categories; default the training data.
        indices
            Cells (integer positions or a boolean mask); default all.
        batch_size
            Cells per minibatch.
        n_samples
            None: the posterior mean of z. An integer: that many draws from q(z | x) per cell.
        seed
            Seeds the draws: the same seed gives each cell the same z in every call, whichever other cells
            ``indices`` asks for and in whatever order (:class:`~pyro_scmodels.models.cell_noise.CellNoise`). A cell is
            its position in the data: a reordered or subset copy of the AnnData draws by its own positions. None:
            fresh draws in each call, from torch's global stream (:func:`~pyro_scmodels.seeding.seed_or_fresh`).
        modality
            Multimodal models: a modality's own encoder posterior instead of the joint z.

        Yields
        ------
        tuple
            ``(cell_positions, minibatch, z)``; z is cells x latent (mean) or
            ``n_samples`` x cells x latent, a tensor on the model's device.
        """
        self._check_trained()
        if n_samples is not None:
            n_samples = V.positive_int("n_samples", n_samples)
        seed = V.optional(V.seed, "seed", seed)
        if n_samples is not None:
            # drawn only when sampling: the mean of z leaves torch's stream as it was
            seed = seed_or_fresh(seed)
        guide = self.module.guide  # in evaluation mode while _indexed_batches runs
        # each cell's draws from its own seeded block, so results depend neither on torch's global state nor on the
        # other cells of the call
        noise = None if n_samples is None else CellNoise(seed, n_samples, self.device)
        for cells, (batch, _) in self._indexed_batches(adata, indices, batch_size):
            # no_grad only around the computation: a `with` spanning the yield would leak into the caller
            with torch.no_grad():
                q_z = guide.z_posterior(batch) if modality is None else guide.z_posterior(batch, modality=modality)
                if n_samples is None:
                    z = q_z.loc
                else:
                    z = noise.normal_draws(q_z, cells)
            yield cells, batch, z

    def posterior_z(self, adata=None, indices=None, batch_size: int | None = None, n_samples: int | None = None,
                    seed: int = 0, modality: str | None = None) -> np.ndarray:
        """The posterior mean of z per cell, or seeded samples (see :meth:`posterior_z_batches`).

        Returns
        -------
        numpy.ndarray
            Cells x latent, or ``n_samples`` x cells x latent.
        """
        batches = self.posterior_z_batches(adata, indices, batch_size, n_samples, seed, modality)
        parts = [z.cpu() for _, _, z in batches]
        return torch.cat(parts, dim=-2).numpy()

    def posterior_z_moments(self, adata=None, indices=None, batch_size: int | None = None,
                            modality: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of q(z | x) per cell (scvi-tools' ``return_dist=True``).

        Parameters
        ----------
        adata, indices, batch_size, modality
            As in :meth:`posterior_z_batches`.

        Returns
        -------
        tuple
            ``(mean, variance)``, each cells x latent.
        """
        self._check_trained()
        guide = self.module.guide  # in evaluation mode while _indexed_batches runs
        means, variances = [], []
        for _, (batch, _) in self._indexed_batches(adata, indices, batch_size):
            with torch.no_grad():
                q_z = guide.z_posterior(batch) if modality is None else guide.z_posterior(batch, modality=modality)
            means.append(q_z.loc.cpu())
            variances.append(q_z.scale.pow(2).cpu())
        return torch.cat(means).numpy(), torch.cat(variances).numpy()

    def decode_samples(self, adata=None, indices=None, batch_size: int | None = None, n_samples: int | None = None,
                       seed: int = 0, nn_covariates: dict | None = None, modality: str | None = None,
                       with_scaling: bool = False):
        """Expression rho decoded from the posterior of z, one minibatch at a time.

        Parameters
        ----------
        adata, indices, batch_size, n_samples, seed
            As in :meth:`posterior_z_batches`; the same seed decodes the same z.
        nn_covariates
            ``{key: category}`` for decoder-conditioning keys (``nn_conditioning_covariate_keys``):
            decode every cell as if it had that category (e.g. a counterfactual condition).
        modality
            The modality decoded (multimodal models only; default: the RNA modality, see ``default_modality``).
        with_scaling
            Also multiply rho by the feature scaling y of the switched categories whose keys are
            feature-scaling keys (see :meth:`feature_scaling_of`): a counterfactual for a key, such
            as a condition, whose effect the model splits between the decoder and y.

        Yields
        ------
        tuple
            ``(cell_positions, minibatch, rho)``; rho has z's leading shape and features last
            (with ``with_scaling``: rho times y, whose rows no longer sum as rho's do).
        """
        switch = self.nn_switch(nn_covariates)
        modality = self.default_modality(modality)  # a multimodal model: its RNA modality by default
        decode_options = {} if modality is None else {"modality": modality}
        scaling = self.feature_scaling_of(nn_covariates, modality) if V.boolean("with_scaling", with_scaling) else None
        model = self.module.model  # in evaluation mode while posterior_z_batches runs
        for cells, batch, z in self.posterior_z_batches(adata, indices, batch_size, n_samples, seed):
            with torch.no_grad():
                nn_onehot = None if switch is None else switch(batch["nn_onehot"])
                rho = model.decode(z, batch, nn_onehot, **decode_options)
            yield cells, batch, rho if scaling is None else rho * scaling

    def feature_scaling_of(self, covariates: dict | None, modality: str | None = None) -> torch.Tensor | None:
        """Product of the feature scalings y (posterior medians) of the given categories, per feature.

        Only the keys of ``covariates`` that are feature-scaling keys count (with
        ``nn_conditioning_covariate_keys=[condition]`` and no ``feature_scaling_covariate_keys``,
        the condition is one: it gets a per-gene factor in the mean, and the model may put much of
        the condition's effect there, so a counterfactual must switch y with the decoder).

        Parameters
        ----------
        covariates
            ``{key: category}``.
        modality
            Multimodal models: the modality (default: the RNA modality, see ``default_modality``).

        Returns
        -------
        torch.Tensor or None
            Features-long, on the model's device; None when no key of ``covariates`` scales
            features (or the modality has no feature-scaling site).

        Raises
        ------
        KeyError
            A key of ``covariates`` is not one of the model's covariate keys.
        ValueError
            A category is not one the model knows for its key.
        """
        modality = self.default_modality(modality)
        unknown = [key for key in (covariates or {}) if key not in self.encoding.categories]
        if unknown:
            raise KeyError(f"{unknown} are not covariate keys of this model (keys: {sorted(self.encoding.categories)}).")
        scaling_keys = list(self.keys.feature_scaling)
        switched = {key: str(category) for key, category in (covariates or {}).items() if key in scaling_keys}
        if not switched:
            return None
        try:
            table = self.global_site_table("feature_scaling", modality)
        except ValueError:  # this modality has no feature-scaling site
            return None
        factor = torch.ones(table.shape[0])
        for key, category in switched.items():
            _, _, column = self.encoding.stacked_span(scaling_keys, key, category)  # the table stacks every scaling key
            factor = factor * torch.as_tensor(table.iloc[:, column].to_numpy(), dtype=torch.float32)
        return factor.to(self.device)  # where posterior_z_batches puts z, hence rho

    def nn_switch(self, nn_covariates: dict | None):
        """A function setting the decoder one-hot of the given keys to the given categories (checked now).

        Parameters
        ----------
        nn_covariates
            ``{key: category}`` for decoder-conditioning keys; None or empty: no switch (returns None).
        """
        if not nn_covariates:
            return None
        keys = list(self.keys.nn_conditioning)
        columns = []
        for key, category in nn_covariates.items():
            if key not in keys:
                raise ValueError(
                    f"{key!r} is not a decoder-conditioning key of this model (nn_conditioning_covariate_keys={keys}); "
                    "only those can be switched when decoding."
                )
            columns.append(self.encoding.stacked_span(keys, key, category))

        def switch(onehot: torch.Tensor) -> torch.Tensor:
            onehot = onehot.clone()
            for start, stop, column in columns:
                onehot[:, start:stop] = 0.0
                onehot[:, column] = 1.0
            return onehot

        return switch

    # --- results built on the two queries ------------------------------------------------------
    def library_sizes(self, adata=None, indices=None, batch_size: int | None = None, modality: str | None = None) -> np.ndarray:
        """Posterior median of each cell's library size factor l (relative to a typical cell, ~1).

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`posterior_z_batches`.
        modality
            Multimodal models: the modality whose library size is returned (default: the RNA modality, see ``default_modality``);
            NaN for a cell without counts in it (its library was not measured, and its likelihood is masked).
        """
        self._check_trained()
        guide = self.module.guide  # in evaluation mode while _indexed_batches runs
        modality = self.default_modality(modality)
        options = {} if modality is None else {"modality": modality}
        parts = []
        with torch.no_grad():
            for _, (batch, _) in self._indexed_batches(adata, indices, batch_size):
                size = guide.library_loc(batch, **options).exp()
                measured = None if modality is None else self.measured_cells(batch, modality)
                if measured is not None:  # no counts in the modality, no library: NaN, as export_posterior gives
                    size = torch.where(measured.reshape(-1, *[1] * (size.ndim - 1)), size, torch.nan)
                parts.append(size.cpu())
        return torch.cat(parts).numpy()

    def normalized_expression(self, adata=None, indices=None, transform_batch=None, gene_list=None,
                              library_size: str | float | None = None, n_samples: int = 1, batch_size: int | None = None,
                              return_mean: bool = True, return_numpy: bool | None = None, modality: str | None = None,
                              seed: int | None = None):
        """Background- and scaling-free expression rho per cell, as the getters return it.

        See :func:`pyro_scmodels.models.expression.normalized_expression`; the arguments are
        those of :meth:`RegularizedVI.get_normalized_expression` plus ``modality``.
        """
        return expression.normalized_expression(
            self, adata, indices, transform_batch, gene_list, library_size, n_samples, batch_size, return_mean,
            return_numpy, modality, seed,
        )

    @refuses_scvi_arguments("differential")
    def differential_expression(self, groupby: str | None = None, group1=None, group2: str | None = None, idx1=None,
                                idx2=None, mode: str = "change", delta: float | None = 0.25,
                                batch_correction: bool | str = False, batchid1=None, batchid2=None,
                                fdr_target: float = 0.05, num_samples: int = 20, n_cells: int = 500, n_pairs: int = 5000,
                                pseudocount: float = PSEUDOCOUNT, adata=None, batch_size: int | None = None, seed: int = 0,
                                modality: str | None = None, all_stats: bool = True, weights: str | None = "uniform",
                                filter_outlier_cells: bool = False, background: str = "shared") -> pd.DataFrame:
        """Bayesian differential expression (scvi-tools' "change" mode, or "vanilla"), one-vs-rest by default.

        ``model.differential_expression(groupby="cell_type")`` compares every group with the
        rest; ``group1``/``group2`` or ``idx1``/``idx2`` narrow it. See
        :func:`pyro_scmodels.differential.differential_expression` for every parameter;
        ``modality`` picks the modality of a multimodal model (default: the RNA modality, see ``default_modality``); ``weights`` (``"uniform"`` or ``"importance"``) and
        ``filter_outlier_cells`` are scvi-tools' options of the same names. By default the tested expression is rho
        plus the background every cell carries (``background="shared"``; ``"none"``: rho alone).
        """
        return differential.differential_expression(
            self, groupby, group1, group2, idx1, idx2, mode=mode, delta=delta, batch_correction=batch_correction,
            batchid1=batchid1, batchid2=batchid2, fdr_target=fdr_target, num_samples=num_samples, n_cells=n_cells,
            n_pairs=n_pairs, pseudocount=pseudocount, adata=adata, batch_size=batch_size, seed=seed, modality=modality, all_stats=all_stats,
            weights=weights, filter_outlier_cells=filter_outlier_cells, background=background,
        )

    def predictive_batches(self, num_samples: int = 1, adata=None, indices=None, batch_size: int | None = None,
                           prior: bool = False):
        """Predictive draws of the counts, one minibatch at a time; see :func:`pyro_scmodels.predictive.predictive_batches`."""
        return predictive.predictive_batches(self, num_samples, adata, indices, batch_size, prior)

    def posterior_predictive(self, num_samples: int = 1, adata=None, indices=None, batch_size: int | None = None,
                             modality: str | None = None, seed: int | None = None):
        """Counts drawn from the posterior predictive; see :func:`pyro_scmodels.predictive.posterior_predictive`."""
        return predictive.posterior_predictive(self, num_samples, adata, indices, batch_size, modality, seed=seed)

    @refuses_scvi_arguments("query")
    def posterior_predictive_sample(self, adata=None, indices=None, *, n_samples: int = 1, gene_list=None,
                                    batch_size: int | None = None, modality: str | None = None,
                                    seed: int | None = None) -> np.ndarray:
        """Counts drawn from the posterior predictive, in scvi-tools' layout.

        The same draws as :meth:`posterior_predictive`, under scvi-tools' name and arguments
        (``n_samples``, ``gene_list``; keyword-only after ``indices``) and with its axis order. scvi-tools
        returns a sparse ``sparse.GCXS`` array; this returns a dense numpy array.

        Parameters
        ----------
        adata, indices, batch_size
            Cells to draw for (default: every cell of the training data) and cells per minibatch.
        n_samples
            Draws per cell.
        gene_list
            Names of the genes to return (default: every gene). Their columns come in the model's gene
            order, as in scvi-tools; only these genes are held, a minibatch at a time.
        modality
            Multimodal models: the modality whose counts are drawn (default: the RNA modality, see ``default_modality``).
        seed
            Seed of the draws (torch's random state is restored after); None draws from the current stream.

        Returns
        -------
        numpy.ndarray
            Cells x genes with ``n_samples=1``, else cells x genes x ``n_samples``.

        Raises
        ------
        KeyError
            A gene of ``gene_list`` that the model does not have (named).
        """
        n_samples = V.positive_int("n_samples", n_samples)
        modality = self.default_modality(modality)
        columns = expression.gene_columns(self.feature_names(modality), gene_list)  # the model's order, as scvi-tools'
        draws = predictive.posterior_predictive(self, n_samples, adata, indices, batch_size, modality, features=columns,
                                                seed=seed)
        return draws[0] if n_samples == 1 else np.moveaxis(draws, 0, -1)
