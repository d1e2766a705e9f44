"""Empirical-Bayes adaptive shrinkage of noisy effects: a normal scale-mixture prior fitted across features.

Many noisy estimates ``beta_g`` (one per gene), each with a known standard error ``se_g``, are taken to
come from

    beta_g ~ Normal(theta_g, se_g^2),    theta_g ~ centre + sum_k pi_k Normal(0, s_k^2),

a mixture of zero-centred normals on a fixed grid of scales ``s_k`` (``s_0 = 0``: a point mass at the
centre). The weights ``pi`` are fitted by EM to the marginal likelihood of all the estimates, so the
data decide how many effects are null and how large the others are (the "adaptive shrinkage" of
Stephens 2017, the idea behind DESeq2's ``lfcShrink(type="ashr")``). Each estimate is then replaced by
its posterior mean: estimates that are small next to their standard error are pulled to the centre,
large ones are kept. Numpy only; every feature at once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: ratio of neighbouring scales on the default grid (the grid is dense enough that the fit barely moves)
GRID_STEP = np.sqrt(2.0)
#: the smallest non-zero scale, as a share of the smallest standard error
GRID_SMALLEST = 0.1
EM_MAX_ITER = 1000
EM_TOLERANCE = 1e-8  # stop when the mean log-likelihood per estimate changes by less


class Posterior(NamedTuple):
    """Posterior mean and standard deviation of each effect."""

    mean: np.ndarray
    sd: np.ndarray


def _checked(estimates, standard_errors, centre) -> tuple[np.ndarray, np.ndarray, float]:
    """The estimates and standard errors as float64 vectors of one length, finite, errors >= 0."""
    beta = np.asarray(estimates, dtype=np.float64)
    se = np.asarray(standard_errors, dtype=np.float64)
    if beta.ndim != 1 or beta.size == 0:
        raise ValueError(f"estimates must be a non-empty 1-D array (one effect per feature), got shape {beta.shape}.")
    if se.shape != beta.shape:
        raise ValueError(f"standard_errors has shape {se.shape}; it needs one per estimate, shape {beta.shape}.")
    if not np.isfinite(beta).all():
        raise ValueError(f"estimates hold {int((~np.isfinite(beta)).sum())} non-finite value(s) (NaN or inf).")
    if not np.isfinite(se).all() or (se < 0).any():
        raise ValueError("standard_errors must be finite and >= 0, got "
                         f"{int((~np.isfinite(se) | (se < 0)).sum())} value(s) that are not.")
    centre = float(centre)
    if not np.isfinite(centre):
        raise ValueError(f"centre must be a finite number, got {centre!r}.")
    return beta, se, centre


def scale_grid(estimates, standard_errors, centre: float = 0.0, step: float = GRID_STEP) -> np.ndarray:
    """A geometric grid of prior scales spanning the estimates' precision and their largest deviation.

    From a tenth of the smallest positive standard error to twice the largest deviation from ``centre``
    that the noise does not explain (``sqrt(max((beta - centre)^2 - se^2))``), at ratio ``step``,
    with 0 (the point mass) first.

    Parameters
    ----------
    estimates, standard_errors
        One effect and its standard error per feature.
    centre
        The prior's centre.
    step
        Ratio of neighbouring scales (> 1).

    Returns
    -------
    numpy.ndarray
        The scales, 0 first, increasing.
    """
    beta, se, centre = _checked(estimates, standard_errors, centre)
    if not step > 1:
        raise ValueError(f"step must be > 1 (the ratio of neighbouring scales), got {step!r}.")
    positive = se[se > 0]
    if positive.size == 0:
        raise ValueError("Every standard error is 0: there is nothing to shrink.")
    smallest = GRID_SMALLEST * positive.min()
    excess = np.max((beta - centre) ** 2 - se ** 2)
    largest = max(2.0 * np.sqrt(excess) if excess > 0 else 0.0, 8.0 * smallest)
    n = int(np.ceil(np.log(largest / smallest) / np.log(step))) + 1
    return np.concatenate([[0.0], smallest * step ** np.arange(n)])


def _log_likelihoods(deviation: np.ndarray, se: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """log Normal(deviation; 0, se^2 + s_k^2), estimates x scales."""
    variance = se[:, None] ** 2 + scales[None, :] ** 2
    return -0.5 * (np.log(2 * np.pi * variance) + deviation[:, None] ** 2 / variance)


def _responsibilities(log_like: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each estimate's posterior probability of each component, and its log marginal likelihood."""
    with np.errstate(divide="ignore"):  # a weight fitted to 0 is a component the data rule out
        joint = log_like + np.log(weights)[None, :]
    top = joint.max(axis=1, keepdims=True)
    total = top[:, 0] + np.log(np.exp(joint - top).sum(axis=1))
    return np.exp(joint - total[:, None]), total


