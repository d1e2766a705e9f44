"""NDreamer: discrete-code representation of cell state for condition effects and batch denoising."""

from .losses import (
    LossWeights,
    codebook_loss,
    dependence_nmi,
    group_index,
    independence_nmi,
    kl_loss,
    neighbourhood_loss,
    reconstruction_loss,
    segmented_soft_nmi,
    total_loss,
    triplet_loss,
)
from .network import NDreamerNetwork, ResidualBlock, codebook_logits
from .pipeline import NDreamer

__all__ = [
    "LossWeights",
    "NDreamer",
    "NDreamerNetwork",
    "ResidualBlock",
    "codebook_logits",
    "codebook_loss",
    "dependence_nmi",
    "group_index",
    "independence_nmi",
    "kl_loss",
    "neighbourhood_loss",
    "reconstruction_loss",
    "segmented_soft_nmi",
    "total_loss",
    "triplet_loss",
]
