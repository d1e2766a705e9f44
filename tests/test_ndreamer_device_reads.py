"""NDreamer's training step on a GPU must not wait for the device more than it has to.

An operation whose output size or Python value depends on the data (``.item()``, ``bool()``, ``unique``, boolean
indexing, ``bincount``, ``nonzero``, a sparse ``coalesce``) is a device-to-host copy on a GPU: the host waits for
every queued kernel, and the GPU then idles while the host queues the next ones. Those operations are seen here on
the CPU, by the dispatcher, so CI catches a new one without a GPU.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyro_scmodels as ps
from pyro_scmodels.ndreamer import NDreamer
from pyro_scmodels.ndreamer.losses import total_loss

SMALL = dict(n_codebooks=4, codebook_size=64, embedding_dim=32, z_dim=16, encoder_hidden=(64, 32),
             decoder_hidden=(32, 64), batch_size=256, device="cpu")
# operations that read the device back to the host on CUDA
READ_BACK = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
             "bincount", "_coalesce", "coalesce", "masked_scatter", "is_nonzero", "equal"}


class ReadBacks(TorchDispatchMode):
    """Counts the operations of :data:`READ_BACK`, and indexing with a boolean mask (a hidden ``nonzero``)."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in {"index", "index_put", "index_put_"} and any(
                t is not None and t.dtype == torch.bool for t in args[1]):
            self.seen[f"{name} with a boolean mask"] += 1
        elif name == "repeat_interleave" and (kwargs or {}).get("output_size") is None and len(args) > 1:
            self.seen[name] += 1
        elif name in READ_BACK:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def trained():
    adata = ps.datasets.simulate(n_cells=600, n_genes=120, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer(adata, "condition", "control", batch_key="batch", layer="counts", **SMALL)
        nd.train(n_epochs=0.5, progress_bar=False)
    cells = next(iter(nd.trainer.minibatches(None, np.random.default_rng(0))))
    return nd, nd.trainer.minibatch(cells)


def test_a_training_step_reads_the_device_once(trained):
    nd, batch = trained
    nd.network.train()
    with ReadBacks() as seen:
        outputs = nd.network(batch["x"], batch["condition"], batch["batches"])
        loss, _ = total_loss(outputs, batch, nd.loss_weights)
        loss.backward()
    # the one read: how many codes the sparse relaxed draw takes (code_choice); the groups, blocks and label
    # columns came with the minibatch, built on the host
    assert dict(seen.seen) == {"_local_scalar_dense": 1}


def test_the_layout_built_on_the_host_gives_the_loss_built_in_place(trained):
    nd, batch = trained
    nd.network.train()
    torch.manual_seed(5)
    outputs = nd.network(batch["x"], batch["condition"], batch["batches"])
    with_layout = total_loss(outputs, batch, nd.loss_weights)
    torch.manual_seed(6)  # the triplet term draws its triplets: the same draws for both
    first = total_loss(outputs, batch, nd.loss_weights)
    torch.manual_seed(6)
    in_place = total_loss(outputs, {k: v for k, v in batch.items() if k != "layout"}, nd.loss_weights)
    assert with_layout[0].isfinite()
    for name in first[1]:
        assert torch.allclose(first[1][name], in_place[1][name], rtol=1e-6, atol=1e-7), name


def test_the_pairwise_terms_are_zero_with_nothing_to_compare():
    from pyro_scmodels.ndreamer.losses import group_blocks, neighbourhood_loss, triplet_loss

    embedding = torch.randn(6, 3, requires_grad=True)
    x = torch.randn(6, 5)
    labels = torch.zeros(6, dtype=torch.long)
    single = torch.arange(6)  # one cell per group: blocks of width 1, the early return
    pairs = torch.tensor([0, 0, 0, 1, 1, 1])
    terms = (
        triplet_loss(embedding, single, labels),
        neighbourhood_loss(x, embedding, single, labels, n_neighbours=3),
        # groups of three with one label: every anchor has positives and no negative, so no triplet is valid and the
        # masked mean divides by nothing
        triplet_loss(embedding, pairs, labels),
        # blocks of three whose cells are all in different groups: no cell has a same-group neighbour (masked mean)
        neighbourhood_loss(x, embedding, single, labels, n_neighbours=3, blocks=group_blocks(pairs)),
    )
    for value in terms:
        (grad,) = torch.autograd.grad(value, embedding, allow_unused=True)
        assert value.item() == 0.0 and (grad is None or not grad.any())
    # the same calls with something to compare are not zero (the test above would pass on a constant)
    assert triplet_loss(embedding, pairs, torch.tensor([0, 1, 0, 1, 0, 1]), margin=100.0).item() > 0
    assert neighbourhood_loss(x, embedding, pairs, labels, n_neighbours=2).item() > 0
