"""RegularizedMultimodalVI (SPEC 2): training on real paired RNA + ATAC in every latent mode, agreement with
RegularizedVI on one modality, setup and resume refusals, older saves, and the scvi-tools calls."""

import os

import mudata
import numpy as np
import pandas as pd
import pyro.distributions as dist
import pytest

import pyro_scmodels as ps
from pyro_scmodels import metrics as M

from .conftest import shared_file
from ._multimodal import SMALL, FIT


@pytest.fixture(scope="module")
def multiome():
    mudata.set_options(pull_on_update=False)
    with pytest.warns(UserWarning):  # the file was written by anndata tools, not mudata
        return mudata.read_h5mu(shared_file("pbmc_multiome_muon_test_rna_atac.h5mu"))


@pytest.mark.parametrize("latent_mode, weights", [("concatenation", "equal"), ("weighted_mean", "universal"),
                                                  ("weighted_mean", "cell"), ("single_encoder", "equal")])
def test_trains_on_real_multiome_in_every_latent_mode(multiome, latent_mode, weights):
    mdata = multiome.copy()
    ps.RegularizedMultimodalVI.setup_mudata(mdata, modalities=["rna", "atac"])
    model = ps.RegularizedMultimodalVI(mdata, latent_mode=latent_mode, modality_weights=weights, **SMALL)
    history = model.train(max_epochs=25, **FIT)
    assert np.isfinite(history.to_numpy()).all()
    assert history["train_loss"].iloc[-3:].mean() < 0.85 * history["train_loss"].iloc[0]
    z = model.get_latent_representation()
    assert z.shape == (1000, 10 if latent_mode == "concatenation" else 5) and np.isfinite(z).all()
    assert model.get_normalized_expression("atac").shape == (1000, mdata.mod["atac"].n_vars)
    assert model.get_ambient_profile("rna").shape == (mdata.mod["rna"].n_vars, 1)
    assert model.get_feature_scaling("atac").shape == (mdata.mod["atac"].n_vars, 1)


def test_latent_blocks_follow_the_users_modality_order(multiome):
    mdata = multiome.copy()
    ps.RegularizedMultimodalVI.setup_mudata(mdata, modalities=["atac", "rna"])
    model = ps.RegularizedMultimodalVI(mdata, n_latent={"atac": 3, "rna": 4}, n_hidden={"atac": 16, "rna": 32})
    model.train(max_epochs=2, **FIT)
    z = model.get_latent_representation()
    np.testing.assert_allclose(z[:, :3], model.get_latent_representation("atac"), rtol=1e-6)
    np.testing.assert_allclose(z[:, 3:], model.get_latent_representation("rna"), rtol=1e-6)
    with pytest.raises(ValueError, match="same n_latent"):
        ps.RegularizedMultimodalVI(mdata, n_latent={"atac": 3, "rna": 4}, latent_mode="weighted_mean")


def test_single_modality_mudata_agrees_with_regularizedvi():
    mdata = ps.datasets.simulate_multiome(n_cells=900, seed=1)
    rna_only = mudata.MuData({"rna": mdata.mod["rna"].copy()})
    rna_only.obs["cell_type"] = mdata.obs["cell_type"].to_numpy()
    rna_only.obs["rna_state"] = mdata.obs["rna_state"].to_numpy()
    ps.RegularizedMultimodalVI.setup_mudata(rna_only, layer="counts")
    multimodal = ps.RegularizedMultimodalVI(rna_only, **SMALL)
    multimodal.train(max_epochs=40, **FIT)
    adata = mdata.mod["rna"].copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts")
    single = ps.RegularizedVI(adata, **SMALL)
    single.train(max_epochs=40, **FIT)
    state = rna_only.obs["rna_state"]
    ari_multi = M.cluster_ari(multimodal.get_latent_representation(), state)
    ari_single = M.cluster_ari(single.get_latent_representation(), state)
    assert ari_multi > 0.9 and ari_single > 0.9
    theta_multi = multimodal.get_dispersion("rna").iloc[:, 0]
    theta_single = single.get_dispersion().iloc[:, 0]
    assert M.spearman(theta_multi, theta_single) > 0.8
    assert multimodal.history["train_loss"].iloc[-1] == pytest.approx(single.history["train_loss"].iloc[-1], rel=0.05)


