"""Counterfactual matching in an embedding: batch denoising and per-cell treatment effects (SPEC 3.5).

Works on any embedding of the cells: the NDreamer effect-modifier space or the latent space of a
Pyro model. Every output is aligned with the input cells.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.decomposition import PCA

from .. import _validation as V
from ..matching import match_groups
from . import _constants as K
from .effect_intervals import bound_names, interval_bounds, interval_level, matched_spread, smallest_positive
from .counterfactual_design import CounterfactualDesign
from .matched_row_sums import dense_block, matched_mean

def matching_space(embedding: np.ndarray, n_components: int = K.MATCHING_PCA_COMPONENTS, seed: int = 0) -> np.ndarray:
    """PCA (seeded) of an embedding, the space in which cells are matched; small embeddings pass through.

    Parameters
    ----------
    embedding
        Cells x dimensions.
    n_components, seed
        PCA components (capped by the data's size) and its random state.

    Returns
    -------
    numpy.ndarray
        Cells x components, float32.
    """
    embedding = np.asarray(embedding, dtype=np.float32)
    n_components = min(n_components, embedding.shape[1], embedding.shape[0] - 1)
    if n_components >= embedding.shape[1]:
        return embedding
    return PCA(n_components=n_components, random_state=seed).fit_transform(embedding).astype(np.float32)


#: how a cell's own batch and condition enter its effects: its own measurement, or its matched cells there
FACTUAL_CHOICES = ("observed", "matched")


class ArmMean(NamedTuple):
    """One condition's matched expression of some cells, averaged over the batches holding that condition."""

    mean: np.ndarray  #: the ITE's term; a cell of that condition takes its own batch from itself or its matches
    variance: np.ndarray | None  #: of ``mean``, with an interval (a cell's own batch: one measurement's variance)
    dof: float  #: the fewest degrees of freedom of the spreads, with an interval
    own_shift: np.ndarray | None  #: with ``factual="matched"``, per cell of that condition (in order): its own
    #: value minus its matched cells' there, over the number of batches; ``mean`` plus it is the denoised value


def mean_over_batches(expression, matches: dict, design: CounterfactualDesign, condition: str, cells: np.ndarray,
                      own: np.ndarray | None = None, observed: np.ndarray | None = None, genes: np.ndarray | None = None,
                      unit: np.ndarray | None = None, factual: str = "observed", batches: list[str] | None = None) -> ArmMean:
    """For each of ``cells``: mean over the batches holding ``condition`` (or over ``batches``) of its matched
    expression there.

    With ``own`` (a boolean per cell of ``cells``) and ``observed`` (the cells' own rows, dense, the genes kept:
    read once by the caller), cells of that condition use themselves for their own batch, or, with
    ``factual="matched"``, their matched cells there (and :attr:`ArmMean.own_shift` keeps the difference; without
    ``observed``, for the ITE alone, it stays None).
    With ``unit`` (a single count's value per cell, for an interval), also the variance of that mean and the
    fewest degrees of freedom of its spreads (:mod:`.effect_intervals`).

    Parameters
    ----------
    expression, matches, design
        As :func:`effects_of_cells`.
    condition
        The arm: the condition the cells are taken to.
    cells
        Positions of the cells.
    own, observed, genes, unit, factual
        As described above (``genes``: the columns kept; default all).
    batches
        The batches averaged over (default: every batch holding ``condition``).

    Returns
    -------
    ArmMean
        The cells' mean in that condition, and with ``unit`` its variance.
    """
    batches = design.batches_with[condition] if batches is None else batches
    if not batches:
        raise ValueError(f"No batch to average condition {condition!r} over.")
    n = len(batches)
    own = np.zeros(cells.size, dtype=bool) if own is None else own
    own_rows = np.flatnonzero(own)
    own_shift = None
    total = variance = None
    dof = float("inf")
    for b in batches:
        match = matches[design.group(b, condition)]
        indices, weights = match.indices[cells], match.weights_of(cells)
        itself = own & (design.batch[cells] == b)
        if unit is None:
            values = matched_mean(expression, indices, weights, genes)
        else:
            values, spread, squared_weights = matched_spread(expression, indices, weights, unit, genes)
            # one measurement (the cell itself) has the spread's variance; a weighted mean of k, sum w^2 of it.
            # The own value keeps one measurement's variance with factual="matched" too: that mean trades the
            # cell's counting noise for how far its neighbours' state is from its own, which no spread measures
            part = spread * squared_weights
            part[itself] = spread[itself]
            if variance is None:
                variance = part
            else:
                variance += part
            dof = min(dof, indices.shape[1] - 1)  # the spread's: k matched values
        if itself.any():
            if factual != "matched":
                values[itself] = observed[itself]
            elif observed is not None:  # only the difference is kept, for the denoised value: not a second array
                own_shift = np.zeros((own_rows.size, values.shape[1]), values.dtype) if own_shift is None else own_shift
                own_shift[np.searchsorted(own_rows, np.flatnonzero(itself))] = (observed[itself] - values[itself]) / n
        if total is None:
            total = values
        else:
            total += values
    total /= n
    return ArmMean(total, None if variance is None else variance / n ** 2, dof, own_shift)


def effects_of_cells(expression, matches: dict, design: CounterfactualDesign, cells=None, genes=None,
                     interval: float | None = None, factual: str = "observed", ite_of=None) -> dict:
    """Denoised expression, batch effect and ITE of some cells and genes, from matches already found.

    Parameters
    ----------
    expression
        Log-normalised expression of all cells (cells x genes): dense, sparse or
        :class:`~pyro_scmodels.ndreamer.count_rows.LogNormalisedCounts`; only the matched rows of
        the cells asked for are read, and only the genes asked for are kept.
    matches
        :func:`~pyro_scmodels.matching.match_groups` of every cell into every batch x condition group.
    design
        Conditions, control and batches.
    cells, genes
        Positions of the cells and of the genes (default all).
    interval
        A level such as 0.9: also the bounds ``ite_<condition>_q05`` / ``_q95`` of each ITE's
        Student t interval from the spread of the matched cells (:mod:`.effect_intervals`). Needs
        at least two matched cells per group.
    factual
        How the ITE takes a cell's value in its own batch and condition: ``"observed"``, the cell's
        own expression; ``"matched"``, the kernel-weighted mean of its matched cells there (itself
        among them), like every other batch and condition. The second removes the cell's own counting
        noise, and is right when the matches share the cell's state (a model's latent); the interval's
        width is the same for both. ``denoised`` and ``batch_effect`` use the observed value either way.
    ite_of
        Treatments whose ITE layers alone (``ite_<c>`` and, with ``interval``, its bounds) are
        computed, the same numbers as without it: no ``denoised`` or ``batch_effect``, and only
        the arms those ITEs use (with ``factual="matched"`` and no interval, the cells' own rows
        are not read). None: every layer.

    Returns
    -------
    dict
        As :func:`estimate_effects`, (len(cells), len(genes)) float32 arrays in the order asked for.
    """
    factual = V.choice("factual", factual, FACTUAL_CHOICES)
    ite_of = checked_treatments(design, ite_of)
    cells = np.arange(len(design.condition)) if cells is None else np.asarray(cells, dtype=np.int64)
    level = None if interval is None else interval_level(interval)
    if level is not None:
        _check_spread_estimable(matches)
        if cells.size > K.WRITE_CHUNK_CELLS:
            # the spread's float64 moments are cells x genes too: a block of cells at a time bounds them
            blocks = [effects_of_cells(expression, matches, design, cells[start:start + K.WRITE_CHUNK_CELLS], genes, level,
                                       factual, ite_of) for start in range(0, cells.size, K.WRITE_CHUNK_CELLS)]
            return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}
    # columns are taken from each block of rows: slicing the whole matrix first would copy all of it
    genes = None if genes is None else np.asarray(genes, dtype=np.int64)
    # the cells' own values: for denoised, for "observed" and for the interval's unit (not the ITE alone of "matched")
    own_values = ite_of is None or factual == "observed"
    observed = unit = None
    if own_values or level is not None:
        observed = expression[cells]
        unit = None if level is None else smallest_positive(observed)  # of the whole row, before the genes are kept
        observed = dense_block(observed, genes) if own_values else None
    arms, over_common = {}, {}

    def _full_arm(condition: str) -> ArmMean:
        """Every cell's value "as if in ``condition``", over every batch holding it: itself for its own batch when it
        is in that condition."""
        if condition not in arms:
            arms[condition] = mean_over_batches(expression, matches, design, condition, cells,
                                                own=design.condition[cells] == condition, observed=observed,
                                                genes=genes, unit=unit, factual=factual)
        return arms[condition]

    def _arm_over(batches: list[str], condition: str) -> ArmMean:
        """An arm over some batches; the control's kept per set of batches (it serves every treatment sharing them,
        and a treatment's arm is used once)."""
        key = tuple(batches)
        if condition == design.control_name and key in over_common:
            return over_common[key]
        arm = mean_over_batches(expression, matches, design, condition, cells, own=design.condition[cells] == condition,
                                observed=observed, genes=genes, unit=unit, factual=factual, batches=batches)
        if condition == design.control_name:
            over_common[key] = arm
        return arm

    out = {}
    if ite_of is None:
        denoised = np.zeros(observed.shape, dtype=np.float32)
        for c in design.conditions:
            own, arm = design.condition[cells] == c, _full_arm(c)
            denoised[own] = arm.mean[own] if arm.own_shift is None else arm.mean[own] + arm.own_shift
        out = {"denoised": denoised, "batch_effect": (observed - denoised).astype(np.float32)}
    for c in design.treatments if ite_of is None else ite_of:
        # both arms over the batches holding both: a batch of one arm would add its batch effect to the difference.
        # None in common (a saved, confounded design, loaded with a warning): each arm over its own batches
        batches = {a: design.ite_batches(c, a) for a in (c, design.control_name)}
        treated, control = (_full_arm(a) if batches[a] == design.batches_with[a] else _arm_over(batches[a], a)
                            for a in (c, design.control_name))
        effect = treated.mean - control.mean
        out[f"ite_{c}"] = effect.astype(np.float32)
        if level is not None:
            low, high = interval_bounds(effect, treated.variance + control.variance, min(treated.dof, control.dof), level)
            low_name, high_name = bound_names(level)
            out[f"ite_{c}_{low_name}"], out[f"ite_{c}_{high_name}"] = low, high
    return out


