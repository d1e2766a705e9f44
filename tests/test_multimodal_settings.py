"""RegularizedMultimodalVI's per-modality settings written two ways: ``n_hidden=16`` and ``{"rna": 16, "atac": 16}``
build the same model, so a checkpoint or save of one resumes and loads with the other, while another value is still
refused with the settings the checkpoint was written with."""

import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels.checkpoints import CHECKPOINT_FILE

QUICK = dict(max_epochs=1, batch_size=64, device="cpu", progress_bar=False, early_stopping=False)


@pytest.fixture(scope="module")
def mdata():
    data = ps.datasets.simulate_multiome(n_cells=150, n_genes=75, n_peaks=120, seed=0)
    ps.RegularizedMultimodalVI.setup_mudata(data, layer="counts")
    return data


def test_a_checkpoint_of_one_value_resumes_with_a_dict_of_that_value_and_back(mdata, tmp_path):
    # n_hidden=16 then {"rna": 16, "atac": 16} was refused: "model settings.n_hidden differ"
    ps.RegularizedMultimodalVI(mdata, n_hidden=16, n_latent=3).train(checkpoint_dir=str(tmp_path / "one"), **QUICK)
    as_dict = ps.RegularizedMultimodalVI(mdata, n_hidden={"rna": 16, "atac": 16}, n_latent={"atac": 3, "rna": 3})
    as_dict.train(checkpoint_dir=str(tmp_path / "one"), **{**QUICK, "max_epochs": 2})
    assert len(as_dict.history) == 2  # it resumed
    assert as_dict.init_params["n_hidden"] == 16 and as_dict.init_params["n_latent"] == 3  # recorded as the one value
    # the other way round: a run given the dict resumes with the one value
    ps.RegularizedMultimodalVI(mdata, n_hidden={"rna": 16, "atac": 16}, n_latent=3).train(
        checkpoint_dir=str(tmp_path / "dict"), **QUICK)
    one = ps.RegularizedMultimodalVI(mdata, n_hidden=16, n_latent=3)
    one.train(checkpoint_dir=str(tmp_path / "dict"), **{**QUICK, "max_epochs": 2})
    assert len(one.history) == 2


def test_a_dict_in_another_order_is_the_same_setting_and_another_value_is_refused(mdata, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    ps.RegularizedMultimodalVI(mdata, n_hidden={"rna": 16, "atac": 8}, n_latent=3).train(checkpoint_dir=ckpt, **QUICK)
    reordered = ps.RegularizedMultimodalVI(mdata, n_hidden={"atac": 8, "rna": 16}, n_latent=3)
    reordered.train(checkpoint_dir=ckpt, **{**QUICK, "max_epochs": 2})
    assert len(reordered.history) == 2
    assert list(reordered.init_params["n_hidden"].items()) == [("rna", 16), ("atac", 8)]  # the modalities' order
    with pytest.raises(ValueError, match=r"use the settings it was written with: n_hidden=\{'rna': 16, 'atac': 8\} "
                                         r"\(now 16\)"):
        ps.RegularizedMultimodalVI(mdata, n_hidden=16, n_latent=3).train(checkpoint_dir=ckpt,
                                                                        **{**QUICK, "max_epochs": 3})
    with pytest.raises(ValueError, match=r"n_hidden=\{'rna': 16, 'atac': 8\} \(now \{'rna': 8, 'atac': 16\}\)"):
        ps.RegularizedMultimodalVI(mdata, n_hidden={"atac": 16, "rna": 8}, n_latent=3).train(
            checkpoint_dir=ckpt, **{**QUICK, "max_epochs": 3})


def test_a_save_given_a_dict_of_equal_values_loads_as_the_one_value_with_its_training_state(mdata, tmp_path):
    model = ps.RegularizedMultimodalVI(mdata, n_hidden={"rna": 16, "atac": 16}, n_latent=3)
    model.train(**QUICK)
    model.save(str(tmp_path / "saved"))
    loaded = ps.RegularizedMultimodalVI.load(str(tmp_path / "saved"), mdata, device="cpu")
    assert loaded.init_params["n_hidden"] == 16 and "n_hidden=16" in repr(loaded)
    assert loaded.trainer is not None  # its training state was taken up: the settings match


def test_a_checkpoint_that_recorded_the_dict_as_given_still_resumes(mdata, tmp_path):
    # checkpoints before 2026-12-06 recorded n_hidden as given: such a record still matches a model given it so
    ckpt = tmp_path / "ckpt"
    ps.RegularizedMultimodalVI(mdata, n_hidden={"atac": 16, "rna": 16}, n_latent=3).train(checkpoint_dir=str(ckpt),
                                                                                          **QUICK)
    state = torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)
    assert state["fingerprint"]["model settings"]["n_hidden"] == "16"
    state["fingerprint"]["model settings"]["n_hidden"] = "{'atac': 16, 'rna': 16}"
    torch.save(state, ckpt / CHECKPOINT_FILE)
    resumed = ps.RegularizedMultimodalVI(mdata, n_hidden={"atac": 16, "rna": 16}, n_latent=3)
    resumed.train(checkpoint_dir=str(ckpt), **{**QUICK, "max_epochs": 2})
    assert len(resumed.history) == 2
    with pytest.raises(ValueError, match="n_hidden differ"):
        ps.RegularizedMultimodalVI(mdata, n_hidden=8, n_latent=3).train(checkpoint_dir=str(ckpt),
                                                                       **{**QUICK, "max_epochs": 3})


def test_an_edited_ambient_prior_that_is_masked_warns_once_per_object_given(mdata):
    # as for RegularizedVI: an edited ambient prior without regularize_ambient=True changes nothing in training
    import warnings

    import pyro.distributions as dist
    edited = ps.RegularizedPriors(ambient=dist.Gamma(1.0, 1e4))
    for priors, where in ((edited, "priors.ambient"), ({"rna": edited, "atac": ps.RegularizedPriors()}, "priors['rna']")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ps.RegularizedMultimodalVI(mdata, n_hidden=16, n_latent=3, priors=priors)
        masked = [str(w.message) for w in caught if "regularize_ambient" in str(w.message)]
        assert len(masked) == 1 and masked[0].startswith(where), masked
