"""A user's ambient profile is matched to the model's genes by name as text, as the rest of the package matches names
(``check_var_names``): integer gene names in the data or in the profile match their string forms (a profile read
from a file names gene 7 "7"), and names that truly differ are still refused by name."""

import warnings

import numpy as np
import pandas as pd
import pytest

from pyro_scmodels import RegularizedVI, datasets
from pyro_scmodels.models.ambient import check_droplets, profile_from_droplets

SMALL = dict(n_hidden=8, n_latent=2)


def _data_and_droplets():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = datasets.simulate(n_cells=200, n_genes=60, n_batches=2, n_markers_per_type=5, n_responding_genes=10,
                                  ambient_fractions=(0.05, 0.1), seed=0)
        empty = datasets.simulate_empty_droplets(adata, n_droplets=5)
    return adata, empty


def _shape(model) -> np.ndarray:
    """The model's ambient profile per category, each column summing to 1 (its shape: fixed by a given profile)."""
    learned = model.get_ambient_profile().to_numpy()
    return learned / learned.sum(0)


def test_integer_gene_names_of_the_data_match_a_profile_named_by_their_text():
    adata, empty = _data_and_droplets()
    empty.var_names = [str(i) for i in range(empty.n_vars)]  # as a file holds them
    profile = profile_from_droplets(empty, groupby="batch")
    adata.var_names = pd.Index(range(adata.n_vars))  # integer names (anndata keeps an Index as given)
    assert isinstance(adata.var_names[0], (int, np.integer))
    RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    # the categories' columns are known, and with integer names every gene was "missing" (KeyError)
    model = RegularizedVI(adata, **SMALL, ambient_profile=profile)
    np.testing.assert_allclose(_shape(model), profile.to_numpy(), rtol=1e-5)


def test_a_profile_with_an_integer_index_lines_up_with_string_gene_names_by_name_not_position():
    adata, empty = _data_and_droplets()
    adata.var_names = [str(i) for i in range(adata.n_vars)]
    RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    one = profile_from_droplets(empty)["all"].to_numpy()
    order = np.random.default_rng(0).permutation(adata.n_vars)
    shuffled = pd.Series(one[order], index=pd.Index(order))  # integer names, in another order
    model = RegularizedVI(adata, **SMALL, ambient_profile=shuffled)
    np.testing.assert_allclose(_shape(model), np.repeat(one[:, None], 2, axis=1), rtol=1e-5)


def test_names_that_truly_differ_or_repeat_as_text_are_refused_by_name():
    adata, empty = _data_and_droplets()
    adata.var_names = pd.Index(range(adata.n_vars))
    RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")
    profile = profile_from_droplets(empty)  # named gene_0, gene_1, ...: other genes
    with pytest.raises(KeyError, match=r"no row for 60 of the model's genes, e.g. \['0', '1', '10', '11', '12'\]"):
        RegularizedVI(adata, **SMALL, ambient_profile=profile)
    repeated = pd.Series(np.ones(adata.n_vars + 1), index=pd.Index([*range(adata.n_vars), "0"], dtype=object))
    with pytest.raises(ValueError, match=r"repeated rows \['0'\]"):
        RegularizedVI(adata, **SMALL, ambient_profile=repeated)


def test_droplets_named_by_text_serve_data_with_integer_gene_names():
    adata, empty = _data_and_droplets()
    empty.var_names = [str(i) for i in range(empty.n_vars)]
    categories = {"batch": list(adata.obs["batch"].cat.categories)}
    check_droplets(empty, pd.Index(range(adata.n_vars)), categories)  # every gene found
    with pytest.raises(KeyError, match=r"the droplets lack 1 of the data's 61 genes, e.g. \['60'\]"):
        check_droplets(empty, pd.Index(range(adata.n_vars + 1)), categories)


def test_one_unnamed_column_serves_every_category_also_when_the_categories_are_digits():
    # pd.DataFrame(vector, index=genes) names its column 0; with ambient categories "0" and "1" the column compared
    # as text was taken for category "0" alone, and category "1" was refused
    from pyro_scmodels.models.ambient import profile_matrix

    genes = pd.Index([f"g{i}" for i in range(5)])
    vector = np.arange(1.0, 6.0)
    values = profile_matrix(pd.DataFrame(vector, index=genes), genes, ["0", "1"])
    assert values.shape == (2, 5)
    np.testing.assert_allclose(values[0], values[1])
    np.testing.assert_allclose(values[0] / values[0].sum(), vector / vector.sum())
    # a column named by a category as text is that category's: the other is still asked for
    with pytest.raises(KeyError, match="1"):
        profile_matrix(pd.DataFrame({"0": vector}, index=genes), genes, ["0", "1"])


def test_a_profile_read_back_from_a_results_table_finds_categories_holding_a_slash():
    # fit and export_posterior write "10x/v3" as "10x%2Fv3" in .varm: that table given back as ambient_profile was
    # refused ("no column for the ambient categories ['10x/v3']")
    from pyro_scmodels._labels import stored_column_names
    from pyro_scmodels.models.ambient import profile_matrix

    genes, levels = pd.Index([f"g{i}" for i in range(4)]), ["10x/v3", "a%2Fb", "plain"]
    table = pd.DataFrame(np.arange(1.0, 13.0).reshape(4, 3), index=genes, columns=levels)
    expected = profile_matrix(table, genes, levels)
    np.testing.assert_array_equal(profile_matrix(stored_column_names(table), genes, levels), expected)
    assert list(stored_column_names(table).columns) == ["10x%2Fv3", "a%252Fb", "plain"]  # each to its own category
    np.testing.assert_array_equal(profile_matrix(table[levels[::-1]], genes, levels), expected)  # labels as they are
