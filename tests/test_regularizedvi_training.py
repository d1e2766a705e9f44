"""RegularizedVI mechanics: plate scaling, seeds, save/load, checkpoints, NaN detection, data access, and training
with Pyro's and torch's own tools."""

import anndata
import warnings

import numpy as np
import pyro
import pytest
import scipy.sparse as sp
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

import pyro_scmodels as ps
from pyro_scmodels.data import CountMatrix
from pyro_scmodels.infer import NonFiniteError

from . import _regularizedvi_small
from ._regularizedvi_small import QUICK, SMALL

# the shared fixture of tests/_regularizedvi_small.py, bound here for pytest to find
small = _regularizedvi_small.small


def _elbo(model, batch, n_obs):
    with pyro.settings.context(validate_distributions_pyro=False):
        return Trace_ELBO().differentiable_loss(model.module.model, model.module.guide, batch, n_obs).item()


def test_global_sites_count_once_and_cells_scale_with_minibatch(small):
    """Inside the cell plate a site's log-probability is scaled by N/B; outside it, by 1 (model and guide)."""
    model = ps.RegularizedVI(small, **SMALL)
    data = model._cell_data()
    batch = data.minibatch(np.arange(20))
    guide_trace = poutine.trace(model.module.guide).get_trace(batch, data.n_cells)
    model_trace = poutine.trace(poutine.replay(model.module.model, trace=guide_trace)).get_trace(batch, data.n_cells)
    for trace, local_sites in ((model_trace, ("z", "library", "obs")), (guide_trace, ("z", "library"))):
        scales = {name: float(site["scale"]) for name, site in trace.nodes.items() if site["type"] == "sample"}
        for site in ("dispersion_rate", "inverse_sqrt_theta", "ambient", "feature_scaling", "library_residual_weight"):
            assert scales[site] == 1.0, site
        for site in local_sites:
            assert scales[site] == pytest.approx(200 / 20), site


def test_validation_loss_weights_the_global_terms_as_the_training_loss_does(small):
    """Per validation cell, the global sites' prior terms count 1 / n_train, as in the training loss: with 1 / n_val
    the validation curve sat above the training curve for no reason of fit."""
    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=2, train_size=0.8, **QUICK)
    trainer = model.trainer
    n_train, validation = len(trainer.train_indices), trainer.validation_indices
    batch = trainer.data.minibatch(validation)
    losses = {}
    for name, n_obs in (("as training", n_train), ("as its own set", len(validation))):
        torch.manual_seed(0)
        losses[name] = trainer.loss(batch, n_obs, 1.0).item()
    torch.manual_seed(0)
    assert trainer._validation_loss(batch_size=len(validation)) == pytest.approx(losses["as training"], rel=1e-5)
    assert losses["as its own set"] - losses["as training"] > 1.0  # the offset the old weighting added, per cell


@pytest.mark.parametrize("n_global", [21, 1])
def test_data_parallel_shards_scale_cells_by_n_over_the_global_minibatch(small, n_global):
    """On W ranks, rank r's shard B_r of a global minibatch B: globals count once, cells W N / |B|
    (N / |B_r| from the plate times the LocalScale factor), so the mean of the ranks' log-joints,
    which DDP's gradient averaging differentiates, is the one-process log-joint of B. A rank left
    without cells (|B| = 1 < W) adds nothing local."""
    from pyro_scmodels.distributed import LocalScale, shard

    model = ps.RegularizedVI(small, **SMALL)
    model.module.eval()
    data = model._cell_data()
    n, world, everything = data.n_cells, 2, data.minibatch(np.arange(data.n_cells))
    with torch.no_grad():
        sample = poutine.trace(model.module.guide).get_trace(everything, n)
    latent = {name: site["value"] for name, site in sample.nodes.items() if site["type"] == "sample" and name not in ("cells", "genes")}

    def trace_of(cells, factor):
        values = {k: (v[torch.as_tensor(cells)] if k in ("z", "library") else v) for k, v in latent.items()}
        with torch.no_grad(), LocalScale(factor):
            return poutine.trace(poutine.condition(model.module.model, data=values)).get_trace(data.minibatch(cells), n)

    global_batch = np.random.default_rng(1).choice(n, n_global, replace=False)
    per_rank = []
    for rank in range(world):
        cells, factor = shard(global_batch, rank, world)
        trace = trace_of(cells, factor)
        scales = {name: float(site["scale"]) for name, site in trace.nodes.items() if site["type"] == "sample"}
        for site in ("dispersion_rate", "inverse_sqrt_theta", "ambient", "feature_scaling"):
            assert scales[site] == 1.0, site
        expected = world * n / n_global if factor else 0.0
        for site in ("z", "library", "obs"):
            assert scales[site] == pytest.approx(expected), (rank, site)
        per_rank.append(trace.log_prob_sum().item())
    assert np.mean(per_rank) == pytest.approx(trace_of(global_batch, 1.0).log_prob_sum().item(), rel=1e-6)