def test_resuming_with_the_modalities_swapped_is_refused(multiome, tmp_path):
    # swapped modalities of the same sizes resumed silently onto the wrong decoders
    models = []
    n = min(multiome.mod["rna"].n_vars, multiome.mod["atac"].n_vars)  # the same sizes: only the names tell them apart
    for modalities in (["rna", "atac"], ["atac", "rna"]):
        mdata = mudata.MuData({m: multiome.mod[m][:200, :n].copy() for m in ("rna", "atac")})
        ps.RegularizedMultimodalVI.setup_mudata(mdata, modalities=modalities)
        models.append(ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16))
    models[0].train(max_epochs=1, checkpoint_dir=str(tmp_path), **FIT)
    with pytest.raises(ValueError, match=r"feature names\.0: atac, feature names\.0: rna"):
        models[1].train(max_epochs=2, checkpoint_dir=str(tmp_path), **FIT)


def test_setup_errors(multiome):
    mdata = multiome.copy()
    with pytest.raises(ValueError, match="Unknown modalities"):
        ps.RegularizedMultimodalVI.setup_mudata(mdata, modalities=["rna", "protein"])
    with pytest.raises(TypeError, match="layer=\\{modality: layer\\}"):
        ps.RegularizedMultimodalVI.setup_mudata(mdata, modalities={"rna": "rna", "atac": "nope"})
    single = mdata.copy()
    ps.RegularizedMultimodalVI.setup_mudata(single, modalities="rna")  # one name, not its letters
    assert ps.data.read_mudata_setup(single).modalities == ["rna"]
    with pytest.raises(ValueError, match="not been set up"):
        ps.RegularizedMultimodalVI(multiome.copy())
    ps.RegularizedMultimodalVI.setup_mudata(mdata)
    with pytest.raises(ValueError, match="latent_mode"):
        ps.RegularizedMultimodalVI(mdata, latent_mode="product")
    with pytest.raises(ValueError, match="in latent_mode='weighted_mean' only"):
        ps.RegularizedMultimodalVI(mdata, modality_weights="cell")  # concatenation has no weights: it was ignored
    with pytest.raises(ValueError, match=r"does not have: \['adt'\]"):
        ps.RegularizedMultimodalVI(mdata, n_latent={"rna": 3, "atac": 2, "adt": 2})
    with pytest.raises(ValueError, match="unknown modalities"):
        ps.RegularizedMultimodalVI(mdata, ambient_modalities=["protein"])
    # per-modality dicts name every modality: a misspelt key left that modality to its default without a word
    with pytest.raises(ValueError, match=r"layer has no entry for modality \['atac'\] \(did you mean \['ATAC'\]"):
        ps.RegularizedMultimodalVI.setup_mudata(mdata.copy(), layer={"rna": None, "ATAC": None})
    with pytest.raises(ValueError, match=r"names \['rna'\] more than once"):
        ps.RegularizedMultimodalVI.setup_mudata(mdata.copy(), modalities=["rna", "rna"])
    # a feature named twice in a modality passed setup and training; then DE and gene_list= failed inside pandas
    # ("cannot reindex on an axis with duplicate labels"). setup_anndata refuses it; so does setup_mudata now
    repeated = mdata.copy()
    names = list(repeated.mod["rna"].var_names)
    repeated.mod["rna"].var_names = [names[0], *names[:-1]]
    with pytest.raises(ValueError, match=r"mdata.mod\['rna'\].var_names are not unique.*var_names_make_unique"):
        ps.RegularizedMultimodalVI.setup_mudata(repeated)
    with pytest.raises(ValueError, match=r"priors has no entry for modality \['atac'\]"):
        ps.RegularizedMultimodalVI(mdata, priors={"rna": ps.RegularizedPriors()})
    with pytest.raises(ValueError, match=r"priors names modalities the model does not have: \['ATAC'\]"):
        ps.RegularizedMultimodalVI(mdata, priors={"rna": ps.RegularizedPriors(), "atac": ps.RegularizedPriors(),
                                                  "ATAC": ps.RegularizedPriors()})
    with pytest.raises(TypeError, match=r"priors\['atac'\] must be a RegularizedPriors"):
        ps.RegularizedMultimodalVI(mdata, priors={"rna": ps.RegularizedPriors(), "atac": None})
    # a prior of a site the modality does not have was dropped without a word (by default RNA has no feature
    # scaling and ATAC no ambient term)
    scaled = ps.RegularizedPriors(feature_scaling=dist.Gamma(2.0, 2.0))
    with pytest.raises(ValueError, match=r"priors\['rna'\] sets \['feature_scaling'\], but modality 'rna' has no "
                                         r"feature scaling term \(feature_scaling_modalities=\['atac'\]\)"):
        ps.RegularizedMultimodalVI(mdata, priors={"rna": scaled, "atac": ps.RegularizedPriors()})
    with pytest.raises(ValueError, match=r"priors\['atac'\] sets \['ambient', 'regularize_ambient'\]"):
        ps.RegularizedMultimodalVI(mdata, priors={"rna": ps.RegularizedPriors(), "atac": ps.RegularizedPriors(
            ambient=dist.Gamma(2.0, 5.0), regularize_ambient=True)})
    with pytest.raises(ValueError, match=r"priors sets \['ambient'\], but no modality has an ambient term"):
        ps.RegularizedMultimodalVI(mdata, ambient_modalities=[], priors=ps.RegularizedPriors(ambient=dist.Gamma(2.0, 5.0)))
    # one object for both: ATAC has the feature scaling it edits; reported per modality, RNA's copy is at the default,
    # so the model rebuilds from its own init_params (it was refused: RNA's copy carried the edit)
    both = ps.RegularizedMultimodalVI(mdata, priors=scaled)
    assert float(both.priors["atac"].feature_scaling.rate) == 2.0 and float(both.priors["rna"].feature_scaling.rate) == 200.0
    ps.RegularizedMultimodalVI(mdata, **both.init_params)


