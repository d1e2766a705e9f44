"""Modalities not named "rna" / "atac" (e.g. "gex" / "peaks"): the default ambient_modalities (["rna"]) and
feature_scaling_modalities (["atac"]) name none of them, so keys set up for those roles are refused at construction
(they were silently unused), and the printed summary names only the roles the model was built with."""

import mudata as md
import pytest

import pyro_scmodels as ps

md.set_options(pull_on_update=False)
MV = ps.RegularizedMultimodalVI


@pytest.fixture
def gex_peaks():
    sim = ps.datasets.simulate_multiome(n_cells=80, n_genes=75, n_peaks=120, seed=0)
    mdata = md.MuData({"gex": sim["rna"].copy(), "peaks": sim["atac"].copy()})
    mdata.obs = sim.obs.copy()
    return mdata


def test_ambient_keys_with_no_ambient_modality_are_refused_naming_the_argument(gex_peaks):
    MV.setup_mudata(gex_peaks, layer="counts", batch_key="batch")
    with pytest.raises(ValueError, match=r"ambient_covariate_keys \(or batch_key\) \['batch'\].*defaults to \['rna'\]"
                                         r".*\['gex', 'peaks'\].*ambient_modalities=\['gex'\]"):
        MV(gex_peaks, n_latent=2, n_hidden=8)
    model = MV(gex_peaks, n_latent=2, n_hidden=8, ambient_modalities=["gex"])
    assert model.module.guide.block("gex").dims.use_ambient
    assert "ambient: batch (gex)" in repr(model)


def test_scaling_keys_with_no_scaling_modality_are_refused_and_the_summary_shows_only_what_was_built(gex_peaks):
    MV.setup_mudata(gex_peaks, layer="counts", nn_conditioning_covariate_keys=["batch"])  # scaling keys default to it
    with pytest.raises(ValueError, match=r"feature_scaling_covariate_keys .*\['batch'\].*defaults to \['atac'\].*"
                                         r"feature_scaling_modalities=\['peaks'\]"):
        MV(gex_peaks, n_latent=2, n_hidden=8)
    without = MV(gex_peaks, n_latent=2, n_hidden=8, feature_scaling_modalities=[])  # asked for: none
    assert "feature scaling" not in repr(without)
    assert not any("feature_scaling" in site for site in without.module.guide.global_medians())
    scaled = MV(gex_peaks, n_latent=2, n_hidden=8, feature_scaling_modalities=["peaks"])
    assert "feature scaling: batch (peaks)" in repr(scaled)


def test_the_standard_names_need_no_argument():
    mdata = ps.datasets.simulate_multiome(n_cells=80, n_genes=75, n_peaks=120, seed=0)
    MV.setup_mudata(mdata, layer="counts", batch_key="batch", nn_conditioning_covariate_keys=["batch"])
    text = repr(MV(mdata, n_latent=2, n_hidden=8))
    assert "ambient: batch (rna)" in text and "feature scaling: batch (atac)" in text
