"""RegularizedVI checkpoints and saves: a resumed run, after Ctrl-C or a load, repeats the uninterrupted one and takes
this call's settings (the refusals of a checkpoint of other data or settings: test_resume_refusals.py)."""

import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import pyro_scmodels as ps

from . import _regularizedvi_small
from ._regularizedvi_small import QUICK, SMALL

# the shared fixture of tests/_regularizedvi_small.py, bound here for pytest to find
small = _regularizedvi_small.small


def test_checkpoint_resume_equals_uninterrupted_run(small, tmp_path):
    straight = ps.RegularizedVI(small, **SMALL)
    straight.train(max_epochs=4, **QUICK)
    interrupted = ps.RegularizedVI(small, **SMALL)
    interrupted.train(max_epochs=2, checkpoint_dir=str(tmp_path), checkpoint_every=1, **QUICK)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = ps.RegularizedVI(small, **SMALL)  # a new session: picks the checkpoint up
    resumed.train(max_epochs=4, checkpoint_dir=str(tmp_path), **QUICK)
    assert len(resumed.history) == 4
    # bit for bit: the resumed trainer checks its loss form at its first training step (not in a pre-pass),
    # and that check leaves the step's random numbers and its form (the direct ELBO) as they were
    np.testing.assert_array_equal(resumed.history.to_numpy(), straight.history.to_numpy())
    np.testing.assert_array_equal(resumed.get_latent_representation(), straight.get_latent_representation())


def test_a_resumed_run_takes_this_calls_optimiser_settings_and_says_the_split_is_kept(small, tmp_path):
    ps.RegularizedVI(small, **SMALL).train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)
    resumed = ps.RegularizedVI(small, **SMALL)  # a new session continues with other settings, as a second call would
    with pytest.warns(UserWarning, match="checkpoint's train/validation split .* is kept"):
        resumed.train(max_epochs=4, checkpoint_dir=str(tmp_path), lr=1e-2, weight_decay=1e-3, global_lr_factor=10.0,
                      datasplitter_kwargs={"external_indexing": [np.arange(150), np.arange(150, 200)]}, **QUICK)
    assert len(resumed.history) == 4  # it did resume
    assert [(g["lr"], g["weight_decay"]) for g in resumed.trainer.optimizer.param_groups] == [(1e-2, 1e-3), (0.1, 1e-3)]


def test_a_resume_after_a_failed_first_call_takes_the_latest_settings(small, tmp_path):
    ps.RegularizedVI(small, **SMALL).train(max_epochs=1, checkpoint_dir=str(tmp_path / "good"), **QUICK)
    other = tmp_path / "other"  # another model's checkpoint: the first call is refused before any epoch
    other.mkdir()
    torch.save({"loop": "NDreamerTrainer"}, other / "checkpoint.pt")
    model = ps.RegularizedVI(small, **SMALL)
    with pytest.raises(ValueError, match="another model's training"):
        model.train(max_epochs=2, checkpoint_dir=str(other), lr=1e-3, **QUICK)
    model.train(max_epochs=2, checkpoint_dir=str(tmp_path / "good"), lr=5e-2, **QUICK)
    assert [g["lr"] for g in model.trainer.optimizer.param_groups] == [5e-2]  # not the failed call's 1e-3


def test_resuming_a_checkpoint_of_more_epochs_than_asked_says_so(small, tmp_path, caplog):
    ps.RegularizedVI(small, **SMALL).train(max_epochs=3, checkpoint_dir=str(tmp_path), **QUICK)
    with caplog.at_level("WARNING", logger="pyro_scmodels"):
        fewer = ps.RegularizedVI(small, **SMALL)
        fewer.train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)
    assert len(fewer.history) == 3 and "The checkpoint holds 3 epochs, more than the 2 asked for" in caplog.text


def test_running_a_finished_early_stopped_run_again_trains_nothing(small, tmp_path):
    stop = dict(max_epochs=20, early_stopping=True, early_stopping_patience=2, early_stopping_min_delta=1e6)
    epochs = []
    for _ in range(2):  # the same script run twice (a notebook re-run, fit --resume)
        model = ps.RegularizedVI(small, **SMALL)
        model.train(checkpoint_dir=str(tmp_path), **stop, **QUICK)
        epochs.append(len(model.history))
    assert epochs == [3, 3]


