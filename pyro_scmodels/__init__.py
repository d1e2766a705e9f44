"""pyro_scmodels: Pyro models of single-cell count data."""

from . import criticism, datasets, matching
from .models import RegularizedMultimodalVI, RegularizedVI
from .ndreamer import NDreamer
from .priors import RegularizedPriors

__version__ = "0.1.0"
__all__ = ["NDreamer", "RegularizedMultimodalVI", "RegularizedPriors", "RegularizedVI", "criticism", "datasets", "matching"]