def test_unaligned_modalities_are_named_with_the_fix_for_each_case():
    # one hint for every case (mu.pp.intersect_obs), which drops the cells without the modality and does not reorder
    from pyro_scmodels.data.mudata_registry import _unaligned

    cells = pd.Index([f"c{i}" for i in range(6)])
    shuffled = _unaligned("atac", cells[::-1], cells)
    assert "same cells in another order" in shuffled and "mdata.mod['atac'][mdata.obs_names]" in shuffled
    assert "intersect_obs" not in shuffled
    lacking = _unaligned("atac", cells[:4], cells)
    assert "lacks 2 of its cells (e.g. ['c4', 'c5'])" in lacking and "row of zeros" in lacking
    extra = _unaligned("atac", cells.append(pd.Index(["x1"])), cells)
    assert "holds 1 cell(s) not in mdata.obs (e.g. ['x1'])" in extra and "mdata.update()" in extra
    both = _unaligned("atac", cells[:4].append(pd.Index(["x1"])), cells)  # only the extra cells were named
    assert "holds 1 cell(s) not in mdata.obs" in both and "lacks 2 of its cells" in both
    repeated = _unaligned("atac", cells.append(cells[:1]), cells)  # it read "lacks 0 of its cells (e.g. [])"
    assert "names cells more than once (e.g. ['c0'])" in repeated and "lacks" not in repeated
    mdata = ps.datasets.simulate_multiome(n_cells=60, n_genes=75, n_peaks=120, seed=0)
    mdata.mod["atac"] = mdata.mod["atac"][::-1].copy()
    with pytest.raises(ValueError, match="same cells in another order"):
        ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")


