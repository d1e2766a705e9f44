"""RegularizedMultimodalVI's ``decoder_gene_scale`` (one bool for every modality, or a dict per modality): each
scaled block decodes ``rho = m_g softplus(W h + b) / log 2``, a response inside the data is recovered where the plain
softplus decoder misses most of it, the option and the scale buffers are saved and loaded, and a model saved without
the option (or before the decoder had a scale) loads and resumes unchanged."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import sparse

import pyro_scmodels as ps

SMALL = dict(n_latent=3, n_hidden=16)
QUICK = dict(max_epochs=1, batch_size=64, device="cpu", progress_bar=False, early_stopping=False)


def _mdata(seed: int = 0, **setup):
    mdata = ps.datasets.simulate_multiome(n_cells=150, n_genes=75, n_peaks=120, seed=seed)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", **setup)
    return mdata


def _normalised_means(counts) -> np.ndarray:
    """Each feature's mean over cells of its counts scaled to a typical library (the geometric mean of the totals)."""
    counts = np.asarray(counts.toarray() if sparse.issparse(counts) else counts, dtype=np.float64)
    totals = counts.sum(1)
    typical = np.exp(np.log(totals[totals > 0]).mean())
    weights = np.where(totals > 0, typical / np.maximum(totals, 1e-12), 0.0)
    return (counts * weights[:, None])[totals > 0].mean(0)  # over the cells measured in the modality


def test_the_scale_and_the_starting_levels_are_means_over_the_cells_measured_in_the_modality():
    # cells without ATAC counts are masked out of its likelihood; they were counted as zeros in its mean, which put
    # the scale (and the plain decoder's starting bias) at 0.7 of the measured cells' level here
    mdata = ps.datasets.simulate_multiome(n_cells=300, n_genes=75, n_peaks=120, atac_missing_fraction=0.3, seed=1)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts")
    counts = mdata.mod["atac"].layers["counts"]
    assert 0.2 < np.mean(np.asarray(counts.sum(1)).ravel() == 0) < 0.4
    expected = _normalised_means(counts)
    scaled = ps.RegularizedMultimodalVI(mdata, decoder_gene_scale=True, **SMALL).module.model.block("atac").decoder
    np.testing.assert_allclose(scaled.output_scale.numpy() * math.log(2.0), np.maximum(expected, 1e-6), rtol=1e-5)
    plain = ps.RegularizedMultimodalVI(mdata, **SMALL).module.model.block("atac").decoder
    np.testing.assert_allclose(F.softplus(plain.output.bias.detach()).numpy(), np.maximum(expected, 1e-6), rtol=1e-3)


def test_a_scaled_block_decodes_its_features_mean_times_softplus_over_log_2():
    mdata = _mdata()
    model = ps.RegularizedMultimodalVI(mdata, decoder_gene_scale={"rna": True, "atac": False}, **SMALL)
    z = torch.randn(7, 6)  # the joint z: two blocks of 3
    batch = {"continuous": torch.zeros(7, 0)}
    means = {m: torch.as_tensor(_normalised_means(mdata.mod[m].layers["counts"]), dtype=torch.float32)
             for m in ("rna", "atac")}
    with torch.no_grad():
        for modality, scaled in (("rna", True), ("atac", False)):
            decoder = model.module.model.block(modality).decoder
            hidden = decoder.hidden(z, None)
            softplus = F.softplus(decoder.output(hidden))
            expected = means[modality] / math.log(2.0) * softplus if scaled else softplus
            torch.testing.assert_close(model.module.model.decode(z, batch, modality=modality), expected)
            # the scale is the feature's own level (or 1), and the output starts there: at W = 0, rho = m_g
            scale = decoder.output_scale
            torch.testing.assert_close(scale, means[modality] / math.log(2.0) if scaled else torch.ones_like(scale))
            assert bool((decoder.output.bias == 0).all()) == scaled
            decoder.output.weight.zero_()
            torch.testing.assert_close(model.module.model.decode(z, batch, modality=modality),
                                       means[modality].clamp_min(1e-6).expand(7, -1), rtol=1e-4, atol=1e-6)
    one_for_all = ps.RegularizedMultimodalVI(mdata, decoder_gene_scale=True, **SMALL)
    assert all(not torch.all(one_for_all.module.model.block(m).decoder.output_scale == 1) for m in ("rna", "atac"))
    assert one_for_all.init_params["decoder_gene_scale"] is True
    assert "decoder_gene_scale={'rna': True, 'atac': False}" in repr(model)


