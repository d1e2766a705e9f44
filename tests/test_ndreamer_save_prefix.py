"""NDreamer's save(dir_path, prefix=) and load(dir_path, prefix=), with scvi-tools' meaning: the prefix goes before
each saved file's name, so that several NDreamers (or an NDreamer and the model it was built from) share one folder."""

import hashlib
import os

import numpy as np
import pandas as pd
import pytest

import pyro_scmodels as ps
from pyro_scmodels.ndreamer import NDreamer

from . import _ndreamer_tiny
from ._ndreamer_tiny import tiny_nd

# the shared fixture of tests/_ndreamer_tiny.py, bound here for pytest to find
tiny_adata = _ndreamer_tiny.tiny_adata
tiny_model = _ndreamer_tiny.tiny_model


@pytest.fixture(scope="module")
def two_nds(tiny_adata):
    """Two trained NDreamers that differ (seeds, passes), their matching spaces computed."""
    first, second = tiny_nd(tiny_adata, seed=0), tiny_nd(tiny_adata, seed=1)
    first.train(n_epochs=1, progress_bar=False)
    second.train(n_epochs=2, progress_bar=False)
    for nd in (first, second):
        nd.estimate_ite(nearest_neighbor=3)
    return first, second




def _digests(folder: str, prefix: str) -> dict:
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in os.listdir(folder) if n.startswith(prefix)}


def _same(loaded: NDreamer, original: NDreamer) -> None:
    np.testing.assert_array_equal(loaded.get_modifier_space(), original.get_modifier_space())
    np.testing.assert_array_equal(loaded.results.layers["ite_stimulated"], original.results.layers["ite_stimulated"])
    pd.testing.assert_frame_equal(loaded.history, original.history)


def test_two_ndreamers_share_a_folder_and_load_back_by_prefix(two_nds, tmp_path):
    first, second = two_nds
    folder = str(tmp_path / "nds")
    first.save(folder, prefix="first_")
    second.save(folder, "second_")  # scvi-tools' position: save(dir_path, prefix)
    names = sorted(os.listdir(folder))
    assert names == sorted(f"{p}{n}" for p in ("first_", "second_")
                           for n in ("effects.npz", "network.pt", "results.h5ad", "settings.json", "training.pt"))
    for prefix, original in (("first_", first), ("second_", second)):
        _same(NDreamer.load(folder, device="cpu", prefix=prefix), original)
    assert len(NDreamer.load(folder, prefix="second_").history) == 2


@pytest.mark.filterwarnings("ignore:The model's encoder is not given:UserWarning")  # the design: not tested here
def test_an_ndreamer_and_the_model_it_was_built_from_share_a_folder(tiny_model, two_nds, tmp_path):
    folder = str(tmp_path / "both")
    nd = NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu")
    expected = nd.estimate_model_ite(num_samples=3).layers["ite_model_stimulated"].copy()
    tiny_model.save(folder, prefix="vi_", save_anndata=True)
    two_nds[0].save(folder, prefix="nd_")  # an NDreamer with a network first: replaced below by the from_model one
    nd.save(folder, prefix="nd_", overwrite=True)
    # its network and training state belonged to the NDreamer replaced: removed; the model's files stay
    assert sorted(os.listdir(folder)) == ["nd_effects.npz", "nd_results.h5ad", "nd_settings.json", "vi_adata.h5ad",
                                          "vi_model.pt"]
    model = ps.RegularizedVI.load(folder, prefix="vi_", device="cpu")
    loaded = NDreamer.load(folder, device="cpu", model=model, prefix="nd_")
    np.testing.assert_allclose(loaded.results.layers["ite_model_stimulated"], expected)
    np.testing.assert_allclose(loaded.estimate_model_ite(num_samples=3).layers["ite_model_stimulated"], expected,
                               atol=1e-6)


def test_overwrite_replaces_only_its_own_prefix(two_nds, tmp_path):
    first, second = two_nds
    folder = str(tmp_path / "nds")
    first.save(folder)  # no prefix beside a prefix: neither takes the other's files
    second.save(folder, prefix="b")
    unprefixed, prefixed = _digests(folder, ("e", "n", "r", "s", "t")), _digests(folder, "b")
    assert len(unprefixed) == len(prefixed) == 5
    with pytest.raises(FileExistsError, match=r"bsettings\.json\); pass overwrite=True"):
        first.save(folder, prefix="b")
    first.save(folder, prefix="b", overwrite=True)
    assert _digests(folder, ("e", "n", "r", "s", "t")) == unprefixed
    _same(NDreamer.load(folder, prefix="b"), first)
    prefixed = _digests(folder, "b")
    second.save(folder, overwrite=True)
    assert _digests(folder, "b") == prefixed
    _same(NDreamer.load(folder), second)


