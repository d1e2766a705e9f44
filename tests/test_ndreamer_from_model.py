"""NDreamer built from a trained model's latent (from_model): its design checked first, its save and load, and the
model re-attached at load checked to be the one it was built from."""

import numpy as np
import pytest

import pyro_scmodels as ps
from pyro_scmodels.ndreamer import NDreamer

from . import _ndreamer_tiny

# the shared fixture of tests/_ndreamer_tiny.py, bound here for pytest to find
tiny_adata = _ndreamer_tiny.tiny_adata
tiny_model = _ndreamer_tiny.tiny_model


def test_from_model_checks_its_design_before_the_latent(tiny_model, monkeypatch):
    def latent(*args, **kwargs):
        raise AssertionError("the latent was computed before the design was checked")

    monkeypatch.setattr(tiny_model, "get_latent_representation", latent)
    with pytest.raises(KeyError, match="conditon"):
        NDreamer.from_model(tiny_model, "conditon", "control", device="cpu")




def test_from_model_refuses_a_condition_key_in_a_list(tiny_model):
    with pytest.raises(TypeError, match=r"condition_key must be one column of adata.obs"):
        NDreamer.from_model(tiny_model, ["condition"], "control", device="cpu")


def test_from_model_save_and_load_round_trip(tiny_model, tmp_path):
    nd = NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu")
    assert repr(nd).splitlines() == [
        "NDreamer(300 cells x 60 genes; representation: the latent of a RegularizedVI)",
        "  condition 'condition': control 'control', treatments ['stimulated']",
        "  batches (batch): ['batch_0', 'batch_1', 'batch_2']",
        "  layers computed: none yet"]
    with pytest.raises(ValueError, match="no network to train"):
        nd.train()
    nd.estimate_ite(nearest_neighbor=3)
    nd.estimate_model_ite(num_samples=3, quantiles=(0.1, 0.9))
    nd.estimate_model_ite(num_samples=3)  # the bounds of the first call would not belong to this mean: dropped
    assert sorted(n for n in nd.results.layers if n.startswith("ite_model")) == [
        "ite_model_stimulated", "ite_model_stimulated_q05", "ite_model_stimulated_q95"]
    nd.save(str(tmp_path / "nd"))
    loaded = NDreamer.load(str(tmp_path / "nd"), device="cpu")
    assert list(loaded.results.obs_names) == list(nd.results.obs_names)
    np.testing.assert_array_equal(loaded.get_modifier_space(), nd.get_modifier_space())
    for layer in nd.results.layers:
        np.testing.assert_allclose(loaded.results.layers[layer], nd.results.layers[layer])
    np.testing.assert_allclose(loaded.estimate_ite(nearest_neighbor=5).layers["ite_stimulated"],
                               nd.estimate_ite(nearest_neighbor=5).layers["ite_stimulated"], atol=1e-6)
    with pytest.raises(ValueError, match="loaded without its model"):
        loaded.estimate_model_ite(num_samples=3)
    with pytest.raises(ValueError, match="no network to train"):
        loaded.train()
    attached = NDreamer.load(str(tmp_path / "nd"), device="cpu", model=tiny_model)
    np.testing.assert_allclose(attached.estimate_model_ite(num_samples=3).layers["ite_model_stimulated"],
                               nd.results.layers["ite_model_stimulated"], atol=1e-6)
    attached.save(str(tmp_path / "nd"), overwrite=True)


def test_load_refuses_a_model_that_is_not_the_one_it_was_built_from(tiny_model, tmp_path):
    """The model ITE is written by position under the saved genes: a model with the genes in another order filed each
    gene's effect under another's name; a model trained further decoded effects the stored latent was not matched in."""
    nd = NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu")
    nd.save(str(tmp_path / "nd"))
    tiny_model.save(str(tmp_path / "model"))
    reloaded = ps.RegularizedVI.load(str(tmp_path / "model"), tiny_model.adata.copy(), device="cpu")
    NDreamer.load(str(tmp_path / "nd"), device="cpu", model=reloaded)  # the same model, saved and loaded: accepted
    reversed_genes = tiny_model.adata[:, ::-1].copy()
    ps.RegularizedVI.setup_anndata(reversed_genes, layer="counts", nn_conditioning_covariate_keys=["condition"])
    other = ps.RegularizedVI(reversed_genes, n_hidden=16, n_latent=4)
    with pytest.raises(ValueError, match="other genes than the saved NDreamer .*position 0: 'gene_59' against the "
                                         "saved 'gene_0'"):
        NDreamer.load(str(tmp_path / "nd"), device="cpu", model=other)
    fewer = ps.RegularizedVI(_setup_copy(tiny_model.adata[:, :40]), n_hidden=16, n_latent=4)
    with pytest.raises(ValueError, match="40 genes against the saved 60"):
        NDreamer.load(str(tmp_path / "nd"), device="cpu", model=fewer)
    reloaded.train(max_epochs=1, batch_size=128, device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match="parameters differ from those of the model this NDreamer was built from"):
        NDreamer.load(str(tmp_path / "nd"), device="cpu", model=reloaded)


