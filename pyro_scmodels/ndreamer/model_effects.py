"""A Pyro model as the representation (SPEC 3.6): its latent space for matching, and
model-based counterfactuals (decode the same z with the condition switched)."""

from __future__ import annotations

import numpy as np
import torch


def condition_block(model, condition_key: str) -> tuple[int, list[str]]:
    """Offset and categories of ``condition_key`` inside the decoder's one-hot covariates."""
    keys = model.keys.nn_conditioning
    if condition_key not in keys:
        raise ValueError(
            f"The model's decoder is not conditioned on {condition_key!r} (nn_conditioning_covariate_keys={keys}); "
            "set it up with nn_conditioning_covariate_keys=[condition_key, ...] to decode counterfactuals."
        )
    offset = sum(len(model.encoding.categories[k]) for k in keys[: keys.index(condition_key)])
    return offset, model.encoding.categories[condition_key]


@torch.no_grad()
def model_counterfactual_ite(model, condition_key: str, control_name: str, treatment: str, num_samples: int = 20,
                             quantiles: tuple[float, float] = (0.05, 0.95), batch_size: int | None = None,
                             seed: int = 0, target_sum: float = 1e4) -> dict[str, np.ndarray]:
    """Per-cell treatment effect by decoding each cell's z under treatment and under control.

    For every posterior sample z_s of a cell: effect_s = log1p(target_sum * rho_t / sum rho_t)
    - log1p(target_sum * rho_c / sum rho_c), with rho decoded with the condition one-hot set to
    the treatment and to the control (everything else of the cell unchanged).

    Returns
    -------
    dict
        ``"mean"``, ``"q05"``, ``"q95"`` (per the quantiles): cells x genes float32 arrays.
    """
    offset, categories = condition_block(model, condition_key)
    for name in (control_name, treatment):
        if name not in categories:
            raise ValueError(f"{name!r} is not a category of {condition_key!r} known to the model ({categories}).")
    columns = {name: offset + categories.index(name) for name in (control_name, treatment)}
    block = slice(offset, offset + len(categories))
    module = model.module.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    level = torch.tensor(quantiles)
    parts = {"mean": [], "low": [], "high": []}
    for batch, _ in model._batches(batch_size=batch_size):
        loc, scale = module.guide.encoder(module.guide.encoder_input(batch))
        z = loc + scale * torch.randn((num_samples, *loc.shape), generator=generator, device=loc.device)
        profiles = {}
        for name, column in columns.items():
            switched = dict(batch)
            onehot = batch["nn_onehot"].clone()
            onehot[:, block] = 0.0
            onehot[:, column] = 1.0
            switched["nn_onehot"] = onehot
            rho = module.model.decode(z, switched)
            profiles[name] = torch.log1p(target_sum * rho / rho.sum(-1, keepdim=True))
        effect = (profiles[treatment] - profiles[control_name]).cpu()
        parts["mean"].append(effect.mean(0))
        low, high = torch.quantile(effect, level, dim=0)
        parts["low"].append(low)
        parts["high"].append(high)
    low_name, high_name = (f"q{round(q * 100):02d}" for q in quantiles)
    return {
        "mean": torch.cat(parts["mean"]).numpy().astype(np.float32),
        low_name: torch.cat(parts["low"]).numpy().astype(np.float32),
        high_name: torch.cat(parts["high"]).numpy().astype(np.float32),
    }
