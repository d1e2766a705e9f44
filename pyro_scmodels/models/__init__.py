"""The models: for each, its Pyro model/guide pair (``*_module.py``) and its user class.

The Pyro modules are public so that a modeller can subclass them (override one site, add a
term) and hand the subclass to the user class through ``model_class`` / ``guide_class``.
"""

from .model_construction import build_model_and_guide
from .multimodal import RegularizedMultimodalVI
from .multimodal_module import RegularizedMultimodalVIGuide, RegularizedMultimodalVIModel
from .regularizedvi import RegularizedVI
from .regularizedvi_guide import RegularizedVIGuide
from .regularizedvi_module import RegularizedVIDims, RegularizedVIModel

__all__ = [
    "RegularizedMultimodalVI",
    "RegularizedMultimodalVIGuide",
    "RegularizedMultimodalVIModel",
    "RegularizedVI",
    "RegularizedVIDims",
    "RegularizedVIGuide",
    "RegularizedVIModel",
    "build_model_and_guide",
]
