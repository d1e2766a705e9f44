"""The scvi-tools API on RegularizedVI: setup and its printed summary, history keys, train arguments, setup and
model arguments scvi-tools has, devices, and save/load with the data."""

import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels.infer import resolve_device
from pyro_scmodels.models._base import PyroModelBase
from pyro_scmodels.models.history import TrainingHistory

from . import _scvi_api
from ._scvi_api import FIT, SMALL, simulate_small

# the shared fixtures of tests/_scvi_api.py, bound here for pytest to find
model = _scvi_api.model
untrained = _scvi_api.untrained


# --- setup ----------------------------------------------------------------------------------
def test_batch_key_combines_with_conditioning_and_scaling_defaults_to_it(model):
    keys = model.keys
    assert keys.ambient == ["batch"] and keys.dispersion == "batch" and keys.library_size == "batch"
    assert keys.nn_conditioning == ["condition"] and keys.feature_scaling == ["condition"]
    assert model.get_feature_scaling().columns.tolist() == ["control", "stimulated"]
    adata = simulate_small()
    ps.RegularizedVI.setup_anndata(adata, batch_key="batch", nn_conditioning_covariate_keys=["condition"],
                                   feature_scaling_covariate_keys=[])
    assert ps.RegularizedVI(adata, **SMALL).keys.feature_scaling == []


def test_view_anndata_setup_and_printed_summary(model, untrained, capsys):
    model.view_anndata_setup()
    shown = capsys.readouterr().out
    assert "300 cells" in shown and "50 genes" in shown and "adata.layers['counts']" in shown
    assert "nn_conditioning_covariate_keys: 'condition' -> 2 categories (control, stimulated)" in shown
    assert "library_size_key: 'batch' -> 3 categories (batch_0, batch_1, batch_2)" in shown
    assert "encoder_covariate_keys: none" in shown
    summary = repr(model)
    assert summary.startswith("RegularizedVI(n_latent=4, n_hidden=32") and str(model) == summary
    assert "decoder-conditioning: condition" in summary and "trained for 6 epochs" in summary
    assert "not trained" in repr(untrained)
    # the model's own setup, not the object's record: a later setup_anndata on the same AnnData printed its keys
    adata = untrained.adata
    adata.obs["run"] = adata.obs["batch"]
    ps.RegularizedVI.setup_anndata(adata, layer="counts", ambient_covariate_keys=["run"])
    untrained.view_anndata_setup()
    shown = capsys.readouterr().out
    assert "ambient_covariate_keys: 'batch' -> 3 categories" in shown and "'run'" not in shown
    untrained.view_anndata_setup(adata)  # given the data, their own record
    assert "ambient_covariate_keys: 'run' -> 3 categories" in capsys.readouterr().out


# --- history and train ------------------------------------------------------------------------
def test_history_answers_scvi_keys_and_stays_a_dataframe(model):
    history = model.history
    assert isinstance(history, TrainingHistory) and isinstance(history, pd.DataFrame) and len(history) == 6
    elbo = history["elbo_train"]
    assert list(elbo.columns) == ["elbo_train"] and elbo.index.name == "epoch" and list(elbo.index) == list(range(6))
    np.testing.assert_array_equal(elbo["elbo_train"].to_numpy(), history["train_loss"].to_numpy())
    # validated every second epoch: scvi-tools lists only those
    assert list(history["elbo_validation"].index) == [1, 3, 5]
    assert np.isfinite(history["elbo_validation"].to_numpy()).all()
    assert history["validation_loss"].isna().sum() == 3  # a column: NaN where not validated
    assert isinstance(history["train_loss"], pd.Series) and "elbo_validation" in history
    assert history.get("kl_local_train") is None
    with pytest.raises(KeyError, match="reconstruction/KL terms"):
        history["reconstruction_loss_train"]


def test_max_epochs_counts_this_call(untrained):
    untrained.train(max_epochs=2, **FIT)
    history = untrained.train(max_epochs=1, **FIT)
    assert list(history.index) == [0, 1, 2]


