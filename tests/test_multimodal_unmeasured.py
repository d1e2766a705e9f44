"""RegularizedMultimodalVI: a cell without counts in a modality is not measured there (its likelihood is masked),
so nothing the model reports of that modality for the cell may count as fitted: correlations, attributions, ambient
fractions and exported library sizes leave it out, and a category with no measured cell is named."""

import warnings

import mudata
import numpy as np
import pytest

import pyro_scmodels as ps

FIT = dict(max_epochs=5, batch_size=128, lr=1e-2, kl_warmup_epochs=2, early_stopping=False, device="cpu",
           progress_bar=False)


@pytest.fixture(scope="module")
def missing_atac():
    """300 cells, a third without ATAC; ambient on both modalities, ATAC scaled per batch."""
    mudata.set_options(pull_on_update=False)
    mdata = ps.datasets.simulate_multiome(n_cells=300, n_genes=75, n_peaks=120, atac_missing_fraction=0.3, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", ambient_covariate_keys=["batch"],
                                            feature_scaling_covariate_keys=["batch"])
    model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16, ambient_modalities=["rna", "atac"])
    model.train(**FIT)
    has_atac = mdata.obs["has_atac"].to_numpy().astype(bool)
    assert 0 < (~has_atac).sum() < len(has_atac)
    return model, has_atac


def test_feature_correlation_leaves_out_cells_without_the_modality(missing_atac):
    # their decoded ATAC is nearly one point: pooled, they weakened every correlation (mean |r| 0.263 vs 0.294)
    model, has_atac = missing_atac
    options = dict(modality="atac", n_samples=3, seed=0, batch_size=1000)  # one minibatch: the same count draws
    with pytest.warns(UserWarning, match=r"\d+ of the 300 cells have no counts in modality 'atac'.*left out"):
        every = model.get_feature_correlation_matrix(**options)
    measured = model.get_feature_correlation_matrix(indices=np.flatnonzero(has_atac), **options)
    np.testing.assert_array_equal(every.to_numpy(), measured.to_numpy())
    with pytest.raises(ValueError, match="none of the .* cells asked for has counts in modality 'atac'"):
        model.get_feature_correlation_matrix(indices=np.flatnonzero(~has_atac), **options)
    with warnings.catch_warnings():  # every cell has RNA: none is left out, nothing to say
        warnings.simplefilter("error", UserWarning)
        model.get_feature_correlation_matrix(modality="rna", n_samples=2, seed=0)


def test_modality_attribution_is_nan_for_cells_without_the_modality(missing_atac):
    # their z lies where the ATAC decoder was never fitted: their attributions were 36-48x the measured cells'
    model, has_atac = missing_atac
    mdata = model.adata
    result = model.get_modality_attribution(store=True)
    for modality, cells in (("atac", has_atac), ("rna", np.ones_like(has_atac))):
        for name, stored in (("attribution", "X_attribution"), ("weighted_z", "X_weighted_z")):
            values = result[modality][name]
            assert np.isnan(values[~cells]).all(), (modality, name)
            assert np.isfinite(values[cells]).all(), (modality, name)
            np.testing.assert_array_equal(mdata.obsm[f"{stored}_{modality}"], values)
    # the measured cells' rows are those of a call on them alone
    measured = model.get_modality_attribution(indices=np.flatnonzero(has_atac), store=False)
    np.testing.assert_allclose(result["atac"]["attribution"][has_atac], measured["atac"]["attribution"], rtol=1e-5)


def test_ambient_fraction_is_nan_for_cells_without_the_modality_and_summaries_leave_them_out(missing_atac):
    # they got a fraction, were counted in n_cells and widened the per-batch quantiles
    model, has_atac = missing_atac
    fractions = model.get_ambient_fraction("atac")
    assert np.isnan(fractions[~has_atac]).all() and np.isfinite(fractions[has_atac]).all()
    assert np.isfinite(model.get_ambient_fraction("rna")).all()  # every cell has RNA
    table = model.get_ambient_fraction("atac", summarize_by="batch")
    batch = model.adata.obs["batch"].to_numpy()
    for category in table.index:
        cells = (batch == category) & has_atac
        row = table.loc[category]
        assert row["n_cells"] == cells.sum() < (batch == category).sum()
        np.testing.assert_allclose(row[["mean", "median", "q05", "q95"]].to_numpy(dtype=float),
                                   [fractions[cells].mean(), np.median(fractions[cells]),
                                    np.quantile(fractions[cells], 0.05), np.quantile(fractions[cells], 0.95)],
                                   rtol=1e-6)
    exported = model.export_posterior(num_samples=2, seed=0, adata=model.adata.copy())
    np.testing.assert_array_equal(exported.obs["ambient_fraction_atac"].to_numpy(), fractions)


def test_exported_library_size_is_nan_for_cells_without_the_modality(missing_atac):
    # from a placeholder total of 1 it read ~0.004-0.02, a library size for a library that was not measured
    model, has_atac = missing_atac
    summaries = model.sample_posterior(num_samples=3, seed=0)
    for stat in ("means", "stds", "q05", "q95"):
        library = summaries[stat]["library_atac"]
        assert np.isnan(library[~has_atac]).all() and np.isfinite(library[has_atac]).all(), stat
        assert np.isfinite(summaries[stat]["library_rna"]).all(), stat
        assert np.isfinite(summaries[stat]["z_atac"]).all(), stat  # z is the decoders' input: kept
    exported = model.export_posterior(num_samples=3, seed=0, adata=model.adata.copy())
    np.testing.assert_array_equal(exported.obs["means_library_atac"].to_numpy(), summaries["means"]["library_atac"])
    assert np.isfinite(exported.obs["means_library_rna"]).all()


