"""Conditional average treatment effects (CATE) per cell group, with a sign test and a z test (SPEC 3.5).

The group's mean ITE is a difference of kernel-weighted means in which every matched cell serves many cells, so the
per-cell ITEs are not independent: their spread over sqrt(n) understated the mean's standard error 3.5-3.9-fold on a
placebo split of real control cells, and both tests rejected 50-83 % of true nulls. The mean's standard error is
taken instead as that of a difference of the group's two arms' means of the observed log expression,
sqrt(var_t / n_t + var_c / n_c). The sign test's trials are shrunk by the same design effect (the ratio of that
variance to the per-cell one, at least 1), and its share of positive ITEs is averaged over the two arms, whose own
values enter their ITEs with opposite signs (a cell's observed value against matched means).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from .._stacklevel import user_stacklevel
from .matched_row_sums import dense_block

#: arm codes of :meth:`CateSums.add`: the treatment's cells, the control's, and any other condition's
TREATED, CONTROL, OTHER = 1, 0, -1
#: rows summed at a time in float64
ADD_ROWS = 2048


class CateSums:
    """Per-gene sums of one group's ITEs and of its two arms' observed expression, added a block of cells at a time
    (the table needs no more).

    Parameters
    ----------
    n_genes
        Genes (columns) of the ITE blocks.
    """

    def __init__(self, n_genes: int):
        self.n = 0
        self.total = np.zeros(n_genes)
        self.squares = np.zeros(n_genes)
        self.positive = np.zeros(n_genes, dtype=np.int64)
        self.negative = np.zeros(n_genes, dtype=np.int64)
        # per arm (TREATED, CONTROL): cells, observed sums and squares, positive and negative ITEs
        self.arms = {arm: {"n": 0, "total": np.zeros(n_genes), "squares": np.zeros(n_genes),
                           "positive": np.zeros(n_genes), "negative": np.zeros(n_genes)} for arm in (TREATED, CONTROL)}

    def add(self, values: np.ndarray, observed, arm: np.ndarray) -> None:
        """Add a block of cells: their ITEs (cells x genes), their observed log expression (the same shape; dense,
        or sparse rows, densified here a few thousand at a time) and their arms (TREATED, CONTROL or OTHER)."""
        values, arm = np.asarray(values), np.asarray(arm)
        observed = observed if sp.issparse(observed) else np.asarray(observed)
        if observed.shape != values.shape or arm.shape != (values.shape[0],):
            raise ValueError(f"CATE sums: ITE {values.shape}, observed {observed.shape} and arms {arm.shape} differ.")
        # float64 a few thousand rows at a time: two whole float64 copies of a 10,000-cell block would add 300 MB
        for start in range(0, values.shape[0], ADD_ROWS):
            rows = slice(start, start + ADD_ROWS)
            self._add(values[rows].astype(np.float64), dense_block(observed[rows]).astype(np.float64), arm[rows])

    def _add(self, values: np.ndarray, observed: np.ndarray, arm: np.ndarray) -> None:
        self.n += values.shape[0]
        self.total += values.sum(0)
        self.squares += np.square(values).sum(0)
        self.positive += (values > 0).sum(0)
        self.negative += (values < 0).sum(0)
        for code, sums in self.arms.items():
            rows = arm == code
            sums["n"] += int(rows.sum())
            sums["total"] += observed[rows].sum(0)
            sums["squares"] += np.square(observed[rows]).sum(0)
            sums["positive"] += (values[rows] > 0).sum(0)
            sums["negative"] += (values[rows] < 0).sum(0)

    def _arm_variance_of_mean(self, code: int) -> np.ndarray:
        sums = self.arms[code]
        n = sums["n"]
        if n < 2:
            raise ValueError(f"A CATE group needs at least two cells of each arm; this one has {n} of one.")
        mean = sums["total"] / n
        return np.maximum(sums["squares"] - n * mean**2, 0.0) / (n - 1) / n

    def table(self, group: str, genes) -> pd.DataFrame:
        """The CATE rows of this group (see :func:`estimate_cate`)."""
        n = self.n
        mean = self.total / max(n, 1)
        # the mean's variance as a difference of the two arms' means (module docstring)
        variance = self._arm_variance_of_mean(TREATED) + self._arm_variance_of_mean(CONTROL)
        per_cell = np.maximum(self.squares - n * mean**2, 0.0) / (n - 1) / n if n > 1 else np.zeros_like(mean)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(variance > 0, mean / np.sqrt(variance), 0.0)
            design_effect = np.where(per_cell > 0, np.maximum(variance / per_cell, 1.0), 1.0)
            # sign test: each arm's share of positive ITEs among its non-zero ones, averaged over the arms, against
            # 1/2, on the non-zero ITEs divided by the design effect (normal approximation of the binomial)
            shares, nonzero = [], np.zeros_like(mean)
            for sums in self.arms.values():
                counted = sums["positive"] + sums["negative"]
                shares.append(np.where(counted > 0, sums["positive"] / np.maximum(counted, 1), 0.5))
                nonzero += counted
            trials = nonzero / design_effect
            sign_z = np.where(trials > 0, (np.mean(shares, axis=0) - 0.5) / np.sqrt(0.25 / np.maximum(trials, 1e-12)),
                              0.0)
        sign_p = np.minimum(1.0, 2 * stats.norm.sf(np.abs(sign_z)))
        z_p = 2 * stats.norm.sf(np.abs(z))
        table = pd.DataFrame({
            "group": group, "gene": list(genes), "n_cells": n, "mean_ite": mean,
            "fraction_positive": self.positive / max(n, 1), "sign_test_p": sign_p, "z": z, "z_p": z_p,
        })
        table["sign_test_p_adj"] = stats.false_discovery_control(table["sign_test_p"].to_numpy())
        table["z_p_adj"] = stats.false_discovery_control(table["z_p"].to_numpy())
        return table


def estimate_cate(ite: np.ndarray, groups, genes, observed: np.ndarray, arms) -> pd.DataFrame:
    """Conditional average treatment effects per cell group and gene.

    Per group and gene: the mean ITE; a z test of it, its standard error that of the difference of the group's
    treated and control cells' mean observed log expression; a sign test of the ITEs' signs, balanced over the two
    arms and with its trials shrunk by the same design effect (module docstring); Benjamini-Hochberg adjusted
    p-values within each group.

    Parameters
    ----------
    ite
        Each cell's ITE (cells x genes).
    groups
        Each cell's group.
    genes
        The genes (columns).
    observed
        Each cell's observed log-normalised expression (cells x genes, the same genes).
    arms
        Each cell's arm: :data:`TREATED` (1), :data:`CONTROL` (0) or :data:`OTHER` (-1, another treatment's cells,
        left out of the standard error).

    Returns
    -------
    pandas.DataFrame
        Columns ``group``, ``gene``, ``n_cells``, ``mean_ite``, ``fraction_positive``,
        ``sign_test_p``, ``z``, ``z_p``, ``sign_test_p_adj``, ``z_p_adj``.
    """
    groups = np.asarray(groups).astype(str)
    arms = np.asarray(arms)
    genes = list(genes)
    rows = []
    for group in dict.fromkeys(groups):
        sums = CateSums(len(genes))
        cells = groups == group
        sums.add(ite[cells], observed[cells], arms[cells])
        rows.append(sums.table(group, genes))
    return pd.concat(rows, ignore_index=True)


def groups_with_both_conditions(groups, condition_labels, condition: str, control_name: str, min_cells: int) -> list:
    """The groups holding at least ``min_cells`` cells of ``condition`` and of the control (warns about the rest).

    Parameters
    ----------
    groups, condition_labels
        Group and condition label per cell.
    condition, control_name
        The treatment and the control compared.
    min_cells
        Fewest cells of each a group must hold.

    Returns
    -------
    list
        The groups kept, in the order of ``pandas.crosstab``.
    """
    counts = pd.crosstab(np.asarray(groups), np.asarray(condition_labels))
    treated = counts.get(condition, pd.Series(0, index=counts.index))
    control = counts.get(control_name, pd.Series(0, index=counts.index))
    enough = (treated >= min_cells) & (control >= min_cells)
    skipped = [f"{g!r} ({treated[g]} {condition}, {control[g]} {control_name})" for g in counts.index[~enough]]
    if not enough.any():
        raise ValueError(f"No group has at least min_cells={min_cells} cells of both {condition!r} and the control "
                         f"{control_name!r}: {', '.join(skipped[:10])}.")
    if skipped:
        warnings.warn(f"CATE skipped {len(skipped)} group(s) with fewer than min_cells={min_cells} cells of either "
                      f"condition: {', '.join(skipped[:10])}.", stacklevel=user_stacklevel())
    return list(counts.index[enough])