@pytest.mark.parametrize("arguments, message", [
    (dict(devices=2), "distributed"),
    (dict(devices=[0, 1]), "distributed"),
    (dict(accelerator="tpu"), "accelerator must be 'auto', 'cpu', 'gpu' or 'cuda'"),
    (dict(accelerator="cpu", device="cuda"), "Pass either device"),
    (dict(plan_kwargs={"reduce_lr_on_plateau": True}), "plan_kwargs key 'reduce_lr_on_plateau' is not supported"),
    (dict(plan_kwargs={"lr": 1e-2}, lr=5e-3), "contradict"),
    (dict(plan_kwargs={"optimizer": "AdamW"}), "must be 'Adam'"),
    (dict(datasplitter_kwargs={"num_workers": 4}), "without a torch DataLoader"),
    (dict(datasplitter_kwargs={"external_indexing": [np.arange(10), np.arange(5, 20)]}), "overlap"),
    (dict(check_val_every_n_epoch=0), "check_val_every_n_epoch must be a positive integer"),
])
def test_bad_scvi_train_arguments_fail_before_training(untrained, arguments, message):
    settings = {**dict(max_epochs=1, progress_bar=False), **arguments}
    with pytest.raises(ValueError, match=message):
        untrained.train(**settings)
    assert not untrained.is_trained and untrained.trainer is None


def test_scvi_train_arguments_without_a_counterpart_say_what_to_use(untrained):
    with pytest.raises(TypeError, match=r"validation_size: pass train_size.*; enable_progress_bar: progress_bar; "
                                        r"bogus: not an argument of RegularizedVI\.train"):
        untrained.train(max_epochs=1, validation_size=0.2, enable_progress_bar=False, bogus=1)
    assert untrained.trainer is None
    untrained.train(max_epochs=1, progress_bar=False, shuffle_set_split=True, load_sparse_tensor=False,
                    early_stopping_monitor="elbo_validation")  # what this package does: accepted
    with pytest.raises(TypeError, match="early_stopping_monitor: early stopping watches the validation loss"):
        untrained.train(max_epochs=1, early_stopping_monitor="reconstruction_loss_validation")
    with pytest.raises(TypeError, match="gene_likelihood: not an argument of RegularizedVI.train"):  # a model argument
        untrained.train(max_epochs=1, gene_likelihood="nb")


def test_scvi_train_arguments_take_effect(untrained):
    train, validation = np.arange(0, 200), np.arange(200, 260)
    untrained.train(max_epochs=1, accelerator="cpu", devices=1, plan_kwargs={"lr": 3e-3, "weight_decay": 0.0,
                    "n_epochs_kl_warmup": 5}, datasplitter_kwargs={"external_indexing": [train, validation]},
                    batch_size=64, progress_bar=False)
    assert untrained.device == torch.device("cpu")
    group = untrained.trainer.optimizer.param_groups[0]
    assert group["lr"] == 3e-3 and group["weight_decay"] == 0.0
    assert untrained.history["kl_weight"].iloc[0] == pytest.approx(1e-6, abs=1e-5)  # epoch 0 of a 5-epoch warm-up
    np.testing.assert_array_equal(untrained.train_indices, train)
    np.testing.assert_array_equal(untrained.validation_indices, validation)
    # a later call with the default train_size asks for nothing (it warned "train_size differs from the first call")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        untrained.train(max_epochs=2, batch_size=64, progress_bar=False)
    with pytest.warns(UserWarning, match="train_size differs from the first call"):  # one the caller gives: said
        untrained.train(max_epochs=3, batch_size=64, train_size=0.3, progress_bar=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_accelerator_without_cuda_says_so(untrained):
    with pytest.raises(ValueError, match="CUDA is not available"):
        untrained.train(max_epochs=1, accelerator="gpu", progress_bar=False)


def test_scvi_setup_and_model_arguments_say_what_to_use_instead():
    adata = simulate_small()
    with pytest.raises(TypeError, match="categorical_covariate_keys: each technical effect has its own key"):
        ps.RegularizedVI.setup_anndata(adata, layer="counts", categorical_covariate_keys=["batch"])
    with pytest.raises(TypeError, match=r"size_factor_key: the library size is a latent.*not_ours: not an argument"):
        ps.RegularizedVI.setup_anndata(adata, layer="counts", size_factor_key="true_library", not_ours=1)
    assert ps.data.SETUP_UNS_KEY not in adata.uns  # refused before anything was recorded
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    with pytest.raises(TypeError, match="gene_likelihood: the counts are negative binomial"):
        ps.RegularizedVI(adata, gene_likelihood="zinb")
    ps.RegularizedVI(adata, gene_likelihood="nb", latent_distribution="normal")  # what this model does: accepted
    with pytest.raises(TypeError, match="dispersion_key"):
        ps.RegularizedVI(adata, dispersion="gene-batch")
    mdata = ps.datasets.simulate_multiome(n_cells=60, n_genes=80, n_peaks=120, seed=0)
    with pytest.raises(TypeError, match="labels_key: RegularizedVI is unsupervised"):
        ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", labels_key="cell_type")
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    with pytest.raises(TypeError, match="latent_distribution: z is Normal"):
        ps.RegularizedMultimodalVI(mdata, latent_distribution="ln")


def test_to_device_moves_the_modules(untrained):
    untrained.to_device("cpu")
    assert untrained.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in untrained.module.parameters())
    with pytest.raises(ValueError, match="device"):
        untrained.to_device("tpu")
    with pytest.raises(ValueError, match="cuda:1"):  # a GPU index, as scvi-tools takes it (no GPU here)
        untrained.to_device(1)