def test_load_refuses_the_model_on_other_counts_under_the_same_cell_names(tiny_model, tmp_path):
    # the file's rows rebuilt in another order (names, labels, genes and parameters all as saved): each cell got
    # another cell's model ITE, without a word
    nd = NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu")
    nd.save(str(tmp_path / "nd"))
    tiny_model.save(str(tmp_path / "model"))
    shuffled = tiny_model.adata.copy()
    order = np.random.default_rng(0).permutation(shuffled.n_obs)
    shuffled.layers["counts"] = shuffled.layers["counts"][order]
    shuffled.X = shuffled.layers["counts"].copy()
    on_shuffled = ps.RegularizedVI.load(str(tmp_path / "model"), shuffled, device="cpu")
    with pytest.raises(ValueError, match="holds other counts than the data this NDreamer was built from: the model's "
                                         "latent of cell 'cell_"):
        NDreamer.load(str(tmp_path / "nd"), device="cpu", model=on_shuffled)


def test_the_model_ite_is_refused_once_the_model_has_changed(tiny_model):
    # trained further after from_model, the model ITE moved (by up to 0.38) while the matches, the latent and the
    # CATE stayed the old model's; the save then held layers of two models and could not take either back
    model = ps.RegularizedVI(tiny_model.adata.copy(), n_hidden=16, n_latent=4)
    model.train(max_epochs=2, batch_size=128, early_stopping=False, device="cpu", progress_bar=False)
    nd = NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu")
    nd.estimate_model_ite(num_samples=2)
    model.train(max_epochs=1, batch_size=128, early_stopping=False, device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match="trained or changed after NDreamer.from_model"):
        nd.estimate_model_ite(num_samples=2)


def test_a_cell_or_gene_asked_for_twice_is_refused(tiny_model):
    # the result is an AnnData indexed by names: repeats gave it repeated obs or var names (anndata only warned)
    nd = NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu")
    with pytest.raises(ValueError, match=r"indices names the cell\(s\) \['cell_1'\] more than once"):
        nd.estimate_ite(indices=[1, 1, 2])
    with pytest.raises(ValueError, match=r"gene_list names the gene\(s\) \['gene_3'\] more than once"):
        nd.estimate_model_ite(num_samples=2, gene_list=["gene_3", "gene_4", "gene_3"])
    assert nd.estimate_ite(indices=[2, 1]).obs_names.tolist() == ["cell_2", "cell_1"]


def _setup_copy(adata):
    adata = adata.copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", nn_conditioning_covariate_keys=["condition"])
    return adata


def test_from_model_factual_is_kept_through_save_and_load(tiny_model, tmp_path):
    """from_model's factual ("matched" by default) decides the matched ITE, and a saved result keeps it."""
    with pytest.raises(ValueError, match="factual must be"):
        NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu", factual="itself")
    ite = {}
    for factual in ("matched", "observed"):
        nd = NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu", factual=factual)
        ite[factual] = nd.estimate_ite(nearest_neighbor=5).layers["ite_stimulated"].copy()
        nd.save(str(tmp_path / factual))
        loaded = NDreamer.load(str(tmp_path / factual), device="cpu")
        space = loaded.get_modifier_space()
        loaded.effects.invalidate()  # recomputed from the matches, not read from the saved layers
        loaded.effects.set_embedding(space)
        np.testing.assert_allclose(loaded.estimate_ite(nearest_neighbor=5).layers["ite_stimulated"], ite[factual],
                                   atol=1e-6)
    with pytest.raises(AttributeError):  # fixed once set: the cached effects do not record it
        nd.effects.factual = "matched"
    default = NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu")
    np.testing.assert_array_equal(default.estimate_ite(nearest_neighbor=5).layers["ite_stimulated"], ite["matched"])
    assert np.abs(ite["matched"] - ite["observed"]).max() > 0.05


def test_from_model_needs_a_model_of_the_package(tiny_model):
    class NotAModel:
        adata = tiny_model.adata

    with pytest.raises(ValueError, match="needs a model of this package"):
        NDreamer.from_model(NotAModel(), "condition", "control")
    source, layer = tiny_model.counts_source()
    assert source is tiny_model.adata and layer == "counts"


