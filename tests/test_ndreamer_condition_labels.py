"""Labels in NDreamer's queries: a condition given as a number, a group column with missing labels."""

import warnings

import numpy as np
import pandas as pd
import pytest

import pyro_scmodels as ps
from pyro_scmodels.ndreamer import NDreamer

from ._ndreamer_tiny import TINY


@pytest.fixture(scope="module")
def numbered_nd():
    """Conditions 0, 1 and the control 2, with treatment 1 first in the cells (the default CATE's treatment)."""
    adata = ps.datasets.simulate(n_cells=300, n_genes=60, n_markers_per_type=4, n_responding_genes=6, seed=5)
    stimulated = np.flatnonzero((adata.obs["condition"] == "stimulated").to_numpy())
    labels = np.full(adata.n_obs, 2)
    labels[stimulated] = 1
    labels[stimulated[1::2]] = 0  # the first stimulated cell keeps 1
    adata.obs["dose"] = pd.Categorical(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer(adata, "dose", 2, layer="counts", **TINY)
        nd.train(n_epochs=1, progress_bar=False)
    return nd


def test_a_condition_given_as_a_number_is_its_label(numbered_nd):
    nd = numbered_nd
    assert nd.design.treatments == ["1", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        as_text = {c: nd.estimate_cate("batch", condition=c, shrink=None) for c in ("0", "1")}
        # 0 was taken for "no condition given" and returned treatment 1's table without a word
        pd.testing.assert_frame_equal(nd.estimate_cate("batch", condition=0, shrink=None), as_text["0"])
        # 1 was refused: "Unknown condition 1; treatments: ['1']"
        pd.testing.assert_frame_equal(nd.estimate_cate("batch", condition=1, shrink=None), as_text["1"])
        assert not np.allclose(as_text["0"]["mean_ite"], as_text["1"]["mean_ite"])
        assert "cate_0_batch" in nd.results.uns
    with pytest.raises(ValueError, match=r"Unknown condition '3'"):
        nd.estimate_cate("batch", condition=3)


def test_a_cate_group_column_with_missing_labels_is_named_where_it_is(numbered_nd):
    nd = numbered_nd
    nd.results.obs["partial"] = np.where(np.arange(nd.results.n_obs) < 7, None, nd.results.obs["batch"].astype(str))
    # it named adata.obs and said to drop the cells, which an NDreamer cannot
    with pytest.raises(ValueError, match=r"nd.results.obs\['partial'\] has 7 missing values; give every cell a group"):
        nd.estimate_cate("partial")


def test_a_cate_group_column_added_to_the_data_after_building_is_pointed_to(numbered_nd):
    # "not found in results.obs" did not say that results.obs is a copy made when the NDreamer was built
    nd = numbered_nd
    with pytest.raises(KeyError, match=r"Column 'donor' not found in results.obs.* nd.results.obs is the NDreamer's "
                                       r"copy of the cells' obs, made when it was built .*nd.results.obs\['donor'\] = "
                                       r"adata.obs\['donor'\].to_numpy\(\)"):
        nd.estimate_cate("donor")
    nd.results.obs["donor"] = np.where(np.arange(nd.results.n_obs) % 2 == 0, "d1", "d2")  # the fix it names works
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert set(nd.estimate_cate("donor", shrink=None)["group"]) == {"d1", "d2"}