def test_expected_log_joint_does_not_depend_on_minibatch_size(small):
    """With every latent fixed, averaging the minibatch log-joint over a partition of the cells
    gives exactly the full-data log-joint: globals count once, cells N/B times."""
    model = ps.RegularizedVI(small, **SMALL)
    model.module.eval()
    data = model._cell_data()
    n = data.n_cells
    everything = data.minibatch(np.arange(n))
    with torch.no_grad():
        sample = poutine.trace(model.module.guide).get_trace(everything, n)
    latent = {name: site["value"] for name, site in sample.nodes.items() if site["type"] == "sample" and name not in ("cells", "genes")}

    def log_joint(cells):
        values = {k: (v[torch.as_tensor(cells)] if k in ("z", "library") else v) for k, v in latent.items()}
        conditioned = poutine.condition(model.module.model, data=values)
        with torch.no_grad():
            return poutine.trace(conditioned).get_trace(data.minibatch(cells), n).log_prob_sum().item()

    full = log_joint(np.arange(n))
    partition = np.array_split(np.random.default_rng(0).permutation(n), 10)
    averaged = np.mean([log_joint(np.sort(cells)) for cells in partition])
    assert averaged == pytest.approx(full, rel=1e-5)
    # the check has the power to see global terms counted once per minibatch
    model_trace = poutine.trace(poutine.condition(model.module.model, data=latent)).get_trace(everything, n)
    model_trace.compute_log_prob()
    global_log_prob = sum(
        site["log_prob_sum"].item() for name, site in model_trace.nodes.items()
        if name in ("dispersion_rate", "inverse_sqrt_theta", "feature_scaling", "library_residual_weight")
    )
    assert abs(global_log_prob) * (n / 20 - 1) > 100 * 1e-5 * abs(full)  # 100x the tolerance


def test_same_seed_same_result_and_different_seed_differs(small):
    results = []
    for seed in (0, 0, 1):
        model = ps.RegularizedVI(small, seed=seed, **SMALL)
        model.train(max_epochs=3, seed=seed, **QUICK)
        results.append((model.get_latent_representation(), model.history["train_loss"].to_numpy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert not np.allclose(results[0][0], results[2][0])


def test_save_load_round_trip_gives_identical_outputs(fitted, tmp_path):
    fitted.save(str(tmp_path / "model"))
    adata = fitted.adata.copy()
    loaded = ps.RegularizedVI.load(str(tmp_path / "model"), adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), fitted.get_latent_representation())
    np.testing.assert_array_equal(loaded.get_ambient_profile().to_numpy(), fitted.get_ambient_profile().to_numpy())
    np.testing.assert_array_equal(loaded.get_dispersion().to_numpy(), fitted.get_dispersion().to_numpy())
    assert loaded.history.equals(fitted.history)
    # a fresh AnnData without setup is set up from what was saved
    bare = anndata.AnnData(X=fitted.adata.layers["counts"].copy(), obs=fitted.adata.obs[["batch"]].copy(), var=fitted.adata.var[[]].copy())
    bare.layers["counts"] = bare.X.copy()
    again = ps.RegularizedVI.load(str(tmp_path / "model"), bare)
    np.testing.assert_allclose(again.get_latent_representation(), fitted.get_latent_representation(), rtol=1e-5, atol=1e-6)


def test_new_anndata_gives_same_latent_for_same_cells(fitted):
    subset = fitted.adata[100:300].copy()
    np.testing.assert_allclose(
        fitted.get_latent_representation(adata=subset), fitted.get_latent_representation(indices=np.arange(100, 300)),
        rtol=1e-5, atol=1e-6,
    )


def test_second_train_call_continues(small):
    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=2, **QUICK)
    # scvi-tools semantics: max_epochs counts the epochs of this call
    model.train(max_epochs=3, lr=5e-3, **QUICK)
    assert len(model.history) == 5 and list(model.history.index) == [0, 1, 2, 3, 4]
    assert model.trainer.optimizer.param_groups[0]["lr"] == 5e-3