def test_a_save_and_checkpoint_of_an_earlier_version_with_a_shared_edited_prior_still_load_and_resume(tmp_path,
                                                                                                       monkeypatch):
    # earlier versions reported every block's priors as its buffers held them, so a shared edit of feature scaling
    # was also in RNA's (unused); now RNA's reads at the default, and the old save was refused ("priors differ")
    import warnings

    mdata = ps.datasets.simulate_multiome(n_cells=150, n_genes=75, n_peaks=120, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", ambient_covariate_keys=["batch"],
                                            feature_scaling_covariate_keys=["batch"])
    shared = ps.RegularizedPriors(feature_scaling=dist.Gamma(2.0, 2.0))
    quick = dict(batch_size=75, progress_bar=False, device="cpu", early_stopping=False)
    monkeypatch.setattr(ps.RegularizedMultimodalVI, "_priors_in_use", ps.RegularizedMultimodalVI._legacy_priors)
    monkeypatch.setattr(ps.RegularizedMultimodalVI, "_legacy_priors", lambda self: None)
    earlier = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16, priors=shared)
    earlier.train(max_epochs=1, checkpoint_dir=str(tmp_path / "ckpt"), **quick)
    earlier.save(str(tmp_path / "saved"))
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = ps.RegularizedMultimodalVI.load(str(tmp_path / "saved"), mdata, device="cpu")
    assert float(loaded.priors["atac"].feature_scaling.rate) == 2.0
    resumed = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16, priors=shared)
    resumed.train(max_epochs=2, checkpoint_dir=str(tmp_path / "ckpt"), **quick)
    assert len(resumed.history) == 2  # it resumed
    with pytest.raises(ValueError, match="priors differ"):  # another prior is still refused
        ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16).train(max_epochs=3, checkpoint_dir=str(tmp_path / "ckpt"),
                                                                        **quick)


def test_query_mapping_is_refused_by_name():
    # an AttributeError came back: scvi-tools users expect the method, or a clear "not supported"
    with pytest.raises(NotImplementedError, match="RegularizedMultimodalVI has no query mapping"):
        ps.RegularizedMultimodalVI.load_query_data(None, None)
    with pytest.raises(NotImplementedError, match="RegularizedVI.load_query_data"):
        ps.RegularizedMultimodalVI.prepare_query_anndata(None, None)


def test_modalities_whose_names_end_alike_keep_their_own_sites():
    """"rna" and "new_rna" (total and newly made RNA): "obs_new_rna" ends with "_rna" too."""
    pair = ps.datasets.simulate_multiome(n_cells=120, seed=0)
    rna = pair.mod["rna"]
    mdata = mudata.MuData({"rna": rna.copy(), "new_rna": rna.copy()})
    mdata.mod["new_rna"].layers["counts"] = rna.layers["counts"] * 2
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=8, ambient_modalities=["new_rna"],
                                       feature_scaling_modalities=[])
    assert {s: model.site_modality(s) for s in ("obs_rna", "obs_new_rna", "ambient_new_rna", "z")} == {
        "obs_rna": "rna", "obs_new_rna": "new_rna", "ambient_new_rna": "new_rna", "z": None}
    draws = model.posterior_predictive(num_samples=2, seed=0)
    assert set(draws) == {"rna", "new_rna"}
    np.testing.assert_array_equal(model.posterior_predictive(num_samples=2, seed=0)["new_rna"], draws["new_rna"])
    for seed in (1.5, "1"):  # checked as every seed is (it was taken as int(seed))
        with pytest.raises(TypeError, match=r"seed must be an integer in \[0, 2\*\*32 - 1\], got "):
            model.posterior_predictive(num_samples=2, seed=seed)
    np.testing.assert_array_equal(model.posterior_predictive_sample(modality="new_rna", n_samples=2, seed=0),
                                  draws["new_rna"].transpose(1, 2, 0))
    model.export_posterior(num_samples=2, seed=0)
    assert "means_ambient_new_rna" in mdata.mod["new_rna"].varm and "means_inverse_sqrt_theta_rna" in mdata.mod["rna"].varm
    assert not [key for key in mdata.mod["rna"].varm if key.endswith("new_rna")]


