"""scvi-tools' keyword arguments to the queries, differential_expression and load_query_data, and the other errors an
scvi-tools user meets: each says what this package takes instead (the mechanism of setup_anndata, __init__ and train:
pyro_scmodels.models.scvi_arguments), not Python's bare "unexpected keyword argument"."""

import inspect
import warnings

import mudata as md
import numpy as np
import pytest
import scipy.sparse as sp

import pyro_scmodels as ps
from pyro_scmodels.cli import main
from tests._ndreamer_tiny import tiny_adata, tiny_model  # noqa: F401 (fixtures)

md.set_options(pull_on_update=False)


@pytest.mark.parametrize("call, argument, says", [
    ("get_normalized_expression", dict(n_samples_overall=100), r"n_samples_overall: not offered: choose the cells "
                                                               r"with indices="),
    ("get_normalized_expression", dict(weights="importance"), r"weights: the posterior draws are averaged with equal"),
    ("get_normalized_expression", dict(silent=False), r"silent: the queries here show no progress bar"),
    ("get_latent_representation", dict(dataloader=object()), r"dataloader: not offered: pass the cells as adata="),
    ("posterior_predictive_sample", dict(n_samples_overall=10), r"n_samples_overall"),
    ("get_likelihood_parameters", dict(dataloader=object()), r"dataloader"),
    ("get_feature_correlation_matrix", dict(silent=False), r"silent"),
    ("differential_expression", dict(groupby="cell_type", n_samples=5), r"n_samples: num_samples"),
    ("differential_expression", dict(groupby="cell_type", pseudocounts=0.1), r"pseudocounts: pseudocount"),
    ("differential_expression", dict(groupby="cell_type", silent=False), r"silent: differential_expression prints"),
    ("view_anndata_setup", dict(hide_state_registries=True), r"hide_state_registries: view_anndata_setup prints"),
    ("get_normalized_expression", dict(not_an_option=1), r"not_an_option: not an argument of "
                                                         r"RegularizedVI.get_normalized_expression"),
])
def test_an_scvi_tools_argument_of_a_query_names_what_to_use(tiny_model, call, argument, says):
    with pytest.raises(TypeError, match=rf"RegularizedVI.{call}\(\) got arguments it does not take\. {says}"):
        getattr(tiny_model, call)(**argument)


def test_scvi_tools_values_that_are_what_the_queries_do_are_taken(tiny_model, capsys):
    expression = tiny_model.get_normalized_expression(silent=True, weights="uniform", n_samples_overall=None,
                                                      dataloader=None)
    assert expression.shape == (tiny_model.adata.n_obs, tiny_model.adata.n_vars)
    tiny_model.view_anndata_setup(hide_state_registries=False)
    assert "set up for pyro_scmodels" in capsys.readouterr().out
    # the signatures stay the methods' own (help(), IDEs, scvi-tools-style introspection)
    assert "n_samples_overall" not in inspect.signature(tiny_model.get_normalized_expression).parameters
    assert "gene_list" in inspect.signature(tiny_model.get_normalized_expression).parameters


@pytest.mark.parametrize("argument, says", [
    (dict(freeze_expression=False), r"freeze_expression: freeze_encoder"),
    (dict(freeze_batchnorm_encoder=False), r"freeze_batchnorm_encoder: the encoders have no BatchNorm"),
    (dict(freeze_batchnorm_decoder=True), r"freeze_batchnorm_decoder: the decoder has no BatchNorm"),
])
def test_scvi_tools_freezing_arguments_of_load_query_data_name_freeze_encoder(tiny_model, argument, says):
    query = tiny_model.adata[:20].copy()
    with pytest.raises(TypeError, match=rf"RegularizedVI.load_query_data\(\) got arguments it does not take\. {says}"):
        ps.RegularizedVI.load_query_data(query, tiny_model, **argument)
    # scvi-tools' defaults say what this package does: taken
    ps.RegularizedVI.load_query_data(query, tiny_model, freeze_expression=True, freeze_batchnorm_encoder=True,
                                     freeze_batchnorm_decoder=False)


