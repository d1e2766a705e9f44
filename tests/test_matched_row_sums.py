"""Matched effects from the dense block of matched rows (matched_row_sums) against numpy from the definitions."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from pyro_scmodels.matching import match_groups
from pyro_scmodels.ndreamer import matched_row_sums as M
from pyro_scmodels.ndreamer.count_rows import LogNormalisedCounts
from pyro_scmodels.ndreamer import CounterfactualDesign
from pyro_scmodels.ndreamer.effects import effects_of_cells

K_MATCHED = 5
LEVEL = 0.9


def small_design(seed=0, n_cells=150, n_genes=30):
    """Counts of 3 batches: "a" and "b" hold both arms, "c" the control only; about half the values are zeros."""
    rng = np.random.default_rng(seed)
    batch = rng.choice(["a", "b", "c"], n_cells)
    condition = np.where((batch != "c") & (rng.random(n_cells) < 0.5), "stim", "ctrl")
    counts = sp.csr_matrix(rng.poisson(rng.gamma(0.7, 1.5, (n_cells, n_genes))).astype(np.uint16))
    factors = (1e4 / np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1)).astype(np.float32)
    rows = LogNormalisedCounts(counts.data, counts.indices.astype(np.uint16), counts.indptr, factors, n_genes)
    with pytest.warns(UserWarning, match="hold only one"):
        design = CounterfactualDesign(condition, "ctrl", batch)
    matches = match_groups(rng.normal(size=(n_cells, 3)), design.groups, k=K_MATCHED, device="cpu")
    return rows, design, matches


def reference(x, design, matches):
    """Denoised, batch effect, ITE and its interval from the definitions (:mod:`.effect_intervals`), cell by cell."""
    x = x.astype(np.float64)
    n = x.shape[0]
    unit = np.array([row[row > 0].min() if (row > 0).any() else 0.0 for row in x])

    def term(i, b, c):
        """Cell i's value in batch b and condition c, and that value's variance."""
        match = matches[design.group(b, c)]
        rows, w = x[match.indices[i]], match.weights_of(np.array([i]))[0].astype(np.float64)
        w /= w.sum()
        spread = np.maximum(rows.var(axis=0, ddof=1), unit[i] ** 2 / K_MATCHED)  # floored at one count among k
        if design.batch[i] == b and design.condition[i] == c:
            return x[i], spread
        return w @ rows, spread * (w**2).sum()

    def arm(i, c, batches):
        terms = [term(i, b, c) for b in batches]
        return np.mean([t[0] for t in terms], axis=0), np.sum([t[1] for t in terms], axis=0) / len(batches) ** 2

    denoised = np.array([arm(i, design.condition[i], design.batches_with[design.condition[i]])[0] for i in range(n)])
    common = design.common_batches("stim")
    ite, variance = [], []
    for i in range(n):
        (t, vt), (c, vc) = arm(i, "stim", common), arm(i, "ctrl", common)
        ite.append(t - c)
        variance.append(vt + vc)
    half = stats.t.ppf(0.5 + LEVEL / 2, K_MATCHED - 1) * np.sqrt(np.array(variance))
    ite = np.array(ite)
    return {"denoised": denoised, "batch_effect": x - denoised, "ite_stim": ite, "ite_stim_q05": ite - half,
            "ite_stim_q95": ite + half}


def as_input(rows, form):
    return {"dense": rows.toarray(), "csr": rows.to_csr(), "count rows": rows}[form]


@pytest.fixture(scope="module")
def case():
    rows, design, matches = small_design()
    return rows, design, matches, reference(rows.toarray(), design, matches)


@pytest.mark.parametrize("form", ["dense", "csr", "count rows"])
@pytest.mark.parametrize("route", ["dense block", "dense block in slices", "sparse product"])
def test_effects_match_the_definitions(case, form, route, monkeypatch):
    rows, design, matches, expected = case
    if route == "sparse product":
        monkeypatch.setattr(M, "SPARSE_ENTRY_COST", 0)
    else:  # the data are small: make the dense block the cheaper route (and slice its float64 copies)
        monkeypatch.setattr(M, "SPARSE_ENTRY_COST", 10**9)
        if route == "dense block in slices":
            monkeypatch.setattr(M, "WIDE_SLICE_VALUES", 7 * len(np.unique(matches["a|stim"].indices)))
    used, original = [], M._dense_rows

    def recorded(*args, **kwargs):
        block = original(*args, **kwargs)
        used.append(block is not None)
        return block

    monkeypatch.setattr(M, "_dense_rows", recorded)
    out = effects_of_cells(as_input(rows, form), matches, design, interval=LEVEL)
    assert set(out) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(out[name], value, rtol=2e-5, atol=2e-5, err_msg=name)
    assert any(used) == (form != "dense" and route != "sparse product")  # the route asked for was taken


@pytest.mark.parametrize("form", ["csr", "count rows"])
def test_dense_block_gives_the_sparse_products_numbers(case, form, monkeypatch):
    """Not only close: the same sums in the same order and precision, so the same bits."""
    rows, design, matches, _ = case
    values = as_input(rows, form)
    genes = np.array([3, 0, 17, 29, 8])
    results = {}
    for cost in (0, 10**9):
        monkeypatch.setattr(M, "SPARSE_ENTRY_COST", cost)
        results[cost] = [effects_of_cells(values, matches, design, genes=genes, interval=LEVEL),
                         effects_of_cells(values, matches, design, cells=np.arange(40, 90), factual="matched")]
    for sparse, dense in zip(results[0], results[10**9]):
        for name in sparse:
            assert np.array_equal(sparse[name], dense[name]), name


def test_the_dense_block_is_refused_where_it_would_not_pay_or_not_fit(case, monkeypatch):
    rows, _, matches, _ = case
    match = matches["a|ctrl"]
    indices, weights = match.indices[:20], match.weights_of(np.arange(20))
    csr = rows.to_csr()
    monkeypatch.setattr(M, "SPARSE_ENTRY_COST", 10**9)
    assert M._dense_rows(csr, indices, None, products=3) is not None
    assert M._dense_rows(rows.toarray(), indices, None, products=3) is None  # dense input: already sparse x dense
    assert M._dense_rows(csr.tocsc(), indices, None, products=3) is None
    monkeypatch.setattr(M, "DENSE_ROWS_MAX_VALUES", 10)
    assert M._dense_rows(csr, indices, None, products=3) is None
    np.testing.assert_array_equal(M.matched_mean(csr, indices, weights), M.matched_mean(rows.toarray(), indices, weights))
    monkeypatch.setattr(M, "DENSE_ROWS_MAX_VALUES", 10**9)
    monkeypatch.setattr(M, "SPARSE_ENTRY_COST", 0)
    assert M._dense_rows(csr, indices, None, products=1) is None
