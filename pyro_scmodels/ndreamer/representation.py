"""A trained Pyro model as NDreamer's representation (SPEC 3.6).

:class:`ModelRepresentation` gives :class:`~pyro_scmodels.ndreamer.NDreamer` its
:meth:`~ModelRepresentation.from_model` entry point (match in the model's latent space) and
the model-based counterfactual (:meth:`~ModelRepresentation.estimate_model_ite`).
"""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pandas as pd

from .. import _validation as V
from .._labels import names_as_text
from ..infer import resolve_device
from . import _constants as K
from ._persistence import LATENT
from .attached_model import model_digest
from .model_effects import checked_quantiles
from .model_ite_width import HULL
from .design import design_from_obs, design_keys
from .effects import FACTUAL_CHOICES
from .preprocess import log_normalise

#: ``results.uns`` key: which interval the ``ite_model_*`` bounds hold
MODEL_ITE_INTERVAL = "model_ite_interval"


def _model_counts(model, modality):
    """The modality the expression is read from (``modality``, checked; by default the package's rule,
    :func:`~pyro_scmodels.models.multimodal_settings.query_modality`: a multimodal model's RNA; None for a
    single-modality model), and the AnnData and layer holding its counts."""
    if not callable(getattr(model, "counts_source", None)):
        raise ValueError(f"NDreamer.from_model needs a model of this package (with counts_source()); "
                         f"{type(model).__name__} is not one.")
    try:
        modality = model.default_modality(modality)
    except ValueError as err:  # no "rna" modality and none given, a name the model lacks, or one for a RegularizedVI
        raise ValueError(f"NDreamer.from_model(modality={modality!r}): {err}") from err
    return (modality, *model.counts_source(modality))


def _refuse_cells_without_counts(model, source, layer, modality) -> None:
    """A multimodal model keeps cells without counts in a modality; NDreamer's expression is ``modality``'s, and
    needs counts for every cell. Checked before the latent is computed (in memory; a backed store is read once,
    later, and refused there)."""
    if not getattr(model, "masks_cells_without_counts", False) or getattr(source, "isbacked", False):
        return
    matrix = source.X if layer is None else source.layers[layer]
    empty = int((np.asarray(matrix.sum(axis=1)).ravel() == 0).sum())
    if empty:
        others = [m for m in getattr(model, "modalities", []) if m != modality]
        raise ValueError(f"NDreamer.from_model reads its expression from the modality {modality!r} (modality=; by "
                         f"default the RNA one), which has no counts for {empty} of its "
                         f"{matrix.shape[0]} cells. Give NDreamer a model of the cells that have {modality!r} counts "
                         f"(e.g. mdata[mdata.obs_names[has_counts]].copy(), set up and trained again), or another "
                         f"modality=; the model's other modalities: {others}.")


