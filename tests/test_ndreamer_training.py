"""NDreamer's training on the shared loop, on tiny data: whole passes, checkpoint resume and refusal, loss weights,
settings checked before any work, NaN naming, Ctrl-C, labels that cannot be joined, dead-code resets and presets."""

import numpy as np
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels.ndreamer import LossWeights, NDreamer, NDreamerTrainer
from pyro_scmodels.training import NonFiniteError

from . import _ndreamer_tiny
from ._ndreamer_tiny import TINY, tiny_nd, nd_state

# the shared fixture of tests/_ndreamer_tiny.py, bound here for pytest to find
tiny_adata = _ndreamer_tiny.tiny_adata


def test_passes_are_whole_epochs_when_cells_are_not_a_multiple_of_the_batch(tiny_adata, tmp_path):
    # 300 cells at batch 128: a pass is 3 steps; 2 + 2 passes, and 2 passes resumed to 4, are 4 passes
    straight = tiny_nd(tiny_adata, batch_size=128)
    straight.train(n_epochs=4, progress_bar=False)
    twice = tiny_nd(tiny_adata, batch_size=128)
    twice.train(n_epochs=2, progress_bar=False, checkpoint_dir=str(tmp_path))
    # min_cells_per_group refuses small groups and changes no training: a run with another value resumes
    resumed = tiny_nd(tiny_adata, batch_size=128, min_cells_per_group=5)
    resumed.train(n_epochs=4, progress_bar=False, checkpoint_dir=str(tmp_path))
    twice.train(n_epochs=2, progress_bar=False)
    assert straight.trainer.step == twice.trainer.step == resumed.trainer.step == 12
    assert len(straight.history) == len(twice.history) == len(resumed.history) == 4  # one row per pass
    for other in (twice, resumed):
        for name, value in nd_state(other).items():
            torch.testing.assert_close(value, nd_state(straight)[name], rtol=1e-5, atol=1e-6)


