"""A modeller's edits of the priors: buffers edited after the model was built, and subclasses of the Pyro modules.

Each edit must be what the model trains with, saves, loads and reports, or be refused by name before training."""

import warnings

import anndata
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_scmodels as ps

SMALL = dict(n_hidden=16, n_latent=3)
QUICK = dict(max_epochs=1, batch_size=64, device="cpu", progress_bar=False, early_stopping=False)


@pytest.fixture
def small():
    adata = ps.datasets.simulate(n_cells=160, n_genes=40, n_markers_per_type=4, n_responding_genes=4, seed=5)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return adata


def _prior_in_trace(model, site: str):
    batch, n_obs = next(model._batches(indices=np.arange(16)))
    fn = poutine.trace(model.module.model).get_trace(batch, n_obs).nodes[site]["fn"]
    return fn.base_dist if isinstance(fn, dist.MaskedDistribution) else fn  # the ambient prior, masked by default


def test_one_buffer_edited_per_gene_saves_loads_and_maps_a_query(small, tmp_path):
    # the rate per gene beside a scalar concentration: load rebuilt both per gene from the distribution, and the saved
    # scalar failed to load into it (torch's "size mismatch"); query mapping refused the same model
    model = ps.RegularizedVI(small, **SMALL)
    rates = torch.linspace(20.0, 80.0, small.n_vars)
    model.module.model.priors.ambient__rate = rates.clone()
    model.train(**QUICK)
    model.save(str(tmp_path / "m"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "m"), small.copy(), device="cpu")
    buffers = loaded.module.model.priors
    assert buffers.ambient__concentration.shape == () and float(buffers.ambient__concentration) == 1.0
    np.testing.assert_array_equal(buffers.ambient__rate.numpy(), rates.numpy())
    np.testing.assert_allclose(_prior_in_trace(loaded, "ambient").rate.reshape(-1, small.n_vars)[0].numpy(), rates.numpy())
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation())
    query = ps.datasets.simulate(n_cells=80, n_genes=40, n_markers_per_type=4, n_responding_genes=4, seed=6)
    mapped = ps.RegularizedVI.load_query_data(query, model)
    np.testing.assert_array_equal(mapped.module.model.priors.ambient__rate.numpy(), rates.numpy())


def test_buffers_edited_to_a_shape_their_site_cannot_take_are_refused_by_name(small, tmp_path):
    # the dispersion rate is one per dispersion group: a per-gene rate failed in a trace at the first call, and after
    # a first train() trained on with its log-density counted once per gene
    model = ps.RegularizedVI(small, **SMALL)
    model.train(**QUICK)
    model.module.model.priors.dispersion_rate__rate = torch.full((small.n_vars,), 3.0)
    message = r"dispersion_rate has batch shape \(40,\).*model\.module\.model\.priors were edited"
    with pytest.raises(ValueError, match=message):
        model.train(**QUICK)
    assert len(model.history) == 1
    with pytest.raises(ValueError, match=message):
        model.save(str(tmp_path / "m"))
    assert not (tmp_path / "m").exists() or not (tmp_path / "m" / "model.pt").exists()
    model.module.model.priors.dispersion_rate__rate = torch.tensor(3.0)  # put right: trains again
    model.train(**QUICK)
    assert len(model.history) == 2


def test_an_ambient_prior_the_shape_prior_replaces_is_refused(small, tmp_path):
    # ambient_shape_prior samples s from Gamma(a, a / (m_e p_g)): an edited priors.ambient was reported by
    # model.priors and silently unused
    with pytest.raises(ValueError, match=r"ambient prior in priors was edited .*ambient_shape_prior replaces it"):
        ps.RegularizedVI(small, ambient_shape_prior=3.0,
                         priors=ps.RegularizedPriors(ambient=dist.Gamma(2.0, 50.0), regularize_ambient=True), **SMALL)
    # edited after the model was built: said at train() and save (a model saved before the refusal loads so too)
    model = ps.RegularizedVI(small, ambient_shape_prior=3.0, **SMALL)
    model.module.model.priors.ambient__rate.fill_(10.0)
    with pytest.warns(UserWarning, match=r"ambient prior in model\.module\.model\.priors was edited .*changes nothing"):
        model.train(**QUICK)
    with pytest.warns(UserWarning, match="changes nothing"):
        model.save(str(tmp_path / "m"))
    with pytest.warns(UserWarning, match=r"ambient prior in priors was edited .*changes nothing"):
        loaded = ps.RegularizedVI.load(str(tmp_path / "m"), small.copy(), device="cpu")
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation())


