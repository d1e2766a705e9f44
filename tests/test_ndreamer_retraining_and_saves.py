"""NDreamer's effects recomputed after retraining, and save/load from every construction path, on tiny data."""

import os
import warnings

import numpy as np
import pandas as pd
import pytest

import pyro_scmodels as ps
from pyro_scmodels.ndreamer import NDreamer
from pyro_scmodels.ndreamer.effects import estimate_effects, matching_space

from . import _ndreamer_tiny
from ._ndreamer_tiny import save_with_one_arm_batches, tiny_nd

# the shared fixture of tests/_ndreamer_tiny.py, bound here for pytest to find
tiny_adata = _ndreamer_tiny.tiny_adata


def test_more_neighbours_than_any_group_holds_says_so(tiny_adata):
    nd = tiny_nd(tiny_adata)
    nd.train(n_epochs=1, progress_bar=False)
    with pytest.warns(UserWarning, match=r"nearest_neighbor=100000 is more than the cells of the largest .* the same as"):
        nd.estimate_ite(nearest_neighbor=100000, gene_list=list(nd.genes[:3]))


def test_retraining_clears_the_interval_bounds_too(tiny_adata):
    nd = tiny_nd(tiny_adata)
    nd.train(n_epochs=1, progress_bar=False)
    nd.estimate_ite(interval=0.9)
    assert "ite_stimulated_q05" in nd.results.layers and "ite_matching" in nd.results.uns
    nd.train(n_epochs=1, progress_bar=False)  # the bounds of the old network stayed, and were saved
    assert not [name for name in nd.results.layers if name.startswith("ite_")]
    assert "ite_matching" not in nd.results.uns


def test_effects_of_an_untrained_network_warn(tiny_adata, tmp_path):
    nd = tiny_nd(tiny_adata)
    with pytest.warns(UserWarning, match="has not been trained"):
        nd.get_modifier_space()
    nd.save(str(tmp_path / "untrained"))  # saved and loaded, still untrained
    with pytest.warns(UserWarning, match="has not been trained"):
        NDreamer.load(str(tmp_path / "untrained")).get_modifier_space()


def test_second_training_recomputes_embedding_and_effects(tiny_adata):
    nd = tiny_nd(tiny_adata)
    nd.train(n_epochs=1, progress_bar=False)
    first = nd.estimate_ite(nearest_neighbor=3, shrink=None).layers["ite_stimulated"].copy()
    nd.estimate_cate("cell_type")
    nd.train(n_epochs=1, progress_bar=False)
    assert len(nd.history) == 2
    # nothing computed in the old representation survives retraining
    assert "X_effect_modifier_space" not in nd.results.obsm and "ite_stimulated" not in nd.results.layers
    assert not any(k.startswith("cate_") for k in nd.results.uns)
    second = nd.estimate_ite(nearest_neighbor=3, shrink=None).layers["ite_stimulated"]
    assert not np.allclose(first, second)
    space = matching_space(nd.get_modifier_space(), seed=nd.settings["seed"])
    fresh = estimate_effects(space, nd.expression, nd.design, nearest_neighbor=3)
    np.testing.assert_allclose(second, fresh["ite_stimulated"], atol=1e-6)


def test_training_goes_on_after_save_and_load_as_in_memory(tiny_adata, tmp_path):
    nd = tiny_nd(tiny_adata)
    nd.train(n_epochs=2, progress_bar=False)
    nd.save(str(tmp_path / "nd"))
    back = NDreamer.load(str(tmp_path / "nd"))
    pd.testing.assert_frame_equal(back.history, nd.history)  # the history was lost
    nd.train(n_epochs=2, progress_bar=False)
    back.train(n_epochs=2, progress_bar=False)  # the optimiser's moments and the passes done are kept
    assert back.trainer.epoch == nd.trainer.epoch == 4
    np.testing.assert_array_equal(back.get_modifier_space(), nd.get_modifier_space())


def test_a_save_into_a_folder_of_other_results_is_refused(tiny_adata, tmp_path):
    # NDreamer.save("out") after `pyro-scmodels fit -o out` replaced the fit's results.h5ad without overwrite=True
    nd = tiny_nd(tiny_adata)
    (tmp_path / "results.h5ad").write_bytes(b"the fit's results")
    with pytest.raises(FileExistsError, match=r"results\.h5ad exists and is not part of a saved NDreamer"):
        nd.save(str(tmp_path))
    assert os.listdir(tmp_path) == ["results.h5ad"] and (tmp_path / "results.h5ad").read_bytes() == b"the fit's results"
    nd.save(str(tmp_path), overwrite=True)  # asked for: replaced
    assert NDreamer.load(str(tmp_path)).results.n_obs == tiny_adata.n_obs


def test_a_failed_overwrite_leaves_the_earlier_save_whole(tiny_adata, tmp_path, monkeypatch):
    import pyro_scmodels.ndreamer._persistence as persistence

    folder = str(tmp_path / "nd")
    nd = tiny_nd(tiny_adata)
    nd.train(n_epochs=1, progress_bar=False)
    nd.get_modifier_space()
    nd.save(folder)
    nd.train(n_epochs=2, progress_bar=False)
    nd.get_modifier_space()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(persistence, "write_h5ad", disk_full)  # the results cannot be written this time
    with pytest.raises(OSError, match="No space left"):
        nd.save(folder, overwrite=True)
    monkeypatch.undo()
    assert not [f for f in os.listdir(folder) if f.startswith(".staged-")]
    back = NDreamer.load(folder)  # the earlier save, whole: its stored embedding is its network's (it was a mix)
    np.testing.assert_allclose(back.results.obsm["X_effect_modifier_space"], back.get_modifier_space(), atol=1e-6)
    assert len(back.history) == 1


