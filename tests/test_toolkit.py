"""The modeller's toolkit on RegularizedVI: editing priors, guide families, subclassing one site,
posterior export, the model graph and Bayesian differential expression."""

import os
import sys
import warnings

import anndata
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import scanpy as sc
import torch
from pyro import poutine

import pyro_scmodels as ps
from pyro_scmodels.differential_statistics import expected_fdr_selection
from pyro_scmodels.models.regularizedvi_module import RegularizedVIModel

from .conftest import shared_file

FIT = dict(max_epochs=60, batch_size=128, lr=1e-2, kl_warmup_epochs=5, early_stopping=False, device="cpu", progress_bar=False)
SMALL = dict(n_hidden=32, n_latent=5)


@pytest.fixture(scope="module")
def sim():
    adata = ps.datasets.simulate(n_cells=600, n_genes=100, n_markers_per_type=8, n_responding_genes=10, seed=5)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", ambient_covariate_keys=["batch"], library_size_key="batch")
    return adata


@pytest.fixture(scope="module")
def default_ambient(sim):
    """The ambient profile of RegularizedVI at the default priors and the default model class, trained with FIT: the
    reference of the two tests below that change the ambient site (one fit for both, not one each)."""
    model = ps.RegularizedVI(sim, **SMALL)
    model.train(**FIT)
    return model.get_ambient_profile().to_numpy()


def _trace(model):
    batch, n_obs = next(model._batches(indices=np.arange(8)))
    guide_trace = poutine.trace(model.module.guide).get_trace(batch, n_obs)
    return guide_trace, poutine.trace(poutine.replay(model.module.model, trace=guide_trace)).get_trace(batch, n_obs)


def test_ambient_prior_term_is_masked_by_default_and_counts_when_switched_on(sim):
    for regularize, expected in ((False, 0.0), (True, None)):
        model = ps.RegularizedVI(sim, priors=ps.RegularizedPriors(regularize_ambient=regularize), **SMALL)
        _, trace = _trace(model)
        trace.compute_log_prob()
        site = trace.nodes["ambient"]
        prior_term = site["fn"].log_prob(site["value"]).sum().item()
        if expected is not None:
            assert site["log_prob_sum"].item() == expected
        else:
            assert site["log_prob_sum"].item() == pytest.approx(prior_term)


def test_a_much_stronger_ambient_prior_shrinks_the_background(sim, default_ambient):
    # default_ambient: the default priors, whose ambient term is masked
    strong = ps.RegularizedVI(sim, priors=ps.RegularizedPriors(ambient=dist.Gamma(1.0, 1e4), regularize_ambient=True),
                              **SMALL)
    strong.train(**FIT)
    assert np.median(strong.get_ambient_profile().to_numpy()) < 0.2 * np.median(default_ambient)


def test_prior_hyperparameters_reach_the_elbo(sim):
    """Changing a prior's numbers changes the model's log-density at the same values."""
    default = ps.RegularizedVI(sim, **SMALL)
    edited = ps.RegularizedVI(sim, priors=ps.RegularizedPriors(feature_scaling=dist.Gamma(2.0, 2.0)), **SMALL)
    edited.module.load_state_dict({k: v for k, v in default.module.state_dict().items() if "priors." not in k}, strict=False)
    torch.manual_seed(0)
    _, t1 = _trace(default)
    torch.manual_seed(0)  # same guide parameters and seed: same samples
    _, t2 = _trace(edited)
    t1.compute_log_prob()
    t2.compute_log_prob()
    assert t1.nodes["feature_scaling"]["log_prob_sum"].item() != pytest.approx(t2.nodes["feature_scaling"]["log_prob_sum"].item())
    assert t1.nodes["obs"]["log_prob_sum"].item() == pytest.approx(t2.nodes["obs"]["log_prob_sum"].item(), rel=1e-4)


