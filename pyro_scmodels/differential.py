"""Bayesian differential expression from posterior samples of normalised expression.

The "change" test of scvi-tools, on a model's expression rho plus the part of its ambient background that every
cell carries (which, for the default background, the likelihood cannot tell from rho; ``background="none"``: rho
alone): draw pairs of
(cell, posterior sample) from the two groups, form log2 fold changes, and per gene report the
posterior probability that |LFC| exceeds ``delta``; genes are selected by posterior expected
false discovery rate. The "vanilla" test reports, on the same pairs, the probability that the
first group's expression is the higher. Comparisons, column names and the one-vs-rest default follow scvi-tools'
``differential_expression``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from . import _validation as V
from ._stacklevel import user_stacklevel
from .data import counts_matrix
from .differential_cells import filter_outlier_cells as _drop_outliers
from .differential_cells import measured_cells_only
from .differential_correction import correction_strata
from .differential_statistics import change_test, vanilla_test
from .differential_weights import check_weights, collapse_warning, per_cell_effective_sample_size, row_weights

PSEUDOCOUNT = 0.01  # added to rho (counts at a typical library) before the log: a silent gene is not a huge fold change
MODES = ("change", "vanilla")  # scvi-tools' two modes; "change" is the default here
BACKGROUNDS = ("shared", "none")  # what of the ambient background the tested expression holds; see differential_expression
NORMALISED_TOTAL = 1e4  # raw_normalized_mean*: counts per 10,000, as scvi-tools reports them


def _cells(name: str, selection, obs: pd.DataFrame) -> np.ndarray:
    """Positions of the cells chosen by a boolean mask, integer positions or an ``obs.query`` string."""
    if isinstance(selection, str):
        # evaluated to a mask, read by position: matching the selected names took every cell sharing a name
        mask = obs.eval(selection)
        if isinstance(mask, pd.Series) and pd.api.types.is_bool_dtype(mask.dtype):
            mask = mask.fillna(False).to_numpy(dtype=bool)  # a nullable column's <NA> is not selected, as obs.query
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (len(obs),):
            raise ValueError(f"{name}={selection!r} is not a condition on the cells (an obs.query string such as "
                             "\"cell_type == 'B'\").")
        return np.flatnonzero(mask)
    if np.ndim(selection) == 0:  # ravel made a one-cell group of it; the getters refuse a number as indices
        raise V.ArgumentTypeError(f"{name}={selection!r} is one value, not a set of cells: pass a boolean mask, a list of "
                                  f"positions ({name}=[{selection!r}] for a one-cell group) or an obs.query string.")
    selection = np.asarray(selection).ravel()
    if selection.dtype == bool:
        if selection.shape != (len(obs),):
            raise ValueError(f"{name} is a boolean mask of {selection.size} entries; it needs one per cell ({len(obs)}).")
        return np.flatnonzero(selection)
    if selection.size and not np.issubdtype(selection.dtype, np.integer):
        raise V.ArgumentTypeError(f"{name} must be a boolean mask, integer cell positions or a query string, got {selection.dtype}.")
    if selection.size and (selection.min() < 0 or selection.max() >= len(obs)):
        raise IndexError(f"{name} must lie in [0, {len(obs)}); got range [{selection.min()}, {selection.max()}].")
    if selection.size == len(obs) > 2 and np.isin(selection, (0, 1)).all():
        # a 0/1 column (mask.astype(int)) read as positions compares cells 0 and 1 with the rest
        raise ValueError(f"{name} holds one 0/1 integer per cell: a mask as integers, which would be read as the cell "
                         f"positions {{0, 1}}. Pass it as booleans ({name}=mask.astype(bool)), or positions as "
                         "np.flatnonzero(mask).")
    return np.unique(selection)


def comparisons(obs: pd.DataFrame, groupby=None, group1=None, group2=None, idx1=None, idx2=None):
    """The comparisons asked for, scvi-tools style, as ``(group1, group2, cells1, cells2)`` tuples.

    ``idx1`` (with optional ``idx2``) compares two cell sets, named ``"idx1"`` and ``"idx2"``
    (``"Rest"`` without ``idx2``). Otherwise ``groupby`` is required: ``group1`` None means
    every group in turn, a list means those groups; each against ``group2`` or, when None,
    against all other cells (``"Rest"``).
    """
    if idx1 is not None:
        if groupby is not None or group1 is not None:
            raise ValueError("Pass either groupby/group1/group2 or idx1/idx2, not both.")
        cells1 = _cells("idx1", idx1, obs)
        cells2 = np.setdiff1d(np.arange(len(obs)), cells1) if idx2 is None else _cells("idx2", idx2, obs)
        if len(cells1) == 0 or len(cells2) == 0:
            raise ValueError(f"{'idx1' if len(cells1) == 0 else 'idx2 (or the rest)'} selects no cells.")
        if np.array_equal(np.unique(cells1), np.unique(cells2)):
            raise ValueError("idx1 and idx2 select the same cells: there is nothing to compare.")
        shared = np.intersect1d(cells1, cells2)
        if len(shared):
            warnings.warn(f"idx1 and idx2 share {len(shared)} cells; they count in both groups, which pulls the two "
                          "towards each other. Pass disjoint selections to compare them.", UserWarning,
                          stacklevel=user_stacklevel())
        return [("idx1", "Rest" if idx2 is None else "idx2", cells1, cells2)]
    if idx2 is not None:
        raise ValueError("idx2 needs idx1.")
    if groupby is None:
        raise ValueError("Pass groupby (an .obs column, for one-vs-rest over its groups) or idx1 (cells to compare).")
    V.group_column(obs, groupby, "groupby", complete=True)
    labels = obs[groupby].astype(str).to_numpy()
    known = [str(g) for g in pd.Categorical(obs[groupby]).remove_unused_categories().categories]
    one = isinstance(group1, str) or not isinstance(group1, (list, tuple, set, np.ndarray, pd.Index, pd.Series))
    chosen = known if group1 is None else list(dict.fromkeys([group1] if one else list(group1)))
    if not chosen:
        raise ValueError("group1 is an empty list; pass a group, a list of groups, or None for every group.")
    for group in [*chosen, *([] if group2 is None else [group2])]:
        if str(group) not in known:
            raise ValueError(f"Group {group!r} not found in adata.obs[{groupby!r}] (groups: {known[:20]}).")
    if group2 is not None and [str(g) for g in chosen] == [str(group2)]:
        raise ValueError(f"group1 and group2 are the same group ({group2!r}).")
    if len(known) < 2:
        raise ValueError(f"adata.obs[{groupby!r}] has a single group ({known}); there is nothing to compare it with.")
    result = []
    for group in (str(g) for g in chosen):
        if group2 is not None and group == str(group2):
            continue  # a group is not compared with itself when every group is taken in turn
        cells2 = np.flatnonzero(labels != group if group2 is None else labels == str(group2))
        result.append((group, "Rest" if group2 is None else str(group2), np.flatnonzero(labels == group), cells2))
    return result


# --- observed-count summaries ----------------------------------------------------------------
def raw_count_properties(matrix, cells1: np.ndarray, cells2: np.ndarray, skip_empty: bool = False) -> dict[str, np.ndarray]:
    """scvi-tools' observed-count columns for two sets of cells.

    Parameters
    ----------
    matrix
        A :class:`~pyro_scmodels.data.CountMatrix` of raw counts.
    cells1, cells2
        Positions of the cells of each group; a cell in both counts in both.
    skip_empty
        Leave out cells without counts (a multimodal model's cells without this modality, whose likelihood is
        masked: their zeros are no measurement).

    Returns
    -------
    dict
        ``raw_mean1/2`` (mean count), ``non_zeros_proportion1/2`` (fraction of cells with a
        count) and ``raw_normalized_mean1/2`` (mean of counts per 10,000 per cell), per feature.
    """
    totals = matrix.totals()
    if skip_empty:
        cells1, cells2 = cells1[totals[cells1] > 0], cells2[totals[cells2] > 0]
    unmeasured = [i + 1 for i, cells in enumerate((cells1, cells2)) if cells.size == 0]
    if unmeasured:  # their means read 0, as if measured
        warnings.warn(f"group {' and '.join(map(str, unmeasured))} has no cells with counts in this modality: its "
                      "observed-count columns are NaN.", UserWarning, stacklevel=user_stacklevel())
    per_10k = np.divide(NORMALISED_TOTAL, totals, out=np.zeros_like(totals), where=totals > 0)

    def group_stats(groups: np.ndarray) -> dict[str, np.ndarray]:
        return {"raw_mean": matrix.column_means(groups=groups, n_groups=3),
                "non_zeros_proportion": matrix.column_means(groups=groups, n_groups=3, nonzero=True),
                "raw_normalized_mean": matrix.column_means(weights=per_10k, groups=groups, n_groups=3)}

    groups = np.full(matrix.n_cells, 2, dtype=np.int64)  # 2: neither group
    if np.intersect1d(cells1, cells2).size == 0:  # both groups in the same passes over the counts
        groups[cells1], groups[cells2] = 0, 1
        stats = group_stats(groups)
        out = {f"{name}{i + 1}": values[i] for name, values in stats.items() for i in range(2)}
    else:  # overlapping groups, one set of passes each: the shared cells were counted in the second group only
        out = {}
        for i, cells in enumerate((cells1, cells2)):
            groups[:] = 2
            groups[cells] = 0
            out.update({f"{name}{i + 1}": values[0] for name, values in group_stats(groups).items()})
    return {f"{name}{i}": np.full_like(out[f"{name}{i}"], np.nan) if i in unmeasured else out[f"{name}{i}"]
            for name in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean") for i in (1, 2)}


# --- the user-facing test ----------------------------------------------------------------------
def _background_shift(model, background, modality) -> np.ndarray | None:
    """What ``background`` adds to rho before the log: the model's shared background, or None."""
    if not isinstance(background, str) or background not in BACKGROUNDS:
        error = ValueError if isinstance(background, str) else V.ArgumentTypeError
        raise error(f"background={background!r} is not an option: pass 'shared' (rho plus the part of the ambient "
                    "background every category carries, which the data cannot tell from rho; the default) or 'none' "
                    "(rho alone, free of all background).")
    shared = model.shared_background(modality) if background == "shared" else None
    return None if shared is None else shared.to_numpy(dtype=np.float32)