def test_resumed_training_equals_an_uninterrupted_run(tiny_adata, tmp_path):
    straight = tiny_nd(tiny_adata)
    straight.train(n_epochs=3, progress_bar=False, checkpoint_dir=str(tmp_path / "straight"))
    interrupted = tiny_nd(tiny_adata)
    interrupted.train(n_epochs=1, progress_bar=False, checkpoint_dir=str(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoint.pt").exists() and len(interrupted.history) == 1
    resumed = tiny_nd(tiny_adata)  # a new session picks the checkpoint up and continues to 3 passes
    history = resumed.train(n_epochs=3, progress_bar=False, checkpoint_dir=str(tmp_path / "run"))
    assert len(history) == 3 and resumed.trainer.step == straight.trainer.step
    np.testing.assert_allclose(history.to_numpy(), straight.history.to_numpy(), rtol=1e-5)
    expected = nd_state(straight)
    for name, value in nd_state(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.trainer.extra_state() == straight.trainer.extra_state()


def test_checkpoint_of_other_settings_is_refused(tiny_adata, tmp_path):
    tiny_nd(tiny_adata).train(n_epochs=1, progress_bar=False, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"different data or settings \(settings\.lr differ\)"):
        tiny_nd(tiny_adata, lr=5e-3).train(n_epochs=2, progress_bar=False, checkpoint_dir=str(tmp_path))
    # a checkpoint of the old default independence weight names it (the default went from 1000 to 300)
    with pytest.raises(ValueError, match=r"\(loss_weights\.independence differ\)"):
        tiny_nd(tiny_adata, loss_weights=LossWeights(independence=1000.0)).train(n_epochs=2, progress_bar=False,
                                                                             checkpoint_dir=str(tmp_path))


def test_checkpoint_of_other_labels_or_other_data_under_the_same_names_is_refused(tiny_adata, tmp_path):
    tiny_nd(tiny_adata).train(n_epochs=1, progress_bar=False, checkpoint_dir=str(tmp_path))
    relabelled = tiny_adata.copy()  # the condition of a few cells corrected, as a rerun after a fix would
    relabelled.obs["condition"] = relabelled.obs["condition"].astype(str)
    relabelled.obs.iloc[:20, relabelled.obs.columns.get_loc("condition")] = "control"
    other = ps.datasets.simulate(n_cells=300, n_genes=60, n_markers_per_type=4, n_responding_genes=6, seed=6)
    assert list(other.obs_names) == list(tiny_adata.obs_names) and list(other.var_names) == list(tiny_adata.var_names)
    for adata, differ in ((relabelled, r"cell labels"), (other, r"expression")):
        with pytest.raises(ValueError, match=rf"different data or settings \(.*{differ}.*differ\)"):
            tiny_nd(adata).train(n_epochs=2, progress_bar=False, checkpoint_dir=str(tmp_path))
    reordered = tiny_adata[::-1].copy()
    with pytest.raises(ValueError, match=r"different data or settings \(cell labels, cell order differ\)"):
        tiny_nd(reordered).train(n_epochs=2, progress_bar=False, checkpoint_dir=str(tmp_path))
    # the same genes in another order: the network's gene rows belonged to other genes (ITE up to 3.6 off)
    genes_reversed = tiny_adata[:, tiny_adata.var_names[::-1]].copy()
    with pytest.raises(ValueError, match=r"different data or settings \(gene order differ\)"):
        tiny_nd(genes_reversed).train(n_epochs=2, progress_bar=False, checkpoint_dir=str(tmp_path))


def test_edited_loss_weights_and_renamed_cells_are_what_a_save_and_a_checkpoint_record(tiny_adata, tmp_path):
    nd = tiny_nd(tiny_adata)
    nd.train(n_epochs=1, progress_bar=False)
    nd.loss_weights.independence = 1000.0  # edited between two calls
    nd.train(n_epochs=1, progress_bar=False, checkpoint_dir=str(tmp_path / "run"))
    nd.results.obs_names = [f"sample1_{name}" for name in nd.results.obs_names]  # before merging with other data
    nd.save(str(tmp_path / "nd"))
    back = NDreamer.load(str(tmp_path / "nd"))  # the save could not be loaded: its state recorded the old ones
    assert back.loss_weights.independence == 1000.0 and back.trainer.epoch == 2
    # the checkpoint holds the weights trained with: a run with the defaults does not resume from it
    with pytest.raises(ValueError, match=r"\(loss_weights\.independence differ\)"):
        tiny_nd(tiny_adata).train(n_epochs=2, progress_bar=False, checkpoint_dir=str(tmp_path / "run"))
    tiny_nd(tiny_adata, loss_weights=LossWeights(independence=1000.0)).train(n_epochs=2, progress_bar=False,
                                                                         checkpoint_dir=str(tmp_path / "run"))


def test_loss_weights_replaced_or_edited_after_training_are_trained_with_and_checked(tiny_adata):
    # a LossWeights assigned after the first train() was saved and fingerprinted but not trained with (the trainer
    # kept the old object): the history's parts no longer summed to its loss
    nd = tiny_nd(tiny_adata)
    nd.train(n_epochs=1, progress_bar=False)
    nd.loss_weights = LossWeights(cosine=0.0)
    history = nd.train(n_epochs=1, progress_bar=False)
    w = nd.loss_weights
    weights = dict(mse=w.mse, cosine=w.cosine, kl=w.kl, correlation=w.kl, independence=w.independence,
                   triplet=w.triplet, neighbourhood=w.neighbourhood, codebook=w.codebook)
    last = history.iloc[-1]
    parts = sum(last[name] * weight for name, weight in weights.items())
    parts -= w.dependence / len(nd.design.conditions) * last["dependence"]
    assert last["train_loss"] == pytest.approx(parts, rel=1e-4, abs=1e-4)
    assert nd.trainer.loss_weights is nd.loss_weights and nd.trainer.loss_weights.cosine == 0.0
    # an entry edited in place is checked as one given to the constructor (a negative weight rewards its part)
    nd.loss_weights.independence = -300.0
    with pytest.raises(ValueError, match="loss_weights.independence must be a non-negative number"):
        nd.train(n_epochs=1, progress_bar=False)


@pytest.mark.parametrize("arguments, message", [
    (dict(gradient_clip=-1.0), "gradient_clip must be a positive number"),  # a negative norm flips every gradient
    (dict(gradient_clip=0), "gradient_clip must be a positive number"),
    (dict(checkpoint_every=0), "checkpoint_every"),
    (dict(progress_bar="no"), "progress_bar"),
])
def test_training_settings_are_checked_before_a_step(tiny_adata, arguments, message, tmp_path):
    nd = tiny_nd(tiny_adata)
    before = nd_state(nd)
    with pytest.raises((ValueError, TypeError), match=message):
        nd.train(n_epochs=1, checkpoint_dir=str(tmp_path / "new"), **{"progress_bar": False, **arguments})
    assert all(torch.equal(value, before[name]) for name, value in nd_state(nd).items())
    assert not (tmp_path / "new").exists()  # the checkpoint folder is made only once every setting has passed


@pytest.mark.parametrize("arguments, error, message", [
    (dict(embedding_dim=0), ValueError, "embedding_dim must be a positive integer"),  # it trained a constant embedding
    (dict(n_codebooks=0), ValueError, "n_codebooks"),
    (dict(codebook_size=0), ValueError, "codebook_size"),
    (dict(codebook_dim=0), ValueError, "codebook_dim"),
    (dict(z_dim=-3), ValueError, "z_dim"),
    (dict(encoder_hidden=64), TypeError, r"encoder_hidden must be a list of layer widths"),
    (dict(decoder_hidden=(16, 0)), ValueError, r"decoder_hidden\[1\]"),
    (dict(loss_weights={"independance": 1.0}), ValueError, "unknown entries \\['independance'\\]"),
    (dict(loss_weights={"triplet": -5.0}), ValueError, "loss_weights.triplet"),  # it would reward bad triplets
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(num_hvg=1), ValueError, "num_hvg must be an integer >= 2"),  # sklearn's n_components=0 error, after work
    (dict(batch_key="true_library"), ValueError, r"batch_key: adata.obs\['true_library'\] holds real numbers"),
])
def test_network_settings_are_checked_before_preprocessing(tiny_adata, monkeypatch, arguments, error, message):
    def preprocessing(*args, **kwargs):
        raise AssertionError("preprocessing started before the settings were checked")

    monkeypatch.setattr("pyro_scmodels.ndreamer.pipeline.log_normalise", preprocessing)
    with pytest.raises(error, match=message):
        NDreamer(tiny_adata, "condition", "control", layer="counts", **{"batch_key": "batch", **TINY, **arguments})


def test_loss_weights_as_a_dict_override_the_defaults(tiny_adata):
    nd = tiny_nd(tiny_adata, loss_weights={"independence": 1000.0})
    assert nd.loss_weights.independence == 1000.0 and nd.loss_weights.triplet == ps.ndreamer.LossWeights().triplet


def test_training_under_torchrun_is_refused(tiny_adata, monkeypatch):
    nd = tiny_nd(tiny_adata)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: each process would train and checkpoint alone
    with pytest.raises(ValueError, match="NDreamer trains in one process"):
        nd.train(n_epochs=1, progress_bar=False)
    assert nd.trainer is None


def test_non_finite_loss_names_the_part_and_parameter(tiny_adata):
    nd = tiny_nd(tiny_adata)
    with torch.no_grad():
        nd.network.mean_head.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"loss part 'kl'.*network\.mean_head\.bias \(value\)"):
        nd.train(n_epochs=1, progress_bar=False)
    assert not nd.network.training  # put back in eval mode


@pytest.mark.parametrize("parameter", ["encoder.0.weight", "codebooks"])
def test_non_finite_weight_before_the_code_choice_names_the_parameter(tiny_adata, parameter):
    # with more codes than candidates, the code choice's sampler once refused the NaN rates and stopped the forward
    # pass on the CPU (on CUDA torch.poisson need not raise); the NaN now goes on to the loss, on either device, and
    # the loss check names the parameter whose value is not finite
    nd = tiny_nd(tiny_adata, codebook_size=32)
    with torch.no_grad():
        dict(nd.network.named_parameters())[parameter].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"the loss is NaN or Inf\..*network\.{parameter} \(value\)"):
        nd.train(n_epochs=1, progress_bar=False)


