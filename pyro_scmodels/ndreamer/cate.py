"""Conditional average treatment effects (CATE) per cell group, with a sign test and a z test (SPEC 3.5)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats


class CateSums:
    """Per-gene sums of one group's ITEs, added a block of cells at a time (the table needs no more).

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

    def add(self, values: np.ndarray) -> None:
        """Add the ITEs of a block of cells (cells x genes)."""
        values = np.asarray(values, dtype=np.float64)
        self.n += values.shape[0]
        self.total += values.sum(0)
        self.squares += np.square(values).sum(0)
        self.positive += (values > 0).sum(0)
        self.negative += (values < 0).sum(0)

    def table(self, group: str, genes) -> pd.DataFrame:
        """The CATE rows of this group (see :func:`estimate_cate`)."""
        n = self.n
        mean = self.total / max(n, 1)
        # two-sided sign test: ties dropped, binomial(n_nonzero, 1/2)
        nonzero = self.positive + self.negative
        smaller = np.minimum(self.positive, self.negative)
        sign_p = np.where(nonzero > 0, np.minimum(1.0, 2 * stats.binom.cdf(smaller, np.maximum(nonzero, 1), 0.5)), 1.0)
        # the sample variance from the sums (float64; clipped at 0 against rounding)
        sd = np.sqrt(np.maximum(self.squares - n * mean**2, 0.0) / (n - 1)) if n > 1 else np.zeros_like(mean)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(sd > 0, mean / (sd / np.sqrt(n)), 0.0)
        z_p = 2 * stats.norm.sf(np.abs(z))
        table = pd.DataFrame({
            "group": group, "gene": list(genes), "n_cells": n, "mean_ite": mean,
            "fraction_positive": self.positive / max(n, 1), "sign_test_p": sign_p, "z": z, "z_p": z_p,
        })
        table["sign_test_p_adj"] = stats.false_discovery_control(table["sign_test_p"].to_numpy())
        table["z_p_adj"] = stats.false_discovery_control(table["z_p"].to_numpy())
        return table


def estimate_cate(ite: np.ndarray, groups, genes) -> pd.DataFrame:
    """Conditional average treatment effects per cell group and gene.

    Per group and gene: the mean ITE, a sign test (binomial test of positive vs negative ITEs), a
    parametric z test of the mean, and Benjamini-Hochberg adjusted p-values within each group.

    Returns
    -------
    pandas.DataFrame
        Columns ``group``, ``gene``, ``n_cells``, ``mean_ite``, ``fraction_positive``,
        ``sign_test_p``, ``z``, ``z_p``, ``sign_test_p_adj``, ``z_p_adj``.
    """
    groups = np.asarray(groups).astype(str)
    genes = list(genes)
    rows = []
    for group in dict.fromkeys(groups):
        sums = CateSums(len(genes))
        sums.add(ite[groups == group])
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
                      f"condition: {', '.join(skipped[:10])}.", stacklevel=3)
    return list(counts.index[enough])