def test_the_record_and_the_summary_show_the_priors_values(small, tmp_path):
    # the export held torch's text of each prior: LogNormal(0, .5) and LogNormal(3, .5) both read "LogNormal()"
    model = ps.RegularizedVI(small, priors=ps.RegularizedPriors(dispersion_rate=dist.LogNormal(3.0, 0.5)), **SMALL)
    assert "priors: the defaults" in repr(ps.RegularizedVI(small, **SMALL))
    model.module.model.priors.ambient__rate = torch.full((small.n_vars,), 50.0)
    assert "priors: dispersion_rate, ambient (edited" in repr(model)
    model.train(**QUICK)
    model.export_posterior(small, num_samples=2).write_h5ad(tmp_path / "out.h5ad")
    written = anndata.read_h5ad(tmp_path / "out.h5ad").uns["RegularizedVI"]
    record = written["settings"]["priors"]
    # the dispersion rate per dispersion group, named by its groups (it was a bare list of lists)
    rates = written["globals"]["means_dispersion_rate"]
    assert list(rates.index) == list(model.get_dispersion().columns) == list(small.obs["batch"].cat.categories)
    assert record["dispersion_rate"]["distribution"] == "LogNormal"
    assert (float(record["dispersion_rate"]["loc"]), float(record["dispersion_rate"]["scale"])) == (3.0, 0.5)
    np.testing.assert_array_equal(record["ambient"]["rate"], np.full(small.n_vars, 50.0))
    assert float(record["feature_scaling"]["concentration"]) == 200.0 and not record["regularize_ambient"]


class _TightLibraryWeight(ps.RegularizedVIModel):
    """A block with an edited site: a tight LogNormal prior on the library residual's weight."""

    def sample_library_residual_weight(self):
        return pyro.sample(self.dims.site("library_residual_weight"), dist.LogNormal(0.0, 0.1))


class _EditedBlocks(ps.RegularizedMultimodalVI):
    block_model_class = _TightLibraryWeight


def test_a_multimodal_model_with_edited_blocks_loads_and_resumes_only_as_itself(tmp_path):
    # the record held the outer classes only: the plain class loaded the save, and resumed its checkpoint, with the
    # block's site at its default (Exponential instead of LogNormal)
    mdata = ps.datasets.simulate_multiome(n_cells=120, n_genes=80, n_peaks=120, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", ambient_covariate_keys=["batch"])
    edited = _EditedBlocks(mdata, **SMALL)
    edited.train(checkpoint_dir=str(tmp_path / "ck"), **QUICK)
    edited.save(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="blocks _TightLibraryWeight / RegularizedVIGuide.*Load it with _EditedBlocks"):
        ps.RegularizedMultimodalVI.load(str(tmp_path / "m"), mdata)
    with pytest.raises(ValueError, match="module classes"):
        ps.RegularizedMultimodalVI(mdata, **SMALL).train(checkpoint_dir=str(tmp_path / "ck"), **QUICK)
    again = _EditedBlocks.load(str(tmp_path / "m"), mdata)
    assert isinstance(again.module.model.block("rna"), _TightLibraryWeight)
    # a plain model's checkpoint is refused by the subclass too (the plain blocks are recorded as well)
    plain = ps.RegularizedMultimodalVI(mdata, **SMALL)
    plain.train(checkpoint_dir=str(tmp_path / "plain"), **QUICK)
    with pytest.raises(ValueError, match="module classes"):
        _EditedBlocks(mdata, **SMALL).train(checkpoint_dir=str(tmp_path / "plain"), **QUICK)
    # saved before the blocks were recorded (the outer classes only): loads with either class, the subclass warned
    # that its blocks cannot be checked
    payload = torch.load(tmp_path / "m" / "model.pt", weights_only=False)
    outer = "RegularizedMultimodalVIModel / RegularizedMultimodalVIGuide"
    payload["module classes"] = payload["trainer"]["fingerprint"]["module classes"] = outer
    torch.save(payload, tmp_path / "m" / "model.pt")
    with pytest.warns(UserWarning, match="saved before the classes of a multimodal model's blocks were recorded"):
        _EditedBlocks.load(str(tmp_path / "m"), mdata)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ps.RegularizedMultimodalVI.load(str(tmp_path / "m"), mdata)
    # a checkpoint that recorded the outer classes only: the plain class resumes it silently, the subclass with a
    # warning (it resumed without a word)
    checkpoint = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)
    checkpoint["fingerprint"]["module classes"] = outer
    for name, model_class in (("old_plain", ps.RegularizedMultimodalVI), ("old_edited", _EditedBlocks)):
        (tmp_path / name).mkdir()
        torch.save(checkpoint, tmp_path / name / "checkpoint.pt")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = model_class(mdata, **SMALL)
            resumed.train(checkpoint_dir=str(tmp_path / name), **{**QUICK, "max_epochs": 2})
        unchecked = [w for w in caught if "cannot be checked" in str(w.message)]
        assert len(resumed.history) == 2 and len(unchecked) == (model_class is _EditedBlocks)


class _InverseTheta(ps.RegularizedVIModel):
    """Keeps the dispersion sites and derives theta = 1 / u from them (not u^-2)."""

    def sample_dispersion(self, genes):
        site = self.dims.site
        with pyro.plate(site("dispersion_groups"), self.dims.n_dispersion, dim=-2):
            rate = pyro.sample(site("dispersion_rate"), self.priors["dispersion_rate"])
            with genes:
                u = pyro.sample(site("inverse_sqrt_theta"), dist.Exponential(rate))
        return u.pow(-1)


