"""The optimisers of the training loop: Adam (or AdamW) built with torch's fastest kernel, and the check that a
saved optimiser state fits the optimiser that continues from it."""

from __future__ import annotations

import torch


def optimizer_state_fits(saved: dict, optimizer: torch.optim.Optimizer) -> bool:
    """Whether a saved optimiser state can be given to ``optimizer``.

    Parameters
    ----------
    saved
        ``optimizer.state_dict()`` of the optimiser that trained before.
    optimizer
        The optimiser about to continue.

    Returns
    -------
    bool
        True when the saved groups hold as many parameters as the optimiser's, group by group, and every saved
        per-parameter moment has the shape of the parameter it would be given to.
    """
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in saved.get("param_groups", []) for i in group["params"]]
    if [len(g["params"]) for g in saved.get("param_groups", [])] != [len(g["params"]) for g in optimizer.param_groups]:
        return False
    for index, parameter in zip(saved_ids, parameters):
        for value in saved.get("state", {}).get(index, {}).values():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != parameter.shape:
                return False
    return True


def fused_optimizer(optimizer_class: type[torch.optim.Optimizer], parameters, **settings) -> torch.optim.Optimizer:
    """``optimizer_class`` (``torch.optim.Adam`` or ``AdamW``) with torch's fused kernel where it runs, else foreach.

    Parameters
    ----------
    optimizer_class
        An optimizer class that takes ``fused`` and ``foreach``.
    parameters
        The parameters to optimise.
    **settings
        Passed on (``lr``, ``eps``, ``weight_decay``, ...).

    Returns
    -------
    torch.optim.Optimizer
        The optimizer. The fused kernel updates each parameter in one pass over its memory; foreach runs several
        whole-tensor operations in turn. On 2 CPU cores, RegularizedVI trained 1.26-1.28x as many cells per
        second at batch 128 with it (benchmarks/RESULTS.md, "Training throughput: what changed it").
    """
    parameters = list(parameters)
    try:
        return optimizer_class(parameters, fused=True, **settings)
    except RuntimeError:  # fused kernels exist for floating-point parameters on the CPU and CUDA only
        return optimizer_class(parameters, foreach=True, **settings)
