"""The models: one file per model (Pyro module and user class)."""

from .regularizedvi import RegularizedVI

__all__ = ["RegularizedVI"]
