"""Weights of the posterior draws behind differential expression: scvi-tools' ``weights="uniform" | "importance"``.

With ``"uniform"`` every (cell, posterior sample) row of a group is drawn alike. With ``"importance"`` the rows are
drawn in proportion to importance weights of their z draws, so that the draws follow the group's aggregate
posterior (1/N) sum_n p(z | x_n) rather than the guide's (1/N) sum_n q(z | x_n): a row whose z explains its cell
better than the guide's spread suggests counts more. scvi-tools (``RNASeqMixin.get_importance_weights``) targets the
same aggregate posterior with the mixture of the group's guides as proposal, which needs each anchor cell's marginal
likelihood p(x_a) and every z decoded against every anchor; here each cell's own guide is the proposal and its draws
are self-normalised among themselves, which needs only the model's log joint against the guide's log density
(``model.log_importance_ratios``; DE reads them beside the decoded draws, from ``model.decode_samples_with_ratios``
in one pass) and gives every cell the same total weight, 1/N, where scvi-tools spreads the
weight over the whole group's rows (a z that explains many of the group's cells counts more) and offers a
``truncation`` of the weights (Ionides 2008). log p(x | z, l) sums over every gene, so with many genes a cell's
draws differ by several nats and its weights fall on a few of them (an effective sample size of 2-3 of 20 draws
at 300-2,000 genes): the test then approaches the best of ``num_samples`` draws per cell, and
:func:`collapse_warning` says so.
"""

from __future__ import annotations

import numpy as np

from . import _validation as V

WEIGHTS = ("uniform", "importance")  # scvi-tools' two choices; None is "uniform", as there
#: share of num_samples below which the cells' mean effective sample size is warned about (:func:`collapse_warning`)
LOW_ESS_SHARE = 0.2


def check_weights(model, weights) -> str:
    """``weights`` checked (None: ``"uniform"``), and ``"importance"`` refused for a model that cannot give the ratios,
    before any posterior draw is made.

    Raises
    ------
    ValueError
        Not one of :data:`WEIGHTS`.
    NotImplementedError
        ``"importance"`` for a model class whose ``importance_ratio_refusal`` says why not.
    """
    weights = "uniform" if weights is None else V.choice("weights", weights, WEIGHTS)
    refusal = getattr(model, "importance_ratio_refusal", None)
    if weights == "importance" and refusal is not None:
        raise NotImplementedError(f"weights='importance' is not available for {type(model).__name__}: {refusal}. "
                                  "Use weights='uniform' (the default).")
    return weights


def row_weights(log_ratios: np.ndarray) -> np.ndarray | None:
    """Probabilities of the rows of a group's draws from their log importance ratios.

    Parameters
    ----------
    log_ratios
        ``n_samples`` x cells: log p(x, z, l) - log q(z, l | x) of each draw.

    Returns
    -------
    numpy.ndarray or None
        One probability per row, rows ordered sample-major as the draws are (row ``s * n_cells + c``): each cell's
        draws weighted by their ratios normalised over that cell's draws, every cell with total ``1 / n_cells``.
        None where every row has the same weight (one draw per cell): the uniform draw.
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    if log_ratios.ndim != 2:
        raise ValueError(f"log_ratios must be n_samples x cells, got shape {log_ratios.shape}.")
    if log_ratios.shape[0] == 1:
        return None
    finite = np.where(np.isfinite(log_ratios), log_ratios, -np.inf)
    if not np.isfinite(finite.max(axis=0)).all():
        raise ValueError("weights='importance': a cell has no draw of finite log joint (the model gives its counts "
                         "zero probability at every draw); use weights='uniform', or check the cell's counts.")
    shifted = np.exp(finite - finite.max(axis=0, keepdims=True))
    per_cell = shifted / shifted.sum(axis=0, keepdims=True)
    return (per_cell / log_ratios.shape[1]).ravel()


def effective_sample_size(probabilities: np.ndarray, axis: int | None = None):
    """Kish's effective number of rows, 1 / sum(p^2), of row probabilities normalised along ``axis`` (the rows' count
    when uniform); None: over all of them, a float. With ``axis``, one value per slice, e.g. per cell of an
    ``n_samples`` x cells array (:func:`per_cell_effective_sample_size`)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    normalised = probabilities / probabilities.sum(axis=axis, keepdims=axis is not None)
    size = 1.0 / np.square(normalised).sum(axis=axis)
    return float(size) if axis is None else size


def per_cell_effective_sample_size(probabilities: np.ndarray, n_samples: int) -> np.ndarray:
    """Each cell's effective number of its ``n_samples`` draws (Kish), from the sample-major row probabilities of
    :func:`row_weights`: ``n_samples`` where its draws weigh alike, 1 where one draw takes all its weight."""
    return effective_sample_size(np.asarray(probabilities).reshape(n_samples, -1), axis=0)


def collapse_warning(per_cell: list[np.ndarray], n_samples: int) -> str | None:
    """The warning for ``weights="importance"`` when the cells' mean effective sample size is below
    ``LOW_ESS_SHARE`` of ``n_samples`` (None otherwise): the figure, what it means and the way out."""
    if not per_cell:
        return None
    mean = float(np.mean(np.concatenate(per_cell)))
    if mean >= LOW_ESS_SHARE * n_samples:
        return None
    return (f"weights='importance': each cell's {n_samples} posterior draws have a mean effective sample size of "
            f"{mean:.1f} (Kish, per cell; below {LOW_ESS_SHARE:.0%} of num_samples): the weights fall on a few draws "
            "per cell, so the result approaches the best draw per cell and loses most of the spread of each cell's "
            "posterior that proba_de and lfc_std report. weights='uniform' keeps that spread.")