def _log2_draws(model, adata, cells, strata, num_samples, batch_size, seed, modality, pseudocount,
                paired: bool = True, weights: str = "uniform",
                shift: np.ndarray | None = None) -> tuple[list[np.ndarray], list | None, np.ndarray | None]:
    """log2(rho + shift + pseudocount) draws (rows: sample x cell) of ``cells``, one array per stratum (one in all
    when the strata do not pair), the rows' probabilities alike (None: uniform) and each cell's effective sample
    size of its draws under them (None: uniform); ``shift`` is a per-feature vector or None."""
    probabilities = None
    if weights == "importance":
        # one pass: each z draw decoded once per stratum beside its log ratio (under the cell's own covariates), the
        # draws and ratios those of decode_samples and log_importance_ratios with the same seed
        parts, ratios = [[] for _ in strata], []
        for _, rhos, log_ratios in model.decode_samples_with_ratios(adata, cells, batch_size, num_samples, seed,
                                                                    strata, modality=modality):
            for part, rho in zip(parts, rhos):
                part.append(rho.cpu())
            ratios.append(log_ratios)
        probabilities = row_weights(torch.cat(ratios, dim=1).numpy())
    else:
        # the same seed in every stratum: each cell keeps its z draws, only the decoder covariates change; decoded
        # lazily, one stratum at a time
        parts = [(rho.cpu() for _, _, rho in model.decode_samples(adata, cells, batch_size, num_samples, seed, stratum,
                                                                  modality=modality)) for stratum in strata]
    draws = []
    while parts:  # a stratum's float32 rho let go once its log2 is taken
        rho = torch.cat(list(parts.pop(0)), dim=1).numpy()  # samples x cells x features
        rho = rho if shift is None else rho + shift
        draws.append(np.log2(rho.reshape(-1, rho.shape[-1]) + pseudocount))
    if not paired:
        draws = [np.concatenate(draws)]
    if probabilities is None:
        return draws, None, None
    ess = per_cell_effective_sample_size(probabilities, num_samples)
    # every stratum decodes the same z: the same weights, shared among the strata when they are pooled
    return draws, ([probabilities] * len(draws) if paired else [np.tile(probabilities, len(strata)) / len(strata)]), ess