class ModelRepresentation:
    """Mixin of :class:`~pyro_scmodels.ndreamer.NDreamer`: a trained model's latent as the representation."""

    @classmethod
    def from_model(cls, model, condition_key: str, control_name: str, batch_key=None, seed: int = 0,
                   device: str = "auto", min_cells_per_group: int = K.MIN_CELLS_PER_GROUP, factual: str = "matched",
                   modality: str | None = None):
        """Match cells in a trained Pyro model's latent space instead of a learned code space.

        Parameters
        ----------
        model
            A trained model of this package (:class:`~pyro_scmodels.RegularizedVI`, or a
            :class:`~pyro_scmodels.RegularizedMultimodalVI`, one of whose modalities gives the expression, see
            ``modality``); read through ``get_latent_representation()``, ``adata`` and
            ``counts_source()``. For
            :meth:`estimate_model_ite` its decoder must be conditioned on ``condition_key``.
        condition_key, control_name, batch_key
            As for the constructor (read from ``model.adata.obs``).
        seed, device
            Seed of the matching-space PCA and the posterior samples; torch device.
        min_cells_per_group
            As for the constructor.
        factual
            How the matched ITE (:meth:`estimate_ite`) takes a cell's value in its own batch and
            condition. ``"matched"`` (the default here): the kernel-weighted mean of its k nearest
            cells there, itself among them, as for every other batch and condition; a model's latent
            is denoised, so those cells share the cell's state, and the mean removes the cell's own
            counting noise. ``"observed"``: the cell's own expression (what NDreamer's own space takes
            with any network but its default one, whose ``factual="auto"`` takes ``"matched"``:
            :func:`~pyro_scmodels.ndreamer.presets.own_space_factual`). ``"auto"`` means ``"matched"`` here. On
            ``datasets.simulate(3000, 500, effect_modifier=1.0)`` (four seeds, a RegularizedVI with
            ``latent_independence=10``) the per-cell correlation with the true ITE is 0.88-0.92 with
            ``"matched"`` and 0.74-0.80 with ``"observed"``. The interval's width is the same for both.
        modality
            A multimodal model's modality whose counts are the expression (matched, and decoded by
            :meth:`estimate_model_ite`); the cells are matched in the joint latent either way. None: the rule of
            every multimodal query, the modality named ``"rna"`` (a model without one needs ``modality=``). A
            single-modality model takes None only. Kept by :meth:`save` and :meth:`load`.

        Returns
        -------
        NDreamer
            With the model's latent as ``obsm["X_effect_modifier_space"]``; the matching-based
            methods work as usual, :meth:`train` raises (there is no network).
        """
        device = resolve_device(device)  # before the latent and the expression are computed
        modality, source, layer = _model_counts(model, modality)
        condition_key, batch_keys = design_keys(condition_key, batch_key)
        settings = dict(modality=modality, condition_key=condition_key, control_name=str(control_name),
                        batch_key=batch_keys,
                        batch_size=K.BATCH_SIZE, seed=V.seed("seed", seed), layer=layer,
                        representation=LATENT, model=type(model).__name__,
                        min_cells_per_group=V.positive_int("min_cells_per_group", min_cells_per_group),
                        # a model's latent is denoised: "auto" is "matched" here
                        factual=V.choice("factual", "matched" if factual == "auto" else factual, FACTUAL_CHOICES),
                        model_digest=model_digest(model))  # re-attaching it at load is checked against it
        self = cls.__new__(cls)
        # the design is checked before the latent and the expression are computed (minutes at 10^6 cells)
        design = design_from_obs(model.adata.obs, settings)
        _refuse_cells_without_counts(model, source, layer, modality)
        latent = model.get_latent_representation()  # before the expression is held: the two never add up
        # from a backed input, the counts themselves (half a float32 CSR; see NDreamer's adata)
        expression = log_normalise(source, layer, compact=bool(getattr(source, "isbacked", False)))
        self._setup(settings, model.adata.obs.copy(), expression, names_as_text(source.var_names), device,
                    latent=latent, model=model, design=design)
        return self

    def estimate_model_ite(self, num_samples: int = K.MODEL_ITE_SAMPLES,
                           quantiles: tuple[float, float] = K.MODEL_ITE_QUANTILES, indices=None,
                           gene_list=None, widen_by_matching: bool | str = "hull",
                           disagreement_groups: str | None = None) -> anndata.AnnData:
        """Model-based counterfactual ITE with credible intervals (``from_model`` only).

        Each cell's z (posterior samples) is decoded with the condition switched to each treatment
        and to the control; layers ``ite_model_<c>`` (posterior mean) and ``ite_model_<c>_q05`` /
        ``_q95`` hold the effect on log-normalised expression.

        Set the model up with the condition in both ``nn_conditioning_covariate_keys`` and
        ``encoder_covariate_keys`` (the basal-state design), and train it with
        ``RegularizedVI(..., latent_independence=10.0)``, which keeps the condition out of z: the
        decoder then adds the whole effect back. With the condition in the decoder only, or in a
        wide network without the penalty, z carries it and the effect is shrunk (a warning says
        so). On ``datasets.simulate(n_cells=2000, n_genes=200, effect_modifier=1.0)`` at
        ``n_hidden=128`` (``benchmarks/bench_model_ite.py``): slope of estimate on truth 1.12 with
        the penalty and 0.52 without; per-cell correlation inside responding types 0.75 and 0.14.

        Which uncertainty the interval includes. By default (``widen_by_matching="hull"``) the bounds are the
        matched ITE's own interval at the same level (:meth:`estimate_ite` with ``interval=``: the noise of the
        cell's own measurement and the spread of its matched cells), extended to hold the decoded ITE E:
        [min(E, M_low), max(E, M_high)]. The interval extended takes the cell's own batch and condition from its
        observed expression, whatever this NDreamer's ``factual``: that term's variance is measured, where the
        matched own term's is an allowance (:mod:`~pyro_scmodels.ndreamer.effect_intervals`). On the simulator
        (stimulated cells of responding types x responding genes) the 90 % bounds covered 0.90-0.925 in the
        standard design at 2000 x 200 and 0.92-0.94 at 3000 x 500; 0.85-0.88 where one cell type of five responds
        (0.86-0.90 with ``n_layers=2``); the matched interval alone 0.82-0.87. It holds the matched route's noise and
        the two routes' disagreement, not the model's parameter uncertainty. It is not centred on E, it is wider
        than the other modes where nothing responds, and it inherits the matched interval's weak spots (strong
        down-regulation is covered least).

        ``widen_by_matching=True``: the posterior spread of each cell's z, q(z | x, condition), decoded with every
        other quantity held fixed (decoder weights and global sites at their point estimates, the library at a
        typical size), widened by a bound on the fitted model's systematic error: per gene (and per group of
        ``disagreement_groups``), the mean over the treatment's cells of (decoded - matched)^2, the matched ITE
        (:meth:`estimate_ite` at its defaults) taken in the same latent. Where the two routes' errors are
        uncorrelated that mean bounds the decoded ITE's mean squared error from above
        (:mod:`~pyro_scmodels.ndreamer.model_ite_width`); each half-width h becomes sqrt(h^2 + z^2 v). It is a
        bound on the error, not a posterior, centred on E and narrower where nothing responds. On the simulator
        its 90 % bounds covered 0.86-0.94 per gene (12 data sets and seeds, both decoders, trained as
        docs/ndreamer_model_route.md recommends; 0.83-0.88 after 120 epochs at lr 2e-2) and 0.92-0.95 per Leiden
        cluster (4, ``decoder_gene_scale=True``); but 0.58-0.71 per gene and 0.80-0.88 per cluster where one
        cell type of five responds and the two routes' errors correlate, which is why it is not the default
        (docs/ndreamer_model_route.md).

        ``widen_by_matching=False`` gives the spread of z alone (it covered 0.30-0.56): read it as the effect's
        sensitivity to the cell's state, not as a calibrated interval.

        Cost: the hull reads the matched interval of the cells asked for: at 60,000 cells 34-41 s against 19-21 s
        for ``True``, which reads the matched ITE of the treated cells (at most 20,000 of each treatment, a seeded
        sample above that), and 17-22 s for the spread of z alone (benchmarks/RESULTS.md).

        Parameters
        ----------
        num_samples, quantiles
            Posterior samples of z per cell (at least 2 unless ``widen_by_matching='hull'``: the other bounds take
            their spread); the interval's quantiles.
        indices, gene_list
            Only these cells (positions, a boolean mask or names) and genes: the layers are
            returned in a new AnnData and :attr:`results` is left as it is (for data too large for
            whole cells x genes layers; the cells are decoded a minibatch at a time either way).
        widen_by_matching
            ``"hull"`` (the default): the matched ITE's interval at the same level, extended to hold the decoded
            ITE (central ``quantiles`` only). True: the spread of z widened by the disagreement with the matched
            ITE (``estimate_ite()`` at its defaults), taken over every cell of each treatment (or a seeded sample
            of 20,000, each group of ``disagreement_groups`` keeping at least 200 or all of its cells), also when
            ``indices`` asks for fewer (those cells are then decoded again, in blocks). False: the spread of z
            alone. See above for what each holds and how each covered.
        disagreement_groups
            A column of :attr:`results` ``.obs`` (e.g. Leiden clusters of the model's latent) over whose groups
            the disagreement is taken separately; None: one value per gene. Needs ``widen_by_matching=True``.

        Returns
        -------
        anndata.AnnData
            :attr:`results`, or the new AnnData of the cells and genes asked for.
        """
        if self.model is None:
            if self.settings["representation"] == LATENT:
                raise ValueError("This NDreamer was loaded without its model (models are not saved inside it); "
                                 "re-attach it with NDreamer.load(dir_path, model=model).")
            raise ValueError("estimate_model_ite needs an NDreamer built with NDreamer.from_model(model, ...).")
        if self.settings.get("model_digest") not in (None, model_digest(self.model)):
            # the rule a re-attached model is held to at load, held in memory too: the layers would mix two models
            raise ValueError("The model was trained or changed after NDreamer.from_model(model, ...): its model ITE "
                             "would not belong to the latent this NDreamer's matches and CATE were made in. Build a new "
                             "NDreamer.from_model(model, ...) for the model as it is now.")
        from .model_effects import model_counterfactual_ite

        cells, columns = self._selection(indices, gene_list)
        widen = self._widening(widen_by_matching, quantiles)
        num_samples = V.positive_int("num_samples", num_samples)
        if num_samples < 2 and widen != HULL:  # the quantiles of one draw are that draw
            raise ValueError(f"num_samples=1 with widen_by_matching={widen!r}: the bounds take the spread of z over the "
                             "draws, and one draw has none (its bounds were the estimate itself). Pass num_samples >= 2 "
                             f"(default {K.MODEL_ITE_SAMPLES}), or widen_by_matching='hull'.")
        if widen == HULL:
            self._refuse_groups_of_one_cell()  # before any decoding
        groups = self._disagreement_groups(disagreement_groups, widen is True)  # checked before any decoding
        layers = {}
        # one model, condition and draws for every decoding (the widening decodes the treated cells again)
        common = dict(model=self.model, condition_key=self.settings["condition_key"],
                      control_name=self.settings["control_name"], num_samples=num_samples,
                      quantiles=quantiles, seed=self.settings["seed"], gene_columns=columns,
                      modality=self.settings.get("modality"))  # None in a save made before it was kept: the rule's
        decode = lambda treatments, rows: model_counterfactual_ite(treatments=treatments, indices=rows, **common)  # noqa: E731
        # its warnings name the user's line through decode too (user_stacklevel); the widening's second pass silences them
        effects = decode(list(self.design.treatments), cells)
        if widen == HULL:
            self._hull_with_matching(effects, quantiles, cells, columns)
        elif widen:
            self._widen_by_matching(effects, quantiles, cells, columns, groups, decode)
        for treatment, effect in effects.items():
            for name, values in effect.items():
                layers[f"ite_model_{treatment}" + ("" if name == "mean" else f"_{name}")] = values
        if indices is None and gene_list is None:
            # bounds of an earlier call (other quantiles or draws) would not belong to this mean
            for treatment in effects:
                for stale in [n for n in self.results.layers if n.startswith(f"ite_model_{treatment}_q")]:
                    del self.results.layers[stale]
            self.results.layers.update(layers)
            # which interval the bounds hold, for whoever reads the layers later
            self.results.uns[MODEL_ITE_INTERVAL] = {"widen_by_matching": widen,
                                                    "disagreement_groups": disagreement_groups or ""}
            return self.results
        return self._subset_result(cells, columns, layers)

    def _drop_matched_model_bounds(self) -> None:
        """Forget the model ITE's bounds when the matched ITE widened them (``widen_by_matching=True`` reads this
        NDreamer's ``factual``): the posterior mean, and the hull's bounds, do not depend on it."""
        widen = self.results.uns.get(MODEL_ITE_INTERVAL, {}).get("widen_by_matching")
        if isinstance(widen, str) or not widen:  # "hull", False, or no model ITE
            return
        prefixes = tuple(f"ite_model_{c}_q" for c in self.design.treatments)
        for stale in [name for name in self.results.layers if name.startswith(prefixes)]:
            del self.results.layers[stale]
        del self.results.uns[MODEL_ITE_INTERVAL]

    @staticmethod
    def _widening(widen_by_matching, quantiles) -> bool | str:
        """``widen_by_matching`` checked: True, False or ``"hull"`` (with central quantiles, the matched interval's)."""
        if not isinstance(widen_by_matching, str):
            try:
                return V.boolean("widen_by_matching", widen_by_matching)
            except TypeError as err:
                raise TypeError(f"widen_by_matching must be True (the disagreement with the matched ITE), 'hull' (the "
                                f"matched interval extended to the model ITE) or False (the spread of z); got "
                                f"{widen_by_matching!r}.") from err
        if widen_by_matching != HULL:
            raise ValueError(f"widen_by_matching={widen_by_matching!r}: give True (the disagreement with the matched "
                             "ITE), 'hull' (the matched interval extended to the model ITE) or False (the spread of z).")
        low, high = checked_quantiles(quantiles)
        if abs(low - (1.0 - high)) > 1e-6:  # float32 levels: 0.05 and 0.95 differ from 1 - each other by ~1e-8
            raise ValueError(f"widen_by_matching='hull' (the default) extends the matched ITE's central interval: "
                             f"give central quantiles such as (0.05, 0.95), or widen_by_matching=True for others; got "
                             f"{tuple(quantiles)!r}.")
        return HULL

    def _refuse_groups_of_one_cell(self) -> None:
        """The hull reads the matched interval, a spread of at least two matched cells in every batch x condition
        group (``min_cells_per_group=1`` lets a group of one cell through)."""
        from .effect_intervals import single_cell_groups

        single = single_cell_groups(self.design)
        if single:
            raise ValueError(f"widen_by_matching='hull' (the default) reads the matched ITE's interval, the spread of "
                             f"at least two matched cells in every batch x condition group, but {single[:5]} hold a "
                             f"single cell: pass widen_by_matching=True (or False), or remove those cells.")

    def _hull_with_matching(self, effects: dict, quantiles, cells, columns) -> None:
        """Each treatment's bounds in ``effects`` replaced by :func:`~.model_ite_width.matched_hull`, in place."""
        from .effect_intervals import bound_names
        from .model_ite_width import BLOCK, matched_hull

        level = float(quantiles[1]) - float(quantiles[0])
        matched = self._matched_effects()
        rows = np.arange(self.results.n_obs) if cells is None else cells
        for start in range(0, len(rows), BLOCK):  # a block of cells at a time: no second cells x genes array
            block = slice(start, start + BLOCK)
            # the ITE layers and their bounds only: no denoised expression or batch effect. The own term is the
            # cell's observed expression, whose variance s^2 is measured; the matched own term's s^2 is an allowance
            # (effect_intervals), and its interval extended to E covered 0.95-0.97 at 3000 x 500
            interval = matched.effects_of(cells=rows[block], genes=columns, interval=level, ite_of=list(effects),
                                          factual="observed")
            for treatment, effect in effects.items():
                low_name, high_name = (f"ite_{treatment}_{name}" for name in bound_names(level))
                low, high = (effect[name] for name in effect if name != "mean")
                low[block], high[block] = matched_hull(effect["mean"][block], interval[low_name], interval[high_name])

    def _disagreement_groups(self, key, widen: bool) -> tuple[np.ndarray, int] | None:
        """Every cell's group code and the number of groups of the ``disagreement_groups`` column, or None."""
        if key is None:
            return None
        if not widen:
            raise ValueError("disagreement_groups needs widen_by_matching=True: it sets the groups over which the "
                             "bounds are widened.")
        if not isinstance(key, str) or key not in self.results.obs:
            raise KeyError(f"disagreement_groups={key!r} is not a column of nd.results.obs; add one first, e.g. "
                           "Leiden clusters of the model's latent.")
        codes, levels = pd.factorize(self.results.obs[key])
        if (codes < 0).any():
            raise ValueError(f"nd.results.obs[{key!r}] has {int((codes < 0).sum())} missing values; give every cell "
                             "a group.")
        return codes, len(levels)

    @staticmethod
    def _decoded_again(decode, treatment, rows) -> np.ndarray:
        """The decoded ITE of ``rows``, decoded again for the disagreement without repeating the first decoding's
        warnings (the same model, condition and setup)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return decode([treatment], rows)[treatment]["mean"]

    def _widen_by_matching(self, effects: dict, quantiles, cells, columns, groups, decode) -> None:
        """Widen each treatment's bounds in ``effects`` in place (:mod:`~.model_ite_width`)."""
        from .model_ite_width import BLOCK, disagreement_sample, disagreement_variance, widened_bounds

        condition = self.results.obs[self.settings["condition_key"]].astype(str).to_numpy()
        matched = self._matched_effects()
        codes, n_groups = (None, 1) if groups is None else groups
        for treatment, effect in effects.items():
            treated, weights = disagreement_sample(np.flatnonzero(condition == str(treatment)), codes, n_groups,
                                                   self.settings["seed"])
            if cells is None:  # every cell was decoded: the treated ones are among them
                decoded = lambda rows, mean=effect["mean"]: mean[rows]  # noqa: E731
            else:
                decoded = lambda rows, t=treatment: self._decoded_again(decode, t, rows)  # noqa: E731
            variance = disagreement_variance(
                treated, decoded,
                lambda rows, t=treatment: matched.effects_of(cells=rows, genes=columns, ite_of=[t])[f"ite_{t}"],
                codes, n_groups, weights)
            rows = np.arange(len(condition)) if cells is None else cells
            low, high = (effect[name] for name in effect if name != "mean")
            for start in range(0, len(rows), BLOCK):  # in place, a block of cells at a time (float64 inside)
                block = slice(start, start + BLOCK)
                per_cell = variance[0][None, :] if codes is None else variance[codes[rows[block]]]
                low[block], high[block] = widened_bounds(effect["mean"][block], low[block], high[block], quantiles,
                                                         per_cell)
