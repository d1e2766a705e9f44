"""Differential expression with the background every cell shares (``background="shared"``, the default) or without
(``"none"``): the tested expression is rho plus, per gene, the smallest ambient background among each ambient key's
categories, summed over keys."""

import numpy as np
import pytest

import pyro_scmodels as ps
from pyro_scmodels.differential_statistics import change_test

from ._scvi_api import FIT, SMALL, simulate_small


@pytest.fixture(scope="module")
def two_keys():
    """A background per batch and per condition: two ambient keys, each with its own shared part."""
    adata = simulate_small()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", ambient_covariate_keys=["batch", "condition"],
                                   dispersion_key="batch", library_size_key="batch")
    model = ps.RegularizedVI(adata, **SMALL)
    model.train(max_epochs=3, **FIT)
    return model


def _by_hand(model, cells1, cells2, shift, num_samples=3, n_pairs=400, pseudocount=0.01):
    """The change test on log2(rho + shift) from the public queries, drawn as differential_expression draws: seed 0,
    the groups' cells (all of them, sorted) from one generator, group i decoded with seed i, then the pairs."""
    rng = np.random.default_rng(0)
    samples = []
    for seed, cells in enumerate((cells1, cells2)):
        chosen = np.sort(rng.choice(cells, size=len(cells), replace=False))
        rho = np.concatenate([r.numpy() for _, _, r in model.decode_samples(indices=chosen, n_samples=num_samples,
                                                                            seed=seed)], axis=1)
        samples.append(np.log2((rho + shift).reshape(-1, rho.shape[-1]) + pseudocount))
    return change_test(samples[0], samples[1], model.var_names, 0.25, 0.05, n_pairs, rng, pseudocount)


def test_shared_background_is_the_smallest_per_key_added_to_rho(two_keys):
    model = two_keys
    profile = model.get_ambient_profile()  # genes x "key=category"
    keys = profile.columns.str.split("=").str[0]
    shared = sum(profile.loc[:, keys == key].min(axis=1) for key in ("batch", "condition"))
    np.testing.assert_allclose(model.shared_background(), shared, rtol=1e-6)
    assert (shared > profile.loc[:, keys == "batch"].min(axis=1) * 1.01).all()  # both keys count

    obs = model.adata.obs
    in_type = (obs["cell_type"] == "type_0").to_numpy()
    cells1 = np.flatnonzero(in_type & (obs["condition"] == "stimulated").to_numpy())
    cells2 = np.flatnonzero(in_type & (obs["condition"] == "control").to_numpy())
    options = dict(idx1=cells1, idx2=cells2, num_samples=3, n_pairs=400, all_stats=False)
    genes = model.var_names
    for background, shift in (("shared", shared.to_numpy(dtype=np.float32)), ("none", 0.0)):
        table = model.differential_expression(background=background, **options).loc[genes]
        hand = _by_hand(model, cells1, cells2, shift).loc[genes]
        for column in ("lfc_mean", "scale1", "scale2", "proba_de"):
            np.testing.assert_allclose(table[column], hand[column], rtol=1e-4, atol=1e-5, err_msg=background)
    default = model.differential_expression(**options).loc[genes]
    np.testing.assert_allclose(default["lfc_mean"], _by_hand(model, cells1, cells2, shared.to_numpy(np.float32))
                               .loc[genes, "lfc_mean"], rtol=1e-4, atol=1e-5)  # the default is "shared"
    without = model.differential_expression(background="none", **options).loc[genes]
    assert not np.allclose(default["lfc_mean"], without["lfc_mean"], rtol=0.05)  # the shared part moves them
    assert np.abs(default["lfc_mean"]).sum() < np.abs(without["lfc_mean"]).sum()  # towards 0: a common c is added


def test_an_unknown_background_names_the_value_and_the_choices(two_keys):
    cells = np.arange(40)
    with pytest.raises(ValueError, match=r"background='ambient' is not an option: pass 'shared' .* or 'none'"):
        two_keys.differential_expression(idx1=cells, background="ambient", num_samples=2, n_cells=10)
    with pytest.raises(TypeError, match=r"background=True is not an option: pass 'shared'"):
        two_keys.differential_expression(idx1=cells, background=True, num_samples=2, n_cells=10)


def test_shared_background_without_an_ambient_key_is_the_one_background():
    adata = simulate_small()
    ps.RegularizedVI.setup_anndata(adata, layer="counts")
    model = ps.RegularizedVI(adata, **SMALL)
    model.train(max_epochs=1, **FIT)
    profile = model.get_ambient_profile()
    assert profile.shape[1] == 1
    np.testing.assert_allclose(model.shared_background().to_numpy(), profile.iloc[:, 0].to_numpy(), rtol=1e-6)


def test_multimodal_shared_background_leaves_out_unmeasured_categories_and_modalities_without_one(tmp_path):
    # a batch with no RNA counts (an ATAC-only channel): its RNA background never leaves its starting floor (1e-8)
    # and, taken into the minimum, made "shared" test rho alone without a word
    import scipy.sparse as sp
    import warnings

    mdata = ps.datasets.simulate_multiome(n_cells=300, n_genes=80, n_peaks=120, seed=0)
    rna, batch = mdata.mod["rna"], mdata.obs["batch"].astype(str).to_numpy()
    counts = rna.layers["counts"]
    counts = counts.toarray() if sp.issparse(counts) else np.array(counts)
    counts[batch == np.unique(batch)[-1]] = 0
    rna.layers["counts"] = sp.csr_matrix(counts)
    ps.RegularizedMultimodalVI.setup_mudata(mdata, layer="counts", ambient_covariate_keys=["batch"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no cell with counts.*")
        model = ps.RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16, ambient_modalities=["rna"])
    model.train(max_epochs=3, batch_size=128, lr=1e-2, kl_warmup_epochs=1, early_stopping=False, device="cpu",
                progress_bar=False)
    profile = model.get_ambient_profile("rna")
    measured = [c for c in profile.columns if not c.endswith(np.unique(batch)[-1])]
    assert len(measured) == profile.shape[1] - 1
    shared = model.shared_background("rna")
    np.testing.assert_allclose(shared.to_numpy(), profile[measured].min(axis=1).to_numpy(), rtol=1e-6)
    assert shared.mean() > 1e-3  # not the unmeasured batch's floor
    assert model.shared_background("atac") is None
    # loaded on the other batches' cells, the model still knows which category its training cells left unmeasured
    model.save(str(tmp_path / "model"))
    loaded = ps.RegularizedMultimodalVI.load(str(tmp_path / "model"), mdata=mdata[batch != np.unique(batch)[-1]].copy())
    np.testing.assert_allclose(loaded.shared_background("rna").to_numpy(), shared.to_numpy(), rtol=1e-6)
