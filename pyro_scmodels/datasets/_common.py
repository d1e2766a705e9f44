"""Helpers shared by the simulators: argument checks and sampling primitives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from .. import _validation as V


# --- argument checks: through the package's one validation module; each error names the argument

def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``, or ValueError naming ``name``."""
    return V.integer(name, value, minimum=minimum)


def check_float(name: str, value, minimum: float, *, strict: bool = False,
                maximum: float = math.inf) -> float:
    """``value`` as a float in [``minimum``, ``maximum``] (above ``minimum`` if ``strict``), or ValueError naming
    ``name``."""
    return V.number(name, value, minimum, None if math.isinf(maximum) else maximum, strict_minimum=strict)


def _check_theta_range(theta_range) -> tuple[float, float]:
    try:
        low, high = (float(t) for t in theta_range)
        valid = 0.0 < low <= high < math.inf
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"theta_range must be (low, high) with 0 < low <= high, got {theta_range!r}")
    return low, high


def _resolve_responding_types(responding_cell_types, n_cell_types: int) -> list[int]:
    """Turn ``responding_cell_types`` (None, indices or names) into sorted type indices."""
    if responding_cell_types is None:
        return list(range(math.ceil(n_cell_types / 2)))
    if isinstance(responding_cell_types, (str, Integral)):
        responding_cell_types = [responding_cell_types]
    indices = set()
    for item in responding_cell_types:
        if isinstance(item, str) and item.startswith("type_") and item[5:].isdigit():
            index = int(item[5:])
        elif isinstance(item, Integral) and not isinstance(item, bool):
            index = int(item)
        else:
            index = -1
        if not 0 <= index < n_cell_types:
            raise ValueError(
                "responding_cell_types must contain type indices in "
                f"[0, {n_cell_types}) or names 'type_<i>', got {item!r}"
            )
        indices.add(index)
    return sorted(indices)


@dataclass(frozen=True)
class SimulationSettings:
    """The checked arguments of ``simulate`` (``responders``: sorted responding type indices)."""

    n_cells: int
    n_genes: int
    n_cell_types: int
    n_batches: int
    n_markers_per_type: int
    within_type_rank: int
    type_sd: float
    stimulated_fraction: float
    n_responding_genes: int
    responders: list[int]
    ambient_fraction: float
    batch_scaling_sd: float
    mean_library: float
    library_sd: float
    theta_range: tuple[float, float]
    seed: int | None


def check_simulate_arguments(*, n_cells, n_genes, n_cell_types, n_batches, n_markers_per_type,
                             within_type_rank, type_sd, stimulated_fraction, n_responding_genes,
                             responding_cell_types, ambient_fraction, batch_scaling_sd,
                             mean_library, library_sd, theta_range, seed) -> SimulationSettings:
    """Check every argument of ``simulate`` and return them converted, as ``SimulationSettings``."""
    n_cells = check_int("n_cells", n_cells, 1)
    n_genes = check_int("n_genes", n_genes, 1)
    n_types = check_int("n_cell_types", n_cell_types, 1)
    n_batches = check_int("n_batches", n_batches, 1)
    n_markers = check_int("n_markers_per_type", n_markers_per_type, 0)
    rank = check_int("within_type_rank", within_type_rank, 0)
    type_sd = check_float("type_sd", type_sd, 0.0)
    n_responding = check_int("n_responding_genes", n_responding_genes, 0)
    if n_types * n_markers > n_genes:
        raise ValueError(f"n_cell_types * n_markers_per_type = {n_types * n_markers} exceeds n_genes = {n_genes} (every "
                         f"type has its own markers); pass n_markers_per_type <= {n_genes // n_types}, fewer "
                         f"n_cell_types or more n_genes.")
    if n_responding > n_genes:
        raise ValueError(f"n_responding_genes = {n_responding} exceeds n_genes = {n_genes}; pass "
                         f"n_responding_genes <= {n_genes}.")
    return SimulationSettings(
        n_cells=n_cells, n_genes=n_genes, n_cell_types=n_types, n_batches=n_batches,
        n_markers_per_type=n_markers, within_type_rank=rank, type_sd=type_sd,
        # the remaining checks run in this (signature) order: keyword arguments are
        # evaluated left to right
        stimulated_fraction=check_float("stimulated_fraction", stimulated_fraction, 0.0,
                                        maximum=1.0),
        n_responding_genes=n_responding,
        ambient_fraction=check_float("ambient_fraction", ambient_fraction, 0.0),
        batch_scaling_sd=check_float("batch_scaling_sd", batch_scaling_sd, 0.0),
        mean_library=check_float("mean_library", mean_library, 0.0, strict=True),
        library_sd=check_float("library_sd", library_sd, 0.0),
        theta_range=_check_theta_range(theta_range),
        seed=V.optional(V.seed, "seed", seed),
        responders=_resolve_responding_types(responding_cell_types, n_types),
    )


# --- sampling primitives ---------------------------------------------------------------------

def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (shifted by the row maximum, so that exp cannot overflow)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def gamma_poisson(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Sample negative binomial counts with mean ``mu`` and inverse dispersion ``theta``."""
    shape = np.broadcast_to(theta, mu.shape)
    return rng.poisson(rng.gamma(shape, mu / shape))
