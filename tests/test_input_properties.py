"""Property-based tests (hypothesis) of the input checks of ``setup_anndata``.

Random shapes, dtypes, dense or sparse storage, NaN / Inf / negative / fractional values at random
places, empty cells, unused and missing categories, repeated names. The property: setup either
raises a clear error (ValueError, TypeError or KeyError with a message) exactly when the input is
invalid, or succeeds with the right categories and leaves the data untouched.
"""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_scmodels as ps

DTYPES = [np.int32, np.int64, np.uint8, np.float32, np.float64]
CORRUPTIONS = ["nan", "inf", "-inf", "negative", "fraction"]


@st.composite
def count_inputs(draw):
    n_cells = draw(st.integers(0, 12))
    n_genes = draw(st.integers(0, 6))
    dtype = draw(st.sampled_from(DTYPES))
    counts = np.array(draw(st.lists(st.integers(0, 20), min_size=n_cells * n_genes, max_size=n_cells * n_genes)),
                      dtype=np.float64).reshape(n_cells, n_genes)
    corruptions = []
    if n_cells and n_genes:
        allowed = CORRUPTIONS if np.issubdtype(dtype, np.floating) else ([] if dtype == np.uint8 else ["negative"])
        for _ in range(draw(st.integers(0, 2)) if allowed else 0):
            kind = draw(st.sampled_from(allowed))
            row, column = draw(st.integers(0, n_cells - 1)), draw(st.integers(0, n_genes - 1))
            counts[row, column] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "negative": -3, "fraction": 2.5}[kind]
            corruptions.append(kind)
    labels = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=n_cells, max_size=n_cells))
    batch_style = draw(st.sampled_from(["text", "category_with_unused", "with_missing"]))
    return dict(counts=counts.astype(dtype), sparse=draw(st.booleans()), corruptions=corruptions, labels=labels,
                batch_style=batch_style, repeat_gene=draw(st.booleans()) and n_genes > 1,
                repeat_cell=draw(st.booleans()) and n_cells > 1)


def _adata(case) -> anndata.AnnData:
    counts = case["counts"]
    n_cells, n_genes = counts.shape
    genes = [f"g{j}" for j in range(n_genes)]
    cells = [f"c{i}" for i in range(n_cells)]
    if case["repeat_gene"]:
        genes[1] = genes[0]
    if case["repeat_cell"]:
        cells[1] = cells[0]
    batch = pd.Series(case["labels"], dtype=object)
    if case["batch_style"] == "category_with_unused":
        batch = pd.Categorical(case["labels"], categories=["a", "b", "c", "never_seen"])
    elif case["batch_style"] == "with_missing" and n_cells:
        batch.iloc[0] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about repeated names itself
        adata = anndata.AnnData(X=sp.csr_matrix(counts) if case["sparse"] else counts,
                                obs=pd.DataFrame({"batch": np.asarray(batch, dtype=object)}, index=cells),
                                var=pd.DataFrame(index=genes))
    if case["batch_style"] == "category_with_unused":
        adata.obs["batch"] = batch
    return adata


def _valid(case) -> bool:
    counts = case["counts"].astype(np.float64)
    if counts.size == 0 or case["corruptions"]:
        return False
    if (counts.sum(axis=1) <= 0).any():
        return False  # an empty cell (or no counts at all)
    missing_label = case["batch_style"] == "with_missing"
    return not (missing_label or case["repeat_gene"] or case["repeat_cell"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(case=count_inputs())
def test_setup_errors_exactly_on_invalid_input_and_keeps_valid_input_intact(case):
    adata = _adata(case)
    before = adata.X.copy()
    try:
        ps.RegularizedVI.setup_anndata(adata, batch_key="batch")
    except (ValueError, TypeError, KeyError) as err:
        message = str(err)
        assert not _valid(case), f"valid input refused: {message}"
        assert len(message) > 30, f"an error must say what is wrong and how to fix it: {message!r}"
        return
    assert _valid(case), f"invalid input accepted: {case['corruptions']}, style {case['batch_style']}"
    model = ps.RegularizedVI(adata, n_latent=2, n_hidden=4)
    observed = sorted(set(case["labels"]))
    # unused categories are dropped, observed ones kept in order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained: only the category names are read
        assert list(model.get_ambient_profile().columns) == observed
    dense = lambda x: x.toarray() if sp.issparse(x) else np.asarray(x)  # noqa: E731
    np.testing.assert_array_equal(dense(adata.X), dense(before))


@pytest.mark.parametrize("axis", ["obs", "var"])
def test_repeated_names_are_refused_with_the_fix(axis):
    adata = ps.datasets.simulate(n_cells=40, n_genes=12, n_markers_per_type=1, n_responding_genes=1, seed=0)
    names = list(getattr(adata, f"{axis}_names"))
    names[2] = names[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setattr(adata, f"{axis}_names", names)
    with pytest.raises(ValueError, match=rf"adata\.{axis}_names are not unique.*{axis}_names_make_unique"):
        ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")


def test_float16_counts_are_summed_without_overflow():
    # float16 sums overflowed at 65,504: three cells' totals read inf, training stopped with a NaN named in the model,
    # and get_library_size() returned zeros
    from pyro_scmodels.data import CountMatrix

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 2048, (20, 60)).astype(np.float16)  # every entry exact in float16; totals up to 120,000
    expected = counts.astype(np.float64).sum(1)
    assert expected.max() > 65504
    np.testing.assert_array_equal(CountMatrix(counts, name="adata.X").totals(), expected)
    checked = CountMatrix(counts, name="adata.X")
    checked.validate()  # its own pass over the blocks (scipy's sparse matrices have no float16)
    np.testing.assert_array_equal(checked.totals(), expected)


def test_ndreamer_reads_dense_float16_counts_as_float32_ones():
    # RegularizedVI trains on them; NDreamer failed inside scipy ("scipy.sparse does not support dtype float16")
    adata = ps.datasets.simulate(n_cells=240, n_genes=60, n_markers_per_type=4, n_responding_genes=4, seed=2)
    counts = np.minimum(adata.layers["counts"].toarray(), 2048)  # exact in float16
    half, single = adata.copy(), adata.copy()
    half.X, single.X = counts.astype(np.float16), counts.astype(np.float32)
    settings = dict(num_hvg=40, seed=0)
    a, b = (ps.NDreamer(x, "condition", "control", batch_key="batch", **settings) for x in (half, single))
    assert list(a.genes) == list(b.genes)
    np.testing.assert_array_equal(a.expression.toarray(), b.expression.toarray())


def test_the_fraction_of_cells_with_counts_counts_an_entry_stored_twice_once():
    # each stored part was turned into 1 before the parts were summed: DE's non_zeros_proportion reached 2.0
    from pyro_scmodels.data import CountMatrix

    dense = np.random.default_rng(0).poisson(1.0, (40, 10)).astype(np.float32)
    coo = sp.coo_matrix(dense)
    order = np.argsort(np.concatenate([coo.row, coo.row]), kind="stable")
    half = np.floor(coo.data / 2)
    doubled = sp.csr_matrix((np.concatenate([half + 0.0, coo.data - half])[order], np.concatenate([coo.col, coo.col])[order],
                             np.concatenate([[0], np.cumsum(np.bincount(coo.row, minlength=40) * 2)])), shape=dense.shape)
    assert not doubled.has_canonical_format
    fraction = CountMatrix(doubled, name="adata.X", validate=False).column_means(nonzero=True)[0]
    np.testing.assert_allclose(fraction, (dense > 0).mean(0))
