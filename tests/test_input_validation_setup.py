"""Bad inputs fail early, at setup or in the constructor, with clear errors; good ones are accepted.

Every test asserts both the exception type and that its message names the problem: the
offending key, layer, argument or value, or the fix. The data are tiny so the whole file
runs in seconds.
"""

import re

import numpy as np
import pytest
from scipy import sparse

from pyro_scmodels import RegularizedVI

from . import _input_validation
from ._input_validation import N_CELLS, N_GENES, SMALL_MODEL

# the shared fixture of tests/_input_validation.py, bound here for pytest to find
adata = _input_validation.adata


# --- counts ---------------------------------------------------------------------------------

def test_log_normalised_counts_rejected(adata):
    X = adata.X.copy()
    X.data = np.log1p(X.data / 3.0)
    adata.X = X
    with pytest.raises(ValueError, match=r"non-integer.*raw\s+counts"):
        RegularizedVI.setup_anndata(adata)


def test_counts_kept_in_raw_are_pointed_to(adata):
    # scanpy's layout: normalised values in .X, the counts in .raw; the hint named a layer the data lack
    adata.raw = adata.copy()
    X = adata.X.copy()
    X.data = np.log1p(X.data / 3.0)
    adata.X = X
    with pytest.raises(ValueError, match=r"non-integer") as err:
        RegularizedVI.setup_anndata(adata)
    message = str(err.value)
    assert "adata.raw holds" in message and "adata.raw[:, adata.var_names].X" in message, message
    adata.layers["counts"] = adata.raw[:, adata.var_names].X  # the fix the message gives works
    RegularizedVI.setup_anndata(adata, layer="counts")
    # raw that holds no counts either is not offered
    adata.raw = adata.copy()
    with pytest.raises(ValueError, match=r"non-integer") as err:
        RegularizedVI.setup_anndata(adata)
    assert "adata.raw" not in str(err.value)



def test_a_backed_file_without_counts_in_x_is_told_to_write_them_there(adata, tmp_path):
    # the hint was "pass the raw count layer with layer=", which `fit --backed` refuses: only .X stays on disk
    import anndata

    X = adata.X.copy()
    X.data = np.log1p(X.data / 3.0)
    adata.X = X
    adata.write_h5ad(tmp_path / "normalised.h5ad")
    backed = anndata.read_h5ad(tmp_path / "normalised.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"non-integer.*Opened with backed='r', only \.X stays on disk: to train from "
                                         r"disk, write a file whose \.X holds the raw counts"):
        RegularizedVI.setup_anndata(backed)
    backed.file.close()
    # with the counts in .raw too: said, without the in-memory layer line (which fit --backed refuses)
    adata.raw = adata.copy()
    adata.raw.X.data[:] = np.round(np.expm1(adata.raw.X.data) * 3.0)
    adata.write_h5ad(tmp_path / "with_raw.h5ad")
    backed = anndata.read_h5ad(tmp_path / "with_raw.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"non-integer") as err:
        RegularizedVI.setup_anndata(backed)
    backed.file.close()
    message = str(err.value)
    assert "adata.raw holds raw counts" in message and "Opened with backed='r'" in message, message
    assert "layer='counts'" not in message and "adata.layers['counts']" not in message, message

def test_negative_counts_rejected(adata):
    X = adata.X.copy()
    X.data[0] = -2.0
    adata.X = X
    with pytest.raises(ValueError, match=r"negative values.*raw counts"):
        RegularizedVI.setup_anndata(adata)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_nan_or_inf_counts_rejected(adata, bad, dense):
    X = adata.X.toarray() if dense else adata.X.copy()
    if dense:
        X[3, 4] = bad
    else:
        X.data[X.indptr[7] + 1] = bad  # an entry of row 7
    adata.X = X
    with pytest.raises(ValueError, match=rf"adata\.X contains NaN or Inf values \(first at row {3 if dense else 7}\)"):
        RegularizedVI.setup_anndata(adata)


def test_bad_values_in_a_layer_name_the_layer(adata):
    adata.layers["counts"] = adata.layers["counts"].toarray() - 5.0
    with pytest.raises(ValueError, match=r"adata\.layers\['counts'\] contains negative"):
        RegularizedVI.setup_anndata(adata, layer="counts")


def test_missing_layer_names_it_and_lists_available(adata):
    with pytest.raises(KeyError, match=r"Layer 'raw_counts' not found.*Available layers: .*counts"):
        RegularizedVI.setup_anndata(adata, layer="raw_counts")


def test_zero_cells_rejected(adata):
    with pytest.raises(ValueError, match="zero cells"):
        RegularizedVI.setup_anndata(adata[:0].copy())


def test_zero_genes_rejected(adata):
    with pytest.raises(ValueError, match=r"zero features \(genes\)"):
        RegularizedVI.setup_anndata(adata[:, :0].copy())


def test_cells_with_zero_total_rejected_with_count_and_fix(adata):
    X = adata.X.tolil()
    X[[2, 7, 11], :] = 0
    adata.X = X.tocsr()
    with pytest.raises(ValueError, match=r"has 3 cell\(s\) with zero total counts.*filter_cells"):
        RegularizedVI.setup_anndata(adata)


def test_setup_failure_records_nothing(adata):
    adata.X = adata.X.toarray() * 0.5
    with pytest.raises(ValueError):
        RegularizedVI.setup_anndata(adata)
    with pytest.raises(ValueError, match=r"not been set up.*setup_anndata"):
        RegularizedVI(adata, **SMALL_MODEL)


# --- .obs columns ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "arguments",
    [
        dict(batch_key="no_such_column"),
        dict(ambient_covariate_keys=["batch", "no_such_column"]),
        dict(nn_conditioning_covariate_keys=["no_such_column"]),
        dict(feature_scaling_covariate_keys=["no_such_column"]),
        dict(dispersion_key="no_such_column"),
        dict(library_size_key="no_such_column"),
        dict(encoder_covariate_keys=["no_such_column"]),
        dict(continuous_covariate_keys=["no_such_column"]),
    ],
    ids=lambda a: next(iter(a)),
)
def test_missing_obs_column_named(adata, arguments):
    with pytest.raises(KeyError, match=r"Column 'no_such_column' not found in adata\.obs.*Available columns: .*batch"):
        RegularizedVI.setup_anndata(adata, **arguments)