# scvi-tools' training settings of tests/_scvi_api.py
SCVI_FIT = dict(batch_size=64, lr=1e-2, kl_warmup_epochs=2, early_stopping=False, device="cpu", progress_bar=False)


def test_multimodal_model_answers_scvi_tools_calls(tmp_path, monkeypatch):
    """The scvi-tools calls of tests/test_scvi_api_*.py, on the multimodal model."""
    mdata = ps.datasets.simulate_multiome(n_cells=150, n_genes=80, n_peaks=120, seed=2, atac_missing_fraction=0.1)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", batch_key="batch")
    model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, **SCVI_FIT)
    assert list(model.history["elbo_train"].index) == [0, 1] and "RegularizedMultimodalVI(" in repr(model)
    errors = model.get_reconstruction_error(return_mean=False)
    assert set(errors) == {"reconstruction_loss", "reconstruction_loss_rna", "reconstruction_loss_atac"}
    # a cell without ATAC counts has no ATAC error (NaN), not a perfect fit of 0; the mean is over the cells measured
    has_atac = mdata.obs["has_atac"].to_numpy()
    assert (~has_atac).any() and np.isnan(errors["reconstruction_loss_atac"]).tolist() == (~has_atac).tolist()
    np.testing.assert_allclose(errors["reconstruction_loss"],
                               errors["reconstruction_loss_rna"] + np.nan_to_num(errors["reconstruction_loss_atac"]), rtol=1e-5)
    means = model.get_reconstruction_error()
    np.testing.assert_allclose(means["reconstruction_loss_atac"], errors["reconstruction_loss_atac"][has_atac].mean(), rtol=1e-5)
    # a NaN of a measured cell (a numerical problem) is not left out of the mean
    from pyro_scmodels.models.evidence import EvidenceQueries

    terms_of = EvidenceQueries._local_terms

    def poisoned(self, batch, n_obs):
        terms = terms_of(self, batch, n_obs)
        terms["obs:obs_rna"] = terms["obs:obs_rna"].clone()
        terms["obs:obs_rna"][0] = float("nan")
        return terms

    monkeypatch.setattr(EvidenceQueries, "_local_terms", poisoned)
    assert np.isnan(model.get_reconstruction_error()["reconstruction_loss_rna"])
    assert np.isnan(model.get_reconstruction_error()["reconstruction_loss"])
    monkeypatch.undo()
    np.testing.assert_allclose(means["reconstruction_loss"], errors["reconstruction_loss"].mean(), rtol=1e-5)
    assert np.isfinite(model.get_elbo(return_mean=False)).all()
    np.testing.assert_allclose(model.get_marginal_ll(n_mc_samples=1, seed=1), model.get_elbo(seed=1), rtol=1e-6)
    mean, variance = model.get_latent_representation(return_dist=True)
    assert mean.shape == variance.shape == (150, 6)
    np.testing.assert_array_equal(model.get_latent_representation(mc_samples=100), mean)
    peaks = list(mdata.mod["atac"].var_names[:4])
    draws = model.get_normalized_expression("atac", gene_list=peaks, n_samples=2, return_mean=False, library_size=1)
    assert draws.shape == (2, 150, 4)
    assert model.posterior_predictive_sample(n_samples=3, gene_list=peaks, modality="atac").shape == (150, 4, 3)
    assert model.posterior_predictive_sample().shape == (150, 80)  # the first modality, as every query's default
    assert model.get_feature_correlation_matrix(indices=np.arange(30), modality="atac").shape == (120, 120)
    assert list(model.get_feature_correlation_matrix(indices=np.arange(30)).index) == list(mdata.mod["rna"].var_names)
    folder = str(tmp_path / "multimodal")
    model.save(folder, save_anndata=True)
    assert os.path.isfile(os.path.join(folder, "mdata.h5mu"))
    loaded = ps.RegularizedMultimodalVI.load(folder)
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation(), rtol=1e-5, atol=1e-6)