def test_a_multimodal_model_whose_rna_modality_lacks_cells_is_named_before_the_latent(monkeypatch):
    # NDreamer reads the model's default modality (its RNA, whatever the modalities' order), as every query does
    mdata = ps.datasets.simulate_multiome(n_cells=120, n_genes=75, n_peaks=120, seed=0)
    mdata.obs["condition"] = np.where(np.arange(120) % 2 == 0, "control", "stimulated")
    rna = mdata.mod["rna"]
    missing = 7
    for matrix in (rna.X, rna.layers["counts"]):
        matrix[:missing] = 0
        matrix.eliminate_zeros()
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", modalities=["atac", "rna"])
    model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=8)

    def latent(*args, **kwargs):
        raise AssertionError("the latent was computed before the cells without counts were found")

    monkeypatch.setattr(model, "get_latent_representation", latent)
    with pytest.raises(ValueError, match=rf"the modality 'rna' .*which has no counts for {missing} of its 120 "
                                         r"cells.*other modalities: \['atac'\]"):
        NDreamer.from_model(model, "condition", "control", device="cpu")


@pytest.fixture(scope="module")
def gex_atac_model():
    """A RegularizedMultimodalVI whose modalities are "gex" and "atac" (none named "rna"), the condition in its decoder."""
    import mudata

    simulated = ps.datasets.simulate_multiome(n_cells=120, n_genes=75, n_peaks=120, seed=1)
    mdata = mudata.MuData({"gex": simulated.mod["rna"], "atac": simulated.mod["atac"]})
    mdata.obs["condition"] = np.where(np.arange(120) % 2 == 0, "control", "stimulated")
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", nn_conditioning_covariate_keys=["condition"],
                                            encoder_covariate_keys=["condition"])
    model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=8)
    model.train(max_epochs=2, batch_size=64, early_stopping=False, device="cpu", progress_bar=False)
    return model


def test_from_model_takes_the_modality_of_a_model_without_rna(gex_atac_model, tmp_path):
    model = gex_atac_model
    with pytest.raises(ValueError, match=r"from_model\(modality=None\).*no modality named 'rna' \(its modalities: "
                                         r"\['(gex|atac)', '(gex|atac)'\]\).*pass modality="):
        NDreamer.from_model(model, "condition", "control", device="cpu")
    with pytest.raises(ValueError, match=r"Unknown modality 'rna'; the model has \['(gex|atac)', '(gex|atac)'\]"):
        NDreamer.from_model(model, "condition", "control", device="cpu", modality="rna")
    nd = NDreamer.from_model(model, "condition", "control", device="cpu", modality="gex")
    assert list(nd.results.var_names) == list(model.var_names["gex"])
    assert "the expression of its 'gex'" in repr(nd)
    # the model ITE decodes the same modality (the model has no default one to fall back on)
    ite = nd.estimate_model_ite(num_samples=2, widen_by_matching=False).layers["ite_model_stimulated"].copy()
    assert ite.shape == (120, 75) and np.isfinite(ite).all()
    nd.save(str(tmp_path / "nd"))
    assert NDreamer.load(str(tmp_path / "nd"), device="cpu").settings["modality"] == "gex"
    attached = NDreamer.load(str(tmp_path / "nd"), device="cpu", model=model)
    assert "the expression of its 'gex'" in repr(attached)
    np.testing.assert_allclose(attached.estimate_model_ite(num_samples=2, widen_by_matching=False)
                               .layers["ite_model_stimulated"], ite, atol=1e-6)


def test_from_model_refuses_a_modality_for_a_single_modality_model(tiny_model):
    with pytest.raises(ValueError, match=r"from_model\(modality='rna'\): RegularizedVI models one count matrix"):
        NDreamer.from_model(tiny_model, "condition", "control", device="cpu", modality="rna")


def test_one_draw_is_refused_where_the_bounds_are_the_spread_of_z(tiny_model):
    # widen_by_matching=False gave bounds equal to the estimate in every entry: a "90 % interval" of width 0
    nd = NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu")
    for widen in (False, True):
        with pytest.raises(ValueError, match=rf"num_samples=1 with widen_by_matching={widen}.*num_samples >= 2"):
            nd.estimate_model_ite(num_samples=1, widen_by_matching=widen, indices=[0, 1])
    hull = nd.estimate_model_ite(num_samples=1, indices=[0, 1])  # its bounds are the matched interval's
    assert (hull.layers["ite_model_stimulated_q95"] > hull.layers["ite_model_stimulated_q05"]).mean() > 0.5
