"""Every per-modality query of RegularizedMultimodalVI defaults to the same modality: the RNA one, whatever the
order of the MuData's modalities (a .h5mu reads back with ATAC first); without an RNA modality, modality= is needed."""

import warnings

import mudata as md
import numpy as np
import pytest

import pyro_scmodels as ps

md.set_options(pull_on_update=False)


@pytest.fixture(scope="module")
def atac_first():
    sim = ps.datasets.simulate_multiome(n_cells=120, n_genes=75, n_peaks=120, seed=0)
    mdata = md.MuData({"atac": sim["atac"].copy(), "rna": sim["rna"].copy()})  # as read_h5mu returns it
    mdata.obs = sim.obs.copy()
    mdata.obs["grp"] = np.where(np.arange(mdata.n_obs) % 2 == 0, "a", "b")
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")  # modalities=None: mdata.mod's order
    model = ps.RegularizedMultimodalVI(mdata, n_latent=2, n_hidden=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=64, device="cpu", progress_bar=False)
    return model


def queries(model):
    """Each per-modality query, asked without a modality, as the number of features it answers on."""
    return {
        "get_normalized_expression": lambda: model.get_normalized_expression(n_samples=1).shape[1],
        "differential_expression": lambda: len(model.differential_expression(groupby="grp", group1="a", num_samples=2,
                                                                              n_cells=20, n_pairs=50)),
        "posterior_predictive_sample": lambda: model.posterior_predictive_sample().shape[1],
        "get_likelihood_parameters": lambda: model.get_likelihood_parameters()["mean"].shape[1],
        "get_feature_correlation_matrix": lambda: model.get_feature_correlation_matrix(n_samples=1).shape[1],
        "get_library_size": lambda: 75 if model.get_library_size().shape[0] == model.adata.n_obs else None,
        "get_dispersion": lambda: model.get_dispersion().shape[0],
        "get_ambient_profile": lambda: model.get_ambient_profile().shape[0] if "rna" in model.modalities else
        model.get_ambient_profile(),
    }


def test_every_query_defaults_to_the_rna_modality_when_it_is_not_first(atac_first):
    assert atac_first.modalities == ["atac", "rna"]
    assert atac_first.default_modality() == "rna"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        answered = {name: query() for name, query in queries(atac_first).items()}
    assert answered == {name: 75 for name in answered}  # the 75 genes, not the 120 peaks


def test_a_model_without_an_rna_modality_needs_modality_in_every_query():
    sim = ps.datasets.simulate_multiome(n_cells=60, n_genes=75, n_peaks=120, seed=1)
    mdata = md.MuData({"gex": sim["rna"].copy(), "peaks": sim["atac"].copy()})
    mdata.obs = sim.obs.copy()
    mdata.obs["grp"] = np.where(np.arange(mdata.n_obs) % 2 == 0, "a", "b")
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    model = ps.RegularizedMultimodalVI(mdata, n_latent=2, n_hidden=8)
    model.is_trained_ = True  # the default is resolved before anything is computed
    for name, query in queries(model).items():
        with pytest.raises(ValueError, match=r"no modality named 'rna' \(its modalities: \['gex', 'peaks'\]\).*"
                                             r"pass modality=, e.g. modality='gex'"):
            query()
    assert model.get_dispersion(modality="gex").shape[0] == 75


def test_data_passed_as_the_modality_is_refused_naming_the_method_and_the_fix(atac_first):
    # scvi-tools' order (the data first): get_library_size(mdata) was told "e.g. get_latent_representation(adata=mdata)"
    mdata = atac_first.adata
    for name in ("get_library_size", "get_normalized_expression", "get_latent_representation", "get_ambient_fraction"):
        with pytest.raises(TypeError, match=rf"^{name}'s first argument is the modality \(one of \['atac', 'rna'\]\), "
                                            rf"got a MuData; pass the data by name: {name}\(adata=mdata, modality=\.\.\.\)"):
            getattr(atac_first, name)(mdata)
    with pytest.raises(TypeError, match=r"get_dispersion\(modality=\.\.\.\): it takes no data"):
        atac_first.get_dispersion(mdata["rna"])  # an AnnData too
    assert atac_first.get_library_size(adata=mdata, modality="atac").shape == (mdata.n_obs,)


def test_a_modality_with_other_features_is_named_with_features_not_genes(atac_first):
    # peaks were called genes, and the fix named model_genes without saying what it is
    mdata = atac_first.adata
    other = md.MuData({"atac": mdata["atac"][:, ::-1].copy(), "rna": mdata["rna"].copy()})
    other.obs = mdata.obs.copy()
    with pytest.raises(ValueError, match=r"The features of mdata\.mod\['atac'\] do not match the model's \(120 features\): "
                                         r"the same features in a different order\. Subset and order them with "
                                         r"`mdata\.mod\['atac'\]\[:, model_genes\]`, model_genes being the model's "
                                         r"features in its order"):
        atac_first.get_latent_representation(adata=other)


def test_binarised_peaks_are_said_at_setup():
    # 0/1 peaks (a common ATAC preprocessing) trained with the count likelihood without a word
    sim = ps.datasets.simulate_multiome(n_cells=120, n_genes=75, n_peaks=120, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counts: nothing to say
        ps.RegularizedMultimodalVI.setup_mudata(sim, layer="counts")
    binary = sim["atac"].layers["counts"].copy()
    binary.data = np.minimum(binary.data, 1.0)
    sim["atac"].layers["counts"] = binary
    with pytest.warns(UserWarning, match=r"mdata.mod\['atac'\] holds only 0 and 1 in its first 120 cells \(\d+ non-zero "
                                         r"values\): binarised, not counts"):
        ps.RegularizedMultimodalVI.setup_mudata(sim, layer="counts")
