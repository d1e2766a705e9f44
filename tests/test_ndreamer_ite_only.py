"""The ITE layers alone (``effects_of_cells(..., ite_of=...)``, what ``estimate_model_ite``'s widening and hull read):
the same numbers, bit for bit, as the ITE layers of the full computation."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from pyro_scmodels.matching import match_groups
from pyro_scmodels.ndreamer import _constants as K
from pyro_scmodels.ndreamer import effects as E
from pyro_scmodels.ndreamer.count_rows import LogNormalisedCounts
from pyro_scmodels.ndreamer import CounterfactualDesign
from pyro_scmodels.ndreamer.effects import effects_of_cells
from pyro_scmodels.ndreamer.matched_effects import MatchedEffects

from .test_model_ite_width import from_model  # noqa: F401 (fixture)


def three_arm_design(seed=0, n_cells=360, n_genes=30):
    """Two treatments and a control in three batches; batch "2" holds no control cells, so each treatment's arms are
    averaged over the batches holding both (a second arm of the treated condition, besides the one for denoised)."""
    rng = np.random.default_rng(seed)
    condition = rng.choice(["ctrl", "stimA", "stimB"], n_cells)
    batch = rng.choice(["0", "1", "2"], n_cells)
    batch[(batch == "2") & (condition == "ctrl")] = "0"
    counts = rng.poisson(rng.gamma(2.0, 1.0, (n_cells, n_genes)) * 3.0)
    expression = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    embedding = rng.normal(size=(n_cells, 3)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch "2" holds one arm only: said with a warning
        design = CounterfactualDesign(condition, "ctrl", batch)
    assert design.common_batches("stimA") != design.batches_with["stimA"]
    return expression, counts, embedding, design


def count_rows(counts):
    """The counts as the row store NDreamer keeps for backed input."""
    csr = sp.csr_matrix(counts.astype(np.float32))
    factors = (1e4 / np.maximum(counts.sum(1), 1)).astype(np.float32)
    return LogNormalisedCounts(csr.data.astype(np.uint16), csr.indices.astype(np.uint16), csr.indptr, factors,
                               counts.shape[1])


def ite_names(treatments, interval):
    suffixes = [""] if interval is None else ["", "_q05", "_q95"]
    return [f"ite_{t}{s}" for t in treatments for s in suffixes]


@pytest.mark.parametrize("factual", ["observed", "matched"])
@pytest.mark.parametrize("interval", [None, 0.9])
@pytest.mark.parametrize("form", ["dense", "csr", "counts"])
def test_ite_of_gives_the_full_computations_ite_layers_bit_for_bit(factual, interval, form, monkeypatch):
    expression, counts, embedding, design = three_arm_design()
    values = {"dense": expression, "csr": sp.csr_matrix(expression),
              "counts": count_rows(counts)}[form]
    matches = match_groups(embedding, design.groups, k=8, device="cpu")
    monkeypatch.setattr(K, "WRITE_CHUNK_CELLS", 70)  # an interval of more cells is computed in blocks
    rng = np.random.default_rng(1)
    selections = [(None, None), (rng.permutation(360)[:150], None), (np.arange(20, 40), rng.permutation(30)[:7]),
                  (None, np.array([29, 0, 3]))]
    for cells, genes in selections:
        full = effects_of_cells(values, matches, design, cells, genes, interval=interval, factual=factual)
        for ite_of in (["stimA"], "stimB", ["stimB", "stimA"], design.treatments):
            alone = effects_of_cells(values, matches, design, cells, genes, interval=interval, factual=factual,
                                     ite_of=ite_of)
            chosen = [ite_of] if isinstance(ite_of, str) else ite_of
            assert list(alone) == ite_names(chosen, interval)
            for name in alone:
                assert alone[name].dtype == full[name].dtype
                np.testing.assert_array_equal(alone[name], full[name], err_msg=f"{name} {factual} {interval} {form}")


@pytest.mark.parametrize("interval", [None, 0.9])
def test_matched_effects_give_the_ite_layers_alone_computed_or_from_the_cache(interval):
    expression, _, embedding, design = three_arm_design(seed=3)
    matched = MatchedEffects(expression, design, factual="matched")
    matched.set_embedding(embedding)
    cells, genes = np.array([5, 300, 17, 42]), np.array([4, 2])
    computed = matched.effects_of(cells=cells, genes=genes, interval=interval, ite_of=["stimB"])
    assert list(computed) == ite_names(["stimB"], interval)
    whole = matched.effects(interval=0.9)  # cached from now on
    cached = matched.effects_of(cells=cells, genes=genes, interval=interval, ite_of=["stimB"])
    assert list(cached) == list(computed)
    for name in computed:
        np.testing.assert_array_equal(computed[name], whole[name][np.ix_(cells, genes)])
        np.testing.assert_array_equal(cached[name], computed[name])


def test_effects_of_another_factual_are_computed_with_it_not_taken_from_the_cache():
    # estimate_model_ite's hull reads the observed own term from an NDreamer whose own factual is "matched"
    expression, _, embedding, design = three_arm_design(seed=4)
    matched, observed = (MatchedEffects(expression, design, factual=f) for f in ("matched", "observed"))
    for effects in (matched, observed):
        effects.set_embedding(embedding)
    cells, genes = np.array([3, 250, 41]), np.array([7, 0, 5])
    expected = observed.effects_of(cells=cells, genes=genes, interval=0.9, ite_of=["stimA"])
    own = matched.effects_of(cells=cells, genes=genes, interval=0.9, ite_of=["stimA"])
    matched.effects(interval=0.9)  # the matched factual's whole result, cached
    asked = matched.effects_of(cells=cells, genes=genes, interval=0.9, ite_of=["stimA"], factual="observed")
    assert matched.factual == "matched"
    assert not np.allclose(own["ite_stimA"], expected["ite_stimA"])  # the two factuals differ here
    for name in expected:
        np.testing.assert_array_equal(asked[name], expected[name], err_msg=name)
    with pytest.raises(ValueError, match="factual"):
        matched.effects_of(cells=cells, factual="mean")


def test_ite_of_names_treatments_only():
    expression, _, embedding, design = three_arm_design()
    matches = match_groups(embedding, design.groups, k=4, device="cpu")
    for wrong in (["ctrl"], ["stimC"], []):
        with pytest.raises(ValueError, match="ite_of="):
            effects_of_cells(expression, matches, design, ite_of=wrong)


def spy_on_ite_of(monkeypatch) -> list:
    """Record the ``ite_of`` of every ``effects_of_cells`` call that MatchedEffects makes from now on."""
    asked = []
    full_path = E.effects_of_cells

    def spy(*args, ite_of=None, **kwargs):
        asked.append(ite_of)
        return full_path(*args, ite_of=ite_of, **kwargs)

    monkeypatch.setattr("pyro_scmodels.ndreamer.matched_effects.effects_of_cells", spy)
    return asked


@pytest.mark.parametrize("widen", [True, "hull"])
def test_the_widening_and_the_hull_read_the_ite_layers_alone_and_get_the_same_bounds(from_model, widen, monkeypatch):  # noqa: F811
    nd = from_model
    full_path = E.effects_of_cells

    def run():
        nd.effects.forget_effects()  # the effects are computed, not sliced from an earlier estimate_ite
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nd.estimate_model_ite(num_samples=4, widen_by_matching=widen).copy()

    asked = spy_on_ite_of(monkeypatch)
    alone = run()
    assert asked and all(a == ["stimulated"] for a in asked)
    # the layers as the full computation gives them (every layer, then the ITE's kept)
    monkeypatch.setattr("pyro_scmodels.ndreamer.matched_effects.effects_of_cells",
                        lambda *args, ite_of=None, **kwargs: full_path(*args, **kwargs))
    full = run()
    assert set(alone.layers) == set(full.layers)
    for name in alone.layers:
        np.testing.assert_array_equal(alone.layers[name], full.layers[name], err_msg=name)


@pytest.mark.parametrize("shrink, interval", [(None, None), ("clusters", 0.9)])
def test_estimate_ite_of_some_cells_computes_the_ite_layers_alone(from_model, shrink, interval, monkeypatch):  # noqa: F811
    # estimate_cate reads the ITE 10,000 cells of a group at a time through the same path: no denoised expression
    # or batch effect (two more cells x genes arrays) for any of them
    nd = from_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = nd.estimate_ite(shrink=shrink, interval=interval).copy()
        nd.effects.forget_effects()  # computed, not sliced from the whole result
        asked = spy_on_ite_of(monkeypatch)
        cells = [3, 77, 150, 299]
        part = nd.estimate_ite(indices=cells, shrink=shrink, interval=interval)
    assert asked == [list(nd.design.treatments)]
    bounds = [] if interval is None else ["ite_stimulated_q05", "ite_stimulated_q95"]
    assert set(part.layers) == {"ite_stimulated", *bounds}
    for name in part.layers:
        np.testing.assert_allclose(part.layers[name], whole.layers[name][cells], rtol=1e-6, atol=1e-7, err_msg=name)
