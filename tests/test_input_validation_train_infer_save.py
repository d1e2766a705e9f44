"""Bad inputs fail early at the start of ``train``, at inference on new data, and in save and load, with clear
errors.

Every test asserts both the exception type and that its message names the problem: the
offending key, layer, argument or value, or the fix. The data are tiny so the whole file
runs in seconds.
"""

import os

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_scmodels import RegularizedVI

from . import _input_validation
from ._input_validation import N_GENES, SMALL_MODEL, simulate_small

# the shared fixture of tests/_input_validation.py, bound here for pytest to find
adata = _input_validation.adata


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model fitted for one epoch on batch-keyed data, its AnnData and a folder it is saved in."""
    data = simulate_small()
    RegularizedVI.setup_anndata(data, batch_key="batch")
    model = RegularizedVI(data, **SMALL_MODEL)
    model.train(max_epochs=1, batch_size=32, device="cpu", progress_bar=False)
    folder = tmp_path_factory.mktemp("saved_model")
    model.save(str(folder))
    return model, data, folder


# --- train arguments ------------------------------------------------------------------------

@pytest.fixture
def untrained(adata):
    RegularizedVI.setup_anndata(adata, batch_key="batch")
    return RegularizedVI(adata, **SMALL_MODEL)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(max_epochs=0), r"max_epochs must be a positive integer, got 0"),
        (dict(batch_size=0), r"batch_size must be a positive integer, got 0"),
        (dict(lr=0.0), r"lr must be a positive number, got 0"),
        (dict(lr=-1e-3), r"lr must be a positive number"),
        (dict(train_size=0.0), r"train_size must be in \(0, 1\], got 0"),
        (dict(train_size=1.5), r"train_size must be in \(0, 1\], got 1\.5"),
        (dict(device="tpu"), r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ],
    ids=["max_epochs", "batch_size", "lr0", "lr_negative", "train_size0", "train_size1.5", "device_tpu"],
)
def test_invalid_train_arguments(untrained, arguments, message):
    settings = dict(max_epochs=1, batch_size=16, device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match=message):
        untrained.train(**{**settings, **arguments})
    assert not untrained.is_trained
    assert len(untrained.history) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_requested_without_cuda(untrained, device):
    with pytest.raises(ValueError, match=rf"device='{device}' was requested but CUDA is not available"):
        untrained.train(max_epochs=1, batch_size=16, device=device, progress_bar=False)
    assert not untrained.is_trained


def test_ndreamer_refuses_cuda_without_cuda_before_any_preprocessing(trained, adata, monkeypatch):
    # the refusal came after the gene choice and the Leiden labels (minutes on large data)
    import pyro_scmodels.ndreamer.pipeline as pipeline
    import pyro_scmodels.ndreamer.representation as representation
    from pyro_scmodels import NDreamer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def too_late(*args, **kwargs):
        raise AssertionError("preprocessing ran before the device was checked")

    for module in (pipeline, representation):
        monkeypatch.setattr(module, "log_normalise", too_late)
    monkeypatch.setattr(trained[0], "get_latent_representation", too_late)
    with pytest.raises(ValueError, match="device='cuda' was requested but CUDA is not available"):
        NDreamer(adata, "condition", "control", device="cuda")
    with pytest.raises(ValueError, match="device='cuda:0' was requested but CUDA is not available"):
        NDreamer.from_model(trained[0], condition_key="condition", control_name="control", device="cuda:0")


# --- new data at inference ------------------------------------------------------------------

def test_unseen_category_at_inference_named(trained):
    model, data, _ = trained
    new = data.copy()
    batch = new.obs["batch"].astype(str).to_numpy()
    batch[:4] = "batch_from_elsewhere"
    new.obs["batch"] = pd.Categorical(batch)
    with pytest.raises(ValueError, match=r"\['batch'\] has categories \['batch_from_elsewhere'\] that the model was not trained on"):
        model.get_latent_representation(adata=new)


def test_inference_on_different_genes_rejected(trained):
    model, data, _ = trained
    with pytest.raises(ValueError, match=r"genes of adata do not match"):
        model.get_latent_representation(adata=data[:, : N_GENES - 2].copy())


def test_inference_on_new_data_with_bad_counts_rejected(trained):
    model, data, _ = trained
    new = data.copy()
    new.X = new.X.toarray() + 0.5
    with pytest.raises(ValueError, match=r"non-integer"):
        model.get_latent_representation(adata=new)


# --- save and load --------------------------------------------------------------------------

def test_save_over_existing_model_needs_overwrite(trained):
    model, _, folder = trained
    with pytest.raises(FileExistsError, match=r"model\.pt exists; pass overwrite=True"):
        model.save(str(folder))
    model.save(str(folder), overwrite=True)  # and with it, saving succeeds
    # a string from a config file or argparse: "False" replaced the saved model (and NDreamer's save, and its effects)
    before = (folder / "model.pt").read_bytes()
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'False'"):
        model.save(str(folder), overwrite="False")
    assert (folder / "model.pt").read_bytes() == before


def test_a_save_leaves_files_it_did_not_write_alone(trained, tmp_path):
    # the user's own adata.h5ad in the folder (the data the model was trained on) was deleted by a save without
    # overwrite, and replaced by the model's copy with save_anndata=True
    model, data, _ = trained
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "adata.h5ad").write_bytes(b"the user's data")
    model.save(str(folder))
    assert (folder / "adata.h5ad").read_bytes() == b"the user's data" and (folder / "model.pt").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "adata.h5ad").write_bytes(b"the user's data")
    with pytest.raises(FileExistsError, match=r"adata\.h5ad exists and is not part of a saved model"):
        model.save(str(other), save_anndata=True)
    assert os.listdir(other) == ["adata.h5ad"] and (other / "adata.h5ad").read_bytes() == b"the user's data"
    # an earlier save's data copy is the save's own: replaced (overwrite=True) or removed with the earlier model
    model.save(str(other), save_anndata=True, overwrite=True)
    assert RegularizedVI.load(str(other)).adata.n_obs == data.n_obs
    model.save(str(other), overwrite=True)
    assert sorted(os.listdir(other)) == ["model.pt"]


def test_flags_given_as_strings_are_refused_not_read_as_true(trained):
    # return_mean="False" returned the mean, return_numpy="False" an array: the answer quietly not the one asked for
    model, data, _ = trained
    for call, flag in ((lambda v: model.get_elbo(return_mean=v), "return_mean"),
                       (lambda v: model.get_reconstruction_error(return_mean=v), "return_mean"),
                       (lambda v: model.get_marginal_ll(return_mean=v, n_mc_samples=2), "return_mean"),
                       (lambda v: model.get_normalized_expression(return_numpy=v), "return_numpy"),
                       (lambda v: model.differential_expression("cell_type", all_stats=v, num_samples=2, n_cells=10),
                        "all_stats")):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'False'"):
            call("False")
    assert isinstance(model.get_elbo(return_mean=np.False_), np.ndarray)  # numpy's bool is a bool
    marginal = lambda seed: model.get_marginal_ll(n_mc_samples=2, seed=seed)  # noqa: E731
    for call in (model.get_elbo, model.get_reconstruction_error, marginal):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32 - 1\], got -1"):
            call(seed=-1)  # taken by torch, where the other getters refuse it


def test_load_from_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No saved model at .*model\.pt"):
        RegularizedVI.load(str(tmp_path), simulate_small())


def _renamed(a):
    a = a.copy()
    a.var_names = [f"renamed_{i}" for i in range(a.n_vars)]
    return a


@pytest.mark.parametrize(
    "change, detail",
    [
        (lambda a: a[:, 5:].copy(), r"5 of the model's genes missing"),
        (lambda a: a[:, ::-1].copy(), r"the same genes in a different order"),
        (_renamed, r"30 genes unknown to the model \(e\.g\. \['renamed_0'"),
    ],
    ids=["subset", "reordered", "renamed"],
)
def test_load_with_different_genes_rejected(trained, change, detail):
    _, _, folder = trained
    new = change(simulate_small())
    # the fix it names says what model_genes is (it named a variable the user does not have)
    with pytest.raises(ValueError, match=r"The genes of adata do not match the model's \(30 genes\): .*" + detail
                       + r".*`adata\[:, model_genes\]`, model_genes being the model's genes in its order"):
        RegularizedVI.load(str(folder), new)


def test_a_mudata_or_another_object_as_adata_is_named(trained):
    # a MuData failed with "argument of type 'NoneType' is not iterable" from deep in the setup check
    import mudata

    model, data, _ = trained
    with pytest.raises(TypeError, match=r"RegularizedVI \(adata=\) takes an AnnData \(one modality\); it was given a "
                                        r"MuData with modalities \['rna'\]\. Pass one of them, e\.g\. mdata\.mod\['rna'\]"):
        model.get_latent_representation(adata=mudata.MuData({"rna": data.copy()}))
    with pytest.raises(TypeError, match="adata= must be an AnnData, got a ndarray"):
        model.get_latent_representation(adata=np.zeros((3, 3)))