def test_a_run_resumed_after_ctrl_c_repeats_the_uninterrupted_run(small, tmp_path, monkeypatch):
    from pyro_scmodels.infer import SVITrainer

    straight = ps.RegularizedVI(small, **SMALL)
    straight.train(max_epochs=4, **QUICK)
    steps = {"n": 0}
    original = SVITrainer.after_step

    def ctrl_c_inside_the_third_epoch(self, item):
        steps["n"] += 1
        if steps["n"] == 2 * 3 + 2:  # 3 steps an epoch (180 training cells, batch 64): the third epoch's second step
            raise KeyboardInterrupt
        original(self, item)

    monkeypatch.setattr(SVITrainer, "after_step", ctrl_c_inside_the_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        ps.RegularizedVI(small, **SMALL).train(max_epochs=4, checkpoint_dir=str(tmp_path), checkpoint_every=10, **QUICK)
    monkeypatch.undo()
    resumed = ps.RegularizedVI(small, **SMALL)  # resumes from the end of epoch 2, the last whole one
    resumed.train(max_epochs=4, checkpoint_dir=str(tmp_path), **QUICK)
    # bit for bit (the interrupted step's state was written, and its epoch's steps were trained twice)
    np.testing.assert_array_equal(resumed.history.to_numpy(), straight.history.to_numpy())
    np.testing.assert_array_equal(resumed.get_latent_representation(), straight.get_latent_representation())
    # the same object, the same call run again (with or without checkpoints): it finishes the interrupted call from
    # its last whole epoch (it trained max_epochs more, from the interrupted step's parameters: 7 epochs, not 4)
    for checkpoint_dir in (None, str(tmp_path / "again")):
        steps["n"] = 0
        model = ps.RegularizedVI(small, **SMALL)
        monkeypatch.setattr(SVITrainer, "after_step", ctrl_c_inside_the_third_epoch)
        with pytest.raises(KeyboardInterrupt):
            model.train(max_epochs=4, checkpoint_dir=checkpoint_dir, **QUICK)
        monkeypatch.undo()
        with pytest.warns(UserWarning, match="Call train\\(\\) again with the same max_epochs to finish that call"):
            model.get_latent_representation()
        model.train(max_epochs=4, checkpoint_dir=checkpoint_dir, **QUICK)
        assert model.trainer.epoch == 4 and len(model.history) == 4
        np.testing.assert_array_equal(model.history.to_numpy(), straight.history.to_numpy())
        np.testing.assert_array_equal(model.get_latent_representation(), straight.get_latent_representation())


def test_a_call_that_asks_for_no_split_is_not_told_the_kept_one_differs(small, tmp_path):
    # after external_indexing, a resume or a load followed by a plain train() warned that the split differs from the
    # one "this call asks for", though it asked for none
    split = {"external_indexing": [np.arange(150), np.arange(150, 200)]}
    first = ps.RegularizedVI(small, **SMALL)
    first.train(max_epochs=1, checkpoint_dir=str(tmp_path / "ckpt"), datasplitter_kwargs=split, **QUICK)
    first.save(str(tmp_path / "saved"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        resumed = ps.RegularizedVI(small, **SMALL)
        resumed.train(max_epochs=2, checkpoint_dir=str(tmp_path / "ckpt"), **QUICK)
        loaded = ps.RegularizedVI.load(str(tmp_path / "saved"), small.copy(), device="cpu")
        loaded.train(max_epochs=1, **QUICK)
    np.testing.assert_array_equal(np.sort(resumed.train_indices), np.arange(150))


def test_a_checkpoint_trained_backed_resumes_in_memory_and_a_loaded_models_own_run_resumes(small, tmp_path,
                                                                                          monkeypatch):
    import anndata

    from pyro_scmodels.infer import SVITrainer

    from ._on_disk_files import write_counts_h5ad

    path = write_counts_h5ad(small.copy(), tmp_path / "cells.h5ad")
    backed = anndata.read_h5ad(path, backed="r")
    ps.RegularizedVI.setup_anndata(backed, batch_key="batch")
    ps.RegularizedVI(backed, **SMALL).train(max_epochs=1, checkpoint_dir=str(tmp_path / "run"), **QUICK)
    in_memory = anndata.read_h5ad(path)  # the same file: its counts summed from disk match those in memory
    ps.RegularizedVI.setup_anndata(in_memory, batch_key="batch")
    resumed = ps.RegularizedVI(in_memory, **SMALL)
    resumed.train(max_epochs=2, checkpoint_dir=str(tmp_path / "run"), **QUICK)
    assert len(resumed.history) == 2
    # a saved model loaded onto other cells: interrupted, then the same session script run again resumes its run
    resumed.save(str(tmp_path / "saved"))
    other = small[:150].copy()
    steps = {"n": 0}
    original = SVITrainer.after_step

    def ctrl_c_in_the_second_epoch(self, item):
        steps["n"] += 1
        if steps["n"] == 4:  # 135 training cells, batch 64: 3 steps an epoch
            raise KeyboardInterrupt
        original(self, item)

    monkeypatch.setattr(SVITrainer, "after_step", ctrl_c_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        ps.RegularizedVI.load(str(tmp_path / "saved"), adata=other).train(max_epochs=3, checkpoint_dir=str(tmp_path / "o"),
                                                                          **QUICK)
    monkeypatch.undo()
    again = ps.RegularizedVI.load(str(tmp_path / "saved"), adata=other)
    counted = {"steps": 0}

    def count(self, item):
        counted["steps"] += 1
        original(self, item)

    monkeypatch.setattr(SVITrainer, "after_step", count)
    again.train(max_epochs=3, checkpoint_dir=str(tmp_path / "o"), **QUICK)
    # the history goes on from the save's 2 epochs: the checkpoint's epoch 3 is taken up, then 2 more (5 in all):
    # 6 steps, not 3 epochs afresh (9 steps) beside the checkpoint, which it then overwrote
    assert list(again.history.index) == [0, 1, 2, 3, 4] and counted["steps"] == 6
    assert again.trainer.step == resumed.trainer.step + 9  # the steps count on from the save's (warm-up by steps)


def test_a_model_saved_after_ctrl_c_warns_when_loaded_and_its_next_call_finishes_the_interrupted_one(small, tmp_path,
                                                                                                    monkeypatch):
    # the interruption was not saved: the loaded model said nothing of its half-trained epoch, and train(5) trained
    # 5 more epochs (7 in all) where the same call in memory finishes the interrupted one (5, as uninterrupted)
    from pyro_scmodels.infer import SVITrainer

    straight = ps.RegularizedVI(small, **SMALL)
    straight.train(max_epochs=5, **QUICK)
    model = ps.RegularizedVI(small, **SMALL)
    steps, original = {"n": 0}, SVITrainer.after_step

    def ctrl_c_in_the_third_epoch(self, item):
        steps["n"] += 1
        if steps["n"] == 8:  # 3 steps an epoch
            raise KeyboardInterrupt
        original(self, item)

    monkeypatch.setattr(SVITrainer, "after_step", ctrl_c_in_the_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        model.train(max_epochs=5, **QUICK)
    monkeypatch.undo()
    model.save(str(tmp_path / "saved"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "saved"), adata=small)
    with pytest.warns(UserWarning, match=r"Training was interrupted: the model was trained for 2 of 5 epochs"):
        loaded.get_latent_representation()
    loaded.train(max_epochs=5, **QUICK)
    assert list(loaded.history.index) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(loaded.history["elbo_train"].to_numpy(), straight.history["elbo_train"].to_numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(loaded.get_latent_representation(), straight.get_latent_representation(), atol=1e-6)


def test_a_checkpoint_resumed_with_another_seed_says_the_run_is_neither_seeds(small, tmp_path):
    # the split stayed the checkpoint's and the remaining epochs drew with the new seed, without a word
    ps.RegularizedVI(small, **SMALL).train(max_epochs=1, seed=0, checkpoint_dir=str(tmp_path), **QUICK)
    with pytest.warns(UserWarning, match=r"trained with seed 0; this call's seed 1 draws its remaining epochs"):
        ps.RegularizedVI(small, **SMALL).train(max_epochs=2, seed=1, checkpoint_dir=str(tmp_path), **QUICK)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ps.RegularizedVI(small, **SMALL).train(max_epochs=3, seed=1, checkpoint_dir=str(tmp_path), **QUICK)


def test_a_model_of_integer_named_genes_and_cells_loads_and_resumes_onto_its_data_read_back_from_h5ad(small, tmp_path):
    # anndata keeps integer names in memory and writes them as strings: the saved model (and its own adata.h5ad)
    # was refused as "60 genes missing, 60 unknown", and a checkpoint as other cells, with the same names
    small.var_names = pd.Index(np.arange(small.n_vars) * 10)  # an Index is kept as it is (an array becomes text)
    small.obs_names = pd.Index(np.arange(small.n_obs) + 1000)
    assert small.var_names.dtype == np.int64 and small.obs_names.dtype == np.int64
    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=2, checkpoint_dir=str(tmp_path / "run"), checkpoint_every=1, **QUICK)
    model.save(str(tmp_path / "model"), save_anndata=True)
    small.write_h5ad(tmp_path / "data.h5ad")
    read_back = anndata.read_h5ad(tmp_path / "data.h5ad")
    assert list(read_back.var_names[:2]) == ["0", "10"]
    expected = model.get_latent_representation()
    for loaded in (ps.RegularizedVI.load(str(tmp_path / "model")),
                   ps.RegularizedVI.load(str(tmp_path / "model"), read_back)):
        np.testing.assert_allclose(loaded.get_latent_representation(), expected, rtol=1e-5, atol=1e-6)
    # an NDreamer of the model saves its cells' names as text; the model re-attaches (it was "other cells")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = ps.NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu")
        nd.save(str(tmp_path / "nd"))
        ps.NDreamer.load(str(tmp_path / "nd"), model=model)
    resumed = ps.RegularizedVI(read_back, **SMALL)
    resumed.train(max_epochs=2, checkpoint_dir=str(tmp_path / "run"), **QUICK)  # finished: nothing to train
    np.testing.assert_array_equal(resumed.history.to_numpy(), model.history.to_numpy())
    np.testing.assert_allclose(resumed.get_latent_representation(), expected, rtol=1e-5, atol=1e-6)


def test_the_state_kept_at_an_epoch_boundary_is_an_equal_copy_that_shares_no_tensor(small):
    """What Ctrl-C writes and the next call starts from (checkpoints.state_copy, in place of copy.deepcopy)."""
    from pyro_scmodels.checkpoints import state_copy

    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=2, **QUICK)
    live = model.trainer.state()
    kept = state_copy(live)

    def tensors(state, path=()):
        if isinstance(state, torch.Tensor):
            yield path, state
        elif isinstance(state, dict):
            for key, value in state.items():
                yield from tensors(value, path + (key,))
        elif isinstance(state, (list, tuple)):
            for i, value in enumerate(state):
                yield from tensors(value, path + (i,))

    pairs = dict(tensors(live)), dict(tensors(kept))
    assert pairs[0].keys() == pairs[1].keys() and len(pairs[0]) > 10  # the parameters and the Adam moments
    for path, tensor in pairs[0].items():
        assert torch.equal(tensor, pairs[1][path]), path
        assert tensor.numel() == 0 or tensor.data_ptr() != pairs[1][path].data_ptr(), path  # (empty: no memory)
    for name in ("model", "guide"):
        assert type(kept[name]) is type(live[name]) and kept[name]._metadata == live[name]._metadata
    kept["history"].iloc[0, 0] = -1.0  # the history is copied too: a later epoch's rows do not reach the kept state
    assert live["history"].iloc[0, 0] != -1.0
    name, weight = next((name, w) for name, w in model.module.model.named_parameters() if w.dim() == 2)
    before = weight.detach().clone()
    with torch.no_grad():  # training on after the copy leaves it as it was
        weight.add_(1.0)
    np.testing.assert_array_equal(kept["model"][name].numpy(), before.numpy())
