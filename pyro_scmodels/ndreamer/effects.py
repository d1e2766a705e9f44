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


def _dense(values, genes: np.ndarray | None = None) -> np.ndarray:
    """A block of rows as a dense array, of the columns ``genes`` only when given."""
    if genes is not None:
        values = values[:, genes]
    return np.asarray(values.todense()) if hasattr(values, "todense") else np.asarray(values)


def _mean_over_batches(expression, matches: dict, design: CounterfactualDesign, condition: str, cells: np.ndarray,
                       own: np.ndarray | None = None, genes: np.ndarray | None = None) -> np.ndarray:
    """For each of ``cells``: mean over the batches holding ``condition`` of its matched expression there.

    With ``own`` (a boolean per cell of ``cells``), cells of that condition use themselves for their own batch.
    """
    batches = design.batches_with[condition]
    total = None
    for b in batches:
        match = matches[design.group(b, condition)]
        values = _dense(weighted_average(expression, match.indices[cells], match.weights[cells]), genes)
        if own is not None:
            itself = own & (design.batch[cells] == b)
            values[itself] = _dense(expression[cells[itself]], genes)
        total = values if total is None else total + values
    return total / len(batches)


def effects_of_cells(expression, matches: dict, design: CounterfactualDesign, cells=None, genes=None) -> dict:
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

    Returns
    -------
    dict
        As :func:`estimate_effects`, (len(cells), len(genes)) float32 arrays in the order asked for.
    """
    cells = np.arange(len(design.condition)) if cells is None else np.asarray(cells, dtype=np.int64)
    # columns are taken from each block of rows: slicing the whole matrix first would copy all of it
    genes = None if genes is None else np.asarray(genes, dtype=np.int64)
    n_genes = expression.shape[1] if genes is None else genes.size
    denoised = np.zeros((cells.size, n_genes), dtype=np.float32)
    per_condition = {}
    for c in design.conditions:
        own = design.condition[cells] == c
        # every cell's value "as if in condition c": itself for its own batch when it is in c
        per_condition[c] = _mean_over_batches(expression, matches, design, c, cells, own=own, genes=genes)
        denoised[own] = per_condition[c][own]
    out = {"denoised": denoised, "batch_effect": (_dense(expression[cells], genes) - denoised).astype(np.float32)}
    for c in design.treatments:
        out[f"ite_{c}"] = (per_condition[c] - per_condition[design.control_name]).astype(np.float32)
    return out


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
        How many ``(nearest_neighbor, bandwidth)`` results are kept (each holds several
        cells x genes arrays); the oldest is dropped first.
    """

    def __init__(self, expression, design: CounterfactualDesign, n_components: int = K.MATCHING_PCA_COMPONENTS,
                 seed: int = 0, max_cached: int = 1):
        self.expression, self.design = expression, design
        self.n_components, self.seed, self.max_cached = n_components, seed, max_cached
        self.embedding: np.ndarray | None = None
        self.space: np.ndarray | None = None
        self._cache: dict[tuple[int, float], dict[str, np.ndarray]] = {}
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
        key = (V.positive_int("nearest_neighbor", nearest_neighbor), V.positive_float("bandwidth", bandwidth))
        if key not in self._matches:
            # device="auto": the matching module decides whether FAISS can use a GPU
            self._matches[key] = match_groups(self.space, self.design.groups, k=key[0], bandwidth=key[1], device="auto")
            while len(self._matches) > self.max_cached:
                self._matches.pop(next(iter(self._matches)))
        return self._matches[key]

    def effects(self, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH) -> dict[str, np.ndarray]:
        """:func:`estimate_effects` of every cell and gene, computed once per ``(nearest_neighbor, bandwidth)``."""
        key = (V.positive_int("nearest_neighbor", nearest_neighbor), V.positive_float("bandwidth", bandwidth))
        if key not in self._cache:
            self._cache[key] = effects_of_cells(self.expression, self.matches(*key), self.design)
            while len(self._cache) > self.max_cached:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    def effects_of(self, nearest_neighbor: int = K.NEAREST_NEIGHBOR, bandwidth: float = K.BANDWIDTH, cells=None,
                   genes=None) -> dict[str, np.ndarray]:
        """The effects of some cells and genes only (positions; default all), not cached: a cells x genes array
        of the whole data is never built. Taken from the cached full result when there is one."""
        key = (V.positive_int("nearest_neighbor", nearest_neighbor), V.positive_float("bandwidth", bandwidth))
        if key in self._cache:
            rows = slice(None) if cells is None else np.asarray(cells, dtype=np.int64)
            columns = slice(None) if genes is None else np.asarray(genes, dtype=np.int64)
            return {name: values[rows][:, columns] for name, values in self._cache[key].items()}
        return effects_of_cells(self.expression, self.matches(*key), self.design, cells, genes)

    def save(self, path: str) -> None:
        """Write the embedding, the matching space and the cached results to one ``.npz`` file."""
        arrays = {} if self.embedding is None else {"embedding": self.embedding, "space": self.space}
        for (k, bandwidth), effects in self._cache.items():
            arrays.update({f"effects|{k}|{bandwidth!r}|{name}": values for name, values in effects.items()})
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
                    _, k, bandwidth, layer = name.split("|", 3)
                    self._cache.setdefault((int(k), float(bandwidth)), {})[layer] = stored[name]
