"""A representation's matching space and the effects estimated in it, cached (:class:`MatchedEffects`)."""

from __future__ import annotations

import warnings

import numpy as np

from .. import _validation as V
from .._stacklevel import user_stacklevel
from ..matching import match_groups
from . import _constants as K
from .effect_intervals import bound_names, interval_level
from .counterfactual_design import CounterfactualDesign
from .effects import FACTUAL_CHOICES, checked_treatments, denoised_of_cells, effects_of_cells, matching_space
from .ite_shrinkage import ClusterShrinkage, interval_dof, matching_space_clusters, shrinkage_offsets, widened_bounds


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
    factual
        How the ITE takes a cell's own batch and condition (:func:`effects_of_cells`).
    """

    def __init__(self, expression, design: CounterfactualDesign, n_components: int = K.MATCHING_PCA_COMPONENTS,
                 seed: int = 0, max_cached: int = 1, factual: str = "observed"):
        self.expression, self.design = expression, design
        self._factual = V.choice("factual", factual, FACTUAL_CHOICES)
        self.n_components, self.seed, self.max_cached = n_components, seed, max_cached
        self.embedding: np.ndarray | None = None
        self.space: np.ndarray | None = None
        self._cache: dict[tuple[int, float, float | None], dict[str, np.ndarray]] = {}
        self._matches: dict[tuple[int, float], dict] = {}  # cells x k indices per group: small next to the effects
        self._clusters: np.ndarray | None = None  # of the matching space, for the ITE's shrinkage
        self._offsets: dict[tuple[int, float, str], ClusterShrinkage] = {}  # clusters x genes per matching and treatment

    @property
    def factual(self) -> str:
        """How the ITE takes a cell's own batch and condition (:meth:`set_factual` changes it; the cache holds this one's
        results, and :meth:`effects_of` computes another's, uncached)."""
        return self._factual

    def set_factual(self, factual: str) -> None:
        """Take a cell's own batch and condition as ``factual`` says from now on (``"observed"`` or ``"matched"``).

        The cached results and the ITE's shrinkage offsets were made with the other and are dropped; the matches
        and the clusters do not depend on it and are kept.
        """
        factual = V.choice("factual", factual, FACTUAL_CHOICES)
        if factual != self._factual:
            self._factual = factual
            self._cache.clear()
            self._offsets.clear()

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
        self._clusters = None
        self._offsets.clear()

    @property
    def cached(self) -> dict[tuple[int, float, float | None], list[str]]:
        """The cached whole results: ``(nearest_neighbor, bandwidth, interval level or None)`` -> their layer names,
        oldest first."""
        return {key: list(layers) for key, layers in self._cache.items()}

    def forget_effects(self) -> None:
        """Drop the cached cells x genes results (their memory), keeping the matches: the next query computes its
        effects again from them."""
        self._cache.clear()

    def matches(self, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH) -> dict:
        """Every cell's matches into every batch x condition group, found once per ``(nearest_neighbor, bandwidth)``."""
        if self.space is None:
            raise ValueError("No representation to match in yet: set an embedding first (NDreamer: train() it).")
        key = self._key(nearest_neighbor, bandwidth)
        if key not in self._matches:
            _, sizes = np.unique(self.design.groups, return_counts=True)
            if key[0] > sizes.max():
                # every group is matched with all of its cells: a larger k changes nothing, and saying so beats
                # a silent clip (results recorded under a k that was never used)
                warnings.warn(f"nearest_neighbor={key[0]} is more than the cells of the largest batch x condition "
                              f"group ({sizes.max()}): each cell is matched with every cell of each group, the same "
                              f"as nearest_neighbor={sizes.max()}.", UserWarning, stacklevel=user_stacklevel())
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
        self._cache[(*key, level)] = effects_of_cells(self.expression, self.matches(*key), self.design, interval=level,
                                                      factual=self._factual)
        while len(self._cache) > self.max_cached:
            self._cache.pop(next(iter(self._cache)))
        return self._cache[(*key, level)]

    def effects_of(self, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH, cells=None,
                   genes=None, interval: float | None = None, ite_of=None,
                   factual: str | None = None) -> dict[str, np.ndarray]:
        """The effects of some cells and genes only, not cached: a cells x genes array of the whole data is never
        built. Taken from the cached full result when there is one (of the same ``factual``).

        Parameters
        ----------
        nearest_neighbor, bandwidth
            The matching (k and the kernel's bandwidth).
        cells, genes
            Positions (default all).
        interval
            A level such as 0.9: the bounds' layers too.
        ite_of
            Treatments: only their ``ite_<c>`` layers (and, with ``interval``, their bounds), the same numbers as
            the full computation (:func:`effects_of_cells`); None: every layer.
        factual
            ``"observed"`` or ``"matched"``: a cell's own term in its own condition (:func:`effects_of_cells`);
            None: this object's :attr:`factual`.

        Returns
        -------
        dict
            Layer name -> (cells, genes) array.
        """
        key = self._key(nearest_neighbor, bandwidth)
        level = None if interval is None else interval_level(interval)
        factual = self._factual if factual is None else V.choice("factual", factual, FACTUAL_CHOICES)
        cached = self._cached(key, level) if factual == self._factual else None
        if cached is not None:
            names = list(cached) if ite_of is None else ite_layer_names(self.design, ite_of, level)
            return _sliced(cached, names, cells, genes)
        return effects_of_cells(self.expression, self.matches(*key), self.design, cells, genes, interval=level,
                                factual=factual, ite_of=ite_of)

    def denoised_of(self, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH, cells=None,
                    genes=None) -> dict[str, np.ndarray]:
        """``denoised`` and ``batch_effect`` of some cells and genes only, not cached: taken from the cached full
        result when there is one, else :func:`~.effects.denoised_of_cells` (each cell's own condition alone, none of
        the ITEs' arms).

        Parameters
        ----------
        nearest_neighbor, bandwidth, cells, genes
            As :meth:`effects_of`.

        Returns
        -------
        dict
            ``"denoised"`` and ``"batch_effect"``, (cells, genes) arrays.
        """
        key = self._key(nearest_neighbor, bandwidth)
        cached = self._cached(key, None)
        if cached is not None:
            return _sliced(cached, ["denoised", "batch_effect"], cells, genes)
        return denoised_of_cells(self.expression, self.matches(*key), self.design, cells, genes)

    def clusters(self) -> np.ndarray:
        """The cluster of every cell in the matching space (the ITE's shrinkage), found once per representation."""
        if self.space is None:
            raise ValueError("No representation yet: train NDreamer (or build it from a model) before asking for "
                             "its clusters.")
        if self._clusters is None:
            self._clusters = matching_space_clusters(self.space, self.seed)
        return self._clusters

    def shrinkage(self, nearest_neighbor: int, bandwidth: float, treatment: str) -> tuple[np.ndarray, ClusterShrinkage]:
        """The clusters of the matching space and what shrinkage adds to each one's ITE of ``treatment``.

        Both found once (per matching, for the offsets) and kept until the representation changes.

        Returns
        -------
        (numpy.ndarray, ClusterShrinkage)
            The cluster of every cell, and the clusters x genes offsets, posterior sds and standard errors
            (:func:`~.ite_shrinkage.shrinkage_offsets`).
        """
        key = self._key(nearest_neighbor, bandwidth)
        matches = self.matches(*key)  # before the clusters: it refuses a missing representation
        self.clusters()
        if (*key, treatment) not in self._offsets:
            self._offsets = {k: v for k, v in self._offsets.items() if k[:2] == key}  # one matching's offsets kept
            self._offsets[(*key, treatment)] = shrinkage_offsets(self.expression, matches, self.design, self._clusters,
                                                                 treatment, self._factual)
        return self._clusters, self._offsets[(*key, treatment)]

    def shrunk(self, effects: dict, nearest_neighbor: int, bandwidth: float, cells=None, columns=None,
               level: float | None = None) -> dict:
        """``effects`` of some cells and genes with every ITE shrunk by its cluster (``estimate_ite(shrink="clusters")``).

        Parameters
        ----------
        effects
            Layers of the cells and genes asked for (as :meth:`effects_of` gives them, of this object's
            :attr:`factual`: the offsets are that factual's); new arrays replace the ITEs.
        nearest_neighbor, bandwidth
            The matching the effects come from.
        cells, columns
            Positions of those cells and genes (None: all).
        level
            The level of the bounds in ``effects`` (None: no bounds): they are rebuilt by
            :func:`~.ite_shrinkage.widened_bounds` around the shrunk ITE.

        Returns
        -------
        dict
            ``effects`` with ``ite_<condition>`` moved by its cluster's offset, and its bounds widened.
        """
        out = dict(effects)
        for c in [c for c in self.design.treatments if f"ite_{c}" in effects]:
            labels, fit = self.shrinkage(nearest_neighbor, bandwidth, c)
            rows = labels if cells is None else labels[np.asarray(cells)]
            columns_kept = np.arange(fit.offset.shape[1]) if columns is None else np.asarray(columns)
            offset, sd = (a[np.ix_(rows, columns_kept)] for a in (fit.offset, fit.posterior_sd))
            out[f"ite_{c}"] = effects[f"ite_{c}"] + offset
            bounds = [f"ite_{c}_{b}" for b in bound_names(level)] if level is not None else []
            if bounds and bounds[0] in effects:
                dof = interval_dof(self.matches(nearest_neighbor, bandwidth), self.design, c)
                out[bounds[0]], out[bounds[1]] = widened_bounds(out[f"ite_{c}"], effects[bounds[0]],
                                                                effects[bounds[1]], sd, dof, level, fit.shrunk[rows])
        return out

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


def _sliced(cached: dict, names: list[str], cells, genes) -> dict[str, np.ndarray]:
    """The layers ``names`` of a cached full result, of the cells and genes at those positions (None: all)."""
    rows = slice(None) if cells is None else np.asarray(cells, dtype=np.int64)
    columns = slice(None) if genes is None else np.asarray(genes, dtype=np.int64)
    return {name: cached[name][rows][:, columns] for name in names}


def ite_layer_names(design: CounterfactualDesign, ite_of, level: float | None) -> list[str]:
    """The layers :func:`effects_of_cells` gives with ``ite_of`` at ``level``.

    Parameters
    ----------
    design
        The counterfactual design.
    ite_of
        The treatments (see :func:`~.effects.checked_treatments`).
    level
        The interval's level, or None.

    Returns
    -------
    list of str
        ``ite_<c>`` for each treatment and, with a level, its bounds' layers.
    """
    suffixes = [""] if level is None else ["", *(f"_{name}" for name in bound_names(level))]
    return [f"ite_{c}{suffix}" for c in checked_treatments(design, ite_of) for suffix in suffixes]


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