class NormalMixturePrior(NamedTuple):
    """A fitted prior ``centre + sum_k weights_k Normal(0, scales_k^2)``.

    Attributes
    ----------
    centre
        Where the effects concentrate.
    scales, weights
        The mixture's scales (0: the point mass) and their fitted weights (summing to 1).
    log_likelihood
        Mean log marginal likelihood per estimate at the fit.
    """

    centre: float
    scales: np.ndarray
    weights: np.ndarray
    log_likelihood: float

    def posterior(self, estimates, standard_errors) -> Posterior:
        """Posterior mean and sd of each effect under this prior.

        An estimate with standard error 0 is known exactly: it is returned as it is, sd 0.

        Parameters
        ----------
        estimates, standard_errors
            One effect and its standard error per feature.

        Returns
        -------
        Posterior
            ``mean`` and ``sd``, one per estimate.
        """
        beta, se, centre = _checked(estimates, standard_errors, self.centre)
        mean, sd = beta.copy(), np.zeros_like(beta)
        noisy = se > 0
        deviation, se = beta[noisy] - centre, se[noisy]
        resp, _ = _responsibilities(_log_likelihoods(deviation, se, self.scales), self.weights)
        # per component, the normal-normal posterior: mean s^2 / (s^2 + se^2) x deviation, variance s^2 se^2 / (s^2 + se^2)
        prior_var = self.scales[None, :] ** 2
        factor = prior_var / (prior_var + se[:, None] ** 2)
        means = factor * deviation[:, None]
        variances = factor * se[:, None] ** 2
        mixture_mean = (resp * means).sum(axis=1)
        mean[noisy] = centre + mixture_mean
        sd[noisy] = np.sqrt(np.maximum((resp * (variances + means ** 2)).sum(axis=1) - mixture_mean ** 2, 0.0))
        return Posterior(mean, sd)


def fit_normal_mixture(estimates, standard_errors, centre: float = 0.0, scales=None,
                       max_iter: int = EM_MAX_ITER, tol: float = EM_TOLERANCE) -> NormalMixturePrior:
    """Fit the weights of a normal scale-mixture prior by EM on the marginal likelihood.

    Parameters
    ----------
    estimates, standard_errors
        One effect and its standard error per feature (estimates with standard error 0 are left out
        of the fit: their likelihood under the point mass is not a density).
    centre
        The prior's centre (fixed, not fitted): e.g. 0, or the median of the estimates when every
        feature shares a common shift.
    scales
        The mixture's scales (>= 0, at least one); default :func:`scale_grid`.
    max_iter, tol
        EM iterations at most, and the change in the mean log-likelihood that ends it.

    Returns
    -------
    NormalMixturePrior
        The fitted prior; its :meth:`~NormalMixturePrior.posterior` gives the shrunk effects.
    """
    beta, se, centre = _checked(estimates, standard_errors, centre)
    scales = scale_grid(beta, se, centre) if scales is None else np.asarray(scales, dtype=np.float64)
    if scales.ndim != 1 or scales.size == 0 or not np.isfinite(scales).all() or (scales < 0).any():
        raise ValueError(f"scales must be a non-empty 1-D array of finite values >= 0, got {scales!r}.")
    if int(max_iter) < 1 or not tol > 0:
        raise ValueError(f"max_iter must be >= 1 and tol > 0, got max_iter={max_iter!r}, tol={tol!r}.")
    noisy = se > 0
    if not noisy.any():
        raise ValueError("Every standard error is 0: there is nothing to shrink.")
    log_like = _log_likelihoods(beta[noisy] - centre, se[noisy], scales)
    weights = np.full(scales.size, 1.0 / scales.size)
    previous = -np.inf
    for _ in range(int(max_iter)):
        resp, total = _responsibilities(log_like, weights)
        weights = resp.mean(axis=0)
        current = float(total.mean())
        if current - previous < tol:  # EM never lowers the likelihood: a small step is convergence
            break
        previous = current
    return NormalMixturePrior(centre, scales, weights, current)


def shrink(estimates, standard_errors, centre="median") -> Posterior:
    """Adaptive shrinkage in one call: fit the prior across the estimates, return their posterior.

    Parameters
    ----------
    estimates, standard_errors
        One effect and its standard error per feature.
    centre
        A number, or ``"median"``: the median of the estimates (a shift that every feature carries,
        such as a composition change, is then not shrunk away).

    Returns
    -------
    Posterior
        Posterior mean and sd of each effect.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> truth = np.r_[np.zeros(900), rng.normal(0, 2, 100)]
    >>> noisy = truth + rng.normal(0, 0.3, 1000)
    >>> post = shrink(noisy, np.full(1000, 0.3), centre=0.0)
    >>> bool(np.mean((post.mean - truth) ** 2) < np.mean((noisy - truth) ** 2))
    True
    """
    if isinstance(centre, str):
        if centre != "median":
            raise ValueError(f"centre must be a number or 'median', got {centre!r}.")
        centre = float(np.median(_checked(estimates, standard_errors, 0.0)[0]))
    return fit_normal_mixture(estimates, standard_errors, centre).posterior(estimates, standard_errors)