def differential_expression(model, groupby: str | None = None, group1=None, group2: str | None = None, idx1=None,
                            idx2=None, mode: str = "change", delta: float | None = 0.25,
                            batch_correction: bool | str = False, batchid1=None, batchid2=None,
                            fdr_target: float = 0.05, num_samples: int = 20, n_cells: int = 500, n_pairs: int = 5000,
                            pseudocount: float = PSEUDOCOUNT, adata=None, batch_size: int | None = None, seed: int = 0,
                            modality: str | None = None, all_stats: bool = True, weights: str | None = "uniform",
                            filter_outlier_cells: bool = False, background: str = "shared") -> pd.DataFrame:
    """Bayesian differential expression (scvi-tools' ``"change"`` and ``"vanilla"`` modes) between groups of cells.

    Uses seeded posterior samples of the scaling-free expression rho (``model.decode_samples``) plus, by default,
    the part of the ambient background that every cell carries (``background``). ``scale1``/``scale2`` are the
    mean of that expression (counts at a typical library size), where scvi-tools reports proportions.

    Parameters
    ----------
    model
        A fitted ``RegularizedVI`` or ``RegularizedMultimodalVI``.
    groupby
        Column of ``adata.obs`` with the groups. Alone: every group against the rest.
    group1
        A group or a list of groups, each compared in turn; None: every group of ``groupby``.
    group2
        The group compared with; None: all other cells (``"Rest"``).
    idx1, idx2
        Instead of ``groupby``: cells as a boolean mask, integer positions or an ``adata.obs``
        query string; without ``idx2``, ``idx1`` is compared with all other cells.
    mode
        ``"change"`` (the default here): P(|LFC| > ``delta``) with LFC summaries and the FDR
        selection. ``"vanilla"`` (scvi-tools' default): P(group 1 expresses more), ``proba_m1`` /
        ``proba_m2`` / ``bayes_factor``, sorted by ``bayes_factor``; ``delta`` and ``fdr_target``
        do not apply.
    delta
        Smallest log2 fold change that counts as a change. None: estimated from the genes' LFC
        means in each comparison (:func:`~pyro_scmodels.differential_statistics.estimate_delta`,
        as scvi-tools' ``delta=None``); the ``delta`` column holds the value used.
    batch_correction
        True: decode every cell as each category of the decoder-conditioning key in turn and pair
        cells only within a category (scvi-tools' batch correction; the ambient, scaling,
        dispersion and library terms never enter rho). A key name picks the key when the decoder
        is conditioned on several.
    batchid1, batchid2
        With ``batch_correction``: the categories of its key that group 1 and group 2 are decoded
        as (default: every category). The same categories for both pair cells within each;
        disjoint ones decode case and control as batches of their own and pair across them
        (scvi-tools' two cases). Categories that overlap but differ are refused.
    fdr_target
        Posterior expected false discovery rate of the selected genes (``is_de_fdr_*``), as scvi-tools computes it:
        from ``proba_de``, which also grows with the LFC's spread inside the groups, not a frequentist guarantee.
        Between two random halves of one Kang cell type (every true difference 0) the default 0.05 called none. On
        simulated data with a known truth, rho alone (``background="none"``) called 24-27 % of its genes with no true
        change, the default ``"shared"`` 3-13 % (docs/models.md, "Differential expression and the background").
    num_samples
        Posterior samples per cell.
    n_cells
        At most this many cells per group (a random subset) for the posterior samples; the
        ``raw_*`` columns use every cell.
    n_pairs
        Random (cell, sample) pairs behind each gene's LFC posterior.
    pseudocount
        Added to rho (counts at a typical library size) before taking log2.
    adata, batch_size, seed
        Cells (default the training data), minibatch size, seed of subsets and samples.
    modality
        Multimodal models: the modality tested (default: the RNA modality, see ``default_modality``). Cells without counts in it (whose likelihood the
        model masks) are left out of both groups, with a warning saying how many; a group with none left is refused.
    all_stats
        Add the observed-count columns (``raw_mean1``, ``non_zeros_proportion1``, ...).
    weights
        How the (cell, posterior sample) rows of a group are drawn, as scvi-tools' ``weights``: ``"uniform"`` (the
        default; None too) alike, ``"importance"`` in proportion to importance weights of their z draws
        (:mod:`pyro_scmodels.differential_weights`: each cell's ``num_samples`` draws self-normalised by their
        ``model.log_importance_ratios``, which ``model.decode_samples_with_ratios`` gives beside the decoded draws
        in the same pass), so the draws follow the group's posterior rather than the guide's; every
        cell keeps total weight 1/N (scvi-tools spreads it over the group: a z that explains many cells counts
        more). The ratios sum log p(x | z, l) over every gene, so with many genes each cell's weight falls on a few
        draws (Kish effective sample size 2-3 of 20 at 300-2,000 simulated genes) and the result approaches the
        best draw per cell, losing the within-cell posterior spread: a warning gives the mean per-cell effective
        sample size when it is below 20 % of ``num_samples``; ``"uniform"`` keeps that spread. With
        ``num_samples=1`` it is the uniform draw. Not for ``RegularizedMultimodalVI`` (refused).
    filter_outlier_cells
        Leave out of the posterior draws the cells outside their group's bulk in the latent space, as scvi-tools'
        ``filter_outlier_cells``: per group, a robust Gaussian (sklearn's ``EllipticEnvelope``) on the posterior means
        of z, dropping the farthest tenth (:func:`pyro_scmodels.differential_cells.latent_inliers`); a warning says
        how many per group. The ``raw_*`` columns keep every cell, as in scvi-tools.
    background
        ``"shared"`` (the default since 2026-12-07; before, DE always tested rho alone, so ``scale1``/``scale2`` and
        the LFCs differ from earlier runs): test rho + c, with c per feature the background every cell carries
        (:meth:`~pyro_scmodels.models.global_site_tables.GlobalSiteTables.shared_background`: the smallest s among
        each ambient key's categories, summed over keys). With the default background, which scales with the
        library, the mean ``l (rho + s) y`` does not change when c moves between rho and every category's s, so a
        fit that leaves too much in s takes it from rho and stretches rho's fold changes; rho + c does not depend on
        where the fit left c. No cell's own category is added, so a batch's extra soup stays out. ``"none"``: rho
        alone, free of all background. On every fit measured ``"shared"`` made as few false calls as ``"none"`` or
        fewer, with LFC slopes of 0.87-0.95 on the truth against rho's 1.07-1.54; where the background is pinned
        (``ambient_profile=``, or a long per-droplet fit) rho's slope was nearer 1 (0.99-1.10), so choose
        ``"none"`` there when the fold changes' size matters more than the calls (docs/models.md, "Differential
        expression and the background"). Key the background by the channel the soup came from (the 10x lane): on
        Kang's data, with control and stimulated cells in separate lanes and the background keyed by donor, the fit
        gave control cells the stimulated soup and ``"shared"`` halved the interferon response that ``"none"`` kept
        (the calls stayed right); keyed by lane the two agreed. Models (or modalities) without a background test rho
        either way.

    Returns
    -------
    pandas.DataFrame
        One row per feature and comparison, indexed by feature, each comparison sorted by
        ``proba_de`` (``bayes_factor`` in vanilla mode): the columns of
        :func:`~pyro_scmodels.differential_statistics.change_test`, ``delta``, ``pseudocounts`` (those of
        :func:`~pyro_scmodels.differential_statistics.vanilla_test` in vanilla mode), those of
        :func:`raw_count_properties` (with ``all_stats``), ``comparison`` (e.g. ``"B vs Rest"``),
        ``group1`` and ``group2``.
    """
    if hasattr(groupby, "obs") or hasattr(groupby, "mod"):
        # scvi-tools' first argument is adata; here it is groupby (the data default to the training data)
        raise TypeError(f"differential_expression's first argument is groupby (a column of adata.obs), not the data "
                        f"(got a {type(groupby).__name__}); pass the data as adata=..., e.g. "
                        "model.differential_expression(adata=adata, groupby='cell_type').")
    mode = V.choice("mode", mode, MODES)
    seed = V.seed("seed", seed)
    all_stats = V.boolean("all_stats", all_stats)
    filter_outlier_cells = V.boolean("filter_outlier_cells", filter_outlier_cells)
    weights = check_weights(model, weights)
    num_samples, n_cells, n_pairs = (V.positive_int(name, value) for name, value in
                                     (("num_samples", num_samples), ("n_cells", n_cells), ("n_pairs", n_pairs)))
    delta = None if delta is None else V.non_negative_float("delta", delta)  # vanilla mode does not use it
    pseudocount = V.positive_float("pseudocount", pseudocount)
    fdr_target = V.number("fdr_target", fdr_target, 0.0, 1.0, strict_minimum=True, strict_maximum=True,
                          description="a number in (0, 1)")
    # to 7 digits, as it names its column (is_de_fdr_0.05, as scvi-tools): a float32 0.05 is not 0.05000000074505806
    fdr_target = float(f"{fdr_target:.7g}")
    adata = model.adata if adata is None else adata
    modality = model.default_modality(modality)
    strata1, strata2, paired = correction_strata(model, batch_correction, batchid1, batchid2)
    shift = _background_shift(model, background, modality)
    tests = comparisons(adata.obs, groupby, group1, group2, idx1, idx2)
    skip_empty = bool(model.masks_cells_without_counts)
    matrix = counts_matrix(*model.counts_source(modality, adata), validate=False) if all_stats or skip_empty else None
    if skip_empty:
        tests = measured_cells_only(tests, matrix.totals(), modality)
    matrix = matrix if all_stats else None
    # the raw_* columns are of the groups as chosen; the posterior draws of the groups without their outliers
    drawn = _drop_outliers(model, adata, tests, batch_size, seed) if filter_outlier_cells else tests
    rng = np.random.default_rng(seed)
    tables, ess = [], []
    # each group's draws take a seed of their own, kept in the seeds' range (it wraps past 2**32 - 1)
    for i, ((name1, name2, cells1, cells2), (_, _, kept1, kept2)) in enumerate(zip(tests, drawn)):
        (samples1, weights1, ess1), (samples2, weights2, ess2) = (
            _log2_draws(model, adata, np.sort(rng.choice(cells, size=min(n_cells, len(cells)), replace=False)), strata,
                        num_samples, batch_size, (seed + 2 * i + offset) % 2**32, modality, pseudocount, paired, weights,
                        shift)
            for offset, (cells, strata) in enumerate(((kept1, strata1), (kept2, strata2)))
        )
        ess += [size for size in (ess1, ess2) if size is not None]
        weighting = {"weights1": weights1, "weights2": weights2}
        if mode == "vanilla":
            table = vanilla_test(samples1, samples2, model.feature_names(modality), n_pairs, rng, pseudocount,
                                 **weighting)
        else:
            table = change_test(samples1, samples2, model.feature_names(modality), delta, fdr_target, n_pairs, rng,
                                pseudocount, **weighting)
            table.insert(5, "pseudocounts", pseudocount)  # before delta, as scvi-tools orders them
        if matrix is not None:
            for column, values in raw_count_properties(matrix, cells1, cells2, skip_empty=skip_empty).items():
                table[column] = pd.Series(values, index=model.feature_names(modality))
        if mode == "change":  # the selection last, after the raw columns, as scvi-tools orders them
            table[f"is_de_fdr_{fdr_target}"] = table.pop(f"is_de_fdr_{fdr_target}")
        table["comparison"], table["group1"], table["group2"] = f"{name1} vs {name2}", name1, name2
        tables.append(table)
    collapse = collapse_warning(ess, num_samples)
    if collapse is not None:  # once per call, over every compared cell
        warnings.warn(collapse, UserWarning, stacklevel=user_stacklevel())
    return pd.concat(tables)
