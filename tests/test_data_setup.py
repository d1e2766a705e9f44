"""``pyro_scmodels.data`` owns setup: the encoding is fitted and the counts validated once, at
setup; models get their cells from ``CellData.from_setup``; and the checks of
``pyro_scmodels._validation`` guard train, the predictive checks and the command line. Tiny data: the file runs in
seconds."""

import json
import os
import re
import warnings

import anndata
import pandas as pd
import numpy as np
import pytest

import pyro_scmodels as ps
from pyro_scmodels import criticism
from pyro_scmodels.cli import main
from pyro_scmodels.data import (
    SETUP_UNS_KEY,
    AnnDataSetup,
    CellData,
    CountMatrix,
    CovariateEncoding,
    MuDataSetup,
    check_var_names,
    read_mudata_setup,
    read_setup,
    setup_anndata,
    setup_mudata,
)
from pyro_scmodels.datasets import simulate, simulate_multiome

SMALL = dict(n_hidden=8, n_latent=2)
FIT = dict(max_epochs=1, batch_size=32, device="cpu", progress_bar=False)


@pytest.fixture
def adata():
    return simulate(n_cells=60, n_genes=30, n_cell_types=2, n_batches=2, n_markers_per_type=3,
                    n_responding_genes=5, seed=0)


@pytest.fixture
def mdata():
    return simulate_multiome(n_cells=40, n_genes=75, n_peaks=120, n_batches=2, seed=0)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of CovariateEncoding.fit and CountMatrix.validate."""
    counted = {"fit": 0, "validate": 0}
    fit, validate = CovariateEncoding.fit, CountMatrix.validate

    def counting_fit(self, *args, **kwargs):
        counted["fit"] += 1
        return fit(self, *args, **kwargs)

    def counting_validate(self, *args, **kwargs):
        counted["validate"] += 1
        return validate(self, *args, **kwargs)

    monkeypatch.setattr(CovariateEncoding, "fit", counting_fit)
    monkeypatch.setattr(CountMatrix, "validate", counting_validate)
    return counted


# --- the encoding is fitted once ------------------------------------------------------------------
def test_setup_fits_the_encoding_once(adata, calls):
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, **SMALL)
    model.train(**FIT)
    model.get_latent_representation()
    assert calls["fit"] == 1
    assert model.encoding.categories == read_setup(adata).categories == {"batch": ["batch_0", "batch_1"]}


def test_multimodal_setup_fits_the_encoding_once(mdata, calls):
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", ambient_covariate_keys=["batch"])
    model = ps.RegularizedMultimodalVI(mdata, n_latent=2, n_hidden=8)
    assert calls["fit"] == 1
    assert model.encoding.categories == read_mudata_setup(mdata).categories


def test_saved_categories_win_over_the_setup(adata, tmp_path):
    ps.RegularizedVI.setup_anndata(adata, batch_key="batch")
    model = ps.RegularizedVI(adata, **SMALL)
    model.save(str(tmp_path))
    only_first = adata[adata.obs["batch"] == "batch_0"].copy()
    loaded = ps.RegularizedVI.load(str(tmp_path), only_first)
    # the setup of the new data saw one batch; the model keeps both, in the saved order
    assert read_setup(only_first).categories == {"batch": ["batch_0"]}
    assert loaded.encoding.categories == {"batch": ["batch_0", "batch_1"]}
    assert loaded.get_ambient_profile().shape == (30, 2)


def test_a_model_built_on_a_subset_of_its_setup_names_the_categories_without_cells(adata, tmp_path):
    # set up on every cell, built on one batch: batch_1's ambient profile stayed at 1e-8 for every gene, its
    # dispersion at the prior, and both were reported like fitted values without a word
    ps.RegularizedVI.setup_anndata(adata, batch_key="batch")
    only_first = adata[adata.obs["batch"] == "batch_0"].copy()  # keeps the setup of every cell
    with pytest.warns(UserWarning, match=r"no cell in the data this model is built on \('batch': \['batch_1'\]\)"):
        ps.RegularizedVI(only_first, **SMALL)
    # a model built on every cell, and one loaded onto the subset (its categories were fitted), say nothing
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="categories recorded at setup")
        model = ps.RegularizedVI(adata, **SMALL)
        model.save(str(tmp_path))
        ps.RegularizedVI.load(str(tmp_path), only_first)


# --- counts are validated once per object ---------------------------------------------------------
def test_counts_validated_once_per_object(adata, calls):
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    assert calls["validate"] == 1
    model = ps.RegularizedVI(adata, **SMALL)
    model.train(**FIT)
    model.get_latent_representation()
    model.get_latent_representation(adata)
    assert calls["validate"] == 1
    other = adata.copy()  # a new object passed to a getter is validated
    model.get_latent_representation(other)
    assert calls["validate"] == 2


def test_counts_changed_after_setup_are_validated_again(adata):
    ps.RegularizedVI.setup_anndata(adata, batch_key="batch")
    adata.X = adata.X.toarray() + 0.5  # not counts any more: the fingerprint changed
    with pytest.raises(ValueError, match="non-integer"):
        ps.RegularizedVI(adata, **SMALL)


def test_counts_normalised_in_place_after_setup_are_caught(adata):
    # the common mistake: sc.pp.log1p after setup keeps shape, dtype and nonzeros, not the sum
    ps.RegularizedVI.setup_anndata(adata, batch_key="batch")
    adata.X.data = np.log1p(adata.X.data)
    with pytest.raises(ValueError, match="non-integer"):
        ps.RegularizedVI(adata, **SMALL)


def _edit(adata, how):
    if how == "counts rescaled":
        adata.layers["counts"] = adata.layers["counts"] * 3
    elif how == "counts edited in place":
        adata.layers["counts"].data[:5] += 1
    elif how == "cells subset":
        adata._inplace_subset_obs(np.arange(30))
    elif how == "batch relabelled":
        adata.obs["batch"] = str(adata.obs["batch"].iloc[0])
    elif how == "batch renamed":  # a category the model never saw
        adata.obs["batch"] = "batch_9"


@pytest.mark.parametrize("how, named", [("counts rescaled", "counts adata.layers['counts']"),
                                        ("counts edited in place", "counts adata.layers['counts']"),
                                        ("cells subset", "cells"), ("batch relabelled", "covariate 'batch'"),
                                        ("batch renamed", "covariate 'batch'")])
def test_a_model_refuses_its_data_changed_in_place(adata, how, named):
    """The model reads its data once; a query after an in-place edit would answer for the old data."""
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, **SMALL)
    model.train(**FIT)
    z = model.get_latent_representation()
    # edits that leave the model's data as they were
    adata.obs["note"] = "x"
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata.layers["normalised"] = adata.layers["counts"].copy()
    np.testing.assert_array_equal(model.get_latent_representation(), z)
    _edit(adata, how)
    for query in (model.get_latent_representation, lambda: model.get_normalized_expression(adata=adata),
                  lambda: model.train(**FIT)):
        with pytest.raises(ValueError, match=f"changed in place.*{re.escape(named)}"):
            query()
    # a copy is new data: read afresh and validated
    if not how.startswith("batch"):
        assert model.get_latent_representation(adata=adata.copy()).shape == (adata.n_obs, 2)


def test_a_multimodal_model_refuses_a_modality_changed_in_place(mdata):
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    model = ps.RegularizedMultimodalVI(mdata, **SMALL)
    model.get_latent_representation()
    original = mdata.mod["atac"]
    mdata.mod["atac"] = original.copy()  # the same names in the same order: not a change
    model.get_latent_representation()
    # a modality replaced with its peaks or its cells in another order keeps every sum of its counts
    for reordered, named in ((original[:, ::-1].copy(), "features"), (original[::-1].copy(), "cells")):
        mdata.mod["atac"] = reordered
        with pytest.raises(ValueError, match=rf"changed in place.*\({named} of mdata\.mod\['atac'\]"):
            model.get_latent_representation()
    mdata.mod["atac"] = original
    model.get_latent_representation()
    mdata.mod["atac"].layers["counts"] = mdata.mod["atac"].layers["counts"] * 2
    with pytest.raises(ValueError, match=r"changed in place.*\(counts mdata\.mod\['atac'\]"):
        model.get_latent_representation()


def test_multimodal_counts_validated_once_per_modality(mdata, calls):
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    assert calls["validate"] == 2
    model = ps.RegularizedMultimodalVI(mdata, n_latent=2, n_hidden=8)
    model.train(**FIT)
    assert calls["validate"] == 2
    model.get_latent_representation(adata=mdata.copy())
    assert calls["validate"] == 4


# --- the data/ API ---------------------------------------------------------------------------------
def test_check_var_names_lives_in_data(adata):
    from pyro_scmodels.models import _base

    assert not hasattr(_base, "check_var_names")  # moved, not copied
    check_var_names(adata.var_names, adata)
    with pytest.raises(ValueError, match=r"The genes of adata do not match the model's \(31 genes\)"):
        check_var_names([*adata.var_names, "extra"], adata)


def test_setup_record_is_json_with_categories_and_fingerprint(adata, tmp_path):
    setup = setup_anndata(adata, layer="counts", batch_key="batch")
    assert isinstance(setup, AnnDataSetup)
    record = json.loads(adata.uns[SETUP_UNS_KEY])
    assert record["categories"] == {"batch": ["batch_0", "batch_1"]}
    assert record["counts"] == {"shape": [60, 30], "dtype": str(adata.layers["counts"].dtype),
                                "nnz": int(adata.layers["counts"].nnz),
                                "sum": float(adata.layers["counts"].sum())}
    adata.write_h5ad(tmp_path / "a.h5ad")  # the record keeps the AnnData writable
    assert read_setup(anndata.read_h5ad(tmp_path / "a.h5ad")) == setup


def test_cell_data_from_anndata_setup(adata):
    setup_anndata(adata, layer="counts", batch_key="batch")
    data = CellData.from_setup(adata)
    assert list(data.modalities) == ["x"] and data.n_cells == 60 and data.n_features == 30
    assert data.encoding.categories == {"batch": ["batch_0", "batch_1"]}
    batch = data.minibatch(np.arange(4))
    np.testing.assert_array_equal(batch["x"].numpy(), adata.layers["counts"][:4].toarray())
    np.testing.assert_array_equal(batch["ambient_index"][:, 0].numpy(), adata.obs["batch"].cat.codes[:4])


def test_cell_data_from_mudata_setup(mdata):
    setup = setup_mudata(mdata, layer="counts", ambient_covariate_keys=["batch"])
    assert isinstance(setup, MuDataSetup) and read_mudata_setup(mdata) == setup
    data = CellData.from_setup(mdata)
    assert list(data.modalities) == ["x_rna", "x_atac"]
    assert data.modalities["x_atac"].n_features == mdata.mod["atac"].n_vars
    batch = data.minibatch(np.arange(3))
    np.testing.assert_array_equal(batch["x_rna"].numpy(), mdata.mod["rna"].layers["counts"][:3].toarray())


def test_setup_mudata_is_the_models_setup(mdata):
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    record = json.loads(mdata.uns[SETUP_UNS_KEY])
    assert record["modalities"] == ["rna", "atac"] and set(record["counts"]) == {"rna", "atac"}
    with pytest.raises(ValueError, match="set up with setup_mudata"):
        read_setup(mdata)


def test_missing_modality_layer_is_key_error(mdata):
    with pytest.raises(KeyError, match=r"Layer 'raw' not found in mdata\.mod\['rna'\]\.layers\. Available layers: counts"):
        setup_mudata(mdata, layer="raw")


# --- the checks are used by train, the predictive checks and the command line ---------------------
@pytest.fixture
def untrained(adata):
    ps.RegularizedVI.setup_anndata(adata, batch_key="batch")
    return ps.RegularizedVI(adata, **SMALL)


@pytest.mark.parametrize("arguments, error, message", [
    (dict(train_size="half"), TypeError, r"train_size must be in \(0, 1\], got 'half'"),
    (dict(weight_decay=-1.0), ValueError, r"weight_decay must be a non-negative number, got -1\.0"),
    (dict(weight_decay="0"), TypeError, r"weight_decay must be a non-negative number, got '0'"),
    (dict(batch_size=2.5), TypeError, r"batch_size must be a positive integer, got 2\.5"),
    (dict(kl_warmup_epochs=-1), ValueError, r"kl_warmup_epochs must be a non-negative integer, got -1"),
    (dict(kl_warmup_epochs=1.5), TypeError, r"kl_warmup_epochs must be a non-negative integer, got 1\.5"),
    (dict(seed=-1), ValueError, r"seed must be an integer in \[0, 2\*\*32 - 1\], got -1"),
], ids=["train_size_type", "weight_decay_value", "weight_decay_type", "batch_size_type", "warmup_value",
        "warmup_type", "seed"])
def test_train_argument_errors(untrained, arguments, error, message):
    with pytest.raises(error, match=message):
        untrained.train(**{**FIT, **arguments})
    assert not untrained.is_trained


def test_predictive_check_arguments_checked_first(untrained, tmp_path):
    with pytest.raises(TypeError, match=r"num_samples must be an integer >= 2 .*got 2\.5"):
        criticism.prior_predictive_check(untrained, num_samples=2.5)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        criticism.prior_predictive_check(untrained, num_samples=2, batch_size=0)
    with pytest.raises(FileNotFoundError, match="figure_path"):
        criticism.prior_predictive_check(untrained, num_samples=2, figure_path=tmp_path / "no" / "f.png")
    with pytest.raises(TypeError, match="split must be 'train', 'validation' or None, got 1"):
        criticism.posterior_predictive_check(untrained, split=1)


def test_cli_checks_numeric_options_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--batch-size", "0", "--quiet"]) == 2
    assert "error: --batch-size must be a positive integer, got 0." in capsys.readouterr().err
    assert main(["demo", "-o", str(out), "--lr", "-1", "--quiet"]) == 2
    assert "--lr must be a positive number" in capsys.readouterr().err
    assert main(["fit", "data.h5ad", "-o", str(out), "--resume", "--overwrite", "--quiet"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert main(["ndreamer", "data.h5ad", "-o", str(out), "--condition-key", "c", "--control", "a", "--backed",
                 "--layer", "counts", "--quiet"]) == 2
    assert "--backed keeps only .X on disk" in capsys.readouterr().err
    # too small a demo for its report (it crashed after training)
    assert main(["demo", "-o", str(out), "--n-cells", "5", "--quiet"]) == 2
    assert "--n-cells must be an integer >= 300" in capsys.readouterr().err
    # named by their options (they were named by their Python arguments, or failed in sklearn after the gene choice)
    assert main(["fit", "data.h5ad", "-o", str(out), "--ambient-shape-prior", "-1", "--quiet"]) == 2
    assert "--ambient-shape-prior must be a positive number" in capsys.readouterr().err
    assert main(["ndreamer", "data.h5ad", "-o", str(out), "--condition-key", "c", "--control", "a", "--num-hvg", "1",
                 "--quiet"]) == 2
    assert "--num-hvg must be an integer >= 2" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_a_seed_out_of_range_is_refused_by_name_at_every_entry_point(adata, tmp_path, capsys):
    # one range for every seed (V.seed), checked before anything is built: RegularizedVI(seed=2**64) failed inside
    # torch.manual_seed with its overflow message
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = ps.RegularizedVI(adata, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model is untrained
        calls = {
            "RegularizedVI": lambda seed: ps.RegularizedVI(adata, seed=seed, **SMALL),
            "train": lambda seed: model.train(seed=seed, **FIT),
            "get_elbo": lambda seed: model.get_elbo(seed=seed),
            "get_latent_representation": lambda seed: model.get_latent_representation(give_mean=False, seed=seed),
            "posterior_predictive_sample": lambda seed: model.posterior_predictive_sample(seed=seed),
            "differential_expression": lambda seed: model.differential_expression(groupby="cell_type", seed=seed,
                                                                                  num_samples=2, n_cells=10),
            "simulate": lambda seed: simulate(n_cells=20, n_genes=30, n_markers_per_type=3, n_responding_genes=5, seed=seed),
            "simulate_multiome": lambda seed: simulate_multiome(n_cells=20, seed=seed),
            "simulate_empty_droplets": lambda seed: ps.datasets.simulate_empty_droplets(adata, seed=seed),
        }
        for name, call in calls.items():
            for seed in (2**64, 2**32, -1):
                with pytest.raises(ValueError, match=rf"^seed must be an integer in \[0, 2\*\*32 - 1\], got {seed}\.$"):
                    call(seed)
            call(2**32 - 1)  # the top of the range is taken
    assert main(["fit", "data.h5ad", "-o", str(tmp_path / "out"), "--seed", str(2**64), "--quiet"]) == 2
    assert f"error: --seed must be an integer in [0, 2**32 - 1], got {2**64}." in capsys.readouterr().err


def test_one_cell_cannot_be_split_for_validation(adata):
    one = adata[:1].copy()
    ps.RegularizedVI.setup_anndata(one, layer="counts")
    model = ps.RegularizedVI(one, **SMALL)
    with pytest.raises(ValueError, match="1 cell cannot be split into training and validation cells"):
        model.train(**FIT)
    model.train(**FIT, train_size=1.0)
    assert model.is_trained


def test_a_cell_without_counts_in_any_modality_is_refused_in_new_data_too(mdata):
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    model = ps.RegularizedMultimodalVI(mdata, **SMALL)
    other = mdata.copy()
    for m in ("rna", "atac"):  # cell 3 loses every count after setup: setup's check no longer sees it
        counts = other.mod[m].layers["counts"].tolil()
        counts[3, :] = 0
        other.mod[m].layers["counts"] = counts.tocsr()
    with pytest.raises(ValueError, match=r"1 cell\(s\) have no counts in any modality \(first at row 3\)"):
        model.get_latent_representation(adata=other)
    with pytest.raises(ValueError, match="no counts in any modality"):
        ps.RegularizedMultimodalVI(other, **SMALL)


def test_an_anndata_without_x_is_named_with_the_fix(tmp_path):
    # the results.h5ad that fit --backed writes hold no counts: passed as input, anndata gave None (or, backed, a bare
    # KeyError from h5py) and the setup failed with "'NoneType' object has no attribute 'shape'"
    empty = anndata.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(5)]), var=pd.DataFrame(index=["g1", "g2"]))
    empty.write_h5ad(tmp_path / "results.h5ad")
    for adata in (empty, anndata.read_h5ad(tmp_path / "results.h5ad", backed="r")):
        with pytest.raises(ValueError, match=r"adata\.X holds no matrix \(it is None\).*layer=\.\.\."):
            ps.RegularizedVI.setup_anndata(adata)


def test_a_mudata_covariate_only_in_a_modality_obs_is_named_with_the_fix():
    # "Column 'batch' not found in mdata.obs. Available columns: (none)."
    import mudata

    mdata = ps.datasets.simulate_multiome(n_cells=60, n_genes=75, n_peaks=120, seed=0)
    mdata.mod["rna"].obs["donor"] = np.where(np.arange(mdata.n_obs) % 2, "d1", "d2")
    with pytest.raises(KeyError, match=r"'donor' is in mdata\.mod\['rna'\]\.obs but not in mdata\.obs.*"
                                       r"pull_obs\(prefix_unique=False\)"):
        ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", batch_key="donor")
    mdata.pull_obs(prefix_unique=False)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", batch_key="donor")  # the fix works
    assert isinstance(mdata, mudata.MuData)