def test_a_query_given_cells_without_counts_names_them_and_the_data_not_setup(tiny_model):
    adata = tiny_model.adata[:30].copy()
    counts = adata.layers["counts"].tolil()
    counts[[2, 5], :] = 0
    adata.layers["counts"] = sp.csr_matrix(counts)
    with pytest.raises(ValueError, match=r"The adata passed to this query has 2 cell\(s\) with zero total counts in "
                                         r"adata.layers\['counts'\] \('.+', '.+'; rows \[2, 5\]\).*Pass the cells "
                                         r"with counts") as raised:
        tiny_model.get_latent_representation(adata=adata)
    assert "before setup" not in str(raised.value)


def test_a_multimodal_call_given_an_anndata_says_what_to_do(tmp_path):
    mdata = ps.datasets.simulate_multiome(n_cells=80, n_genes=75, n_peaks=120, seed=1)
    rna = mdata.mod["rna"]
    for call in (lambda: ps.RegularizedMultimodalVI.setup_mudata(rna, layer="counts"),
                 lambda: ps.RegularizedMultimodalVI(rna)):
        with pytest.raises(TypeError, match=r"RegularizedMultimodalVI(.setup_mudata)? takes a MuData \(paired "
                                            r"modalities in mdata.mod\); it was given AnnData of 80 cells x 75 "
                                            r"features\. For one modality use RegularizedVI.*mudata.MuData"):
            call()
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    model = ps.RegularizedMultimodalVI(mdata, n_latent=2, n_hidden=8)
    model.save(str(tmp_path / "model"))
    with pytest.raises(TypeError, match=r"RegularizedMultimodalVI.load takes a MuData .*given AnnData of 80 cells"):
        ps.RegularizedMultimodalVI.load(str(tmp_path / "model"), rna)


def test_a_single_modality_call_given_a_mudata_says_what_to_do(tiny_model, tmp_path):
    # the mirror of the test above: setup_anndata said ".X holds no matrix ... the results.h5ad that fit --backed
    # writes", NDreamer that the condition column is missing (columns: []), load that no gene matched, the model
    # that the data were not set up, prepare_query_anndata "'NoneType' object has no attribute 'items'"
    mdata = ps.datasets.simulate_multiome(n_cells=80, n_genes=75, n_peaks=120, seed=1)
    tiny_model.save(str(tmp_path / "model"))
    for name, call in (("RegularizedVI.setup_anndata", lambda: ps.RegularizedVI.setup_anndata(mdata, layer="counts")),
                       ("RegularizedVI.load", lambda: ps.RegularizedVI.load(str(tmp_path / "model"), mdata)),
                       ("NDreamer", lambda: ps.NDreamer(mdata, "condition", "control", device="cpu")),
                       ("RegularizedVI", lambda: ps.RegularizedVI(mdata)),
                       (r"RegularizedVI \(adata=\)", lambda: tiny_model.get_latent_representation(adata=mdata)),
                       ("RegularizedVI.prepare_query_anndata", lambda: ps.RegularizedVI.prepare_query_anndata(mdata, tiny_model)),
                       ("RegularizedVI.load_query_data", lambda: ps.RegularizedVI.load_query_data(mdata, tiny_model))):
        with pytest.raises(TypeError, match=rf"{name} takes an AnnData \(one modality\); it was given a MuData with "
                                            r"modalities \['rna', 'atac'\]\. Pass one of them, e\.g\. "
                                            r"mdata\.mod\['rna'\]"):
            call()


def test_an_unknown_option_of_a_command_is_refused_with_that_commands_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["fit", str(tmp_path / "x.h5ad"), "-o", str(tmp_path / "out"), "--categorical-covariate-keys", "a"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pyro-scmodels fit ")
    assert "pyro-scmodels fit: error: unrecognized arguments: --categorical-covariate-keys a" in err
    assert "--nn-conditioning-keys" in err  # scvi-tools' categorical covariates: this package's option
