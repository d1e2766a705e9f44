"""A Pyro model as the representation (SPEC 3.6): model-based counterfactuals.

Each cell's posterior z is decoded twice, with the decoder's condition covariate set to the
treatment and to the control; the same seeded draws of z serve both decodings, so the effect
of a draw is a difference of two decodings of one latent state. When the condition is also a
feature-scaling key (the default when it conditions the decoder), its per-gene factor y is
switched with it: part of the effect may sit in y rather than in the decoder.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .. import _validation as V
from .._stacklevel import user_stacklevel
from .._labels import quantile_label
from . import _constants as K


def check_condition_decodable(model, condition_key: str) -> list[str]:
    """The model's categories of ``condition_key``; a clear error if its decoder is not conditioned on it."""
    keys = list(model.keys.nn_conditioning)
    if condition_key not in keys:
        raise ValueError(
            f"The model's decoder is not conditioned on {condition_key!r} (nn_conditioning_covariate_keys={keys}); "
            "set it up with nn_conditioning_covariate_keys=[condition_key, ...] to decode counterfactuals."
        )
    if condition_key not in list(model.keys.encoder):
        # measured (benchmarks/bench_model_ite.py): without the condition the encoder reads it off the
        # treated counts, z carries it, and switching the decoder's condition moves the output only
        # partly (slope of estimate on truth 0.37-0.46 instead of 1.12-1.16 in the recommended setup)
        warnings.warn(
            f"The model's encoder is not given {condition_key!r}, so z carries the condition and the decoded "
            "effect is shrunk towards 0. Set the model up with encoder_covariate_keys=[condition_key] as well "
            "as nn_conditioning_covariate_keys=[condition_key] (the basal-state design).", stacklevel=user_stacklevel(),
        )
    elif not model.init_params.get("latent_independence", 0.0):
        # measured (bench_model_ite.py): told the condition, the encoder may still write it into z (simulator,
        # n_hidden=128: slope 0.52-0.62, per-cell r 0.14-0.55; with the penalty 1.12-1.16, 0.75-0.88)
        warnings.warn(
            f"The model was trained without latent_independence, so z may still carry {condition_key!r} and the "
            "decoded effect may be shrunk. Train it with RegularizedVI(adata, latent_independence=10.0).",
            stacklevel=user_stacklevel(),
        )
    return list(model.encoding.categories[condition_key])


def checked_quantiles(quantiles) -> tuple[float, float]:
    """Two levels in (0, 1), the lower first (the layers are named after them).

    Parameters
    ----------
    quantiles
        The pair given, e.g. ``(0.05, 0.95)``.

    Returns
    -------
    tuple of float
        The two levels.

    Raises
    ------
    ValueError
        Not a pair of levels with 0 < low < high < 1.
    """
    try:
        low, high = quantiles
    except (TypeError, ValueError) as err:
        raise ValueError(f"quantiles must be two levels (low, high), e.g. (0.05, 0.95); got {quantiles!r}.") from err
    low, high = V.probability("quantiles[0]", low), V.probability("quantiles[1]", high)
    if not 0 < low < high < 1:
        raise ValueError(f"quantiles must satisfy 0 < low < high < 1, e.g. (0.05, 0.95); got {quantiles!r}.")
    return low, high


def model_counterfactual_ite(model, condition_key: str, control_name: str, treatments,
                             num_samples: int = K.MODEL_ITE_SAMPLES,
                             quantiles: tuple[float, float] = K.MODEL_ITE_QUANTILES, batch_size: int | None = None,
                             seed: int = 0, target_sum: float = K.TARGET_SUM, indices=None,
                             gene_columns=None, modality: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-cell treatment effects by decoding each cell's z under each treatment and under control.

    For every posterior sample z_s of a cell: effect_s = log1p(target_sum * e_t / sum e_t)
    - log1p(target_sum * e_c / sum e_c), with e = rho decoded with the condition set to the
    treatment and to the control (everything else of the cell unchanged), times the condition's
    feature scaling y when the condition is a feature-scaling key (``model.feature_scaling_of``).
    Ambient RNA, library size and the scaling of other keys are left out.

    Parameters
    ----------
    model
        A trained model whose decoder is conditioned on ``condition_key``.
    condition_key, control_name
        The condition column and the control category.
    treatments
        One treatment category or a list of them; the control is decoded once for all of them.
    num_samples
        Posterior draws of z per cell.
    quantiles
        Lower and upper quantile of the effect over the draws.
    batch_size, seed
        Minibatch size; seed of the draws of z.
    target_sum
        Counts per cell of the log-normalised scale the effect is on.
    indices, gene_columns
        Cell positions and gene positions to return (default all); every gene is decoded, since
        the log-normalisation divides by the cell's total.
    modality
        A multimodal model's modality decoded (default: its RNA one, ``model.default_modality``).

    Returns
    -------
    dict
        For each treatment, ``"mean"`` and the two quantiles (``"q05"``, ``"q95"`` by default):
        cells x genes float32.
    """
    categories = check_condition_decodable(model, condition_key)
    treatments = [treatments] if isinstance(treatments, str) else list(treatments)
    for name in [control_name, *treatments]:
        if name not in categories:
            raise ValueError(f"{name!r} is not a category of {condition_key!r} known to the model ({categories}).")
    num_samples = V.positive_int("num_samples", num_samples)
    seed = V.seed("seed", seed)
    level = torch.tensor(checked_quantiles(quantiles))
    columns = None if gene_columns is None else torch.as_tensor(gene_columns, dtype=torch.long)
    # the same seed draws the same z in every pass, minibatch by minibatch
    # with_scaling: the condition's feature scaling y is switched with the decoder (the model's
    # measured split on Kang: ISG15's decoded effect 2.71 log units without y, 4.11 with it, 4.61 observed)
    passes = [
        model.decode_samples(indices=indices, batch_size=batch_size, n_samples=num_samples, seed=seed,
                             nn_covariates={condition_key: name}, with_scaling=True,
                             modality=modality)
        for name in [control_name, *treatments]
    ]
    parts = {t: {"mean": [], "low": [], "high": []} for t in treatments}
    for (_, _, rho_c), *treated in zip(*passes):
        log_c = _log_normalised(rho_c, target_sum)
        for treatment, (_, _, rho_t) in zip(treatments, treated):
            effect = (_log_normalised(rho_t, target_sum) - log_c).cpu()
            if columns is not None:
                effect = effect[..., columns]
            low, high = torch.quantile(effect, level.to(effect.dtype), dim=0)
            for name, value in (("mean", effect.mean(0)), ("low", low), ("high", high)):
                parts[treatment][name].append(value)
    low_name, high_name = (quantile_label(q) for q in quantiles)
    return {
        treatment: {label: torch.cat(part[name]).numpy().astype(np.float32)
                    for label, name in (("mean", "mean"), (low_name, "low"), (high_name, "high"))}
        for treatment, part in parts.items()
    }


def _log_normalised(rho: torch.Tensor, target_sum: float) -> torch.Tensor:
    """log1p of rho rescaled to ``target_sum`` counts per cell (the scale the effects are on)."""
    return torch.log1p(target_sum * rho / rho.sum(-1, keepdim=True))