def test_adam_runs_torchs_fused_kernel_and_falls_back_to_foreach(small):
    from pyro_scmodels.optimizers import fused_optimizer

    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=1, **QUICK)
    assert model.trainer.optimizer.defaults["fused"] is True  # one pass over each parameter per step

    class NoFusedKernel(torch.optim.Adam):  # as on a device without torch's fused Adam
        def __init__(self, params, fused=None, **settings):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
            super().__init__(params, **settings)

    optimizer = fused_optimizer(NoFusedKernel, [torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]


def test_global_sites_learn_at_global_lr_factor_times_lr_and_keep_their_moments(small, tmp_path):
    from pyro_scmodels.pyro_modules import PositiveSiteGuide

    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=2, **QUICK)
    assert len(model.trainer.optimizer.param_groups) == 1  # the default: every parameter at lr
    some = next(p for p in model.module.guide.parameters())
    before = model.trainer.optimizer.state[some]["exp_avg"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the moments move with the parameters: no "fresh moments" warning
        model.train(max_epochs=1, global_lr_factor=10.0, lr=2e-3, **QUICK)
    rest, chosen = model.trainer.optimizer.param_groups
    globals_ = {id(p) for m in model.module.guide.modules() if isinstance(m, PositiveSiteGuide) for p in m.parameters()}
    assert {id(p) for p in chosen["params"]} == globals_ and len(globals_) >= 3  # ambient, scaling, dispersion
    assert not globals_ & {id(p) for p in rest["params"]}
    assert chosen["lr"] == pytest.approx(2e-2) and rest["lr"] == pytest.approx(2e-3)
    # the step taken at the new settings started from the moments of the first call
    assert not torch.equal(model.trainer.optimizer.state[some]["exp_avg"], before)
    assert model.trainer.optimizer.state[some]["step"].item() == model.trainer.step
    # saved and loaded with its two groups and their moments
    model.save(str(tmp_path / "model"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = ps.RegularizedVI.load(str(tmp_path / "model"), small.copy())
        loaded.train(max_epochs=1, global_lr_factor=10.0, lr=2e-3, **QUICK)
    assert [g["lr"] for g in loaded.trainer.optimizer.param_groups] == pytest.approx([2e-3, 2e-2])
    with pytest.raises(ValueError, match="global_lr_factor"):
        model.train(max_epochs=1, global_lr_factor=0.0, **QUICK)


def test_nan_is_detected_and_named(small):
    model = ps.RegularizedVI(small, **SMALL)
    with torch.no_grad():
        model.module.model.decoder.output.bias[3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.decoder\.output\.bias \(value\)"):
        model.train(max_epochs=2, **QUICK)


def test_a_nan_loss_stops_before_any_parameter_moves(small):
    # the loop checks the loss after backward (one host copy per step): the optimiser step must not run
    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=1, **QUICK)
    with torch.no_grad():
        model.module.model.decoder.output.bias[3] = float("nan")
    before = {name: p.detach().clone() for name, p in model.trainer.named_parameters()}
    step = model.trainer.step
    with pytest.raises(NonFiniteError, match="the loss is NaN or Inf"):
        model.train(max_epochs=1, **QUICK)
    assert model.trainer.step == step
    for name, p in model.trainer.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], equal_nan=True, rtol=0, atol=0, msg=name)


def test_pyro_checks_the_model_and_guide_on_the_first_loss_only(small, monkeypatch):
    # site matching, shapes and a NaN warning per site: once, not on every step (each waits for a GPU)
    import pyro.poutine.trace_struct as trace_struct

    calls = []
    real = trace_struct.warn_if_nan
    monkeypatch.setattr(trace_struct, "warn_if_nan", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=1, **QUICK)
    checked = len(calls)
    assert checked > 0  # the first pass was checked
    model.train(max_epochs=2, **QUICK)
    assert len(calls) == checked and model.trainer.step > 2
    # validation switched off by the user stays off, on the first call too
    calls.clear()
    was_on = pyro.poutine.util.is_validation_enabled()
    pyro.enable_validation(False)
    try:
        ps.RegularizedVI(small, **SMALL).train(max_epochs=1, **QUICK)
    finally:
        pyro.enable_validation(was_on)
    assert calls == []


def test_counts_stay_sparse_and_only_minibatch_rows_are_densified(small):
    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=1, **QUICK)
    assert sp.issparse(small.layers["counts"])
    data = model._cell_data()
    assert sp.issparse(data.counts.matrix)
    rows = np.array([5, 1, 150, 7])
    batch = data.minibatch(rows)
    assert batch["x"].shape == (4, 40)
    np.testing.assert_array_equal(batch["x"].numpy(), small.layers["counts"][rows].toarray())