def denoised_of_cells(expression, matches: dict, design: CounterfactualDesign, cells=None,
                      genes=None) -> dict[str, np.ndarray]:
    """Denoised expression and batch effect of some cells and genes alone, from matches already found.

    The same numbers as those layers of :func:`effects_of_cells` with ``factual="observed"`` (and within float32
    rounding of ``"matched"``'s, whose denoised value also keeps the cell's observed value): a cell's own condition
    averaged over every batch holding it, the cell itself standing for its own batch. Only that one arm of each cell
    is read, where the full computation reads every condition's for the ITEs.

    Parameters
    ----------
    expression, matches, design
        As :func:`effects_of_cells`.
    cells, genes
        Positions of the cells and of the genes (default all).

    Returns
    -------
    dict
        ``"denoised"`` and ``"batch_effect"`` (observed - denoised): (len(cells), len(genes)) float32 arrays in the
        order asked for.
    """
    cells = np.arange(len(design.condition)) if cells is None else np.asarray(cells, dtype=np.int64)
    genes = None if genes is None else np.asarray(genes, dtype=np.int64)
    observed = dense_block(expression[cells], genes)
    denoised = np.zeros(observed.shape, dtype=np.float32)
    for c in design.conditions:
        rows = np.flatnonzero(design.condition[cells] == c)
        if rows.size:
            denoised[rows] = mean_over_batches(expression, matches, design, c, cells[rows], own=np.ones(rows.size, bool),
                                               observed=observed[rows], genes=genes).mean
    return {"denoised": denoised, "batch_effect": (observed - denoised).astype(np.float32)}