class _ShiftedZ(ps.RegularizedVIGuide):
    """A visible edit of q(z | x): its location moved by 1."""

    def z_posterior(self, batch, encoder_input=None):
        q = super().z_posterior(batch, encoder_input)
        return dist.Normal(q.loc + 1.0, q.scale)


def test_the_getters_report_a_subclass_theta_and_a_multimodal_block_guide_override_is_trained_with(small):
    # the getters reported the guide's u^-2 (8.95) for a model decoding with 1 / u (2.99); the multimodal guide called
    # the block encoders directly, so a block guide's z_posterior shaped the modality query but not the joint z
    model = type("InverseThetaVI", (ps.RegularizedVI,), {"model_class": _InverseTheta})(small, **SMALL)
    model.train(**QUICK)
    u = model.module.guide.global_medians()["inverse_sqrt_theta"]
    np.testing.assert_allclose(model.get_dispersion().to_numpy().T, (1 / u).detach().numpy(), rtol=1e-4)
    mdata = ps.datasets.simulate_multiome(n_cells=120, n_genes=80, n_peaks=120, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    shifted = type("ShiftedMM", (ps.RegularizedMultimodalVI,), {"block_guide_class": _ShiftedZ})(mdata, **SMALL)
    joint = shifted.get_latent_representation(indices=np.arange(5))
    rna = shifted.get_latent_representation(indices=np.arange(5), modality="rna")
    np.testing.assert_allclose(joint[:, :SMALL["n_latent"]], rna, rtol=1e-6)


class _HalfLibraryWeight(ps.RegularizedVIModel):
    """Fixes the library residual weight w at 0.5 (no site)."""

    def sample_library_residual_weight(self):
        return torch.tensor(0.5)


def test_a_library_residual_weight_a_subclass_fixes_is_the_one_used(small):
    # the guide dropped the site but kept using its own untouched w = 1 in training and in the library queries
    model = type("HalfWeightVI", (ps.RegularizedVI,), {"model_class": _HalfLibraryWeight})(small, **SMALL)
    model.train(**QUICK)
    guide = model.module.guide
    assert "library_residual_weight" in guide.unsampled_sites and float(guide.residual_weight_estimate()) == 0.5
    batch, _ = next(iter(model.minibatches(indices=np.arange(6))))[1]
    with torch.no_grad():
        guide.eval()
        expected = guide.log_library_loc(guide.encoder_input(batch), batch, torch.tensor(0.5))[0].exp()
        assert not torch.allclose(expected, guide.log_library_loc(guide.encoder_input(batch), batch,
                                                                   torch.tensor(1.0))[0].exp())
    np.testing.assert_allclose(model.get_library_size(indices=np.arange(6)), expected.numpy(), rtol=1e-5)
    medians = guide.global_medians()
    assert float(model.module.model.global_values(medians)["library_residual_weight"]) == 0.5


@pytest.mark.parametrize("buffer, value, message", [
    ("priors.feature_scaling__rate", float("nan"), r"priors\.feature_scaling: rate is nan.*model\.module\.model\.priors\.feature_scaling__rate"),
    ("priors.dispersion_rate__rate", -1.0, r"priors\.dispersion_rate: rate is -1.*GreaterThan"),
    ("priors.ambient__concentration", float("inf"), r"priors\.ambient: concentration is inf"),
    ("library_prior_loc", float("nan"), r"model\.module\.model\.library_prior_loc holds \[nan"),
    ("library_prior_scale", 0.0, r"library_prior_scale holds \[0\.0.*positive"),
])
def test_buffers_edited_to_a_value_their_prior_cannot_take_are_refused_by_name_before_training(small, buffer, value,
                                                                                                 message):
    # shapes only were checked: training then stopped with a NonFiniteError listing ~20 gradients and advising a
    # lower learning rate
    model = ps.RegularizedVI(small, **SMALL)
    owner, name = (model.module.model.priors, buffer.split(".")[1]) if "." in buffer else (model.module.model, buffer)
    getattr(owner, name).fill_(value)
    with pytest.raises(ValueError, match=message):
        model.train(**QUICK)
    assert not model.is_trained


def test_an_edited_ambient_prior_that_is_masked_warns_once_at_construction(small):
    # RegularizedPriors(ambient=...) without regularize_ambient=True was accepted silently and changed nothing in
    # training (only prior predictive draws)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ps.RegularizedVI(small, priors=ps.RegularizedPriors(ambient=dist.Gamma(1.0, 1e4)), **SMALL)
    masked = [w for w in caught if "regularize_ambient" in str(w.message)]
    assert len(masked) == 1 and "regularize_ambient=True" in str(masked[0].message)
    assert masked[0].filename == __file__  # the user's line (user_stacklevel)
    for priors in (ps.RegularizedPriors(), ps.RegularizedPriors(ambient=dist.Gamma(1.0, 1e4), regularize_ambient=True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ps.RegularizedVI(small, priors=priors, **SMALL)
        assert not [w for w in caught if "regularize_ambient" in str(w.message)]
