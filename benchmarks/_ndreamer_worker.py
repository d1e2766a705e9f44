"""The measured process of ``bench_ndreamer.py``: the two codebook layers and the training step.

``bench_ndreamer.py`` re-invokes itself with hidden ``--_worker`` arguments for every row (and
once for the agreement check); that process calls :func:`run_worker`.
"""

from __future__ import annotations

import json
import time

from _common import status_mib

K, C, D = 32, 1024, 8  # SPEC defaults: codebooks, codes per codebook, code dimension
TRAIN_GENES = 2000
N_CONDITIONS, N_BATCHES, N_LOW, N_HIGH = 2, 2, 5, 12
SEED = 0
IMPLEMENTATIONS = ("ours", "naive")


# ------------------------------------------------------------------------------------------
# the two codebook layers
# ------------------------------------------------------------------------------------------
def naive_codebook_logits(projections, codebooks):
    """Reference: per codebook the ``N x C x d`` difference tensor, squared and summed.

    Parameters
    ----------
    projections
        ``(K, N, d)``.
    codebooks
        ``(K, C, d)``.

    Returns
    -------
    torch.Tensor
        ``(K, N, C)`` negative squared distances.
    """
    import torch

    return torch.stack(
        [-((p[:, None, :] - e[None, :, :]) ** 2).sum(-1) for p, e in zip(projections, codebooks)]
    )


def layer_function(impl: str):
    """The logits function called ``impl`` (``"ours"`` or ``"naive"``; the two differ by a constant per cell)."""
    from pyro_scmodels.ndreamer.code_choice import code_scores

    return code_scores if impl == "ours" else naive_codebook_logits


def layer_inputs(n_cells: int, seed: int = SEED):
    """Projections ``(K, N, d)``, codebooks ``(K, C, d)`` (both requiring grad) and head weights ``(C,)``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    projections = torch.randn(K, n_cells, D, generator=generator).requires_grad_()
    # codebooks as the network initialises them (standard normal)
    codebooks = torch.randn(K, C, D, generator=generator).requires_grad_()
    head = torch.randn(C, generator=generator)
    return projections, codebooks, head


def layer_step(logits_fn, projections, codebooks, head) -> None:
    """One forward + backward: logits, softmax over codes, a fixed weighted sum, backward."""
    projections.grad = None
    codebooks.grad = None
    # a plain sum of a softmax is constant (zero gradient); fixed weights per code make it not
    loss = (logits_fn(projections, codebooks).softmax(-1) * head).sum()
    loss.backward()


# ------------------------------------------------------------------------------------------
# the full training step
# ------------------------------------------------------------------------------------------
def training_setup(impl: str, n_cells: int, n_genes: int = TRAIN_GENES, seed: int = SEED):
    """Network (SPEC defaults), optimiser and one minibatch; patches the naive layer in for ``"naive"``.

    Returns
    -------
    tuple
        ``(step, network)`` where ``step()`` runs one training step as ``NDreamer.train`` does.
    """
    import torch

    from pyro_scmodels.ndreamer import network as network_module
    from pyro_scmodels.ndreamer.losses import total_loss
    from pyro_scmodels.ndreamer.network import NDreamerNetwork

    if impl == "naive":
        # NDreamerNetwork.quantise looks the function up in its module at call time
        network_module.code_scores = naive_codebook_logits
    torch.manual_seed(seed)
    network = NDreamerNetwork(n_genes, N_CONDITIONS, batch_sizes=(N_BATCHES,))
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)

    generator = torch.Generator().manual_seed(seed)
    rate = torch.distributions.Gamma(0.5, 0.5).sample((1, n_genes)).expand(n_cells, n_genes)
    counts = torch.poisson(rate, generator=generator)
    # balanced groups (condition x batch), as the pipeline draws them
    condition = torch.arange(n_cells) % N_CONDITIONS
    batches = ((torch.arange(n_cells) // N_CONDITIONS) % N_BATCHES).unsqueeze(1)
    batch = {
        "x": torch.log1p(counts),
        "condition": condition,
        "batches": batches,
        "label_low": torch.randint(N_LOW, (n_cells,), generator=generator),
        "label_high": torch.randint(N_HIGH, (n_cells,), generator=generator),
        "n_conditions": N_CONDITIONS,
    }

    steps = [0]

    def step() -> None:
        outputs = network(batch["x"], batch["condition"], batch["batches"])
        loss, _ = total_loss(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 10.0)
        optimizer.step()
        steps[0] += 1
        if steps[0] % 30 == 0:  # NDreamer.train's dead-code schedule at batch size 1024 on large data
            network.reinitialise_dead_codes(outputs["projections"].detach())
        loss.item()

    return step, network


# ------------------------------------------------------------------------------------------
# the measured process
# ------------------------------------------------------------------------------------------
def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _check_agreement(n_cells: int) -> dict:
    """Largest differences (and scales) of both layers' logits and gradients on the same inputs."""
    import torch

    projections, codebooks, head = layer_inputs(n_cells)
    values = {}
    for name in IMPLEMENTATIONS:
        layer_step(layer_function(name), projections, codebooks, head)
        with torch.no_grad():
            logits = layer_function(name)(projections, codebooks)
        values[name] = (logits, projections.grad.clone(), codebooks.grad.clone())
    # the logits of a cell are compared up to a constant per row (the code choice's softmax does not see it: the
    # fast layer leaves out each cell's |p|^2, the same for every code)
    centred = {name: (logits - logits.max(-1, keepdim=True).values, *grads) for name, (logits, *grads) in values.items()}
    diffs = [(a - b).abs().max().item() for a, b in zip(centred["ours"], centred["naive"])]
    scales = [b.abs().max().item() for b in values["naive"]]
    return dict(
        logits_max_abs_diff=diffs[0], logits_max_abs=scales[0],
        grad_projections_max_abs_diff=diffs[1], grad_projections_max_abs=scales[1],
        grad_codebooks_max_abs_diff=diffs[2], grad_codebooks_max_abs=scales[2],
    )


def _time_steps(step, timing: dict) -> dict:
    """Reset the peak-RSS mark, run the warm-up and then the timed steps; speed and peak memory."""
    result = {"peak_reset": _reset_peak()}
    rss_before = status_mib("VmRSS") if result["peak_reset"] else status_mib("VmHWM")
    for _ in range(timing["warmup"]):
        step()
    steps, start = 0, time.perf_counter()
    while steps < timing["min_steps"] or time.perf_counter() - start < timing["seconds"]:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    peak = status_mib("VmHWM")
    result.update(
        steps=steps, seconds=elapsed, steps_per_s=steps / elapsed,
        rss_before_mib=rss_before, rss_peak_mib=peak,
        peak_extra_mib=None if peak is None or rss_before is None else peak - rss_before,
    )
    return result


def run_worker(
    part: str, impl: str, n_cells: int, timing: dict, threads: int | None, result_path: str
) -> None:
    """One measurement (``part`` = ``"layer"``, ``"train"`` or ``"check"``); writes a JSON result."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    result = {"part": part, "impl": impl, "cells": n_cells, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if part == "check":
        result.update(_check_agreement(n_cells))
    else:
        if part == "layer":
            projections, codebooks, head = layer_inputs(n_cells)
            logits_fn = layer_function(impl)
            step = lambda: layer_step(logits_fn, projections, codebooks, head)  # noqa: E731
        else:
            step, _ = training_setup(impl, n_cells)
        # the inputs (and network) exist before the peak-RSS mark is reset
        result.update(_time_steps(step, timing))
    with open(result_path, "w") as handle:
        json.dump(result, handle)
