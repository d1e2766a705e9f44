"""NDreamer: discrete-code representation of cell state for condition effects and batch denoising.

The public API is the effects pipeline; the loss functions live in
:mod:`pyro_scmodels.ndreamer.losses` and the network's building blocks in
:mod:`pyro_scmodels.ndreamer.network`.
"""

from ._persistence import discard_saved
from .cate import estimate_cate
from .count_rows import LogNormalisedCounts
from .counterfactual_design import CounterfactualDesign
from .matched_effects import MatchedEffects
from .losses import LossWeights
from .network import NDreamerNetwork
from .pipeline import NDreamer
from .presets import PRESET_NAMES, network_preset
from .trainer import NDreamerTrainer

__all__ = [
    "CounterfactualDesign",
    "LogNormalisedCounts",
    "LossWeights",
    "MatchedEffects",
    "NDreamer",
    "NDreamerNetwork",
    "NDreamerTrainer",
    "PRESET_NAMES",
    "discard_saved",
    "estimate_cate",
    "network_preset",
]