def test_global_guide_family_switches_to_lognormal(sim):
    model = ps.RegularizedVI(sim, global_guides={"ambient": "lognormal", "feature_scaling": "lognormal"}, **SMALL)
    guide_trace, _ = _trace(model)
    assert isinstance(guide_trace.nodes["ambient"]["fn"], dist.LogNormal)
    assert isinstance(guide_trace.nodes["dispersion_rate"]["fn"], dist.Delta)
    model.train(max_epochs=3, **{k: v for k, v in FIT.items() if k != "max_epochs"})
    summary = model.sample_posterior(num_samples=10, indices=np.arange(50))
    assert (summary["stds"]["ambient"] > 0).all()
    assert (summary["stds"]["dispersion_rate"] == 0).all()
    with pytest.raises(ValueError, match="need at least 2 draws"):  # one draw reported every sd as 0
        model.sample_posterior(num_samples=1)
    # the point estimates' sd 0 read as certainty beside real quantiles; they are named now
    assert "dispersion_rate" in model.point_estimate_sites and "feature_scaling" not in model.point_estimate_sites
    assert "ambient" not in model.point_estimate_sites and "z" not in model.point_estimate_sites


def test_the_export_names_the_sites_whose_guide_is_a_point_estimate(sim):
    model = ps.RegularizedVI(sim, **SMALL)
    model.train(max_epochs=2, **{k: v for k, v in FIT.items() if k != "max_epochs"})
    exported = model.export_posterior(sim.copy(), num_samples=3)
    named = exported.uns["RegularizedVI"]["point_estimates"]
    assert {"ambient", "feature_scaling", "dispersion_rate"} <= set(named)
    assert not {"z", "inverse_sqrt_theta", "dispersion"} & set(named)  # sampled from a spread
    for site in ("ambient", "feature_scaling"):  # sd 0, as the list says
        assert (exported.varm[f"stds_{site}"].to_numpy() == 0).all()
    assert (exported.varm["stds_dispersion"].to_numpy() > 0).all()


def test_subclass_overrides_one_site(sim, default_ambient):
    class HalfNormalAmbient(RegularizedVIModel):
        def sample_ambient(self, genes):
            with pyro.plate("ambient_categories", self.dims.n_ambient, dim=-2), genes:
                return pyro.sample("ambient", dist.HalfNormal(0.01))

    class MyModel(ps.RegularizedVI):
        model_class = HalfNormalAmbient

    model = MyModel(sim, **SMALL)
    _, trace = _trace(model)
    assert isinstance(trace.nodes["ambient"]["fn"], dist.HalfNormal)
    assert isinstance(trace.nodes["feature_scaling"]["fn"], dist.Gamma)  # the rest is untouched
    model.train(**FIT)
    assert np.median(model.get_ambient_profile().to_numpy()) < 0.5 * np.median(default_ambient)  # the baseline's


