"""Simulated single-cell counts with known ground truth.

The generative process matches the likelihood of RegularizedVI::

    mu[n, g] = l[n] * (rho[n, g] + s[b(n), g]) * y[b(n), g]
    x[n, g] ~ GammaPoisson(concentration=theta[g], rate=theta[g] / mu[n, g])

so that fitted parameters (library sizes, ambient profiles, feature scalings,
dispersions, treatment effects) can be compared with the values that generated
the data.

- :func:`simulate`: RNA counts with cell types, batches, ambient RNA and a stimulus
  (``_simulate.py``);
- :func:`simulate_multiome`: paired RNA + ATAC counts (``_multiome.py``);
- :func:`simulate_empty_droplets`: droplets holding only a simulated dataset's background (``_droplets.py``).

Argument checks and the sampling primitives both share are in ``_common.py``.
"""

from ._droplets import simulate_empty_droplets
from ._multiome import simulate_multiome
from ._simulate import CONTROL, STIMULATED, simulate  # noqa: F401  (condition names)

__all__ = ["simulate", "simulate_multiome", "simulate_empty_droplets"]