def checked_treatments(design: CounterfactualDesign, ite_of) -> list[str] | None:
    """The treatments whose ITE layers alone are asked for.

    Parameters
    ----------
    design
        The counterfactual design.
    ite_of
        A treatment, a list of treatments, or None (every layer).

    Returns
    -------
    list of str or None
        The treatments, as text; None when ``ite_of`` is None.
    """
    if ite_of is None:
        return None
    chosen = [str(c) for c in ([ite_of] if isinstance(ite_of, str) else ite_of)]
    unknown = [c for c in chosen if c not in design.treatments]
    if unknown or not chosen:
        raise ValueError(f"ite_of={ite_of!r}: give one or more of the treatments {design.treatments} (the control "
                         f"{design.control_name!r} has no ITE), or None for every layer.")
    return list(dict.fromkeys(chosen))


def _check_spread_estimable(matches: dict) -> None:
    """An interval needs at least two matched cells in every group (one cell has no spread)."""
    single = [label for label, match in matches.items() if match.indices.shape[1] < 2]
    if single:
        raise ValueError(
            f"An interval needs at least two matched cells per group, but the matches into group(s) {single[:5]} "
            "hold one: match with nearest_neighbor >= 2 (the default is "
            f"{K.NEAREST_NEIGHBOR}), and keep at least two cells in every batch x condition group."
        )


def estimate_effects(embedding: np.ndarray, expression, design: CounterfactualDesign,
                     nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH, device: str = "auto",
                     factual: str = "observed") -> dict[str, np.ndarray]:
    """Denoised expression, batch effect and per-cell treatment effects, by matching in ``embedding``.

    Parameters
    ----------
    embedding
        Matching space (cells x dims), e.g. :func:`matching_space` of the effect-modifier space.
    expression
        Log-normalised expression (cells x genes): dense, sparse or
        :class:`~pyro_scmodels.ndreamer.count_rows.LogNormalisedCounts`.
    design
        Conditions, control and batches.
    nearest_neighbor, bandwidth, device
        k of the matching (1: causal matching), kernel bandwidth for k > 1, FAISS device.
    factual
        As in :func:`effects_of_cells`.

    Returns
    -------
    dict
        ``"denoised"``, ``"batch_effect"`` and ``"ite_<condition>"`` for every non-control
        condition: cells x genes float32 arrays in the input's cell order. The ITE of a cell is
        its treated arm minus its control arm, each the mean over the batches that hold both
        arms; in its own condition the arm is the cell itself (``factual="observed"``) or its
        own batch's matched cells (``"matched"``). With ``"observed"`` and every batch holding
        both arms, a treated cell's ITE is its denoised expression minus its matched controls.
    """
    if np.asarray(embedding).shape[0] != len(design.condition):
        raise ValueError(f"embedding has {np.asarray(embedding).shape[0]} cells, the design {len(design.condition)}.")
    matches = match_groups(embedding, design.groups, k=nearest_neighbor, bandwidth=bandwidth, device=device)
    return effects_of_cells(expression, matches, design, factual=factual)
