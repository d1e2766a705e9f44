"""Seeded draws that leave the caller's random state as it was.

Every seeded query (posterior summaries, predictive checks, evidence, training) forks torch's generators of the
device it draws on, and only those: forking without ``devices`` touches every visible GPU.
"""

from __future__ import annotations

import contextlib

import torch


def rng_devices(device) -> list:
    """The devices whose generators a fork must save: the CUDA device drawn on, or none on the CPU."""
    device = torch.device(device)
    return [device] if device.type == "cuda" else []


@contextlib.contextmanager
def seeded(seed: int | None, device):
    """Torch's generators seeded with ``seed`` inside, and restored after (nothing when ``seed`` is None).

    Parameters
    ----------
    seed
        The seed, or None to draw from the caller's stream.
    device
        The device the draws are made on.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(int(seed))
        yield


def seed_or_fresh(seed: int | None) -> int:
    """``seed``, or when None one drawn from torch's global CPU stream: a fresh draw per call that
    ``torch.manual_seed`` (or ``pyro.set_rng_seed``) makes repeatable, as scvi-tools' sampling queries are."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return seed
