"""How far the latent state of cells depends on a category: a kernel two-sample statistic (MMD).

Used by RegularizedVI's ``latent_independence`` penalty: when the encoder is told a covariate
(the condition, in the basal-state design), nothing in the ELBO stops it from also writing that
covariate into z; the decoder then reads it from z instead of from its own covariate input, and
switching the decoder's covariate moves the output only partly. The penalty makes q(z) the same
in every category of the covariate, as trVAE (Lotfollahi et al., 2020) does for its condition.
"""

from __future__ import annotations

import torch

#: squared-distance scales of the Gaussian kernels summed in the MMD: a range around the unit
#: scale of the standard-Normal prior on z, so both near and far structure is compared
KERNEL_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)


def squared_mmd(a: torch.Tensor, b: torch.Tensor, scales=KERNEL_SCALES) -> torch.Tensor:
    """Squared maximum mean discrepancy between two samples, with a sum of Gaussian kernels.

    ``MMD^2 = E k(a, a') + E k(b, b') - 2 E k(a, b)`` with ``k(x, y) = sum_s exp(-|x - y|^2 / (2 s))``
    (the biased estimate, which includes the diagonal: always >= 0, 0 only for equal samples).

    Parameters
    ----------
    a, b
        Samples, ``(n_a, d)`` and ``(n_b, d)``.
    scales
        Kernel scales ``s`` (squared-distance units).

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    both = torch.cat([a, b])
    squared = torch.cdist(both, both).pow(2)
    kernel = sum(torch.exp(-squared / (2.0 * s)) for s in scales)
    n = a.shape[0]
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2.0 * kernel[:n, n:].mean()


def category_mmd(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Share-weighted sum over categories of ``MMD^2`` between a category's z and the other cells' z.

    With two categories this is the MMD^2 between them.

    Parameters
    ----------
    z
        Latent states of a minibatch, cells x d.
    codes
        Category of every cell, cells x keys (integer codes; one column per covariate).

    Returns
    -------
    torch.Tensor
        A scalar: 0 when the minibatch holds one category per key, or when z has the same
        distribution in every category.
    """
    total = z.new_zeros(())
    for column in codes.T:
        for category in torch.unique(column):
            inside = column == category
            if bool(inside.all()):  # one category in this minibatch: nothing to compare
                continue
            total = total + inside.float().mean() * squared_mmd(z[inside], z[~inside])
    return total
