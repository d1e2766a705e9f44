"""RegularizedVI checkpoint and save refusals: a checkpoint or folder of other data (counts, covariates, cell order,
genes, counts on disk), settings, priors or model classes, or a file that is no checkpoint, is refused by name."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_scmodels as ps

from . import _regularizedvi_small
from ._regularizedvi_small import QUICK, SMALL

# the shared fixture of tests/_regularizedvi_small.py, bound here for pytest to find
small = _regularizedvi_small.small


def test_resuming_with_other_priors_is_refused(small, tmp_path):
    # the priors are buffers of the saved modules: resuming would train with the checkpoint's, not these
    ps.RegularizedVI(small, **SMALL).train(max_epochs=1, checkpoint_dir=str(tmp_path), **QUICK)
    edited = ps.RegularizedPriors(ambient=dist.Gamma(2.0, 50.0), regularize_ambient=True)
    with pytest.raises(ValueError, match=r"priors differ"):
        ps.RegularizedVI(small, **SMALL, priors=edited).train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)
    again = ps.RegularizedVI(small, **SMALL, priors=ps.RegularizedPriors())  # the same priors, passed explicitly
    again.train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)
    assert len(again.history) == 2


def test_resuming_compares_the_prior_buffers_not_the_priors_object(small, tmp_path):
    # the checkpoint of a model whose buffers were edited: a default model resumed silently with the edited prior, and
    # a model given that prior as an object was refused
    first = ps.RegularizedVI(small, **SMALL)
    first.module.model.priors.feature_scaling__concentration.fill_(2.0)
    first.module.model.priors.feature_scaling__rate.fill_(2.0)
    first.train(max_epochs=1, checkpoint_dir=str(tmp_path), **QUICK)
    with pytest.raises(ValueError, match=r"priors differ"):
        ps.RegularizedVI(small, **SMALL).train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)
    same = ps.RegularizedVI(small, **SMALL, priors=ps.RegularizedPriors(feature_scaling=dist.Gamma(2.0, 2.0)))
    same.train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)
    assert len(same.history) == 2  # it resumed
    # edited between two train() calls: the second call's checkpoints recorded the first call's priors
    later = ps.RegularizedVI(small, **SMALL)
    later.train(max_epochs=1, **QUICK)
    later.module.model.priors.dispersion_rate__rate.fill_(1.0)
    later.train(max_epochs=2, checkpoint_dir=str(tmp_path / "later"), **QUICK)
    with pytest.raises(ValueError, match=r"priors differ"):
        ps.RegularizedVI(small, **SMALL).train(max_epochs=3, checkpoint_dir=str(tmp_path / "later"), **QUICK)


def test_resuming_with_other_genes_is_refused_by_name(small, tmp_path):
    ps.RegularizedVI(small, **SMALL).train(max_epochs=1, checkpoint_dir=str(tmp_path), **QUICK)
    other = small[:, ::-1].copy()  # the same counts, the genes in another order: the per-gene tables would not fit
    ps.RegularizedVI.setup_anndata(other, layer="counts", batch_key="batch")
    with pytest.raises(ValueError, match=r"feature names\.genes differ.*--overwrite"):
        ps.RegularizedVI(other, **SMALL).train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)
    # the setting is named, with the value that resumes the checkpoint (the only fix offered had been to discard it)
    with pytest.raises(ValueError, match=r"model settings\.n_latent differ\); to resume it, use the settings it "
                                         r"was written with: n_latent=4 \(now 5\); or remove it"):
        ps.RegularizedVI(small, n_hidden=32, n_latent=5).train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)
    with pytest.raises(ValueError, match=r"written with: decoder_gene_scale=True \(now the default\); or remove it"):
        scaled = tmp_path / "scaled"
        ps.RegularizedVI(small, decoder_gene_scale=True, **SMALL).train(max_epochs=1, checkpoint_dir=str(scaled), **QUICK)
        ps.RegularizedVI(small, **SMALL).train(max_epochs=2, checkpoint_dir=str(scaled), **QUICK)
    with pytest.raises(ValueError, match=r"feature names\.genes differ\); remove it"):  # not a setting: no such advice
        ps.RegularizedVI(other, **SMALL).train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)


def test_a_checkpoint_written_before_the_finer_fingerprint_keeps_its_settings_check(small, tmp_path):
    ps.RegularizedVI(small, **SMALL).train(max_epochs=1, checkpoint_dir=str(tmp_path), **QUICK)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    for part in ("covariate keys", "covariate categories", "priors", "feature names", "model settings"):
        del state["fingerprint"][part]  # as checkpoints were written before 2026-12-06
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"\(settings differ\)"):  # it resumed, or failed in load_state_dict
        ps.RegularizedVI(small, n_hidden=32, n_latent=5).train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)
    same = ps.RegularizedVI(small, **SMALL)
    same.train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)
    assert len(same.history) == 2  # the same settings still resume
    # a model saved before 2026-12-05 (its fingerprint: cells, features, settings) still loads and trains on
    same.save(str(tmp_path / "saved"))
    payload = torch.load(tmp_path / "saved" / "model.pt", weights_only=False)
    fingerprint = payload["trainer"]["fingerprint"]
    payload["trainer"]["fingerprint"] = {k: fingerprint[k] for k in ("cells", "features", "settings")}
    torch.save(payload, tmp_path / "saved" / "model.pt")
    loaded = ps.RegularizedVI.load(str(tmp_path / "saved"), adata=small)
    loaded.train(max_epochs=1, **QUICK)
    assert len(loaded.history) == 3


def test_a_trained_model_does_not_overwrite_another_runs_checkpoint(small, tmp_path):
    other = small.copy()
    other.layers["counts"] = other.layers["counts"].copy()
    other.layers["counts"].data = np.ceil(other.layers["counts"].data / 2)
    ps.RegularizedVI.setup_anndata(other, layer="counts", batch_key="batch")
    ps.RegularizedVI(other, **SMALL).train(max_epochs=2, checkpoint_dir=str(tmp_path / "other"), **QUICK)
    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=1, checkpoint_dir=str(tmp_path / "mine"), **QUICK)
    written = (tmp_path / "other" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"of another run, which this one would overwrite\) was written for different "
                                         r"data or settings \(counts\.x differ\)"):
        model.train(max_epochs=1, checkpoint_dir=str(tmp_path / "other"), **QUICK)
    assert (tmp_path / "other" / "checkpoint.pt").read_bytes() == written
    model.train(max_epochs=1, checkpoint_dir=str(tmp_path / "mine"), **QUICK)  # its own run's checkpoint
    model.save(str(tmp_path / "saved"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "saved"), adata=small.copy())
    loaded.train(max_epochs=1, checkpoint_dir=str(tmp_path / "mine"), **QUICK)  # the same run, loaded
    assert loaded.trainer.epoch == 3


def test_a_subclassed_model_is_not_loaded_or_resumed_as_the_plain_one(small, tmp_path):
    from pyro_scmodels.models.regularizedvi_guide import RegularizedVIGuide
    from pyro_scmodels.models.regularizedvi_module import RegularizedVIModel
    from pyro_scmodels.pyro_modules import PositiveSiteGuide

    class OffsetModel(RegularizedVIModel):  # a per-gene factor on the mean, a site of its own
        def global_sites(self):
            values = super().global_sites()
            with pyro.plate("genes_offset", self.dims.n_genes, dim=-1):
                values["offset"] = pyro.sample("gene_offset", dist.Gamma(10.0, 10.0))
            return values

    class OffsetGuide(RegularizedVIGuide):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gene_offset = PositiveSiteGuide(torch.ones(self.dims.n_genes), "map")

        def global_sites(self):
            values = super().global_sites()
            with pyro.plate("genes_offset", self.dims.n_genes, dim=-1):
                self.gene_offset("gene_offset")
            return values

    class OffsetVI(ps.RegularizedVI):
        model_class, guide_class = OffsetModel, OffsetGuide

    edited = OffsetVI(small, **SMALL)
    edited.train(max_epochs=2, checkpoint_dir=str(tmp_path / "ck"), **QUICK)
    edited.save(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="OffsetModel / OffsetGuide.*OffsetVI.load"):
        ps.RegularizedVI.load(str(tmp_path / "saved"), adata=small)  # it loaded, or failed in load_state_dict
    with pytest.raises(ValueError, match="module classes differ"):
        ps.RegularizedVI(small, **SMALL).train(max_epochs=3, checkpoint_dir=str(tmp_path / "ck"), **QUICK)
    assert OffsetVI.load(str(tmp_path / "saved"), adata=small).is_trained
    # a per-gene site of the subclass is exported per gene, to .varm (it went to .uns as a list)
    exported = small.copy()
    edited.export_posterior(exported, num_samples=2)
    assert exported.varm["means_gene_offset"].shape == (small.n_vars, 1)


def test_a_checkpoint_of_other_counts_covariates_or_cell_order_under_the_same_names_is_refused(small, tmp_path):
    ps.RegularizedVI(small, **SMALL).train(max_epochs=1, checkpoint_dir=str(tmp_path), **QUICK)
    thinned = small.copy()
    thinned.layers["counts"] = thinned.layers["counts"].copy()
    thinned.layers["counts"].data = np.ceil(thinned.layers["counts"].data / 2)
    relabelled = small.copy()
    relabelled.obs["batch"] = relabelled.obs["batch"].to_numpy()[np.random.default_rng(0).permutation(200)]
    for adata, differ in ((thinned, r"counts\.x"), (relabelled, r"cell covariates\.ambient_index"),
                          (small[::-1].copy(), "cell order")):
        ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
        with pytest.raises(ValueError, match=rf"different data or settings \(.*{differ}.*differ\)"):
            ps.RegularizedVI(adata, **SMALL).train(max_epochs=2, checkpoint_dir=str(tmp_path), **QUICK)


def test_a_saved_model_loaded_onto_its_cells_reordered_or_other_counts_does_not_reuse_the_split(small, tmp_path):
    model = ps.RegularizedVI(small, **SMALL)
    model.train(max_epochs=2, **QUICK)
    model.save(str(tmp_path / "model"))
    reordered = small[::-1].copy()  # the split's positions would point at other cells
    on_reordered = ps.RegularizedVI.load(str(tmp_path / "model"), adata=reordered)
    assert on_reordered.trainer is None
    on_reordered.train(max_epochs=2, **QUICK)  # trained on: its history goes on (it was dropped) from epoch 2
    assert list(on_reordered.history.index) == [0, 1, 2, 3] and on_reordered.trainer.epoch == 4
    assert (on_reordered.history["kl_weight"].iloc[2:] == 1.0).all()  # no second KL warm-up
    thinned = small.copy()
    thinned.layers["counts"] = thinned.layers["counts"].copy()
    thinned.layers["counts"].data = np.ceil(thinned.layers["counts"].data / 2)
    with pytest.warns(UserWarning, match=r"data differ from those the model was trained on \(counts\.x differ\)"):
        loaded = ps.RegularizedVI.load(str(tmp_path / "model"), adata=thinned)
    assert loaded.trainer is None and len(loaded.history) == 2
    assert ps.RegularizedVI.load(str(tmp_path / "model"), adata=small.copy()).trainer is not None  # the same data


def test_a_checkpoint_trained_backed_refuses_other_counts_on_disk_in_every_format(small, tmp_path):
    # the counts on disk were recorded as unknown, matching any: a run on thinned counts under the same names took up
    # the finished checkpoint and returned the first data's model as its own (in memory: refused)
    import anndata
    import scipy.sparse as sp
    import torch

    from pyro_scmodels.checkpoints import StateMismatchError

    from ._on_disk_files import write_counts_h5ad

    path = write_counts_h5ad(small.copy(), tmp_path / "cells.h5ad")
    thinned = anndata.read_h5ad(path)
    thinned.X.data = np.ceil(thinned.X.data / 2)  # the same names and stored entries
    thinned.write_h5ad(tmp_path / "thinned.h5ad")

    def model_on(file, backed="r", layout=None):
        if layout is not None:  # the same counts written as CSC or dense
            adata = anndata.read_h5ad(file)
            adata.X = sp.csc_matrix(adata.X) if layout == "csc" else adata.X.toarray()
            file = str(tmp_path / f"{layout}_{backed}.h5ad")
            adata.write_h5ad(file)
        adata = anndata.read_h5ad(file, backed=backed)
        ps.RegularizedVI.setup_anndata(adata, batch_key="batch")
        return ps.RegularizedVI(adata, **SMALL)

    first = model_on(path)
    first.train(max_epochs=1, checkpoint_dir=str(tmp_path / "run"), **QUICK)
    for backed in ("r", None):
        with pytest.raises(StateMismatchError, match=r"counts\.x differ"):
            model_on(str(tmp_path / "thinned.h5ad"), backed).train(max_epochs=1, checkpoint_dir=str(tmp_path / "run"),
                                                                  **QUICK)
    # the same counts, read in memory or from disk as CSR or dense, or in memory as CSC, take the checkpoint up
    for backed, layout in ((None, None), (None, "csc"), ("r", "dense"), (None, "dense")):
        again = model_on(path, backed, layout)
        again.train(max_epochs=1, checkpoint_dir=str(tmp_path / "run"), **QUICK)
        assert all(torch.equal(a, b) for a, b in zip(first.module.state_dict().values(),
                                                     again.module.state_dict().values())), (backed, layout)
    # a model saved from disk, loaded onto thinned counts: its training state is dropped, as in memory
    first.save(str(tmp_path / "model"))
    with pytest.warns(UserWarning, match=r"counts\.x differ"):
        loaded = ps.RegularizedVI.load(str(tmp_path / "model"),
                                       adata=anndata.read_h5ad(tmp_path / "thinned.h5ad", backed="r"))
    assert loaded.trainer is None


def test_a_checkpoint_that_did_not_record_its_counts_on_disk_is_taken_up_with_a_warning():
    from pyro_scmodels.checkpoints import fingerprint_differences

    saved = {"counts": {"x": None}, "cells": 10}
    with pytest.warns(UserWarning, match="did not record the counts of 'x'"):
        assert fingerprint_differences(saved, {"counts": {"x": "5 entries, sum 9"}, "cells": 10}) == []
    assert fingerprint_differences(saved, {"counts": {"x": "5 entries, sum 9"}, "cells": 11}) == ["cells"]


def test_a_file_that_is_not_a_checkpoint_is_refused_by_name(small, tmp_path):
    # a pickled list failed with AttributeError; a dict without the modules (a saved NDreamer's training.pt) was
    # taken up with the model left at its random initialisation
    for content in ([1, 2], {"epoch": 3, "step": 9, "history": None}):
        torch.save(content, tmp_path / "checkpoint.pt")
        with pytest.raises(ValueError, match=r"checkpoint\.pt is not a training checkpoint of this SVITrainer \(it lacks "
                                             r"'model', 'guide'"):
            ps.RegularizedVI(small, **SMALL).train(max_epochs=1, checkpoint_dir=str(tmp_path), **QUICK)