def test_another_models_checkpoint_is_named_as_such(tiny_adata, tmp_path):
    adata = tiny_adata.copy()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    ps.RegularizedVI(adata, n_hidden=16, n_latent=4).train(max_epochs=1, checkpoint_dir=str(tmp_path), device="cpu",
                                                          progress_bar=False)
    nd = tiny_nd(tiny_adata)  # the same folder: both write checkpoint.pt
    with pytest.raises(ValueError, match=r"written by another model's training \(SVITrainer\).*choose another"):
        nd.train(n_epochs=1, progress_bar=False, checkpoint_dir=str(tmp_path))


def test_a_saved_confounded_design_loads_with_a_warning(tiny_adata, tmp_path):
    """Saved before the confounding checks: its results stay readable, and the design is named as confounded."""
    nd = tiny_nd(tiny_adata)
    nd.train(n_epochs=1, progress_bar=False)
    save_with_one_arm_batches(nd, str(tmp_path / "nd"))
    with pytest.warns(UserWarning, match="No batch holds both condition 'stimulated'"):
        with pytest.warns(UserWarning, match=r"training state in .* does not match the saved results \(cell labels "
                                             r"differ\): loaded without it"):
            loaded = NDreamer.load(str(tmp_path / "nd"), device="cpu")
    assert loaded.trainer is None
    with warnings.catch_warnings():  # its network is the saved one, not a new one to train
        warnings.simplefilter("error", UserWarning)
        loaded.get_modifier_space()
    loaded.save(str(tmp_path / "again"))
    with warnings.catch_warnings():  # saved again without a training state, it still loads as trained
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="No batch holds both")
        NDreamer.load(str(tmp_path / "again"), device="cpu").get_modifier_space()
    with pytest.raises(ValueError, match="takes no model"):  # its own network: a model would be ignored
        NDreamer.load(str(tmp_path / "nd"), device="cpu", model=object())
    assert loaded.results.n_obs == tiny_adata.n_obs
    with pytest.raises(ValueError, match="No batch holds both"):  # a new NDreamer on such data is refused
        tiny_nd(_with_obs(tiny_adata, loaded.results.obs))


def _with_obs(adata, obs):
    changed = adata.copy()
    changed.obs["batch"] = obs["batch"].to_numpy()
    return changed


def test_a_cate_does_not_read_ite_layers_saved_before_the_arms_shared_their_batches(tiny_adata):
    # layers saved before 2026-12-06 averaged each arm over its own batches; with a batch holding one arm they differ,
    # and the CATE read them while estimate_ite(indices=...) computed the new way
    one_arm = tiny_adata[~((tiny_adata.obs["batch"] == "batch_2") & (tiny_adata.obs["condition"] == "control"))].copy()
    nd = tiny_nd(one_arm)  # (its warning names batch_2)
    assert nd.design.common_batches("stimulated") == ["batch_0", "batch_1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained network's warning
        nd.estimate_ite(nearest_neighbor=5)
        fresh = nd.estimate_cate("cell_type", nearest_neighbor=5)
        nd.results.layers["ite_stimulated"] = nd.results.layers["ite_stimulated"] + 5.0  # as if computed the old way
        read = nd.estimate_cate("cell_type", nearest_neighbor=5)["mean_ite"]  # this version's layers: read
        np.testing.assert_allclose(read - fresh["mean_ite"], 5.0, atol=1e-4)
        del nd.results.uns["ite_matching"]["arms"]  # saved before the arms were recorded: recomputed
        np.testing.assert_allclose(nd.estimate_cate("cell_type", nearest_neighbor=5)["mean_ite"], fresh["mean_ite"],
                                   atol=1e-5)


def test_ndreamer_factual_is_checked_kept_and_does_not_block_a_resume(tiny_adata, tmp_path):
    """NDreamer's own factual ("observed" for this test's compact network under the default "auto"): refused before any work when unknown, saved with the
    results, and not part of what a checkpoint must match (it changes no training)."""
    with pytest.raises(ValueError, match="factual must be"):
        tiny_nd(tiny_adata, factual="itself")
    observed = tiny_nd(tiny_adata)
    observed.train(n_epochs=1, progress_bar=False, checkpoint_dir=str(tmp_path / "run"))
    matched = tiny_nd(tiny_adata, factual="matched")  # resumes the same run: its pass counts towards n_epochs
    assert len(matched.train(n_epochs=1, progress_bar=False, checkpoint_dir=str(tmp_path / "run"))) == 1
    ite = {name: nd.estimate_ite(nearest_neighbor=5).layers["ite_stimulated"].copy()
           for name, nd in (("observed", observed), ("matched", matched))}
    assert observed.effects.factual == "observed" and matched.effects.factual == "matched"
    assert np.abs(ite["matched"] - ite["observed"]).max() > 0.05
    matched.save(str(tmp_path / "nd"))
    loaded = NDreamer.load(str(tmp_path / "nd"), device="cpu")
    assert loaded.effects.factual == "matched"
    np.testing.assert_allclose(loaded.results.layers["ite_stimulated"], ite["matched"], atol=1e-6)
