"""The route on a CUDA GPU: training, training from disk, faiss's GPU index, NDreamer and the model route.

Marked ``gpu`` and skipped where torch sees no CUDA device (CI and the CPU machine); on a GPU machine
``benchmarks/gpu_check.sh`` runs them (``pytest -m gpu``). The faiss GPU test also needs a faiss build
with GPU support. The CPU machine covers each device decision with mocks (tests/test_matching.py).
"""

import anndata
import numpy as np
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels import matching

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]
TINY = dict(n_hidden=32, n_latent=5)
FAST = dict(batch_size=256, progress_bar=False, lr=1e-2, kl_warmup_epochs=2)


@pytest.fixture(scope="module")
def cells():
    adata = ps.datasets.simulate(n_cells=1500, n_genes=200, seed=0)
    adata.X = adata.layers["counts"].copy()
    return adata


def test_regularizedvi_trains_on_cuda_host_and_device_counts(cells):
    for counts_on_device in (False, True):
        adata = cells.copy()
        ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
        model = ps.RegularizedVI(adata, seed=0, **TINY)
        model.train(max_epochs=20, device="auto", counts_on_device=counts_on_device, **FAST)
        assert model.device.type == "cuda"
        losses = model.history["train_loss"].to_numpy()
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
        latent = model.get_latent_representation()
        assert latent.shape == (1500, 5) and np.isfinite(latent).all()


def test_direct_elbo_on_cuda_equals_trace_elbo_and_is_taken(cells):
    """On CUDA the direct ELBO gives Trace_ELBO's loss and gradient, and training keeps it (first-call check passed)."""
    adata = cells.copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, seed=0, **TINY)
    model.train(max_epochs=2, device="cuda", counts_on_device=True, **FAST)
    loss_module = model.trainer.elbo_loss
    # the check at the first call restored the GPU's random generator (dropout, z, l draws) before comparing
    assert loss_module.direct
    batch = model.trainer.data.minibatch(np.arange(256))
    results = {}
    for form in ("trace_loss", "direct_loss"):
        for parameter in loss_module.parameters():
            parameter.grad = None
        torch.manual_seed(5)
        loss = getattr(loss_module, form)(batch, 1500, 0.5)
        loss.backward()
        results[form] = (loss.item(), [p.grad.clone() for p in loss_module.parameters()])
    assert results["direct_loss"][0] == pytest.approx(results["trace_loss"][0], rel=1e-5)
    for traced, direct in zip(results["trace_loss"][1], results["direct_loss"][1]):
        assert (direct - traced).abs().max().item() <= 1e-4 * max(traced.abs().max().item(), 1e-6)


def test_compiled_training_on_cuda_equals_the_eager_direct_loss(cells):
    """train(compile=True) on CUDA (triton kernels) learns, and its loss and gradients equal the eager direct form's."""
    adata = cells.copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, seed=0, **TINY)
    model.train(max_epochs=6, device="cuda", counts_on_device=True, compile=True, **FAST)
    loss_module = model.trainer.elbo_loss
    assert loss_module.direct and loss_module.compiled_loss is not None
    losses = model.history["train_loss"].to_numpy()
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    model.module.train()
    batch = model.trainer.data.minibatch(np.arange(0, 1500, 7))
    results = {}
    for name, call in (("eager", loss_module.direct_loss), ("compiled", loss_module.compiled_step_loss)):
        for parameter in loss_module.parameters():
            parameter.grad = None
        torch.manual_seed(5)
        loss = call(batch, 1500, 0.5)
        loss.backward()
        results[name] = (loss.item(), [p.grad.clone() for p in loss_module.parameters()])
    assert results["compiled"][0] == pytest.approx(results["eager"][0], rel=1e-5)
    for eager, compiled in zip(results["eager"][1], results["compiled"][1]):
        assert (compiled - eager).abs().max().item() <= 1e-3 * max(eager.abs().max().item(), 1e-6)


