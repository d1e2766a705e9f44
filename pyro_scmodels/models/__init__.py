"""The models: one file per model (Pyro module and user class)."""

from .multimodal import RegularizedMultimodalVI
from .regularizedvi import RegularizedVI

__all__ = ["RegularizedMultimodalVI", "RegularizedVI"]