def test_the_library_size_getter_is_nan_for_cells_without_the_modality(missing_atac):
    # it gave about 0.002 for them (a library that was not measured) where export_posterior gave NaN
    model, has_atac = missing_atac
    atac = model.get_library_size("atac")
    assert np.isnan(atac[~has_atac]).all() and np.isfinite(atac[has_atac]).all() and (atac[has_atac] > 0).all()
    assert np.isfinite(model.get_library_size("rna")).all()
    some = np.flatnonzero(~has_atac)[:3]
    assert np.isnan(model.get_library_size("atac", indices=some)).all()



def test_expected_counts_at_the_latent_library_are_nan_for_cells_without_the_modality(missing_atac):
    # from the placeholder total of 1 they summed to about 0.2 % of a measured cell's, read as that cell's counts
    model, has_atac = missing_atac
    expected = model.get_normalized_expression("atac", library_size="latent").to_numpy()
    assert np.isnan(expected[~has_atac]).all() and np.isfinite(expected[has_atac]).all()
    draws = model.get_normalized_expression("atac", library_size="latent", n_samples=2, return_mean=False, seed=0)
    assert np.isnan(draws[:, ~has_atac]).all() and np.isfinite(draws[:, has_atac]).all()
    assert np.isfinite(model.get_normalized_expression("atac").to_numpy()).all()  # rho, the decoder's: kept
    assert np.isfinite(model.get_normalized_expression("rna", library_size="latent").to_numpy()).all()


def test_predictive_draws_for_cells_without_the_modality_are_said_not_to_be_an_imputation(missing_atac):
    # MULTIVI users impute a missing modality this way; here the draws came from a stand-in library (about 2 counts a
    # cell against about 900), without a word
    model, has_atac = missing_atac
    missing = int((~has_atac).sum())
    with pytest.warns(UserWarning, match=rf"{missing} of the cells drawn have no counts in modality 'atac': .* not an "
                                         r"imputation of that modality"):
        draws = model.posterior_predictive_sample(modality="atac", seed=0)
    assert draws.shape == (len(has_atac), 120)
    measured = np.flatnonzero(has_atac)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the measured cells alone, and the RNA of every cell: nothing to say
        model.posterior_predictive_sample(indices=measured, modality="atac", seed=0)
        model.posterior_predictive_sample(modality="rna", seed=0)

def batch_without_atac(all_of_it=True):
    """150 cells in 3 batches, every cell with ATAC but those of batch_2 (all, or all but one)."""
    import scipy.sparse as sp

    mdata = ps.datasets.simulate_multiome(n_cells=150, n_genes=75, n_peaks=120, n_batches=3, seed=2)
    batch_2 = np.flatnonzero(mdata.obs["batch"].to_numpy() == "batch_2")[0 if all_of_it else 1:]
    counts = mdata.mod["atac"].layers["counts"].tolil()
    counts[batch_2] = 0
    mdata.mod["atac"].layers["counts"] = sp.csr_matrix(counts)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", ambient_covariate_keys=["batch"],
                                            feature_scaling_covariate_keys=["batch"], dispersion_key="batch",
                                            library_size_key="batch")
    return mdata


def test_a_category_without_counts_in_a_modality_is_named_when_the_model_is_built():
    # its ATAC feature scaling, dispersion (~8.98 for every peak) and library group stayed the prior's, unsaid
    mdata = batch_without_atac()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    named = [m for m in messages if "has no cell with counts" in m]
    assert len(named) == 1, messages  # ATAC in batch_2 only: RNA and the other batches are measured
    assert named[0].startswith("modality 'atac' has no cell with counts in batch 'batch_2': its batch_2 feature "
                               "scaling, dispersion and library size are the prior's")
    with pytest.warns(UserWarning, match="its batch_2 dispersion, ambient and library size are the prior's"):
        ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16, ambient_modalities=["atac"],
                                   feature_scaling_modalities=[])
    # one measured cell in batch_2 informs them: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ps.RegularizedMultimodalVI(batch_without_atac(all_of_it=False), n_latent=3, n_hidden=16)


def test_the_wrong_data_object_or_the_data_in_place_of_the_modality_is_named():
    # an AnnData failed with "'AnnData' object has no attribute 'mod'"; scvi-tools' habit get_latent_representation(mdata)
    # printed the whole MuData as an unknown modality
    mdata = ps.datasets.simulate_multiome(n_cells=80, n_genes=75, n_peaks=120, seed=1)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    model = ps.RegularizedMultimodalVI(mdata, n_latent=2, n_hidden=8)
    with pytest.raises(TypeError, match=r"RegularizedMultimodalVI \(adata=\) takes a MuData .*given AnnData of 80 cells x 75 features.*RegularizedVI"):
        model.get_latent_representation(adata=mdata.mod["rna"])
    with pytest.raises(TypeError, match=r"get_latent_representation's first argument is the modality \(one of \['rna', "
                                        r"'atac'\]\), got a MuData; pass the data by name: "
                                        r"get_latent_representation\(adata=mdata, modality=\.\.\.\)"):
        model.get_latent_representation(mdata)
