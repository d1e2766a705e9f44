"""The KL warm-up across calls to train(): a trained model keeps its own warm-up when a call leaves the warm-up out
(prober r5: train(max_epochs=12, kl_warmup_epochs=10) then train(max_epochs=3) went from weight 1.0 to 0.030, the
default 400-epoch ramp applied to the running epoch count); a call that passes one gets it, counted from the model's
first epoch."""

import numpy as np
import pytest

import pyro_scmodels as ps

QUICK = dict(batch_size=64, device="cpu", progress_bar=False, early_stopping=False)


@pytest.fixture(scope="module")
def adata():
    data = ps.datasets.simulate(n_cells=120, n_genes=60, n_markers_per_type=4, seed=3)
    ps.RegularizedVI.setup_anndata(data, layer="counts")
    return data


def new_model(adata):
    return ps.RegularizedVI(adata, n_latent=2, n_hidden=8)


def weights(model, first=0):
    return model.history["kl_weight"].to_numpy()[first:]


def test_a_finished_warm_up_stays_at_weight_one_when_the_next_call_leaves_it_out(adata, tmp_path):
    model = new_model(adata)
    model.train(max_epochs=3, kl_warmup_epochs=2, **QUICK)
    model.train(max_epochs=2, **QUICK)
    np.testing.assert_allclose(weights(model, 2), [1.0, 1.0, 1.0])
    # saved and loaded: the warm-up is part of the training state
    model.save(str(tmp_path / "model"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "model"), adata)
    loaded.train(max_epochs=1, **QUICK)
    assert weights(loaded)[-1] == 1.0
    # a state saved before the warm-up was recorded: a KL weight of 1 before the call says the warm-up is over
    loaded.trainer.kl_warmup = None
    loaded.train(max_epochs=1, **QUICK)
    assert weights(loaded)[-1] == 1.0


def test_an_unfinished_warm_up_goes_on_and_a_new_model_warms_up_over_400_epochs(adata):
    model = new_model(adata)
    model.train(max_epochs=2, kl_warmup_epochs=4, **QUICK)
    model.train(max_epochs=3, **QUICK)
    np.testing.assert_allclose(weights(model, 1), [0.25, 0.5, 0.75, 1.0])
    default = new_model(adata)
    default.train(max_epochs=2, **QUICK)
    default.train(max_epochs=1, **QUICK)
    np.testing.assert_allclose(weights(default, 1), [1 / 400, 2 / 400])


@pytest.mark.parametrize("given", [dict(kl_warmup_epochs=10), dict(plan_kwargs={"n_epochs_kl_warmup": 10})])
def test_a_warm_up_passed_to_a_trained_model_counts_from_its_first_epoch(adata, given):
    model = new_model(adata)
    model.train(max_epochs=3, kl_warmup_epochs=2, **QUICK)
    model.train(max_epochs=2, **given, **QUICK)
    np.testing.assert_allclose(weights(model, 3), [0.3, 0.4])
    # 400 passed is asked for, not the default
    model.train(max_epochs=1, kl_warmup_epochs=400, **QUICK)
    np.testing.assert_allclose(weights(model, 5), [5 / 400])
