"""Counterfactual matching in an embedding: batch denoising and per-cell treatment effects (SPEC 3.5).

Works on any embedding of the cells: the NDreamer effect-modifier space or the latent space of a
Pyro model. Every output is aligned with the input cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

from .. import _validation as V
from ..matching import match_groups, weighted_average
from . import _constants as K
from .effect_intervals import bound_names, dense_block, interval_bounds, interval_level, matched_spread, smallest_positive

GROUP_SEPARATOR = "|"  # joins batch and condition into one matching-group label


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


@dataclass
class CounterfactualDesign:
    """Conditions, batches and their groups, checked once.

    Parameters
    ----------
    condition
        Condition label per cell.
    control_name
        The control condition.
    batch
        Batch label per cell (a combined label when several batch keys); None for one batch.
    min_cells_per_group
        Fewest cells a batch x condition group may hold. Matching into a smaller group gives every
        cell the same few partners, and effects that look certain but rest on a handful of cells.
    """

    condition: np.ndarray
    control_name: str
    batch: np.ndarray | None = None
    min_cells_per_group: int = 1

    def __post_init__(self):
        self.condition = np.asarray(self.condition).astype(str)
        n = len(self.condition)
        self.batch = np.full(n, "all") if self.batch is None else np.asarray(self.batch).astype(str)
        if len(self.batch) != n:
            raise ValueError(f"batch has {len(self.batch)} labels for {n} cells.")
        self.conditions = list(dict.fromkeys(self.condition))
        if self.control_name not in self.conditions:
            raise ValueError(f"control_name {self.control_name!r} is not a condition (conditions: {self.conditions}).")
        self.treatments = [c for c in self.conditions if c != self.control_name]
        if not self.treatments:
            raise ValueError(f"Only the control condition {self.control_name!r} is present: nothing to compare with.")
        self.groups = np.char.add(np.char.add(self.batch, GROUP_SEPARATOR), self.condition)
        self._check_group_sizes(V.positive_int("min_cells_per_group", self.min_cells_per_group))
        present = set(self.groups)
        self.batches_with = {c: [b for b in dict.fromkeys(self.batch) if f"{b}{GROUP_SEPARATOR}{c}" in present]
                             for c in self.conditions}

    def _check_group_sizes(self, minimum: int) -> None:
        names, sizes = np.unique(self.groups, return_counts=True)
        small = [(name, int(size)) for name, size in zip(names, sizes) if size < minimum]
        if small:
            listed = ", ".join(f"batch {n.split(GROUP_SEPARATOR, 1)[0]!r} x condition {n.split(GROUP_SEPARATOR, 1)[1]!r}: "
                               f"{s} cell{'s' if s != 1 else ''}" for n, s in small[:10])
            raise ValueError(
                f"{len(small)} batch x condition group(s) hold fewer than min_cells_per_group={minimum} cells ({listed}). "
                "Every cell is matched into each group, so effects from so few cells are not trustworthy: remove "
                "those cells, merge their batches, or lower min_cells_per_group if you accept that."
            )

    def group(self, batch: str, condition: str) -> str:
        """The matching-group label of ``batch`` x ``condition``."""
        return f"{batch}{GROUP_SEPARATOR}{condition}"


def _mean_over_batches(expression, matches: dict, design: CounterfactualDesign, condition: str, cells: np.ndarray,
                       own: np.ndarray | None = None, genes: np.ndarray | None = None, unit: np.ndarray | None = None):
    """For each of ``cells``: mean over the batches holding ``condition`` of its matched expression there.

    With ``own`` (a boolean per cell of ``cells``), cells of that condition use themselves for their own batch.
    With ``unit`` (a single count's value per cell, for an interval), returns ``(mean, variance, dof)``:
    the variance of that mean and the fewest degrees of freedom of its spreads (:mod:`.effect_intervals`).
    """
    batches = design.batches_with[condition]
    total = variance = None
    dof = float("inf")
    for b in batches:
        match = matches[design.group(b, condition)]
        indices, weights = match.indices[cells], match.weights[cells]
        itself = np.zeros(cells.size, dtype=bool) if own is None else own & (design.batch[cells] == b)
        if unit is None:
            values = dense_block(weighted_average(expression, indices, weights), genes)
        else:
            values, spread, squared_weights = matched_spread(expression, indices, weights, unit, genes)
            # one measurement (the cell itself) has the spread's variance; a weighted mean of k, sum w^2 of it
            part = np.where(itself[:, None], spread, spread * squared_weights)
            variance = part if variance is None else variance + part
            dof = min(dof, indices.shape[1] - 1)  # the spread's: k matched values
        if itself.any():
            values[itself] = dense_block(expression[cells[itself]], genes)
        total = values if total is None else total + values
    if unit is None:
        return total / len(batches)
    return total / len(batches), variance / len(batches) ** 2, dof


def effects_of_cells(expression, matches: dict, design: CounterfactualDesign, cells=None, genes=None,
                     interval: float | None = None) -> dict:
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

    Returns
    -------
    dict
        As :func:`estimate_effects`, (len(cells), len(genes)) float32 arrays in the order asked for.
    """
    cells = np.arange(len(design.condition)) if cells is None else np.asarray(cells, dtype=np.int64)
    level = None if interval is None else interval_level(interval)
    if level is not None:
        _check_spread_estimable(matches)
        if cells.size > K.WRITE_CHUNK_CELLS:
            # the spread's float64 moments are cells x genes too: a block of cells at a time bounds them
            blocks = [effects_of_cells(expression, matches, design, cells[start:start + K.WRITE_CHUNK_CELLS], genes, level)
                      for start in range(0, cells.size, K.WRITE_CHUNK_CELLS)]
            return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}
    # columns are taken from each block of rows: slicing the whole matrix first would copy all of it
    genes = None if genes is None else np.asarray(genes, dtype=np.int64)
    observed = expression[cells]
    unit = None if level is None else smallest_positive(observed)  # of the whole row, before the genes are kept
    observed = dense_block(observed, genes)
    denoised = np.zeros(observed.shape, dtype=np.float32)
    per_condition = {}
    for c in design.conditions:
        own = design.condition[cells] == c
        # every cell's value "as if in condition c": itself for its own batch when it is in c
        per_condition[c] = _mean_over_batches(expression, matches, design, c, cells, own=own, genes=genes, unit=unit)
        denoised[own] = (per_condition[c] if level is None else per_condition[c][0])[own]
    out = {"denoised": denoised, "batch_effect": (observed - denoised).astype(np.float32)}
    control = per_condition[design.control_name]
    for c in design.treatments:
        if level is None:
            out[f"ite_{c}"] = (per_condition[c] - control).astype(np.float32)
            continue
        (treated_mean, treated_variance, treated_dof), (control_mean, control_variance, control_dof) = per_condition[c], control
        effect = treated_mean - control_mean
        out[f"ite_{c}"] = effect.astype(np.float32)
        low, high = interval_bounds(effect, treated_variance + control_variance, min(treated_dof, control_dof), level)
        low_name, high_name = bound_names(level)
        out[f"ite_{c}_{low_name}"], out[f"ite_{c}_{high_name}"] = low, high
    return out


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
                     nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH, device: str = "auto") -> dict[str, np.ndarray]:
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

    Returns
    -------
    dict
        ``"denoised"``, ``"batch_effect"`` and ``"ite_<condition>"`` for every non-control
        condition: cells x genes float32 arrays in the input's cell order. The ITE of a treated
        cell is its denoised expression minus its matched controls (mean over control batches);
        a control cell's is its matched treated cells minus its denoised expression.
    """
    if np.asarray(embedding).shape[0] != len(design.condition):
        raise ValueError(f"embedding has {np.asarray(embedding).shape[0]} cells, the design {len(design.condition)}.")
    matches = match_groups(embedding, design.groups, k=nearest_neighbor, bandwidth=bandwidth, device=device)
    return effects_of_cells(expression, matches, design)


class MatchedEffects:
    """One representation's matching space and the effects estimated in it, cached.

    Owns the embedding, its PCA (the matching space, :func:`matching_space`) and the results
    of :func:`estimate_effects` keyed by ``(nearest_neighbor, bandwidth)``. A new embedding
    (:meth:`set_embedding`) or :meth:`invalidate` drops every cached result, so effects never
    outlive the representation they were matched in.

    Parameters
    ----------
    expression
        Log-normalised expression (cells x genes) whose matched values make the effects.
    design
        Conditions, control and batches of the same cells.
    n_components, seed
        PCA of the matching space.
    max_cached
        How many ``(nearest_neighbor, bandwidth, interval)`` results are kept (each holds several
        cells x genes arrays); the oldest is dropped first.
    """

    def __init__(self, expression, design: CounterfactualDesign, n_components: int = K.MATCHING_PCA_COMPONENTS,
                 seed: int = 0, max_cached: int = 1):
        self.expression, self.design = expression, design
        self.n_components, self.seed, self.max_cached = n_components, seed, max_cached
        self.embedding: np.ndarray | None = None
        self.space: np.ndarray | None = None
        self._cache: dict[tuple[int, float, float | None], dict[str, np.ndarray]] = {}
        self._matches: dict[tuple[int, float], dict] = {}  # cells x k indices per group: small next to the effects

    @property
    def has_embedding(self) -> bool:
        """Whether a representation has been set."""
        return self.embedding is not None

    def set_embedding(self, embedding: np.ndarray, space: np.ndarray | None = None) -> None:
        """Match in ``embedding`` from now on (its PCA unless ``space`` is given).

        Cached effects are dropped unless the embedding is exactly the one already set.
        """
        embedding = np.asarray(embedding, dtype=np.float32)
        if embedding.ndim != 2 or embedding.shape[0] != len(self.design.condition):
            raise ValueError(f"embedding has shape {embedding.shape}; expected ({len(self.design.condition)}, dims).")
        if self.embedding is not None and np.array_equal(embedding, self.embedding):
            return
        self.invalidate()
        self.embedding = embedding
        self.space = (matching_space(embedding, self.n_components, self.seed) if space is None
                      else np.asarray(space, dtype=np.float32))

    def invalidate(self) -> None:
        """Forget the embedding, the matching space and every cached result."""
        self.embedding = self.space = None
        self._cache.clear()
        self._matches.clear()

    def matches(self, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH) -> dict:
        """Every cell's matches into every batch x condition group, found once per ``(nearest_neighbor, bandwidth)``."""
        if self.space is None:
            raise ValueError("No representation to match in yet: set an embedding first (NDreamer: train() it).")
        key = self._key(nearest_neighbor, bandwidth)
        if key not in self._matches:
            # device="auto": the matching module decides whether FAISS can use a GPU
            self._matches[key] = match_groups(self.space, self.design.groups, k=key[0], bandwidth=key[1], device="auto")
            while len(self._matches) > self.max_cached:
                self._matches.pop(next(iter(self._matches)))
        return self._matches[key]

    def effects(self, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH,
                interval: float | None = None) -> dict[str, np.ndarray]:
        """:func:`effects_of_cells` of every cell and gene, computed once per ``(nearest_neighbor, bandwidth, interval)``.

        A result with an interval also answers the same matching without one.
        """
        key = self._key(nearest_neighbor, bandwidth)
        level = None if interval is None else interval_level(interval)
        cached = self._cached(key, level)
        if cached is not None:
            return cached
        self._cache[(*key, level)] = effects_of_cells(self.expression, self.matches(*key), self.design, interval=level)
        while len(self._cache) > self.max_cached:
            self._cache.pop(next(iter(self._cache)))
        return self._cache[(*key, level)]

    def effects_of(self, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH, cells=None,
                   genes=None, interval: float | None = None) -> dict[str, np.ndarray]:
        """The effects of some cells and genes only (positions; default all), not cached: a cells x genes array
        of the whole data is never built. Taken from the cached full result when there is one."""
        key = self._key(nearest_neighbor, bandwidth)
        level = None if interval is None else interval_level(interval)
        cached = self._cached(key, level)
        if cached is not None:
            rows = slice(None) if cells is None else np.asarray(cells, dtype=np.int64)
            columns = slice(None) if genes is None else np.asarray(genes, dtype=np.int64)
            return {name: values[rows][:, columns] for name, values in cached.items()}
        return effects_of_cells(self.expression, self.matches(*key), self.design, cells, genes, interval=level)

    @staticmethod
    def _key(nearest_neighbor, bandwidth) -> tuple[int, float]:
        return V.positive_int("nearest_neighbor", nearest_neighbor), V.positive_float("bandwidth", bandwidth)

    def _cached(self, key: tuple[int, float], level: float | None) -> dict | None:
        """The cached result of this matching at ``level``; without a level, one at any level will do."""
        if (*key, level) in self._cache:
            return self._cache[(*key, level)]
        if level is None:
            return next((v for (k, b, _), v in self._cache.items() if (k, b) == key), None)
        return None

    def save(self, path: str) -> None:
        """Write the embedding, the matching space and the cached results to one ``.npz`` file."""
        arrays = {} if self.embedding is None else {"embedding": self.embedding, "space": self.space}
        for (k, bandwidth, level), effects in self._cache.items():
            arrays.update({f"effects|{k}|{bandwidth!r}|{level!r}|{name}": values for name, values in effects.items()})
        with open(path, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    def load(self, path: str) -> None:
        """Restore what :meth:`save` wrote (for the same cells)."""
        self.invalidate()
        with np.load(path, allow_pickle=False) as stored:
            if "embedding" in stored:
                self.set_embedding(stored["embedding"], stored["space"])
            for name in stored.files:
                if name.startswith("effects|"):
                    _, k, bandwidth, rest = name.split("|", 3)
                    level, layer = _stored_level(rest)
                    self._cache.setdefault((int(k), float(bandwidth), level), {})[layer] = stored[name]


def _stored_level(rest: str) -> tuple[float | None, str]:
    """``(level, layer)`` of a saved effect's name after ``effects|k|bandwidth|``: ``level|layer`` since intervals
    exist, the layer alone before (a layer name may hold ``|``, a condition's name)."""
    head, _, tail = rest.partition("|")
    if not tail:
        return None, rest
    if head == "None":
        return None, tail
    try:
        return float(head), tail
    except ValueError:
        return None, rest