def test_a_subclass_that_fixes_a_site_leaves_no_guide_site_without_a_model_site(sim):
    # the guide still sampled the fixed site: Pyro warned of a guide site missing from the model, and a LogNormal
    # guide's scale, free of any model term, grew at every step
    class FixedScaling(RegularizedVIModel):
        def sample_feature_scaling(self, genes):
            return torch.full((self.dims.n_scaling, self.dims.n_genes), 2.0)

    class MyModel(ps.RegularizedVI):
        model_class = FixedScaling

    model = MyModel(sim, global_guides={"feature_scaling": "lognormal"}, **SMALL)
    before = model.module.guide.feature_scaling.scale.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Found non-auxiliary vars in guide but not model" among them
        model.train(max_epochs=2, **{k: v for k, v in FIT.items() if k != "max_epochs"})
    torch.testing.assert_close(model.module.guide.feature_scaling.scale.detach(), before)
    assert (model.get_feature_scaling().to_numpy() == 2).all()  # the model's fixed value, as before
    # a draw of the posterior held the guide's unused value (1, where the model uses 2); a fixed site has no posterior
    assert "feature_scaling" not in model.sample_posterior(num_samples=2, indices=np.arange(20))["means"]
    assert ps.RegularizedVI(sim, **SMALL).module.guide.unsampled_sites == frozenset()

    class FixedDispersion(RegularizedVIModel):  # theta fixed: neither lambda nor 1/sqrt(theta) is sampled
        def sample_dispersion(self, genes):
            return torch.full((self.dims.n_dispersion, self.dims.n_genes), 10.0)

    class Poissonish(ps.RegularizedVI):
        model_class = FixedDispersion

    model = Poissonish(sim, **SMALL)
    assert model.module.guide.unsampled_sites == {"dispersion_rate", "inverse_sqrt_theta"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train(max_epochs=1, **{k: v for k, v in FIT.items() if k != "max_epochs"})
    # the model's theta, not the guide's unused 1/sqrt(theta) (9 after its initial value)
    np.testing.assert_allclose(model.get_dispersion().to_numpy(), 10.0, rtol=1e-5)
    np.testing.assert_allclose(model.get_likelihood_parameters(indices=np.arange(5))["dispersions"], 10.0, rtol=1e-5)


def test_export_posterior_follows_cell2location_layout(fitted, tmp_path):
    adata = fitted.adata.copy()
    fitted.export_posterior(adata, num_samples=10)
    assert adata.obsm["means_z"].shape == (3000, 10)
    assert adata.obs["q05_library"].le(adata.obs["q95_library"]).all()
    ambient = adata.varm["means_ambient"]
    assert list(ambient.columns) == list(adata.obs["batch"].cat.categories)
    np.testing.assert_allclose(ambient.to_numpy(), fitted.get_ambient_profile().to_numpy(), rtol=1e-5)
    theta = adata.varm["q95_dispersion"].to_numpy()
    assert (adata.varm["q05_dispersion"].to_numpy() <= theta).all()
    assert adata.uns["RegularizedVI"]["settings"]["n_latent"] == 10
    adata.write_h5ad(tmp_path / "exported.h5ad")  # everything written is h5ad-compatible
    assert "means_ambient" in anndata.read_h5ad(tmp_path / "exported.h5ad").varm
    # a second export at other levels: the first one's quantiles (of another fit, perhaps) do not stay beside it
    adata.obs["q05_my_column"] = 1.0  # the user's own column, not a site's
    fitted.export_posterior(adata, num_samples=10, quantiles=(0.1, 0.9))
    assert {"q10_library", "q90_library", "q05_my_column"} <= set(adata.obs) and "q05_library" not in adata.obs
    assert "q10_dispersion" in adata.varm and not [key for key in adata.varm if key.startswith(("q05", "q95"))]
    assert not [key for key in adata.obsm if key.startswith(("q05", "q95"))] and "q10_z" in adata.obsm


def test_render_model_draws_plates_and_sites(sim, monkeypatch, tmp_path):
    model = ps.RegularizedVI(sim, **SMALL)
    pytest.importorskip("graphviz")
    source = model.render_model().source
    for name in ("ambient", "feature_scaling", "inverse_sqrt_theta", "cluster_cells", "obs"):
        assert name in source
    # a file: its folder, format and the Graphviz binaries are checked before drawing; nothing is left behind
    import shutil as shutil_module

    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.render_model(str(tmp_path / "no_folder" / "model.png"))
    with pytest.raises(ValueError, match="not one Graphviz writes"):
        model.render_model(str(tmp_path / "model.xyz"))
    import graphviz

    monkeypatch.setattr(shutil_module, "which", lambda name: None)
    with pytest.raises(graphviz.ExecutableNotFound):
        model.render_model(str(tmp_path / "model.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "graphviz", None)  # as if graphviz were not installed
    with pytest.raises(ImportError, match="pip install graphviz"):
        model.render_model()


def test_expected_fdr_selection():
    proba = np.array([0.99, 0.98, 0.9, 0.5, 0.1])
    np.testing.assert_array_equal(expected_fdr_selection(proba, 0.05), [True, True, True, False, False])
    np.testing.assert_array_equal(expected_fdr_selection(proba, 0.001), [False] * 5)


def test_differential_expression_finds_the_simulated_response(fitted):
    adata = fitted.adata
    adata.obs["type_condition"] = adata.obs["cell_type"].astype(str) + "_" + adata.obs["condition"].astype(str)
    table = fitted.differential_expression("type_condition", "type_0_stimulated", "type_0_control", num_samples=10, n_cells=300)
    truth = adata.var["true_lfc"].reindex(table.index)
    up = truth > 0
    assert table.loc[up, "lfc_mean"].gt(0.5).mean() > 0.9
    assert table.loc[truth < 0, "lfc_mean"].lt(-0.5).mean() > 0.8
    assert np.corrcoef(table["lfc_mean"], truth)[0, 1] > 0.8
    with pytest.raises(ValueError, match="not found"):
        fitted.differential_expression("type_condition", "no_such_group")


def test_interferon_genes_up_in_stimulated_cd14_monocytes():
    """Kang et al. 2018: IFN-beta stimulation raises interferon-stimulated genes in monocytes."""
    adata = anndata.read_h5ad(shared_file("kang2018_ifnb_scgen_valid_counts.h5ad"))
    interferon = [g for g in ("ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "ISG20", "LY6E") if g in adata.var_names]
    adata.layers["counts"] = adata.X.copy()
    log = adata.copy()
    sc.pp.normalize_total(log, target_sum=1e4)
    sc.pp.log1p(log)
    sc.pp.highly_variable_genes(log, n_top_genes=1500, flavor="seurat")
    adata = adata[:, log.var["highly_variable"].to_numpy() | adata.var_names.isin(interferon)].copy()
    adata.obs["type_condition"] = adata.obs["cell_type"].astype(str) + "_" + adata.obs["condition"].astype(str)
    ps.RegularizedVI.setup_anndata(adata, layer="counts")
    model = ps.RegularizedVI(adata)
    model.train(max_epochs=80, batch_size=256, lr=5e-3, kl_warmup_epochs=10, early_stopping=False, device="cpu", progress_bar=False)
    table = model.differential_expression("type_condition", "CD14+Mono_stimulated", "CD14+Mono_control", num_samples=10)
    hits = table.loc[interferon]
    assert (hits["lfc_mean"] > 1.0).all(), hits
    assert (hits["proba_de"] > 0.9).all(), hits
    assert hits[f"is_de_fdr_0.05"].all()
    assert table[f"is_de_fdr_0.05"].mean() < 0.5  # not everything is called


def test_latent_figure_draws_every_cell_whatever_the_number_of_categories(tmp_path):
    # only the first 20 categories were drawn: with 25 cell types 60 of 300 cells were missing from latent.png, and a
    # column of real numbers was drawn as 20 one-cell categories
    from pyro_scmodels import figures

    labels = np.repeat([f"type_{i:02d}" for i in range(25)], 12)
    groups = figures.colour_groups(labels)
    masks = np.stack([mask for _, mask in groups])
    assert (masks.sum(0) == 1).all()  # every cell in exactly one group
    assert groups[0][0] == "other (5 categories)" and len(groups) == figures.MAX_CATEGORIES_COLOURED + 1
    assert figures.colour_groups(np.linspace(0.1, 3.7, 300)) is None  # real numbers: a colour scale
    assert [name for name, _ in figures.colour_groups(np.repeat([0.0, 6.0, 24.0], 100))] == ["0.0", "6.0", "24.0"]
    # whole numbers with many values (a count of genes) go on a colour scale; a categorical of numbers is categories
    assert figures.colour_groups(np.arange(300) * 3) is None and figures.colour_groups(np.arange(300.0)) is None
    assert len(figures.colour_groups(pd.Series(np.arange(300) % 25).astype("category"))) == 21
    leiden = pd.Series((np.arange(300) % 12).astype(str))  # scanpy's clusters: text "0" ... "11"
    assert [name for name, _ in figures.colour_groups(leiden)] == [str(i) for i in range(12)]
    ordered = pd.Categorical(np.repeat(["b", "c", "a"], 100), categories=["c", "a", "b"])  # the user's order
    assert [name for name, _ in figures.colour_groups(pd.Series(ordered))] == ["c", "a", "b"]
    # more than ten categories: each its own colour (the default cycle of ten gave type_00 and type_10 the same)
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    fifteen = figures.colour_groups(np.repeat([f"type_{i:02d}" for i in range(15)], 20))
    figures.draw_groups(ax, np.random.default_rng(0).normal(size=(300, 2)), fifteen)
    colours = {tuple(collection.get_facecolor()[0]) for collection in ax.collections}
    assert len(ax.collections) == 15 and len(colours) == 15
    obs = pd.DataFrame({"cell_type": labels, "qc": np.linspace(0.1, 3.7, 300)})
    latent = np.random.default_rng(0).normal(size=(300, 4))
    path = figures.plot_latent(latent, obs, ["cell_type", "qc"], str(tmp_path / "latent.png"))
    assert os.path.getsize(path) > 0
