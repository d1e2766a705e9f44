"""Named NDreamer configurations: a network size and the loss weights measured for it.

``NDreamer(adata, ..., **network_preset("small"))`` is what the CLI's ``--network small`` and the demo run.
"""

from . import _constants as K
from .losses import LossWeights
from .network import checked_sizes

PRESET_NAMES = K.NETWORK_PRESET_NAMES


def network_preset(name: str) -> dict:
    """Keyword arguments of :class:`~pyro_scmodels.ndreamer.NDreamer` for a named configuration.

    Parameters
    ----------
    name
        ``"default"``: the SPEC's network (tens of thousands of cells and more), with the default
        :class:`~pyro_scmodels.ndreamer.LossWeights`. ``"small"``: a compact network that trains much
        faster and suits a few thousand cells; it keeps the SPEC's independence weight of 1000 (see Notes).

    Returns
    -------
    dict
        ``n_codebooks``, ``codebook_size``, ``codebook_dim``, ``embedding_dim``, ``z_dim``,
        ``encoder_hidden``, ``decoder_hidden`` and a new ``loss_weights`` object on every call.

    Notes
    -----
    The default independence weight is 300 because the default network lost the state inside a cell
    type at 1000. The compact network keeps little of that state at either weight, and at 300 its CATE
    correlation fell (``datasets.simulate(2000, 300, effect_modifier=1.0)``, seeds 0-2: 0.933-0.957
    against 0.955-0.960 at 1000, per-cell ITE correlation 0.41-0.50 at both; benchmarks/RESULTS.md,
    "NDreamer keeps the cell state").
    """
    if name == "default":
        return dict(n_codebooks=K.N_CODEBOOKS, codebook_size=K.CODEBOOK_SIZE, codebook_dim=K.CODEBOOK_DIM,
                    embedding_dim=K.EMBEDDING_DIM, z_dim=K.Z_DIM, encoder_hidden=K.ENCODER_HIDDEN,
                    decoder_hidden=K.DECODER_HIDDEN, loss_weights=LossWeights())
    if name == "small":
        return dict(n_codebooks=8, codebook_size=64, codebook_dim=K.CODEBOOK_DIM, embedding_dim=128, z_dim=32,
                    encoder_hidden=(256, 128), decoder_hidden=(128, 256),
                    loss_weights=LossWeights(independence=1000.0))
    raise ValueError(f"Unknown network preset {name!r}; choose one of {list(PRESET_NAMES)}.")


def own_space_factual(sizes: dict, loss_weights: LossWeights) -> str:
    """NDreamer's ``factual="auto"``: ``"matched"`` for the default network, ``"observed"`` for any other.

    A cell's own term from its matched cells (``"matched"``) helps only where the embedding keeps the cell's state
    inside a cell type, and that was measured for the default configuration alone. On
    ``datasets.simulate(3000, 500, effect_modifier=1.0)``, six trainings with the default shrinkage: per-cell ITE
    correlation 0.832-0.859 against 0.745-0.786 (``"observed"``), 90 % coverage 0.873-0.913 against 0.832-0.863,
    slope 0.008-0.016 lower; on Kang every stimulated cell has a positive ITE of ISG15, IFI6, IFIT1 and IFIT3
    (``"observed"``: 0.906 for IFIT1, bounded by the cells that detect it). The compact network
    (``network_preset("small")``) fell to 0.09-0.12 against 0.41-0.48, and the default network at the SPEC's
    independence weight 1000 to 0.45 / 0.22 against 0.56 / 0.51 (benchmarks/RESULTS.md, "NDreamer's own space:
    ``factual="observed"`` or ``"matched"`` with the shrinkage"). No measure of the data told those cases apart, so any
    other network sizes or loss weights keep the cell's own counts (the data's size, the genes and the length of
    training are not checked).

    Parameters
    ----------
    sizes
        The network's checked sizes (:func:`~pyro_scmodels.ndreamer.network.checked_sizes`).
    loss_weights
        The loss weights.

    Returns
    -------
    str
        ``"matched"`` or ``"observed"``.
    """
    default = network_preset("default")
    weights = default.pop("loss_weights")
    return "matched" if sizes == checked_sizes(**default) and loss_weights == weights else "observed"
