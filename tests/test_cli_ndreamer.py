"""The command line: ``pyro-scmodels ndreamer`` writes results aligned with its input, refuses bad options before
any work, and its ``--help`` names the files it writes."""

from __future__ import annotations

import os

import anndata
import pytest

import pyro_scmodels as ps
from pyro_scmodels.cli import main
from pyro_scmodels.ndreamer import NDreamer

from . import _cli
from ._cli import help_entries

# the shared fixtures of tests/_cli.py, bound here for pytest to find
_restore_package_logger = _cli._restore_package_logger
input_h5ad = _cli.input_h5ad


# --- ndreamer ---------------------------------------------------------------------------------------
def test_ndreamer_command_writes_results_aligned_with_input(input_h5ad, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "nd")
    code = main(["ndreamer", input_h5ad, "--condition-key", "condition", "--control", "control", "--batch-key", "batch",
                 "--layer", "counts", "--epochs", "1", "--batch-size", "128", "--cate-groupby", "cell_type", "--network", "small",
                 "--device", "cpu", "-o", out, "--quiet", "--ite-interval", "0.9", "--factual", "matched"])
    assert code == 0
    loaded = ps.NDreamer.load(out, device="cpu")
    assert loaded.effects.factual == "matched"
    # --network small trained the compact network with the weights measured for it
    assert loaded.loss_weights.independence == 1000.0 and loaded.settings["n_codebooks"] == 8
    results = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    source = anndata.read_h5ad(input_h5ad)
    assert list(results.obs_names) == list(source.obs_names)
    for layer in ("denoised", "batch_effect", "ite_stimulated", "ite_stimulated_q05", "ite_stimulated_q95"):
        assert layer in results.layers
    low, ite, high = (results.layers[f"ite_stimulated{s}"] for s in ("_q05", "", "_q95"))
    assert (low <= ite).all() and (ite <= high).all()
    assert "X_effect_modifier_space" in results.obsm
    assert os.path.exists(os.path.join(out, "cate_stimulated.csv"))
    with open(os.path.join(out, "ite_heatmap_stimulated.png"), "rb") as handle:
        assert handle.read(4) == b"\x89PNG"
    assert main(["ndreamer", input_h5ad, "--condition-key", "condition", "--control", "ctrl", "-o",
                 str(tmp_path / "bad"), "--quiet"]) == 2
    assert "--control 'ctrl' is not a condition" in capsys.readouterr().err  # the option, not the Python argument
    for bad, named in ((["--ite-interval", "90"], "--ite-interval"), (["--ite-interval", "0.9", "--nearest-neighbor", "1"],
                                                                        "--nearest-neighbor")):
        assert main(["ndreamer", input_h5ad, "--condition-key", "condition", "--control", "control", "-o",
                     str(tmp_path / "bad_interval"), "--quiet", *bad]) == 2
        assert named in capsys.readouterr().err
        assert not (tmp_path / "bad_interval").exists()  # refused before anything is read or trained
    # a grouping with no group holding enough cells of both arms: refused before training, nothing written
    called = []
    monkeypatch.setattr(NDreamer, "train", lambda *a, **k: called.append(1))
    for column, message in (("condition", "--cate-groupby condition: No group has at least"),  # one arm per group
                            ("true_library", "holds real numbers")):
        assert main(["ndreamer", input_h5ad, "--condition-key", "condition", "--control", "control", "--batch-key",
                     "batch", "--layer", "counts", "--cate-groupby", column, "-o", str(tmp_path / "bad_cate"), "--quiet"]) == 2
        assert message in capsys.readouterr().err
        assert not called and not (tmp_path / "bad_cate").exists()


def test_ndreamer_help_names_the_files_cate_groupby_writes(capsys):
    with pytest.raises(SystemExit):
        main(["ndreamer", "--help"])
    entries = help_entries(capsys.readouterr().out)
    assert "cate_<condition>.csv" in entries["--cate-groupby"] and "ite_heatmap_<condition>.png" in entries["--cate-groupby"]
    assert "raw counts" in entries["--backed"] and "float32 CSR" in entries["--backed"]


def test_ndreamer_shrink_option_writes_shrunk_effects_and_their_clusters(input_h5ad, tmp_path, capsys):
    out = str(tmp_path / "nd")
    base = ["ndreamer", input_h5ad, "--condition-key", "condition", "--control", "control", "--batch-key", "batch",
            "--layer", "counts", "--epochs", "1", "--batch-size", "128", "--network", "small", "--device", "cpu",
            "--quiet", "--ite-interval", "0.9"]
    assert main([*base, "-o", out]) == 0  # --shrink clusters, the default
    results = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    assert results.uns["ite_matching"]["shrink"] == "clusters"
    # --factual auto (the default) keeps the cell's own counts for the compact network
    assert ps.NDreamer.load(out, device="cpu").settings["factual"] == "observed"
    clusters = results.obs["ite_shrinkage_cluster"].to_numpy().astype(int)
    assert clusters.shape == (results.n_obs,) and clusters.max() >= 1  # several clusters, one per cell
    # the same layers as the saved NDreamer's estimate_ite(shrink="clusters")
    again = ps.NDreamer.load(out, device="cpu").estimate_ite(interval=0.9, shrink="clusters")
    for layer in ("ite_stimulated", "ite_stimulated_q05", "ite_stimulated_q95"):
        assert abs(results.layers[layer] - again.layers[layer]).max() < 1e-5
    assert (again.obs["ite_shrinkage_cluster"].to_numpy().astype(int) == clusters).all()
    # --shrink none: the matched ITE as it is, no clusters
    assert main([*base, "-o", str(tmp_path / "raw"), "--shrink", "none"]) == 0
    raw = anndata.read_h5ad(str(tmp_path / "raw" / "results.h5ad"))
    assert raw.uns["ite_matching"]["shrink"] == "none" and "ite_shrinkage_cluster" not in raw.obs
    unshrunk = ps.NDreamer.load(out, device="cpu").estimate_ite(interval=0.9, shrink=None)
    assert abs(raw.layers["ite_stimulated"] - unshrunk.layers["ite_stimulated"]).max() < 1e-5
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices, as --network and --factual
        main([*base, "-o", str(tmp_path / "bad"), "--shrink", "genes"])
    assert exit_info.value.code == 2
    assert "--shrink: invalid choice: 'genes'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(["ndreamer", "--help"])
    assert "ite_shrinkage_cluster" in help_entries(capsys.readouterr().out)["--shrink"]