@pytest.mark.parametrize("as_category", [False, True], ids=["object", "category"])
def test_nan_in_categorical_column_named(adata, as_category):
    column = adata.obs["batch"].astype(object)
    column.iloc[[0, 5]] = np.nan
    adata.obs["batch"] = column.astype("category") if as_category else column
    with pytest.raises(ValueError, match=r"adata\.obs\['batch'\] has 2 missing \(NaN\)"):
        RegularizedVI.setup_anndata(adata, batch_key="batch")


def test_nan_in_dispersion_key_named(adata):
    adata.obs["lane"] = ["a", "b"] * (N_CELLS // 2)
    adata.obs.loc[adata.obs_names[3], "lane"] = None
    with pytest.raises(ValueError, match=r"\['lane'\] has 1 missing"):
        RegularizedVI.setup_anndata(adata, dispersion_key="lane")


@pytest.mark.parametrize(
    "values, message",
    [
        (["low", "high"] * (N_CELLS // 2), "is a continuous covariate but is not numeric"),
        ([np.nan] + [1.0] * (N_CELLS - 1), "has NaN or Inf values"),
        ([np.inf] + [1.0] * (N_CELLS - 1), "has NaN or Inf values"),
    ],
    ids=["strings", "nan", "inf"],
)
def test_bad_continuous_covariate_rejected_before_training(adata, values, message):
    adata.obs["percent_mito"] = values
    # the column must be rejected at setup or, at the latest, when the model is built
    with pytest.raises(ValueError, match=re.escape("adata.obs['percent_mito'] ") + message):
        RegularizedVI.setup_anndata(adata, continuous_covariate_keys=["percent_mito"])
        RegularizedVI(adata, **SMALL_MODEL)


@pytest.mark.parametrize(
    "argument, value",
    [
        ("ambient_covariate_keys", ["batch"]),
        ("dispersion_key", "batch"),
        ("library_size_key", "batch"),
        ("ambient_covariate_keys", []),  # asked for no ambient key: batch_key filled it without a word
        ("dispersion_key", ""),
    ],
)
def test_batch_key_clashes_with_the_keys_it_fills(adata, argument, value):
    with pytest.raises(ValueError, match=rf"`batch_key='batch'` cannot be combined with `{argument}`"):
        RegularizedVI.setup_anndata(adata, batch_key="batch", **{argument: value})


def test_batch_key_as_list_is_type_error(adata):
    with pytest.raises(TypeError, match=r"`batch_key` must be one \.obs column name, got \['batch'\]"):
        RegularizedVI.setup_anndata(adata, batch_key=["batch"])


def test_single_keys_as_list_are_type_errors(adata):
    with pytest.raises(TypeError, match=r"`dispersion_key` must be one \.obs column name"):
        RegularizedVI.setup_anndata(adata, dispersion_key=["batch"])


# --- model construction ---------------------------------------------------------------------

def test_model_on_adata_not_set_up(adata):
    with pytest.raises(ValueError, match=r"has not been set up\. Call `RegularizedVI\.setup_anndata"):
        RegularizedVI(adata, **SMALL_MODEL)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(n_latent=0), r"n_latent must be a positive integer, got 0"),
        (dict(n_hidden=0), r"n_hidden must be a positive integer, got 0"),
        (dict(n_layers=0), r"n_layers must be a positive integer, got 0"),
        (dict(init="bogus"), r"init must be 'data' or 'prior', got 'bogus'"),
        (dict(global_guides={"nonexistent_site": "map"}), r"Unknown global site\(s\) \['nonexistent_site'\]"),
        (dict(global_guides={"ambient": "bogus_family"}), r"one of \('map', 'lognormal'\), got 'bogus_family'"),
    ],
    ids=["n_latent", "n_hidden", "n_layers", "init", "unknown_site", "unknown_family"],
)
def test_invalid_model_arguments(adata, arguments, message):
    RegularizedVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match=message):
        RegularizedVI(adata, **{**SMALL_MODEL, **arguments})


# --- inputs that must be accepted -----------------------------------------------------------

def test_integer_valued_float32_counts_accepted(adata):
    adata.X = adata.X.toarray().astype(np.float32)
    assert adata.X.dtype == np.float32
    RegularizedVI.setup_anndata(adata, batch_key="batch")
    model = RegularizedVI(adata, **SMALL_MODEL)
    assert model.dims.n_genes == N_GENES


def test_counts_layer_used_when_x_is_log_normalised(adata):
    X = adata.layers["counts"].copy().astype(np.float64)
    X = sparse.diags(1e4 / np.asarray(X.sum(axis=1)).ravel()) @ X
    X.data = np.log1p(X.data)
    adata.X = sparse.csr_matrix(X)
    with pytest.raises(ValueError, match="non-integer"):
        RegularizedVI.setup_anndata(adata)  # .X alone is refused ...
    RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch")  # ... the layer is accepted
    model = RegularizedVI(adata, **SMALL_MODEL)
    assert model.layer == "counts"
    batch = model._cell_data().minibatch(np.arange(3))
    np.testing.assert_array_equal(batch["x"].numpy(), adata.layers["counts"][:3].toarray())