def test_device_held_counts_match_host_rows(small):
    counts = CountMatrix(small.layers["counts"])
    on_device = counts.to_torch_csr(torch.device("cpu"))
    rows = np.array([3, 199, 0, 3, 42])
    np.testing.assert_array_equal(on_device.rows(torch.as_tensor(rows)).numpy(), counts.rows(rows))
    host = ps.RegularizedVI(small, **SMALL)
    host.train(max_epochs=2, **QUICK)
    device = ps.RegularizedVI(small, **SMALL)
    device.train(max_epochs=2, counts_on_device=True, **QUICK)
    np.testing.assert_allclose(host.get_latent_representation(), device.get_latent_representation(), rtol=1e-5, atol=1e-6)


def test_backed_anndata_reads_rows_from_disk(small, tmp_path):
    path = tmp_path / "small.h5ad"
    small.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    assert not sp.issparse(backed.X)  # an on-disk dataset, read by rows through h5py
    counts = CountMatrix(backed.X)
    rows = np.array([10, 2, 150])
    np.testing.assert_array_equal(counts.rows(rows), small.layers["counts"][rows].toarray())
    np.testing.assert_allclose(counts.totals(), np.asarray(small.layers["counts"].sum(1)).ravel())


def test_pyro_vectorised_particles_are_refused_by_name(small):
    # the global sites' particle dimension lined up with the cells' plate: the ELBO came out about num_particles times
    # too large, without an error, and Predictive(parallel=True) failed in a reshape
    model = ps.RegularizedVI(small, **SMALL)
    batch, n_obs = next(model._batches(indices=np.arange(64)))
    one = Trace_ELBO(num_particles=3).loss(model.module.model, model.module.guide, batch, n_obs)  # sequential: fine
    assert np.isfinite(one)
    with pytest.raises(NotImplementedError, match="ran inside the plate\\(s\\) \\['num_particles_vectorized'\\]"):
        Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2).loss(model.module.model,
                                                                                        model.module.guide, batch, n_obs)
    predictive = pyro.infer.Predictive(poutine.uncondition(model.module.model), guide=model.module.guide, num_samples=4,
                                       parallel=True)
    with pytest.raises(NotImplementedError, match="Predictive\\(..., parallel=False\\)"):
        predictive(batch, n_obs)


