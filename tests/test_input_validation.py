"""Bad inputs fail early (setup, constructor or the start of ``train``) with clear errors.

Every test asserts both the exception type and that its message names the problem: the
offending key, layer, argument or value, or the fix. The data are tiny so the whole file
runs in seconds.
"""

import os
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from pyro_scmodels import RegularizedVI
from pyro_scmodels.datasets import simulate

N_CELLS, N_GENES = 60, 30
SMALL_MODEL = dict(n_hidden=8, n_latent=2)


def _simulate(seed=0):
    return simulate(n_cells=N_CELLS, n_genes=N_GENES, n_cell_types=2, n_batches=2,
                    n_markers_per_type=3, n_responding_genes=5, seed=seed)


@pytest.fixture
def adata():
    """A fresh AnnData per test: raw counts (CSR float32) in .X and layers['counts']."""
    return _simulate()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model fitted for one epoch on batch-keyed data, its AnnData and a folder it is saved in."""
    data = _simulate()
    RegularizedVI.setup_anndata(data, batch_key="batch")
    model = RegularizedVI(data, **SMALL_MODEL)
    model.train(max_epochs=1, batch_size=32, device="cpu", progress_bar=False)
    folder = tmp_path_factory.mktemp("saved_model")
    model.save(str(folder))
    return model, data, folder


# --- counts ---------------------------------------------------------------------------------

def test_log_normalised_counts_rejected(adata):
    X = adata.X.copy()
    X.data = np.log1p(X.data / 3.0)
    adata.X = X
    with pytest.raises(ValueError, match=r"non-integer.*raw\s+counts"):
        RegularizedVI.setup_anndata(adata)


def test_negative_counts_rejected(adata):
    X = adata.X.copy()
    X.data[0] = -2.0
    adata.X = X
    with pytest.raises(ValueError, match=r"negative values.*raw counts"):
        RegularizedVI.setup_anndata(adata)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_nan_or_inf_counts_rejected(adata, bad, dense):
    X = adata.X.toarray() if dense else adata.X.copy()
    if dense:
        X[3, 4] = bad
    else:
        X.data[X.indptr[7] + 1] = bad  # an entry of row 7
    adata.X = X
    with pytest.raises(ValueError, match=rf"adata\.X contains NaN or Inf values \(first at row {3 if dense else 7}\)"):
        RegularizedVI.setup_anndata(adata)


def test_bad_values_in_a_layer_name_the_layer(adata):
    adata.layers["counts"] = adata.layers["counts"].toarray() - 5.0
    with pytest.raises(ValueError, match=r"adata\.layers\['counts'\] contains negative"):
        RegularizedVI.setup_anndata(adata, layer="counts")


def test_missing_layer_names_it_and_lists_available(adata):
    with pytest.raises(KeyError, match=r"Layer 'raw_counts' not found.*Available layers: .*counts"):
        RegularizedVI.setup_anndata(adata, layer="raw_counts")


def test_zero_cells_rejected(adata):
    with pytest.raises(ValueError, match="zero cells"):
        RegularizedVI.setup_anndata(adata[:0].copy())


def test_zero_genes_rejected(adata):
    with pytest.raises(ValueError, match=r"zero features \(genes\)"):
        RegularizedVI.setup_anndata(adata[:, :0].copy())


def test_cells_with_zero_total_rejected_with_count_and_fix(adata):
    X = adata.X.tolil()
    X[[2, 7, 11], :] = 0
    adata.X = X.tocsr()
    with pytest.raises(ValueError, match=r"has 3 cell\(s\) with zero total counts.*filter_cells"):
        RegularizedVI.setup_anndata(adata)


def test_setup_failure_records_nothing(adata):
    adata.X = adata.X.toarray() * 0.5
    with pytest.raises(ValueError):
        RegularizedVI.setup_anndata(adata)
    with pytest.raises(ValueError, match=r"not been set up.*setup_anndata"):
        RegularizedVI(adata, **SMALL_MODEL)


# --- .obs columns ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "arguments",
    [
        dict(batch_key="no_such_column"),
        dict(ambient_covariate_keys=["batch", "no_such_column"]),
        dict(nn_conditioning_covariate_keys=["no_such_column"]),
        dict(feature_scaling_covariate_keys=["no_such_column"]),
        dict(dispersion_key="no_such_column"),
        dict(library_size_key="no_such_column"),
        dict(encoder_covariate_keys=["no_such_column"]),
        dict(continuous_covariate_keys=["no_such_column"]),
    ],
    ids=lambda a: next(iter(a)),
)
def test_missing_obs_column_named(adata, arguments):
    with pytest.raises(KeyError, match=r"Column 'no_such_column' not found in adata\.obs.*Available columns: .*batch"):
        RegularizedVI.setup_anndata(adata, **arguments)


@pytest.mark.parametrize("as_category", [False, True], ids=["object", "category"])
def test_nan_in_categorical_column_named(adata, as_category):
    column = adata.obs["batch"].astype(object)
    column.iloc[[0, 5]] = np.nan
    adata.obs["batch"] = column.astype("category") if as_category else column
    with pytest.raises(ValueError, match=r"adata\.obs\['batch'\] has 2 missing \(NaN\)"):
        RegularizedVI.setup_anndata(adata, batch_key="batch")


def test_nan_in_dispersion_key_named(adata):
    adata.obs["lane"] = ["a", "b"] * (N_CELLS // 2)
    adata.obs.loc[adata.obs_names[3], "lane"] = None
    with pytest.raises(ValueError, match=r"\['lane'\] has 1 missing"):
        RegularizedVI.setup_anndata(adata, dispersion_key="lane")


@pytest.mark.parametrize(
    "values, message",
    [
        (["low", "high"] * (N_CELLS // 2), "is a continuous covariate but is not numeric"),
        ([np.nan] + [1.0] * (N_CELLS - 1), "has NaN or Inf values"),
        ([np.inf] + [1.0] * (N_CELLS - 1), "has NaN or Inf values"),
    ],
    ids=["strings", "nan", "inf"],
)
def test_bad_continuous_covariate_rejected_before_training(adata, values, message):
    adata.obs["percent_mito"] = values
    # the column must be rejected at setup or, at the latest, when the model is built
    with pytest.raises(ValueError, match=re.escape("adata.obs['percent_mito'] ") + message):
        RegularizedVI.setup_anndata(adata, continuous_covariate_keys=["percent_mito"])
        RegularizedVI(adata, **SMALL_MODEL)


@pytest.mark.parametrize(
    "argument, value",
    [
        ("ambient_covariate_keys", ["batch"]),
        ("dispersion_key", "batch"),
        ("library_size_key", "batch"),
        ("ambient_covariate_keys", []),  # asked for no ambient key: batch_key filled it without a word
        ("dispersion_key", ""),
    ],
)
def test_batch_key_clashes_with_the_keys_it_fills(adata, argument, value):
    with pytest.raises(ValueError, match=rf"`batch_key='batch'` cannot be combined with `{argument}`"):
        RegularizedVI.setup_anndata(adata, batch_key="batch", **{argument: value})


def test_batch_key_as_list_is_type_error(adata):
    with pytest.raises(TypeError, match=r"`batch_key` must be one \.obs column name, got \['batch'\]"):
        RegularizedVI.setup_anndata(adata, batch_key=["batch"])


def test_single_keys_as_list_are_type_errors(adata):
    with pytest.raises(TypeError, match=r"`dispersion_key` must be one \.obs column name"):
        RegularizedVI.setup_anndata(adata, dispersion_key=["batch"])


# --- model construction ---------------------------------------------------------------------

def test_model_on_adata_not_set_up(adata):
    with pytest.raises(ValueError, match=r"has not been set up\. Call `RegularizedVI\.setup_anndata"):
        RegularizedVI(adata, **SMALL_MODEL)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(n_latent=0), r"n_latent must be a positive integer, got 0"),
        (dict(n_hidden=0), r"n_hidden must be a positive integer, got 0"),
        (dict(n_layers=0), r"n_layers must be a positive integer, got 0"),
        (dict(init="bogus"), r"init must be 'data' or 'prior', got 'bogus'"),
        (dict(global_guides={"nonexistent_site": "map"}), r"Unknown global site\(s\) \['nonexistent_site'\]"),
        (dict(global_guides={"ambient": "bogus_family"}), r"one of \('map', 'lognormal'\), got 'bogus_family'"),
    ],
    ids=["n_latent", "n_hidden", "n_layers", "init", "unknown_site", "unknown_family"],
)
def test_invalid_model_arguments(adata, arguments, message):
    RegularizedVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match=message):
        RegularizedVI(adata, **{**SMALL_MODEL, **arguments})


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


def test_load_from_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No saved model at .*model\.pt"):
        RegularizedVI.load(str(tmp_path), _simulate())


def _renamed(a):
    a = a.copy()
    a.var_names = [f"renamed_{i}" for i in range(a.n_vars)]
    return a


@pytest.mark.parametrize(
    "change, detail",
    [
        (lambda a: a[:, 5:].copy(), r"5 gene\(s\) of the model missing"),
        (lambda a: a[:, ::-1].copy(), r"same genes in a different order"),
        (_renamed, r"30 gene\(s\) unknown to the model \(e\.g\. \['renamed_0'"),
    ],
    ids=["subset", "reordered", "renamed"],
)
def test_load_with_different_genes_rejected(trained, change, detail):
    _, _, folder = trained
    new = change(_simulate())
    with pytest.raises(ValueError, match=r"The genes of adata do not match the model's \(30 genes\): .*" + detail):
        RegularizedVI.load(str(folder), new)


# --- inputs that must be accepted -----------------------------------------------------------

def test_integer_valued_float32_counts_accepted(adata):
    adata.X = adata.X.toarray().astype(np.float32)
    assert adata.X.dtype == np.float32
    RegularizedVI.setup_anndata(adata, batch_key="batch")
    model = RegularizedVI(adata, **SMALL_MODEL)
    assert model.dims.n_genes == N_GENES


def test_counts_layer_used_when_x_is_log_normalised(adata):
    X = adata.layers["counts"].copy().astype(np.float64)
    X = sparse.diags(1e4 / np.asarray(X.sum(axis=1)).ravel()) @ X
    X.data = np.log1p(X.data)
    adata.X = sparse.csr_matrix(X)
    with pytest.raises(ValueError, match="non-integer"):
        RegularizedVI.setup_anndata(adata)  # .X alone is refused ...
    RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")  # ... the layer is accepted
    model = RegularizedVI(adata, **SMALL_MODEL)
    assert model.layer == "counts"
    batch = model._cell_data().minibatch(np.arange(3))
    np.testing.assert_array_equal(batch["x"].numpy(), adata.layers["counts"][:3].toarray())


def test_a_mudata_or_another_object_as_adata_is_named(trained):
    # a MuData failed with "argument of type 'NoneType' is not iterable" from deep in the setup check
    import mudata

    model, data, _ = trained
    with pytest.raises(TypeError, match=r"adata= is a MuData \(modalities \['rna'\]\): pass one modality"):
        model.get_latent_representation(adata=mudata.MuData({"rna": data.copy()}))
    with pytest.raises(TypeError, match="adata= must be an AnnData, got a ndarray"):
        model.get_latent_representation(adata=np.zeros((3, 3)))
