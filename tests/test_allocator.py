"""Freed memory kept for reuse while a model trains: fewer page faults inside, memory handed back after, never over
the user's own malloc settings."""

import os
import subprocess
import sys

import pytest

from pyro_scmodels import _allocator

GLIBC = _allocator._glibc() is not None

# a 64 MB tensor written and freed, again and again; prints the page faults of the last one inside the block and
# after it, then the resident memory (MB) after the block against before it
PROBE = """
import resource, torch
from pyro_scmodels._allocator import reuse_freed_memory

def faults_of_a_fresh_tensor():
    for _ in range(3):  # allocated, written and freed: torch asks for 64-byte alignment, which a freed block of
        torch.ones(16, 1024, 1024)  # exactly the size lacks, so the heap grows until two freed blocks merge
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16, 1024, 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident_mb():
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() / 2**20

before = resident_mb()
with reuse_freed_memory():
    with reuse_freed_memory():  # a nested block leaves the setting to the outer one
        pass
    inside = faults_of_a_fresh_tensor()
after = resident_mb()
print(inside, faults_of_a_fresh_tensor(), round(after - before))
"""


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            return "[always]" in handle.read()
    except OSError:
        return False


def _probe(**environment) -> tuple[int, int, int]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in (_allocator.OPT_OUT, "THP_MEM_ALLOC_ENABLE")}
    env.pop("GLIBC_TUNABLES", None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env | environment, capture_output=True, text=True,
                          check=True)
    return tuple(int(v) for v in done.stdout.split())


@pytest.mark.skipif(not GLIBC or not os.path.exists("/proc/self/statm"), reason="glibc's malloc on Linux only")
@pytest.mark.skipif(_huge_pages_always(), reason="with huge pages always on, fresh memory faults once per 2 MB anyway")
def test_freed_memory_is_reused_inside_the_block_and_handed_back_after():
    inside, _, resident_growth = _probe()
    assert inside < 500  # 64 MB in 4 KB pages would be 16,384 faults: the freed tensor's pages were reused
    assert resident_growth < 40  # the 128 MB kept during the block went back to the kernel


@pytest.mark.skipif(not GLIBC or not os.path.exists("/proc/self/statm"), reason="glibc's malloc on Linux only")
@pytest.mark.parametrize("environment", [{_allocator.OPT_OUT: "0"}, {"MALLOC_MMAP_THRESHOLD_": "1048576"}])
def test_the_user_setting_or_opt_out_leaves_malloc_alone(environment):
    inside, outside, _ = _probe(**environment)
    if not _huge_pages_always():  # with huge pages always on, fresh memory faults once per 2 MB only
        assert inside > 8000 and outside > 8000  # glibc's default: a fresh mapping per large tensor


def test_reuse_is_wanted_only_without_the_users_malloc_settings(monkeypatch):
    for name in (_allocator.OPT_OUT, *_allocator.USER_TUNING):
        monkeypatch.delenv(name, raising=False)
    assert _allocator.reuse_wanted() == GLIBC
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    assert not _allocator.reuse_wanted()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(_allocator.OPT_OUT, "0")
    assert not _allocator.reuse_wanted()


def test_the_training_loop_trains_inside_the_block(monkeypatch):
    import contextlib

    import numpy as np
    import torch

    from pyro_scmodels import training

    entered = []

    @contextlib.contextmanager
    def recording():
        entered.append("in")
        yield
        entered.append("out")

    monkeypatch.setattr(training, "reuse_freed_memory", recording)

    class Line(training.TrainingLoop):
        def build_optimizer(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def minibatches(self, plan, rng):
            assert entered == ["in"]  # steps run inside the block
            yield torch.ones(4, 1)

        def minibatch_loss(self, item):
            loss = (self.modules["line"](item) - 1).pow(2).mean()
            return loss, {}

    loop = Line({"line": torch.nn.Linear(1, 1)})
    loop.fit(training.LoopPlan(max_epochs=2, progress_bar=False))
    assert entered == ["in", "out"] and np.isfinite(loop.history["train_loss"]).all()


# a 32 MB tensor freed raises glibc's adaptive mmap threshold; prints the page faults of a fresh 8 MB tensor after
# four more were written and freed, with or without map_large_blocks() first
THRESHOLD_PROBE = """
import resource, sys, torch
from pyro_scmodels._allocator import map_large_blocks
torch.ones(8, 1024, 1024)
if sys.argv[1] == "fix":
    map_large_blocks()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2, 1024, 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(4):
    faults()
print(faults())
"""


def _threshold_probe(mode: str, **environment) -> int:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in (_allocator.OPT_OUT, "THP_MEM_ALLOC_ENABLE")}
    env.pop("GLIBC_TUNABLES", None)
    done = subprocess.run([sys.executable, "-c", THRESHOLD_PROBE, mode], env=env | environment, capture_output=True,
                          text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
@pytest.mark.skipif(_huge_pages_always(), reason="with huge pages always on, fresh memory faults once per 2 MB anyway")
def test_map_large_blocks_gives_each_large_block_its_own_mapping_again():
    """Once glibc's threshold has risen, 8 MB blocks come from the heap (no fresh pages); after map_large_blocks each
    is mapped on its own (2,048 fresh 4 KB pages) and unmapped when freed, so a query's loop cannot grow the heap."""
    assert _threshold_probe("plain") < 500
    assert _threshold_probe("fix") > 1500
    assert _threshold_probe("fix", **{_allocator.OPT_OUT: "0"}) < 500  # the opt-out leaves malloc alone


def test_queries_of_many_cells_fix_the_threshold_first(monkeypatch):
    import pyro_scmodels as ps
    from pyro_scmodels.models import cell_batches

    adata = ps.datasets.simulate(n_cells=200, n_genes=150, seed=0)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, n_latent=4, n_hidden=16, seed=0)
    model.train(max_epochs=1, device="cpu", progress_bar=False)
    calls = []
    monkeypatch.setattr(cell_batches, "map_large_blocks", lambda: calls.append(1))
    model.get_latent_representation(indices=list(range(50)))
    assert calls == []  # a small query leaves malloc as it is
    monkeypatch.setattr(cell_batches, "MAPPED_QUERY_CELLS", 100)
    model.get_latent_representation()
    assert calls == [1]