# --- save and load -----------------------------------------------------------------------------
def test_save_with_anndata_and_load_without(model, tmp_path):
    folder = str(tmp_path / "model")
    model.save(folder, save_anndata=True)
    assert os.path.isfile(os.path.join(folder, "adata.h5ad"))
    loaded = ps.RegularizedVI.load(folder)
    assert loaded.device == torch.device("cpu")
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation(), rtol=1e-5, atol=1e-6)
    assert list(loaded.history["elbo_validation"].index) == [1, 3, 5]
    # saved again without the data: the old copy must not be loaded with the new model
    model.save(folder, overwrite=True)
    assert not os.path.exists(os.path.join(folder, "adata.h5ad"))
    with pytest.raises(ValueError, match=r"save\(\.\.\., save_anndata=True\)"):
        ps.RegularizedVI.load(folder)


def test_load_device_auto_chooses_cuda_when_available(model, tmp_path, monkeypatch):
    folder = str(tmp_path / "model")
    model.save(folder)
    chosen = []
    move = PyroModelBase._move_to

    def record(self, device):
        # the decision load makes for its default device, on a machine that has CUDA
        with monkeypatch.context() as patched:
            patched.setattr(torch.cuda, "is_available", lambda: True)
            chosen.append(resolve_device(device))
        move(self, "cpu")  # no GPU here: the modules stay on the CPU

    monkeypatch.setattr(PyroModelBase, "_move_to", record)
    ps.RegularizedVI.load(folder, adata=model.adata.copy())
    assert chosen == [torch.device("cuda")]
    monkeypatch.setattr(PyroModelBase, "_move_to", move)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ps.RegularizedVI.load(folder, adata=model.adata.copy()).device == torch.device("cpu")


def test_load_takes_scvi_tools_accelerator_and_gpu_index(model, tmp_path, monkeypatch):
    from pyro_scmodels.models.train_options import load_device

    folder = str(tmp_path / "model")
    model.save(folder)
    loaded = ps.RegularizedVI.load(folder, adata=model.adata.copy(), accelerator="cpu")
    assert loaded.device == torch.device("cpu")
    with pytest.raises(ValueError, match="names a GPU index, but accelerator='cpu'"):
        ps.RegularizedVI.load(folder, adata=model.adata.copy(), accelerator="cpu", device=0)
    with pytest.raises(ValueError, match="device is scvi-tools' GPU index or 'auto'"):
        ps.RegularizedVI.load(folder, adata=model.adata.copy(), accelerator="gpu", device="cpu")
    with pytest.raises(ValueError, match="accelerator must be"):
        ps.RegularizedVI.load(folder, adata=model.adata.copy(), accelerator="tpu")
    # scvi-tools' load(accelerator="gpu", device=1) on a machine with two GPUs: the second one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_device(1, "gpu") == torch.device("cuda:1")
    assert load_device("auto", "auto") == torch.device("cuda")
    assert load_device("cuda:1", None) == "cuda:1"  # this package's own device, untouched