def test_the_documented_own_loop_with_a_torch_optimiser_trains(small):
    # docs/posterior_queries.md, "Training with your own loop": pyro.infer.SVI needs Pyro's param store, which the modules do
    # not use; the module-based Trace_ELBO with a torch optimiser is the route, and it must lower the loss
    model = ps.RegularizedVI(small, **SMALL)
    loss_fn = Trace_ELBO()(model.module.model, model.module.guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    model.module.train()
    torch.manual_seed(0)
    losses = []
    for epoch in range(10):
        order = np.random.default_rng(epoch).permutation(model.adata.n_obs)
        for _, (batch, n_obs) in model.minibatches(indices=order, batch_size=128):
            optimizer.zero_grad()
            loss = loss_fn(batch, n_obs)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    model.module.eval()
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    model.is_trained = True  # as the doc's loop ends: the queries no longer say the parameters are the initial ones
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.get_latent_representation()


def test_a_float64_default_dtype_is_named_before_the_model_is_built(small):
    # the networks were built in float64 and the first step failed in the encoder: "mat1 and mat2 must have the same
    # dtype"
    model = ps.RegularizedVI(small, **SMALL)
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(RuntimeError, match="default dtype is torch.float64.*torch.set_default_dtype\\(torch.float32\\)"):
            ps.RegularizedVI(small, **SMALL)
        with pytest.raises(RuntimeError, match="default dtype is torch.float64"):
            model.train(max_epochs=1, progress_bar=False)
    finally:
        torch.set_default_dtype(torch.float32)


def test_early_stopping_without_validation_cells_is_said_not_silent(small, caplog):
    # train_size=1.0 leaves no validation cell: early stopping had nothing to watch and stopped on the training loss
    model = ps.RegularizedVI(small, **SMALL)
    stop = dict(early_stopping_patience=2, early_stopping_min_delta=1e6)  # a run that stops early stops at epoch 3
    with pytest.raises(ValueError, match=r"early_stopping=True .*no validation cells \(train_size=1\.0\).*"
                                         r"train_size below 1.*early_stopping=False"):
        model.train(max_epochs=6, train_size=1.0, early_stopping=True, **stop, **QUICK)
    assert model.trainer is None  # refused before the split was made (a later call would have kept it)
    with caplog.at_level("WARNING", logger="pyro_scmodels"):
        history = model.train(max_epochs=6, train_size=1.0, **stop, **QUICK)  # left at its default: off, and said
    assert len(history) == 6 and len(model.validation_indices) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "No validation cells (train_size=1.0): early stopping is off, and every epoch is trained."]
    caplog.clear()
    with caplog.at_level("WARNING", logger="pyro_scmodels"):
        other = ps.RegularizedVI(small, **SMALL)
        assert len(other.train(max_epochs=6, **stop, **QUICK)) == 3  # with validation cells the default stops early
    assert not caplog.records
    # the loop's own plan follows the same rule
    trainer = ps.infer.SVITrainer(other.module.model, other.module.guide, other._cell_data(), np.arange(200), [])
    with pytest.raises(ValueError, match="early_stopping=True"):
        trainer.fit(ps.infer.TrainingPlan(max_epochs=1, early_stopping=True, progress_bar=False))


def test_a_model_saved_with_a_seed_above_2_32_still_loads(small, tmp_path):
    # seeds up to 2**64 - 1 were taken before seeds got one range: the saved settings hold one, and load rebuilds from them
    model = ps.RegularizedVI(small, **SMALL)
    model._init_params["seed"] = 2**40  # what such a save recorded (the constructor refuses it now)
    model.save(str(tmp_path / "saved"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "saved"), small)
    assert loaded.init_params["seed"] == 2**40
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32 - 1\]"):
        ps.RegularizedVI(small, seed=2**40, **SMALL)  # a new model is held to the range


def test_a_resumed_run_decides_early_stopping_on_the_checkpoints_split(small, tmp_path):
    # the checkpoint's split is kept on resume: its validation cells, not this call's train_size, decide the default
    stop = dict(early_stopping_patience=2, early_stopping_min_delta=1e6, checkpoint_dir=str(tmp_path / "run"))
    first = ps.RegularizedVI(small, **SMALL)
    assert len(first.train(max_epochs=3, train_size=1.0, **stop, **QUICK)) == 3  # no validation cells: off
    resumed = ps.RegularizedVI(small, **SMALL)
    history = resumed.train(max_epochs=8, **stop, **QUICK)  # train_size left out: the checkpoint's split is kept
    assert len(resumed.validation_indices) == 0
    assert len(history) == 8  # off, as in the run it continues (it stopped at epoch 6 on the training loss)
    with pytest.raises(ValueError, match="early_stopping=True stops on the validation loss"):
        ps.RegularizedVI(small, **SMALL).train(max_epochs=8, early_stopping=True, **stop, **QUICK)
