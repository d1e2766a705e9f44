"""pyro_scmodels: Pyro models of single-cell count data."""

from . import criticism, datasets, matching
from .models import RegularizedMultimodalVI, RegularizedVI
from .priors import RegularizedPriors

__version__ = "0.1.0"
__all__ = ["RegularizedMultimodalVI", "RegularizedPriors", "RegularizedVI", "criticism", "datasets", "matching"]