def test_decoder_gene_scale_that_is_not_a_bool_is_refused_by_name():
    mdata = _mdata()
    with pytest.raises(TypeError, match=r"decoder_gene_scale must be True or False, got 'yes'"):
        ps.RegularizedMultimodalVI(mdata, decoder_gene_scale="yes", **SMALL)
    with pytest.raises(TypeError, match=r"decoder_gene_scale\['rna'\] must be True or False, got 1"):
        ps.RegularizedMultimodalVI(mdata, decoder_gene_scale={"rna": 1, "atac": False}, **SMALL)
    with pytest.raises(ValueError, match=r"decoder_gene_scale has no entry for modality \['atac'\]"):
        ps.RegularizedMultimodalVI(mdata, decoder_gene_scale={"rna": True}, **SMALL)
    # off for every modality: not in init_params, as a model saved before the option was
    off = ps.RegularizedMultimodalVI(mdata, decoder_gene_scale={"rna": False, "atac": False}, **SMALL)
    assert "decoder_gene_scale" not in off.init_params and "decoder_gene_scale" not in repr(off)
    assert all(torch.all(off.module.model.block(m).decoder.output_scale == 1) for m in ("rna", "atac"))


def _stimulated_pair(n_cells: int = 400, n_responding: int = 20, fold: float = 3.0, seed: int = 0):
    """Paired RNA + ATAC where a random half of the cells is stimulated: its last ``n_responding`` genes' counts are
    ``fold`` times as high in expectation (x + Poisson((fold - 1) x)). Returns the MuData, the stimulated cells and the
    true log2 fold change of each gene's share (log2 fold on the responders, 0 elsewhere: the ratio of a responder's
    share to another gene's grows ``fold``-fold, however the cell's total is normalised)."""
    mdata = ps.datasets.simulate_multiome(n_cells=n_cells, n_genes=100, n_peaks=150, seed=seed)
    rng = np.random.default_rng(seed)
    stimulated = rng.permutation(np.arange(n_cells) % 2).astype(bool)
    rna = mdata.mod["rna"].layers["counts"].toarray()
    genes = np.arange(rna.shape[1] - n_responding, rna.shape[1])  # none of the 75 RNA-state markers
    block = rna[np.ix_(stimulated, genes)]
    rna[np.ix_(stimulated, genes)] = block + rng.poisson((fold - 1.0) * block)
    counts = sparse.csr_matrix(rna.astype(np.float32))
    mdata.mod["rna"].X, mdata.mod["rna"].layers["counts"] = counts, counts.copy()
    mdata.obs["condition"] = np.where(stimulated, "stimulated", "control")
    mdata.obs["condition"] = mdata.obs["condition"].astype("category")
    truth = np.zeros(rna.shape[1])
    truth[genes] = np.log2(fold)
    return mdata, stimulated, truth


def _fold_change_slope(model, stimulated, truth) -> float:
    """Slope of the decoded log2 fold change of each gene's share (stimulated cells' mean over the controls') on the
    truth: over the 0 / log2(fold) truth, the responders' mean change less the others', over log2(fold)."""
    rho = model.get_normalized_expression("rna", return_numpy=True).astype(np.float64)
    rho /= rho.sum(1, keepdims=True)
    decoded = np.log2(rho[stimulated].mean(0)) - np.log2(rho[~stimulated].mean(0))
    return float(np.polyfit(truth, decoded, 1)[0])


def test_the_scaled_rna_decoder_recovers_a_response_the_plain_one_shrinks():
    # measured (400 cells, 30 epochs at lr 1e-2, data seeds 0-2): slope 0.21-0.33 plain, 1.04-1.20 scaled
    mdata, stimulated, truth = _stimulated_pair()
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", nn_conditioning_covariate_keys=["condition"])
    fit = dict(max_epochs=30, batch_size=128, lr=1e-2, kl_warmup_epochs=5, early_stopping=False, device="cpu",
               progress_bar=False)
    slopes = {}
    for scaled in (False, True):
        model = ps.RegularizedMultimodalVI(mdata, n_latent=4, n_hidden=32,
                                           decoder_gene_scale={"rna": scaled, "atac": False})
        history = model.train(**fit)
        assert np.isfinite(history["train_loss"]).all()
        slopes[scaled] = _fold_change_slope(model, stimulated, truth)
    assert 0.8 < slopes[True] < 1.4 and slopes[False] < 0.6, slopes
    assert slopes[True] > slopes[False] + 0.5, slopes