def test_missing_or_wrong_prefix_names_the_files_and_the_prefixes(two_nds, tiny_model, tmp_path):
    first, second = two_nds
    folder = str(tmp_path / "nds")
    first.save(folder, prefix="first_")
    with pytest.raises(FileNotFoundError, match=r"No saved NDreamer at .*nds.settings\.json .*'first_settings\.json'.*"
                                                r"the one saved NDreamer there has prefix='first_'"):
        NDreamer.load(folder)
    second.save(folder, prefix="second_")
    with open(os.path.join(folder, "run_settings.json"), "w") as handle:  # the user's: no NDreamer's prefix
        handle.write('{"learning_rate": 0.001}')
    with pytest.raises(FileNotFoundError, match=r"thrid_settings\.json.*prefixes \['first_', 'second_'\]"):
        NDreamer.load(folder, prefix="thrid_")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NDreamer.load(str(tmp_path / "nowhere"), prefix="first_")
    tiny_model.save(str(tmp_path / "model"))  # a model's folder: named as holding no NDreamer
    with pytest.raises(FileNotFoundError, match=r"\['model\.pt'\]; no saved NDreamer is there"):
        NDreamer.load(str(tmp_path / "model"))


@pytest.mark.parametrize("prefix, error, message", [
    ("runs/a_", ValueError, r"path separator '/'.*prefix='a_'"),
    (True, TypeError, r"prefix must be a string.*overwrite=True"),
    (".staged-x", ValueError, "save in progress"),
])
def test_bad_prefix_is_refused_before_anything_is_written(two_nds, tmp_path, prefix, error, message):
    folder = str(tmp_path / "nds")
    with pytest.raises(error, match=message):
        two_nds[0].save(folder, prefix=prefix)
    assert not os.path.exists(folder)
    with pytest.raises(error, match=message):
        NDreamer.load(folder, prefix=prefix)


def test_a_boolean_in_overwrites_old_place_is_refused(two_nds, tmp_path):
    first = two_nds[0]
    folder = str(tmp_path / "nds")
    first.save(folder)
    before = _digests(folder, "")
    # save(dir_path, True) meant overwrite=True before prefix came second: refused, not saved under the prefix "True"
    with pytest.raises(TypeError, match=r"prefix must be a string.*got True.*save\(dir_path, overwrite=True\)"):
        first.save(folder, True)
    assert _digests(folder, "") == before


@pytest.mark.filterwarnings("ignore:The model's encoder is not given:UserWarning")
def test_overwrite_never_removes_a_file_no_ndreamer_save_wrote(tiny_model, tmp_path):
    # an NDreamer without a network (from_model) writes no best_network.pt: the user's files of NDreamer's names
    # stay, with or without an earlier NDreamer under the prefix; and they are not read as the save's
    nd = NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu")
    folder = tmp_path / "run"
    folder.mkdir()
    user = {"best_network.pt": "the user's network", "best_training.pt": "the user's", "best_expression_counts.npz": "x"}
    for name, text in user.items():
        (folder / name).write_text(text)
    for _ in range(2):  # no earlier save under the prefix, then one
        nd.save(str(folder), prefix="best_", overwrite=True)
        assert {name: (folder / name).read_text() for name in user} == user
    assert NDreamer.load(str(folder), model=tiny_model, prefix="best_").network is None


def test_discard_saved_removes_only_its_prefixs_save(two_nds, tmp_path):
    from pyro_scmodels.ndreamer import discard_saved

    first, second = two_nds
    folder = tmp_path / "nds"
    first.save(str(folder))
    first.save(str(folder), prefix="a_")
    second.save(str(folder), prefix="b_")
    others = {".staged-b_network.pt", ".staged-model.pt", ".staged-b_results.partial-12.h5ad", "a_notes.txt"}
    kept = {n for n in os.listdir(folder) if not n.startswith("a_")} | others
    for name in (*others, ".staged-a_results.partial-12.h5ad", ".staged-a_settings.json"):
        (folder / name).write_text("in progress")
    discard_saved(str(folder), prefix="a_")
    assert set(os.listdir(folder)) == kept
    discard_saved(str(folder))  # no prefix: the unprefixed save's files only
    assert set(os.listdir(folder)) == {n for n in kept if n.startswith(("b_", ".staged-", "a_"))}
    _same(NDreamer.load(str(folder), prefix="b_"), second)


def test_discard_after_a_save_stopped_in_its_renames_leaves_a_users_file(tiny_model, tmp_path):
    # no settings file, the effects file in place: only the files the stopped save's staged settings list go (the
    # effects file alone without them), never a user's best_network.pt that this NDreamer (no network) did not write
    from pyro_scmodels.ndreamer import discard_saved

    nd = NDreamer.from_model(tiny_model, "condition", "control", batch_key="batch", device="cpu")
    folder = tmp_path / "run"
    nd.save(str(folder), prefix="best_")
    (folder / "best_network.pt").write_text("the user's network")
    settings = (folder / "best_settings.json").read_text()
    (folder / "best_settings.json").unlink()
    (folder / ".staged-best_settings.json").write_text(settings)  # the stopped save's settings, not yet renamed
    discard_saved(str(folder), prefix="best_")
    assert sorted(os.listdir(folder)) == ["best_network.pt"]
    nd.save(str(folder), prefix="best_", overwrite=True)  # overwrite: a file of an NDreamer name is there
    (folder / "best_settings.json").unlink()  # stopped with no staged settings left: the effects file alone
    discard_saved(str(folder), prefix="best_")
    assert "best_network.pt" in os.listdir(folder) and "best_effects.npz" not in os.listdir(folder)
