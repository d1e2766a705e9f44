"""Which cells differential expression compares and how it names its columns: overlapping groups, query strings
over repeated or nullable columns, and the FDR column's name."""

import warnings

import numpy as np
import pandas as pd
import pytest

from . import _scvi_api

# the shared fixture of tests/_scvi_api.py, bound here for pytest to find
model = _scvi_api.model


def test_overlapping_selections_warn(model):
    with pytest.warns(UserWarning, match="idx1 and idx2 share 10 cells"):
        table = model.differential_expression(idx1=np.arange(30), idx2=np.arange(20, 60), num_samples=2, n_cells=10)
    # the shared cells count in both groups' observed columns (group 1's left them out)
    counts = model.adata.layers["counts"]
    dense = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    genes = list(model.adata.var_names)
    rows = table.loc[genes]
    np.testing.assert_allclose(rows["raw_mean1"], dense[:30].mean(0), rtol=1e-5)
    np.testing.assert_allclose(rows["raw_mean2"], dense[20:60].mean(0), rtol=1e-5)
    np.testing.assert_allclose(rows["non_zeros_proportion1"], (dense[:30] > 0).mean(0), rtol=1e-5)


def test_a_float32_fdr_target_names_its_column_as_a_float_does(model):
    table = model.differential_expression(groupby="condition", fdr_target=np.float32(0.05), num_samples=2, n_cells=10)
    assert "is_de_fdr_0.05" in table.columns  # it was is_de_fdr_0.05000000074505806


def test_a_query_string_selects_cells_by_position_when_names_repeat(model):
    # the names the query matched selected every cell sharing a name: 168 cells for a query matching 100
    adata = model.adata.copy()
    adata.obs_names = [f"c{i % 50}" for i in range(adata.n_obs)]
    positions = np.flatnonzero((adata.obs["condition"] == "stimulated").to_numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_query = model.differential_expression(adata=adata, idx1="condition == 'stimulated'", num_samples=2, n_cells=10)
        by_mask = model.differential_expression(adata=adata, idx1=positions, num_samples=2, n_cells=10)
    np.testing.assert_allclose(by_query.loc[by_mask.index, "raw_mean1"], by_mask["raw_mean1"], rtol=1e-6)
    with pytest.raises(ValueError, match="is not a condition on the cells"):
        model.differential_expression(idx1="true_library * 2", num_samples=2, n_cells=10)
    # a nullable column gives pandas' boolean array (with <NA> not selected, as obs.query)
    adata.obs["dose"] = pd.array([1, 3, None] * (adata.n_obs // 3), dtype="Int64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_dose = model.differential_expression(adata=adata, idx1="dose > 2", num_samples=2, n_cells=10)
        thirds = model.differential_expression(adata=adata, idx1=np.arange(1, adata.n_obs, 3), num_samples=2, n_cells=10)
    np.testing.assert_allclose(by_dose.loc[thirds.index, "raw_mean1"], thirds["raw_mean1"], rtol=1e-6)


def test_a_mask_given_as_integers_is_refused_not_read_as_cells_0_and_1(model):
    # (cell_type == 'type_0').astype(int) compared cells 0 and 1 with the rest: 0 DE genes, without a word
    mask = (model.adata.obs["cell_type"] == model.adata.obs["cell_type"].iloc[0]).to_numpy()
    with pytest.raises(ValueError, match=r"idx1 holds one 0/1 integer per cell.*idx1=mask\.astype\(bool\)"):
        model.differential_expression(idx1=mask.astype(int), num_samples=2, n_cells=10)
    with pytest.raises(ValueError, match="idx2 holds one 0/1 integer per cell"):
        model.differential_expression(idx1=mask, idx2=(~mask).astype(np.int64), num_samples=2, n_cells=10)
    model.differential_expression(idx1=np.array([0, 1, 1, 0]), num_samples=2, n_cells=10)  # positions: as before



def test_a_single_number_as_a_cell_set_is_refused(model):
    # idx1=5 was read as a one-cell group (np.ravel); the getters refuse a number as indices
    with pytest.raises(TypeError, match=r"idx1=5 is one value, not a set of cells: .*idx1=\[5\] for a one-cell group"):
        model.differential_expression(idx1=5, num_samples=2, n_cells=10)
    with pytest.raises(TypeError, match=r"idx2=np\.int64\(7\) is one value|idx2=7 is one value"):
        model.differential_expression(idx1=[0, 1, 2], idx2=np.int64(7), num_samples=2, n_cells=10)

def test_a_group_column_mixing_1_and_text_1_is_refused(model):
    # groups are compared as text: groupby= gave two comparisons both named '1 vs Rest', and a column mixing 1 and 1.0
    # failed with "indices selects no cells"; summarize_by= gave two rows named 1
    adata = model.adata.copy()
    cell_type = adata.obs["cell_type"].astype(str).to_numpy()
    for second in ("1", 1.0):
        adata.obs["mixed"] = np.array([1 if t == "type_0" else second if t == "type_1" else 2 for t in cell_type],
                                      dtype=object)
        with pytest.raises(ValueError, match=r"groupby: adata.obs\['mixed'\] holds labels of different types"):
            model.differential_expression(groupby="mixed", adata=adata, num_samples=2, n_cells=10)
        with pytest.raises(ValueError, match=r"summarize_by: adata.obs\['mixed'\] holds labels of different types"):
            model.get_ambient_fraction(adata, summarize_by="mixed")
    # a categorical column is judged by the categories its cells use (an unused one that clashes is no group)
    adata.obs["mixed"] = pd.Categorical([1 if t == "type_0" else "1" if t == "type_1" else 2 for t in cell_type])
    with pytest.raises(ValueError, match=r"groupby: adata.obs\['mixed'\] holds labels of different types"):
        model.differential_expression(groupby="mixed", adata=adata, num_samples=2, n_cells=10)
    adata.obs["mixed"] = pd.Categorical([1 if t == "type_0" else 2 for t in cell_type], categories=[1, 2, "1"])
    assert set(model.get_ambient_fraction(adata, summarize_by="mixed").index.astype(str)) == {"1", "2"}
