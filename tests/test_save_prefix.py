"""save(..., prefix=) and load(..., prefix=) with scvi-tools' meaning: the prefix goes before each saved file's name,
so that several models share one folder."""

import os

import mudata
import numpy as np
import pytest
import torch

import pyro_scmodels as ps

from ._multimodal import FIT as MULTIMODAL_FIT
from ._scvi_api import FIT, SMALL, simulate_small


def _trained(seed: int, n_latent: int):
    adata = simulate_small(seed=seed)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, **{**SMALL, "n_latent": n_latent}, seed=seed)
    model.train(max_epochs=3, **FIT)
    return model


@pytest.fixture(scope="module")
def two_models():
    return _trained(0, 4), _trained(1, 3)


def test_two_models_share_a_folder_and_load_back_by_prefix(two_models, tmp_path):
    first, second = two_models
    folder = str(tmp_path / "models")
    first.save(folder, prefix="first_", save_anndata=True)
    second.save(folder, prefix="second_")
    assert sorted(os.listdir(folder)) == ["first_adata.h5ad", "first_model.pt", "second_model.pt"]
    loaded_first = ps.RegularizedVI.load(folder, prefix="first_")  # its data saved beside it, under its prefix
    loaded_second = ps.RegularizedVI.load(folder, adata=second.adata.copy(), prefix="second_")
    for original, loaded in ((first, loaded_first), (second, loaded_second)):
        np.testing.assert_array_equal(loaded.get_latent_representation(), original.get_latent_representation())
        np.testing.assert_array_equal(loaded.get_normalized_expression(n_samples=2, return_numpy=True, seed=0),
                                      original.get_normalized_expression(n_samples=2, return_numpy=True, seed=0))
    assert loaded_second.module.model.dims.n_latent == 3
    # the second model saved without data: it does not take the first's, which carries another prefix
    with pytest.raises(ValueError, match=r"second_adata\.h5ad is absent"):
        ps.RegularizedVI.load(folder, prefix="second_")


def test_overwrite_replaces_only_its_own_prefix(two_models, tmp_path):
    first, second = two_models
    folder = str(tmp_path / "models")
    first.save(folder, prefix="a", save_anndata=True)
    second.save(folder, prefix="b", save_anndata=True)
    with pytest.raises(FileExistsError, match="amodel.pt exists"):
        second.save(folder, prefix="a")
    second.save(folder, prefix="a", overwrite=True)  # a's data file belonged to the earlier a: removed with it
    assert sorted(os.listdir(folder)) == ["amodel.pt", "badata.h5ad", "bmodel.pt"]
    np.testing.assert_array_equal(ps.RegularizedVI.load(folder, prefix="b").get_latent_representation(),
                                  second.get_latent_representation())


def test_missing_or_wrong_prefix_names_the_files_and_the_prefixes(two_models, tmp_path):
    first, second = two_models
    folder = str(tmp_path / "models")
    first.save(folder, prefix="first_")
    # the user's own checkpoint, and scvi-tools' model.pt: files named *model.pt that are no saved model of this package
    torch.save({"state_dict": first.module.state_dict(), "epoch": 3}, os.path.join(folder, "best_model.pt"))
    torch.save({"model_state_dict": {}, "attr_dict": {"init_params_": {}, "is_trained_": True}},
               os.path.join(folder, "scvi_model.pt"))
    with pytest.raises(FileNotFoundError, match=r"No saved model at .*models.model\.pt .*\['best_model\.pt', "
                                                r"'first_model\.pt', 'scvi_model\.pt'\]; the one saved model there has "
                                                r"prefix='first_'"):
        ps.RegularizedVI.load(folder, adata=first.adata.copy())
    second.save(folder, prefix="second_")
    with pytest.raises(FileNotFoundError, match=r"thrid_model\.pt.*prefixes \['first_', 'second_'\]"):
        ps.RegularizedVI.load(folder, adata=first.adata.copy(), prefix="thrid_")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ps.RegularizedVI.load(str(tmp_path / "nowhere"), adata=first.adata.copy(), prefix="first_")


@pytest.mark.parametrize("prefix, error, message", [
    ("runs/a_", ValueError, r"path separator '/'.*prefix='a_'"),
    (True, TypeError, r"prefix must be a string.*overwrite=True"),
    (".staged-x", ValueError, "save in progress"),
])
def test_bad_prefix_is_refused_before_anything_is_written(two_models, tmp_path, prefix, error, message):
    folder = str(tmp_path / "models")
    with pytest.raises(error, match=message):
        two_models[0].save(folder, prefix=prefix)
    assert not os.path.exists(folder)
    with pytest.raises(error, match=message):
        ps.RegularizedVI.load(folder, prefix=prefix)


def test_multimodal_models_share_a_folder_by_prefix(tmp_path):
    models = []
    for seed in (0, 1):
        mdata = ps.datasets.simulate_multiome(n_cells=200, n_genes=80, n_peaks=120, seed=seed)
        ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
        model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16)
        model.train(max_epochs=2, **MULTIMODAL_FIT)
        models.append(model)
    folder = str(tmp_path / "models")
    models[0].save(folder, prefix="x_", save_anndata=True)
    models[1].save(folder, prefix="y_", save_anndata=True)
    assert sorted(os.listdir(folder)) == ["x_mdata.h5mu", "x_model.pt", "y_mdata.h5mu", "y_model.pt"]
    for prefix, original in zip(("x_", "y_"), models):
        loaded = ps.RegularizedMultimodalVI.load(folder, prefix=prefix)
        assert isinstance(loaded.adata, mudata.MuData)
        np.testing.assert_array_equal(loaded.get_latent_representation(), original.get_latent_representation())


def test_load_query_data_reads_a_reference_saved_with_a_prefix(two_models, tmp_path):
    first, second = two_models
    folder = str(tmp_path / "models")
    first.save(folder, prefix="first_")
    second.save(folder, prefix="second_")
    query = second.adata.copy()
    query.obs_names = [f"query_{name}" for name in query.obs_names]
    with pytest.warns(UserWarning, match="nothing is left to train"):  # no new batch: all frozen
        from_model = ps.RegularizedVI.load_query_data(query.copy(), second)
    with pytest.warns(UserWarning, match="nothing is left to train"):
        from_folder = ps.RegularizedVI.load_query_data(query.copy(), folder, prefix="second_")
    assert from_folder.module.model.dims.n_latent == 3  # the second model's, not the first's
    assert from_folder.query_reference == from_model.query_reference
    state = from_model.module.state_dict()
    assert all(np.array_equal(v, state[k]) for k, v in from_folder.module.state_dict().items())
    assert list(ps.RegularizedVI.prepare_query_anndata(query, folder, return_reference_var_names=True,
                                                       prefix="first_")) == list(first.adata.var_names)
    # scvi-tools reads the unprefixed model.pt of a reference folder: absent here, the error names the prefixes
    with pytest.raises(FileNotFoundError, match=r"No saved model at .*models.model\.pt .*prefixes \['first_', "
                                                r"'second_'\]; pass one as prefix=.*reference must be"):
        ps.RegularizedVI.load_query_data(query.copy(), folder)
    with pytest.raises(ValueError, match="reference is a model, not the folder"):  # it would be ignored
        ps.RegularizedVI.load_query_data(query.copy(), second, prefix="second_")
    with pytest.raises(TypeError, match="prefix must be a string"):
        ps.RegularizedVI.load_query_data(query.copy(), folder, prefix=True)