def test_training_from_disk_on_cuda(cells, tmp_path):
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    model = ps.RegularizedVI(backed, seed=0, **TINY)
    model.train(max_epochs=5, device="cuda", **FAST)
    assert np.isfinite(model.history["validation_loss"]).all()


@pytest.mark.skipif(not matching.faiss_gpu_available(), reason="the installed faiss has no GPU support")
def test_faiss_gpu_exact_search_agrees_with_the_cpu():
    rng = np.random.default_rng(0)
    base, query = rng.normal(size=(20_000, 16)).astype(np.float32), rng.normal(size=(5_000, 16)).astype(np.float32)
    gpu_distances, gpu_indices = matching.knn(query, base, k=5, device="cuda", method="exact")
    cpu_distances, cpu_indices = matching.knn(query, base, k=5, device="cpu", method="exact")
    assert np.mean(gpu_indices[:, 0] == cpu_indices[:, 0]) > 0.999
    np.testing.assert_allclose(gpu_distances, cpu_distances, rtol=1e-3, atol=1e-3)


def test_ndreamer_end_to_end_on_cuda(cells):
    adata = cells.copy()
    nd = ps.NDreamer(adata, "condition", "control", batch_key="batch", device="auto", num_hvg=150)
    nd.train(n_epochs=2, progress_bar=False)
    results = nd.estimate_ite()
    assert np.isfinite(results.layers["ite_stimulated"]).all()
    table = nd.estimate_cate("cell_type")
    assert np.isfinite(table["mean_ite"]).all()


def test_ndreamer_training_step_synchronises_once_on_cuda(cells):
    # tests/test_ndreamer_device_reads.py counts the operations on the CPU; here CUDA itself reports each
    # synchronising call of the dense operations (torch's sync debug mode warns on them). It does not cover
    # torch.sparse (its documentation says so): the NMI terms' sparse product is not checked here (docs/gpu.md)
    import warnings

    from pyro_scmodels.ndreamer.losses import total_loss

    nd = ps.NDreamer(cells.copy(), "condition", "control", batch_key="batch", device="cuda", num_hvg=150)
    nd.train(n_epochs=0.2, progress_bar=False)
    batch = nd.trainer.minibatch(next(iter(nd.trainer.minibatches(None, np.random.default_rng(0)))))
    nd.network.train()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            outputs = nd.network(batch["x"], batch["condition"], batch["batches"])
            loss, _ = total_loss(outputs, batch, nd.loss_weights)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, syncs  # the sparse code draw's count of candidates


def test_model_route_on_cuda_saves_and_loads(cells, tmp_path):
    adata = cells.copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", ambient_covariate_keys=["batch"],
                                   nn_conditioning_covariate_keys=["condition"], encoder_covariate_keys=["condition"])
    model = ps.RegularizedVI(adata, seed=0, latent_independence=10.0, **TINY)
    model.train(max_epochs=20, device="cuda", **FAST)
    nd = ps.NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cuda")
    nd.estimate_ite()
    results = nd.estimate_model_ite(num_samples=10)
    assert np.isfinite(results.layers["ite_model_stimulated"]).all()
    nd.save(str(tmp_path / "nd"))
    again = ps.NDreamer.load(str(tmp_path / "nd"), model=model)
    np.testing.assert_array_equal(again.results.layers["ite_stimulated"], results.layers["ite_stimulated"])


def test_select_rows_on_cuda_matches_the_cpu_values_and_gradients():
    # the gathered rows' backward pass is written out (distributions._SelectedRows): same numbers on the GPU
    from pyro_scmodels.distributions import select_rows

    torch.manual_seed(0)
    table = torch.randn(3, 50, dtype=torch.float64)
    index = torch.randint(0, 3, (40,))
    weights = torch.rand(2, 40, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        t, w = table.to(device).requires_grad_(), weights.to(device).requires_grad_()
        out = select_rows(t, index.to(device), w)
        grad_t, grad_w = torch.autograd.grad((out * out).sum(), (t, w))
        results.append([x.detach().cpu() for x in (out, grad_t, grad_w)])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu)