def test_ctrl_c_writes_a_checkpoint_and_reraises(tiny_adata, tmp_path, monkeypatch):
    nd = tiny_nd(tiny_adata)

    def interrupt(self, cells):
        raise KeyboardInterrupt

    monkeypatch.setattr(NDreamerTrainer, "after_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        nd.train(n_epochs=1, progress_bar=False, checkpoint_dir=str(tmp_path))
    assert (tmp_path / "checkpoint.pt").exists() and not nd.network.training
    assert nd.trainer.step == 1
    with pytest.warns(UserWarning, match=r"Training was interrupted: the network was trained for 0 of 1 epochs"):
        nd.get_modifier_space()
    # the same call again finishes the interrupted one from its last whole pass, as an uninterrupted run
    monkeypatch.undo()
    nd.train(n_epochs=1, progress_bar=False)
    straight = tiny_nd(tiny_adata)
    straight.train(n_epochs=1, progress_bar=False)
    assert nd.trainer.step == straight.trainer.step and len(nd.history) == 1
    for name, value in nd_state(straight).items():
        torch.testing.assert_close(nd_state(nd)[name], value, rtol=0, atol=0)


def test_batch_labels_holding_the_join_character_are_refused(tiny_adata):
    adata = tiny_adata.copy()
    half = np.arange(adata.n_obs) < adata.n_obs // 2
    adata.obs["donor"], adata.obs["lane"] = np.where(half, "x|1", "x"), np.where(half, "2", "1|2")
    with pytest.raises(ValueError, match="label 'x\\|1'.*joined with '\\|'"):  # ("x|1", "2") and ("x", "1|2") merged
        NDreamer(adata, "condition", "control", batch_key=["donor", "lane"], layer="counts", **TINY)


def test_a_single_batch_keys_labels_holding_the_join_character_are_refused(tiny_adata):
    # batch "x" with condition "stim|control" and batch "x|stim" with "control" were one matching group, "x|stim|control";
    # with '|' in no batch label a group's parts are unambiguous, so a condition may hold it
    adata = tiny_adata.copy()
    half = np.arange(adata.n_obs) < adata.n_obs // 2
    adata.obs["run"] = np.where(half, "x", "x|stim")
    adata.obs["arm"] = np.where(adata.obs["condition"] == "control", "control", "stim|control")
    with pytest.raises(ValueError, match="batch_key 'run' has the label 'x\\|stim'"):
        NDreamer(adata, "arm", "control", batch_key="run", layer="counts", **TINY)
    adata.obs["run"] = np.where(half, "x", "y")
    assert NDreamer(adata, "arm", "control", batch_key="run", layer="counts", **TINY).design.treatments == ["stim|control"]
    # a condition names layers and files: '/' made an h5ad that could not be read back
    adata.obs["arm"] = np.where(adata.obs["condition"] == "control", "control", "drug/10uM")
    with pytest.raises(ValueError, match="condition_key 'arm' has the label 'drug/10uM'"):
        NDreamer(adata, "arm", "control", batch_key="run", layer="counts", **TINY)
    adata.obs["arm"] = np.where(adata.obs["condition"] == "control", "DMSO/vehicle", "drug")  # the control names nothing
    assert NDreamer(adata, "arm", "DMSO/vehicle", batch_key="run", layer="counts", **TINY).design.treatments == ["drug"]


def _codes_in_use(nd: NDreamer) -> int:
    """Distinct codes chosen (argmax, evaluation mode) by the cells, summed over codebooks."""
    nd.network.eval()
    with torch.no_grad():
        codes = nd.network.encode(torch.as_tensor(nd.expression.toarray()))["codes"].numpy()
    return sum(len(np.unique(codes[:, k])) for k in range(codes.shape[1]))


def test_dead_codes_are_revived_on_small_data(tiny_adata):
    """300 cells at the default batch size: a pass is one step of 1,024 draws, 15 steps in the default 15
    passes, so a schedule of one reset per 30 steps never ran. By data seen, every 10 passes (10,240 cells
    drawn) here: once in the default 15 passes, 6 times in 60, after which the cells use more codes than in
    the same training without resets. Large data reset every DEAD_CODE_RESET_CELLS cells."""
    with_resets, without = tiny_nd(tiny_adata, batch_size=1024), tiny_nd(tiny_adata, batch_size=1024)
    without.network.reinitialise_dead_codes = lambda projections: None  # same training, resets switched off
    with_resets.train(progress_bar=False)
    assert with_resets.trainer.step == 15 and with_resets.trainer.resets == 1  # the default 15 passes
    with_resets.train(n_epochs=45, progress_bar=False)
    without.train(progress_bar=False)
    without.train(n_epochs=45, progress_bar=False)
    assert with_resets.trainer.step == without.trainer.step == 60 and with_resets.trainer.resets == 6
    used, unused = _codes_in_use(with_resets), _codes_in_use(without)
    assert used > unused + 2, f"codes in use: {used} with resets, {unused} without"
    from pyro_scmodels.ndreamer import _constants as K
    from pyro_scmodels.ndreamer.trainer import NDreamerTrainer

    many = np.repeat(without.design.groups, 20)  # 6,000 cells: 10 passes are more than 30 minibatches
    assert NDreamerTrainer(without.network, lambda cells: None, many).reset_every == K.DEAD_CODE_RESET_CELLS


def test_network_presets_give_their_sizes_and_loss_weights():
    from pyro_scmodels.ndreamer import PRESET_NAMES, network_preset

    assert set(PRESET_NAMES) == {"default", "small"}
    default, small = network_preset("default"), network_preset("small")
    assert default["loss_weights"] == LossWeights() and default["loss_weights"].independence == 300.0
    assert small["loss_weights"].independence == 1000.0 and small["n_codebooks"] < default["n_codebooks"]
    # a new object each call: changing one NDreamer's weights cannot change the preset
    small["loss_weights"].independence = 1.0
    assert network_preset("small")["loss_weights"].independence == 1000.0
    with pytest.raises(ValueError, match="Unknown network preset 'huge'.*default.*small"):
        network_preset("huge")


def test_ndreamers_built_from_one_preset_do_not_share_loss_weights():
    from pyro_scmodels.ndreamer import NDreamer, network_preset

    adata = ps.datasets.simulate(n_cells=200, n_genes=40, n_batches=1, n_markers_per_type=3, n_responding_genes=4, seed=0)
    preset = network_preset("small")
    first, second = (NDreamer(adata, "condition", "control", layer="counts", device="cpu", **preset) for _ in range(2))
    first.loss_weights.independence = 5.0
    assert second.loss_weights.independence == 1000.0 and preset["loss_weights"].independence == 1000.0
    # ... but an NDreamer trains with the weights it saves and fingerprints: its trainer holds the same object
    first.train(n_epochs=0.1, progress_bar=False)
    assert first.trainer.loss_weights is first.loss_weights