def test_the_option_and_the_scales_are_saved_and_loaded(tmp_path):
    mdata = _mdata(ambient_covariate_keys=["batch"])
    model = ps.RegularizedMultimodalVI(mdata, decoder_gene_scale={"rna": True, "atac": False}, **SMALL)
    model.train(**QUICK)
    model.save(str(tmp_path / "scaled"), save_anndata=True)
    loaded = ps.RegularizedMultimodalVI.load(str(tmp_path / "scaled"), accelerator="cpu")  # scvi-tools' name
    assert loaded.device == torch.device("cpu")
    assert loaded.init_params["decoder_gene_scale"] == {"rna": True, "atac": False}
    for m in ("rna", "atac"):
        torch.testing.assert_close(loaded.module.model.block(m).decoder.output_scale,
                                   model.module.model.block(m).decoder.output_scale, rtol=0, atol=0)
        np.testing.assert_allclose(loaded.get_normalized_expression(m, return_numpy=True),
                                   model.get_normalized_expression(m, return_numpy=True), rtol=1e-6)
    assert not torch.all(loaded.module.model.block("rna").decoder.output_scale == 1)
    assert "decoder_gene_scale={'rna': True, 'atac': False}" in repr(loaded)


def test_a_model_saved_without_the_option_loads_and_resumes_with_a_scale_of_1(tmp_path):
    mdata = _mdata(ambient_covariate_keys=["batch"])
    plain = ps.RegularizedMultimodalVI(mdata, **SMALL)
    plain.train(checkpoint_dir=str(tmp_path / "ckpt"), **QUICK)
    plain.save(str(tmp_path / "plain"))
    assert "decoder_gene_scale" not in plain.init_params
    # as a save from before the decoder had a scale: no output_scale buffers in its state
    payload = torch.load(tmp_path / "plain" / "model.pt", weights_only=False)
    stripped = {k: v for k, v in payload["state_dict"].items() if not k.endswith(".output_scale")}
    assert len(stripped) == len(payload["state_dict"]) - 2  # one per modality's decoder
    payload["state_dict"] = stripped
    torch.save(payload, tmp_path / "plain" / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # loaded without a word
        loaded = ps.RegularizedMultimodalVI.load(str(tmp_path / "plain"), mdata, device="cpu")
    assert "decoder_gene_scale" not in loaded.init_params
    for m in ("rna", "atac"):
        assert torch.all(loaded.module.model.block(m).decoder.output_scale == 1)
        np.testing.assert_allclose(loaded.get_normalized_expression(m, return_numpy=True),
                                   plain.get_normalized_expression(m, return_numpy=True), rtol=1e-6)
    assert loaded.trainer is not None  # its training state was taken up: the settings still match
    # its checkpoint resumes with the same settings, and is refused by a model with the scale
    resumed = ps.RegularizedMultimodalVI(mdata, **SMALL)
    resumed.train(checkpoint_dir=str(tmp_path / "ckpt"), **{**QUICK, "max_epochs": 2})
    assert len(resumed.history) == 2
    with pytest.raises(ValueError, match="decoder_gene_scale"):
        ps.RegularizedMultimodalVI(mdata, decoder_gene_scale=True, **SMALL).train(
            checkpoint_dir=str(tmp_path / "ckpt"), **{**QUICK, "max_epochs": 3})


def test_a_dict_of_equal_values_and_the_bool_are_one_setting(tmp_path):
    # a run checkpointed with {"rna": True, "atac": True} was refused with True ("decoder_gene_scale differ")
    mdata = _mdata()
    every = ps.RegularizedMultimodalVI(mdata, decoder_gene_scale={"rna": True, "atac": True}, **SMALL)
    assert every.init_params["decoder_gene_scale"] is True
    every.train(checkpoint_dir=str(tmp_path / "ckpt"), **QUICK)
    resumed = ps.RegularizedMultimodalVI(mdata, decoder_gene_scale=True, **SMALL)
    resumed.train(checkpoint_dir=str(tmp_path / "ckpt"), **{**QUICK, "max_epochs": 2})
    assert len(resumed.history) == 2
    assert ps.RegularizedMultimodalVI(mdata, decoder_gene_scale={"rna": False, "atac": False},
                                      **SMALL).init_params.get("decoder_gene_scale") is None


def test_a_multimodal_model_built_on_a_subset_of_its_setup_names_the_categories_without_cells(tmp_path):
    mdata = _mdata(batch_key="batch")
    first = mdata.obs["batch"].astype(str).unique()[0]
    subset = mdata[mdata.obs["batch"].astype(str) == first].copy()  # keeps the setup of every cell
    others = sorted(set(mdata.obs["batch"].astype(str)) - {first})
    with pytest.warns(UserWarning, match=re.escape(f"no cell in the data this model is built on ('batch': {others[:5]}")):
        ps.RegularizedMultimodalVI(subset, **SMALL)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="categories recorded at setup")
        model = ps.RegularizedMultimodalVI(mdata, **SMALL)  # every category has cells: nothing said
        model.save(str(tmp_path / "m"))
        ps.RegularizedMultimodalVI.load(str(tmp_path / "m"), subset, device="cpu")  # fitted on other cells: nothing said
