"""The command line: ``pyro-scmodels demo`` and ``pyro-scmodels fit``.

Every run is tiny (300 cells x 60 genes, a few epochs) so the whole file takes seconds; the
tests check the exit codes, what is printed, and what is written (read back from disk).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from urllib.parse import unquote

import anndata
import numpy as np
import scipy.sparse as sp
import pandas as pd
import pytest

import pyro_scmodels as ps
from pyro_scmodels.cli import LATENT_KEY, NORMALIZED_LAYER, main

from . import _cli
from ._cli import BATCHES, DEMO_ARGS, FIT_ARGS, N_CELLS, N_GENES, N_LATENT, history_table, run_cli

# the shared fixtures of tests/_cli.py, bound here for pytest to find
_restore_package_logger = _cli._restore_package_logger
input_h5ad = _cli.input_h5ad


def _succeeded(run) -> str:
    """The output folder of a module-scoped run, after checking it exited 0."""
    out, code, stdout, stderr = run
    assert code == 0, f"exit code {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    return out


def _dense(x) -> np.ndarray:
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


# --- demo ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    return (out, *run_cli(["demo", "-o", out, *DEMO_ARGS]))


def test_demo_exits_zero_and_prints_recovery_report(demo_run):
    out = _succeeded(demo_run)
    stdout = demo_run[2]
    assert f"Simulating {N_CELLS} cells x {N_GENES} genes" in stdout
    assert "RegularizedVI: recovered vs ground truth" in stdout
    lines = stdout.splitlines()
    # every figure stands beside its truth or baseline, with a verdict and a sentence of meaning
    for name, reference in (("ambient profile vs truth", "1 = exact"), ("dispersion vs truth", "1 = same gene order"),
                            ("cell-type ARI, latent", "PCA baseline"), ("batch mixing, latent", "PCA baseline"),
                            ("ITE vs truth", "1 = exact"), ("mean |ITE|, responding types", "truth"),
                            ("mean |ITE|, other types", "truth 0")):
        at = next((i for i, line in enumerate(lines) if name in line), None)
        assert at is not None, f"{name!r} missing from the report:\n{stdout}"
        assert reference in lines[at] and any(f"[{v:>6}]" in lines[at] for v in ("good", "weak", "failed"))
        assert len(lines[at + 1].strip()) > 20, "a sentence of meaning follows each figure"
    value = float(re.search(r"\)\s+(-?\d+\.\d+)\s+\(", next(line for line in lines if "ambient profile vs" in line)).group(1))
    assert -1.0 <= value <= 1.0
    # the demo ends with the paths written and the next command to try
    assert os.path.join(out, "results.h5ad") in stdout and os.path.join(out, "latent.png") in stdout
    assert "pyro-scmodels fit" in stdout.split("Wrote:")[-1]


def test_demo_writes_results_h5ad(demo_run):
    out = _succeeded(demo_run)
    adata = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    assert adata.shape == (N_CELLS, N_GENES)
    z = adata.obsm[LATENT_KEY]
    assert z.shape == (N_CELLS, N_LATENT)
    assert np.isfinite(z).all()
    normalized = np.asarray(adata.layers[NORMALIZED_LAYER])
    assert normalized.shape == (N_CELLS, N_GENES)
    assert np.isfinite(normalized).all() and (normalized >= 0).all()
    ambient = adata.varm["regularizedvi_ambient"]
    assert isinstance(ambient, pd.DataFrame)
    assert list(ambient.columns) == BATCHES
    assert (ambient.to_numpy() > 0).all()
    for key in ("regularizedvi_dispersion", "regularizedvi_feature_scaling"):
        assert adata.varm[key].shape[0] == N_GENES
    assert "regularizedvi_library_size" in adata.obs


def test_demo_model_loads_and_reproduces_latent(demo_run):
    out = _succeeded(demo_run)
    model_dir = os.path.join(out, "model")
    assert os.path.isfile(os.path.join(model_dir, "model.pt"))
    adata = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    model = ps.RegularizedVI.load(model_dir, adata)
    np.testing.assert_allclose(model.get_latent_representation(), adata.obsm[LATENT_KEY], rtol=1e-4, atol=1e-5)


def test_demo_refuses_existing_output_then_overwrites(demo_run, capsys):
    out = _succeeded(demo_run)
    before = os.path.getmtime(os.path.join(out, "results.h5ad"))
    capsys.readouterr()
    assert main(["demo", "-o", out, *DEMO_ARGS]) == 2
    message = capsys.readouterr().err
    assert "--overwrite" in message and "--resume" not in message  # the demo has no --resume to offer
    assert out in message and "results.h5ad" in message
    assert os.path.getmtime(os.path.join(out, "results.h5ad")) == before  # nothing was touched

    code, stdout, stderr = run_cli(["demo", "-o", out, "--overwrite", *DEMO_ARGS])
    assert code == 0, stderr
    assert "recovered vs ground truth" in stdout
    assert anndata.read_h5ad(os.path.join(out, "results.h5ad")).obsm[LATENT_KEY].shape == (N_CELLS, N_LATENT)


# --- fit ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fit_run(input_h5ad, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fit") / "out")
    return (out, *run_cli(["fit", input_h5ad, "-o", out, "--max-epochs", "3", *FIT_ARGS]))


def test_fit_writes_results_history_model_and_checkpoint(fit_run, input_h5ad):
    out = _succeeded(fit_run)
    stdout = fit_run[2]
    assert os.path.join(out, "results.h5ad") in stdout
    adata = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    assert adata.obsm[LATENT_KEY].shape == (N_CELLS, N_LATENT)
    assert np.isfinite(adata.obsm[LATENT_KEY]).all()
    assert NORMALIZED_LAYER not in adata.layers  # dense: written only with --write-normalized
    # --batch-key is the shortcut for ambient, dispersion and library-size keys
    assert list(adata.varm["regularizedvi_ambient"].columns) == BATCHES
    fraction = adata.obs["regularizedvi_ambient_fraction"].to_numpy()
    assert fraction.shape == (N_CELLS,) and ((fraction > 0) & (fraction < 1)).all()
    # the input layer and obs survive
    original = anndata.read_h5ad(input_h5ad)
    assert np.array_equal(_dense(adata.layers["counts"]), _dense(original.layers["counts"]))
    assert list(adata.obs_names) == list(original.obs_names)
    history = history_table(out)
    assert len(history) == 3
    assert list(history.index) == [0, 1, 2]
    assert "train_loss" in history and np.isfinite(history["train_loss"]).all()
    assert os.path.isfile(os.path.join(out, "model", "model.pt"))
    assert os.path.isdir(os.path.join(out, "checkpoint"))
    assert os.listdir(os.path.join(out, "checkpoint"))
    model = ps.RegularizedVI.load(os.path.join(out, "model"), adata)
    assert len(model.history) == 3
    for figure in ("latent.png", "training_curve.png"):
        with open(os.path.join(out, figure), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", f"{figure} is not a PNG"
        assert figure in stdout


def test_fit_refuses_existing_output_without_resume_or_overwrite(fit_run, input_h5ad, capsys):
    out = _succeeded(fit_run)
    capsys.readouterr()
    assert main(["fit", input_h5ad, "-o", out, "--max-epochs", "3", *FIT_ARGS]) == 2
    message = capsys.readouterr().err
    assert "--overwrite" in message and "--resume" in message
    assert len(history_table(out)) == 3


def test_fit_compile_without_a_working_compiler_stops_before_training(input_h5ad, tmp_path, monkeypatch, capsys):
    from pyro_scmodels import elbo

    monkeypatch.setitem(elbo._COMPILE_PROBES, "cpu", "InvalidCxxCompiler: No working C++ compiler found")
    out = str(tmp_path / "out")
    assert main(["fit", input_h5ad, "-o", out, "--max-epochs", "2", "--compile", "--device", "cpu", *FIT_ARGS]) != 0
    message = capsys.readouterr().err
    assert "C++ compiler" in message and "compile=False" in message
    assert not os.path.exists(os.path.join(out, "results.h5ad"))
    assert not os.path.exists(os.path.join(out, "checkpoint")) or not os.listdir(os.path.join(out, "checkpoint"))


def test_fit_writes_the_normalized_layer_only_when_asked(input_h5ad, tmp_path):
    out = str(tmp_path / "out")
    assert main(["fit", input_h5ad, "-o", out, "--max-epochs", "1", "--write-normalized", *FIT_ARGS]) == 0
    adata = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    assert adata.layers[NORMALIZED_LAYER].dtype == np.float32
    assert adata.obsm[LATENT_KEY].shape == (N_CELLS, N_LATENT)
    assert len(history_table(out)) == 1
    # refitted from those results without the flag: the earlier model's layer was kept beside the new latent
    again = str(tmp_path / "again")
    assert main(["fit", os.path.join(out, "results.h5ad"), "-o", again, "--max-epochs", "1", *FIT_ARGS]) == 0
    assert NORMALIZED_LAYER not in anndata.read_h5ad(os.path.join(again, "results.h5ad")).layers


def test_fit_background_options_reach_the_saved_model(input_h5ad, tmp_path):
    out = str(tmp_path / "out")
    assert main(["fit", input_h5ad, "-o", out, "--max-epochs", "1", "--ambient-per-droplet", "--ambient-shape-prior", "10",
                 "--decoder-gene-scale", *FIT_ARGS]) == 0
    model = ps.RegularizedVI.load(os.path.join(out, "model"), anndata.read_h5ad(input_h5ad))
    assert model.init_params["ambient_per_droplet"] is True and model.init_params["ambient_shape_prior"] == 10.0
    assert model.init_params["decoder_gene_scale"] is True
    results = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    np.testing.assert_allclose(results.obs["regularizedvi_ambient_fraction"], model.get_ambient_fraction(), rtol=1e-4)


def test_a_label_holding_a_slash_is_written_and_read_back(input_h5ad, tmp_path, capsys):
    # "10x/v3" as a .varm column name: anndata warned "Forward slashes will be disallowed in h5 stores"
    adata = anndata.read_h5ad(input_h5ad)
    labels = {"batch_0": "10x/v3", "batch_1": "a%2Fb", "batch_2": "plain"}
    adata.obs["batch"] = adata.obs["batch"].astype(str).map(labels).astype("category")
    path = str(tmp_path / "slash.h5ad")
    adata.write_h5ad(path)
    out = str(tmp_path / "out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", path, "-o", out, "--max-epochs", "1", *FIT_ARGS]) == 0
        model = ps.RegularizedVI.load(os.path.join(out, "model"), anndata.read_h5ad(path))
        exported = model.export_posterior(anndata.read_h5ad(path), num_samples=2)
        exported.write_h5ad(str(tmp_path / "exported.h5ad"))
    said = capsys.readouterr().err + " ".join(str(w.message) for w in caught)
    assert "slash" not in said.lower()
    names = sorted(labels.values())
    assert list(model.get_ambient_profile().columns) == names  # the model's own tables keep the names
    results = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    again = anndata.read_h5ad(str(tmp_path / "exported.h5ad"))
    for table in (results.varm["regularizedvi_ambient"], again.varm["means_ambient"]):
        assert list(table.columns) == ["10x%2Fv3", "a%252Fb", "plain"]
        assert [unquote(name) for name in table.columns] == names


def test_fit_takes_the_background_profile_from_empty_droplets(input_h5ad, tmp_path, capsys):
    from pyro_scmodels.models.ambient import profile_from_droplets

    adata = anndata.read_h5ad(input_h5ad)
    empty = ps.datasets.simulate_empty_droplets(adata, n_droplets=200)
    empty_path = str(tmp_path / "empty.h5ad")
    empty.write_h5ad(empty_path)
    out = str(tmp_path / "out")
    assert main(["fit", input_h5ad, "-o", out, "--max-epochs", "1", "--empty-droplets", empty_path, "--ambient-per-droplet",
                 *FIT_ARGS]) == 0
    model = ps.RegularizedVI.load(os.path.join(out, "model"), adata)
    fitted = model.get_ambient_profile()
    measured = profile_from_droplets(empty, groupby="batch")
    # only the amounts were learned: every batch's background has the empty droplets' shape
    np.testing.assert_allclose(fitted / fitted.sum(0), measured.loc[fitted.index, fitted.columns], rtol=1e-4)
    # checked before training: a gene or the ambient key missing from the droplets' file
    first = adata.obs["batch"].cat.categories[0]
    bad = {"genes": empty[:, 1:].copy(), "key": empty.copy(), "one_batch": empty[empty.obs["batch"] == first].copy(),
           "repeated": empty.copy(), "no_counts": empty.copy(), "halved": empty.copy()}
    bad["no_counts"].X = bad["no_counts"].X * 0
    bad["halved"].X = bad["halved"].X * 0.5  # the hint said --layer, which picks the data's layer, not the droplets
    del bad["key"].obs["batch"]
    bad["repeated"].var_names = [*empty.var_names[:-1], empty.var_names[0]]
    others = [str(c) for c in adata.obs["batch"].cat.categories[1:]]
    for name, words in (("genes", ["lack 1 of the data's", adata.var_names[0]]), ("key", ["no obs column", "batch"]),
                        ("one_batch", ["no droplet of batch", *others]), ("repeated", ["repeated gene names"]),
                        ("no_counts", ["no counts at all"]),
                        ("halved", ["non-integer values", "write the droplets' raw counts in .X of that file"])):
        path = str(tmp_path / f"{name}.h5ad")
        bad[name].write_h5ad(path)
        capsys.readouterr()
        assert main(["fit", input_h5ad, "-o", str(tmp_path / name), "--max-epochs", "1", "--empty-droplets", path,
                     *FIT_ARGS]) == 2
        err = capsys.readouterr().err
        assert all(word in err for word in [f"--empty-droplets {path}", *words]), err
        assert not (tmp_path / name).exists()
    assert main(["fit", input_h5ad, "-o", str(tmp_path / "none"), "--empty-droplets", str(tmp_path / "no.h5ad"),
                 *FIT_ARGS]) == 2
    assert "--empty-droplets" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_fit_backed_trains_from_disk_and_writes_results_without_the_counts(input_h5ad, tmp_path, monkeypatch):
    from pyro_scmodels.data import CountMatrix

    held = []  # the training buffers read ahead from the file (queries read without holding)
    original = CountMatrix.hold
    monkeypatch.setattr(CountMatrix, "hold", lambda self, indices: held.append(indices) or original(self, indices))
    out = str(tmp_path / "out")
    args = ["--batch-key", "batch", "--batch-size", "128", "--quiet", "--max-epochs", "1"]
    with_graph = anndata.read_h5ad(input_h5ad)
    with_graph.obsp["connectivities"] = sp.identity(N_CELLS, format="csr")  # a neighbours graph: it was dropped
    input_h5ad = str(tmp_path / "with_graph.h5ad")
    with_graph.write_h5ad(input_h5ad)
    assert main(["fit", input_h5ad, "-o", out, "--backed", *args]) == 0
    adata = anndata.read_h5ad(os.path.join(out, "results.h5ad"))
    assert adata.X is None and adata.obsm[LATENT_KEY].shape == (N_CELLS, N_LATENT)
    assert adata.obsp["connectivities"].nnz == N_CELLS and not adata.layers
    assert np.isfinite(adata.obsm[LATENT_KEY]).all() and "regularizedvi_ambient" in adata.varm
    # training read its counts from the file: one buffer held every training cell (90 % of them)
    assert max(len(h) for h in held if h is not None) == int(round(0.9 * N_CELLS))
    for extra, word in ((["--layer", "counts"], "--layer"), (["--write-normalized"], "--write-normalized")):
        assert main(["fit", input_h5ad, "-o", str(tmp_path / "bad"), "--backed", *args, *extra]) == 2
        assert not (tmp_path / "bad").exists()


# --- bad inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--batch-key", "nope", "--layer", "counts"], ["nope", "adata.obs"]),
    (["--batch-key", "batch", "--layer", "no_such_layer"], ["no_such_layer", "adata.layers"]),
    (["--batch-key", "batch", "--dispersion-key", "batch", "--layer", "counts"], ["--batch-key", "--dispersion-key"]),
    (["--batch-key", "batch", "--layer", "counts", "--global-lr-factor", "0"], ["--global-lr-factor", "positive"]),
    (["--batch-key", "batch", "--layer", "counts", "--ambient-shape-prior", "-1"], ["--ambient-shape-prior"]),
    (["--batch-key", "batch", "--layer", "counts", "--label-key", "celltype"], ["celltype", "--label-key"]),
], ids=["missing-obs-key", "missing-layer", "batch-key-with-dispersion-key", "global-lr-factor-not-positive",
        "ambient-shape-prior-not-positive", "missing-label-key"])
def test_fit_bad_input_returns_2_with_message(input_h5ad, tmp_path, capsys, extra, expected):
    out = str(tmp_path / "out")
    code = main(["fit", input_h5ad, "-o", out, "--max-epochs", "1", "--quiet", *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error:")
    for word in expected:
        assert word in captured.err, captured.err
    # validation happens before training: nothing was written
    for name in ("results.h5ad", "model", "checkpoint", "history.csv"):
        assert not os.path.exists(os.path.join(out, name))


def test_fit_missing_input_file_exits_with_message(tmp_path, capsys):
    missing = str(tmp_path / "does_not_exist.h5ad")
    assert main(["fit", missing, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and missing in err
    assert not (tmp_path / "out").exists()  # nothing is created for a failed run


def test_fit_requires_output_argument(input_h5ad, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", input_h5ad])
    assert info.value.code == 2
    assert "--output" in capsys.readouterr().err


# --- python -m ----------------------------------------------------------------------------------
def test_python_m_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "pyro_scmodels", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "fit" in result.stdout
    assert "pyro-scmodels" in result.stdout


def test_feature_scaling_keys_given_empty_is_one_shared_factor(input_h5ad, tmp_path):
    # nargs="+" refused an empty list, so the decoder's keys always became the scaling keys on the command line
    out = str(tmp_path / "out")
    assert main(["fit", input_h5ad, "-o", out, "--max-epochs", "1", "--nn-conditioning-keys", "batch",
                 "--feature-scaling-keys", "--batch-size", "128", "--quiet"]) == 0
    model = ps.RegularizedVI.load(os.path.join(out, "model"), anndata.read_h5ad(input_h5ad))
    assert model.keys.feature_scaling == [] and model.keys.nn_conditioning == ["batch"]
    assert anndata.read_h5ad(os.path.join(out, "results.h5ad")).varm["regularizedvi_feature_scaling"].shape[1] == 1
