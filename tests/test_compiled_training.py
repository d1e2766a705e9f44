"""Training with ``compile=True``: the loss through ``torch.compile`` is the direct loss, and a missing toolchain is named.

The compiled function must give the eager direct form's loss and gradients on the same minibatch and
random numbers (the direct form itself is checked against Pyro's ``Trace_ELBO`` in
``test_direct_elbo.py``). Compiling needs a C++ compiler on the CPU; where none works the tests that
compile are skipped, and the error a user gets is tested by forcing the probe's answer.
"""

import re

import numpy as np
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels import elbo

QUICK = dict(batch_size=64, device="cpu", progress_bar=False, early_stopping=False)


def _compile_works() -> bool:
    try:
        elbo.check_compile_works(torch.device("cpu"))
        return True
    except RuntimeError:
        return False


needs_compiler = pytest.mark.skipif(not _compile_works(), reason="torch.compile does not work here (no C++ compiler)")


def _adata(seed=3):
    adata = ps.datasets.simulate(n_cells=400, n_genes=60, n_markers_per_type=4, n_responding_genes=4, seed=seed)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return adata


@pytest.fixture(scope="module")
def compiled_model():
    torch.manual_seed(0)
    model = ps.RegularizedVI(_adata(), n_hidden=32, n_latent=4)
    model.train(max_epochs=6, compile=True, **QUICK)
    return model


def _loss_and_gradients(loss_module, call, batch, n_obs, kl_weight):
    parameters = list(loss_module.parameters())
    for parameter in parameters:
        parameter.grad = None
    torch.manual_seed(11)  # the same draws for both forms (the compiled one uses torch's generator too)
    loss = call(batch, n_obs, kl_weight)
    loss.backward()
    return loss.item(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in parameters]


@needs_compiler
def test_compiled_training_uses_the_compiled_loss_and_learns(compiled_model):
    history = compiled_model.history
    loss = compiled_model.trainer.elbo_loss
    assert loss.direct and loss.compiled_loss is not None
    assert np.isfinite(history["train_loss"]).all() and np.isfinite(history["validation_loss"]).all()
    assert history["train_loss"].iloc[-1] < 0.9 * history["train_loss"].iloc[0]
    # a further call without compile trains eagerly again
    compiled_model.train(max_epochs=1, **QUICK)
    assert loss.compiled_loss is None


@needs_compiler
@pytest.mark.parametrize("kl_weight", [0.3, 1.0])
def test_compiled_loss_and_gradients_equal_trace_elbo_and_the_eager_direct_form(compiled_model, kl_weight):
    trainer = compiled_model.trainer
    loss_module = trainer.elbo_loss
    loss_module.use_compiled(True)
    compiled_model.module.train()
    batch = trainer.data.minibatch(np.arange(0, 400, 7))  # 58 cells: a size no training step had
    n_obs = len(trainer.train_indices)
    traced, traced_grads = _loss_and_gradients(loss_module, loss_module.trace_loss, batch, n_obs, kl_weight)
    eager, eager_grads = _loss_and_gradients(loss_module, loss_module.direct_loss, batch, n_obs, kl_weight)
    compiled, compiled_grads = _loss_and_gradients(loss_module, loss_module.compiled_step_loss, batch, n_obs, kl_weight)
    # Pyro's Trace_ELBO defines the loss: the compiled form gives it, as the eager direct form does
    assert compiled == pytest.approx(eager, rel=1e-5) and compiled == pytest.approx(traced, rel=1e-5)
    for reference in (eager_grads, traced_grads):
        for a, b in zip(reference, compiled_grads):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5 * max(1.0, float(a.abs().max())))
    loss_module.use_compiled(False)


@pytest.mark.parametrize("device, needs", [("cpu", "C++ compiler"), ("cuda", "triton")])
def test_a_missing_toolchain_is_named_before_training(monkeypatch, device, needs):
    monkeypatch.setitem(elbo._COMPILE_PROBES, device, "InvalidCxxCompiler: No working C++ compiler found")
    with pytest.raises(RuntimeError, match=f"compile=True.*{re.escape(needs)}.*compile=False"):
        elbo.check_compile_works(torch.device(device))
    model = ps.RegularizedVI(_adata(), n_hidden=16, n_latent=3)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
            model.train(max_epochs=2, compile=True, **QUICK)
        assert not model.is_trained and model.trainer.step == 0


def test_the_probe_finds_a_compiler_that_does_not_exist(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(elbo, "_COMPILE_PROBES", {})
    torch._dynamo.reset()  # no function compiled before in this process may stand in
    # torch's own patch restores its config afterwards (pytest's monkeypatch deletes what a config module hides);
    # without the kernel cache, no kernel built before may stand in either
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):
        with pytest.raises(RuntimeError, match="does not work on cpu.*C\\+\\+ compiler"):
            elbo.check_compile_works(torch.device("cpu"))
    torch._dynamo.reset()  # the probe's failed compilation is not kept either


def test_compile_must_be_a_boolean():
    model = ps.RegularizedVI(_adata(), n_hidden=16, n_latent=3)
    with pytest.raises((TypeError, ValueError), match="compile"):
        model.train(max_epochs=1, compile="yes", **QUICK)


@needs_compiler
def test_a_compiled_run_resumed_from_its_checkpoint_repeats_the_uninterrupted_run(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several threads make fused reductions differ by rounding from run to run
    try:
        histories = []
        for name, stops in (("whole", (4,)), ("resumed", (2, 4))):
            checkpoint = str(tmp_path / name)
            for epochs in stops:  # a fresh model each call, as after a crash: the checkpoint carries the state
                model = ps.RegularizedVI(_adata(), n_hidden=32, n_latent=4)
                model.train(max_epochs=epochs, compile=True, checkpoint_dir=checkpoint, checkpoint_every=1, **QUICK)
            histories.append(model.history["train_loss"].to_numpy())
        assert len(histories[1]) == 4
        np.testing.assert_array_equal(histories[1], histories[0])
    finally:
        torch.set_num_threads(threads)
