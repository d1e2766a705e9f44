"""The denoised expression and batch effect alone (``decompose_batch_effect(indices=...)``): each cell's own condition
is read, not every condition's arm for the ITEs, and the numbers are those of the full computation."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from pyro_scmodels.matching import match_groups
from pyro_scmodels.ndreamer import effects as E
from pyro_scmodels.ndreamer.effects import denoised_of_cells, effects_of_cells
from pyro_scmodels.ndreamer.matched_effects import MatchedEffects

from .test_model_ite_width import from_model  # noqa: F401 (fixture)
from .test_ndreamer_ite_only import count_rows, three_arm_design


@pytest.mark.parametrize("form", ["dense", "csr", "counts"])
def test_denoised_alone_is_the_full_computations_denoised_and_batch_effect(form):
    expression, counts, embedding, design = three_arm_design()
    values = {"dense": expression, "csr": sp.csr_matrix(expression), "counts": count_rows(counts)}[form]
    matches = match_groups(embedding, design.groups, k=8, device="cpu")
    rng = np.random.default_rng(1)
    for cells, genes in [(None, None), (rng.permutation(360)[:150], None), (np.arange(20, 40), rng.permutation(30)[:7]),
                         (None, np.array([29, 0, 3]))]:
        alone = denoised_of_cells(values, matches, design, cells, genes)
        assert list(alone) == ["denoised", "batch_effect"]
        full = effects_of_cells(values, matches, design, cells, genes, factual="observed")
        for name in alone:
            assert alone[name].dtype == np.float32
            np.testing.assert_array_equal(alone[name], full[name], err_msg=f"{name} {form}")
        # "matched" keeps the observed value in denoised by a difference: equal within float32 rounding
        matched = effects_of_cells(values, matches, design, cells, genes, factual="matched")
        for name in alone:
            np.testing.assert_allclose(alone[name], matched[name], rtol=1e-5, atol=1e-5, err_msg=f"{name} {form}")
    # and it is not a copy of the observed values: the batches' matched cells moved them
    assert np.abs(alone["batch_effect"]).max() > 0.1


def _counting(monkeypatch):
    """Record every call of the full computation and of the denoised one made by MatchedEffects."""
    calls = []
    for name in ("effects_of_cells", "denoised_of_cells"):
        original = getattr(E, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(f"pyro_scmodels.ndreamer.matched_effects.{name}", spy)
    return calls


@pytest.mark.parametrize("factual", ["observed", "matched"])
def test_matched_effects_give_denoised_alone_computed_or_from_the_cache(factual, monkeypatch):
    expression, counts, embedding, design = three_arm_design()
    effects = MatchedEffects(expression, design, factual=factual)
    effects.set_embedding(embedding)
    cells, genes = np.array([5, 300, 17]), np.array([4, 0])
    calls = _counting(monkeypatch)
    computed = effects.denoised_of(8, 1.0, cells, genes)
    assert calls == ["denoised_of_cells"] and effects.cached == {}
    whole = effects.effects(8, 1.0)
    assert effects.cached == {(8, 1.0, None): ["denoised", "batch_effect", *(f"ite_{t}" for t in design.treatments)]}
    calls.clear()
    sliced = effects.denoised_of(8, 1.0, cells, genes)
    assert calls == []  # taken from the cached whole result
    for name in ("denoised", "batch_effect"):
        np.testing.assert_array_equal(sliced[name], whole[name][np.ix_(cells, genes)])
        np.testing.assert_allclose(computed[name], sliced[name], rtol=1e-5, atol=1e-5)
    effects.forget_effects()
    assert effects.cached == {}
    effects.denoised_of(8, 1.0, cells, genes)
    assert calls == ["denoised_of_cells"]


def test_decompose_batch_effect_of_some_cells_reads_no_ite(from_model, monkeypatch):  # noqa: F811
    nd = from_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = nd.decompose_batch_effect().copy()
        nd.effects.forget_effects()  # computed, not sliced from the whole result
        calls = _counting(monkeypatch)
        cells, genes = [3, 77, 150, 299], list(nd.genes[[0, 5, 9]])
        part = nd.decompose_batch_effect(indices=cells, gene_list=genes)
    assert calls == ["denoised_of_cells"]
    assert set(part.layers) == {"denoised", "batch_effect"}
    assert list(part.obs_names) == list(whole.obs_names[cells]) and list(part.var_names) == genes
    columns = [list(nd.genes).index(g) for g in genes]
    for name in part.layers:
        # from_model's factual is "matched": its whole denoised keeps the observed value by a difference
        np.testing.assert_allclose(part.layers[name], whole.layers[name][np.ix_(cells, columns)], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
