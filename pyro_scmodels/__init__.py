"""pyro_scmodels: Pyro models of single-cell count data."""

from . import criticism, datasets, differential, matching, predictive
from .models import (
    RegularizedMultimodalVI,
    RegularizedMultimodalVIGuide,
    RegularizedMultimodalVIModel,
    RegularizedVI,
    RegularizedVIGuide,
    RegularizedVIModel,
)
from .ndreamer import NDreamer
from .priors import RegularizedPriors

__version__ = "0.1.0"
__all__ = [
    "NDreamer",
    "RegularizedMultimodalVI",
    "RegularizedMultimodalVIGuide",
    "RegularizedMultimodalVIModel",
    "RegularizedPriors",
    "RegularizedVI",
    "RegularizedVIGuide",
    "RegularizedVIModel",
    "criticism",
    "datasets",
    "differential",
    "matching",
    "predictive",
]
