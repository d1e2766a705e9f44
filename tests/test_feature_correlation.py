"""scvi-tools' get_feature_correlation_matrix on RegularizedVI: marker modules found, seeded, and a list of
transform_batch categories averaged as scvi-tools averages it."""

import numpy as np
import pytest
from scipy.stats import rankdata

import pyro_scmodels as ps

from ._scvi_api import FIT, SMALL, simulate_small


def test_feature_correlation_matrix_finds_the_marker_modules():
    adata = simulate_small(seed=1)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch", nn_conditioning_covariate_keys=["condition"])
    fitted = ps.RegularizedVI(adata, **SMALL)
    fitted.train(max_epochs=80, **FIT)
    correlation = fitted.get_feature_correlation_matrix(seed=0)  # its thresholds hold for these draws
    assert correlation.shape == (50, 50) and list(correlation.index) == list(adata.var_names)
    np.testing.assert_allclose(np.diag(correlation), 1.0, rtol=1e-6)
    np.testing.assert_allclose(correlation, correlation.T, atol=1e-12)
    # markers of one cell type rise and fall together; markers of different types do not. The model's dispersion is
    # large here (theta about 1.7), so the drawn counts correlate weakly, but clearly above the other pairs
    marker_of = adata.var["marker_of"].astype(str).to_numpy()
    upper = np.triu(np.ones((50, 50), dtype=bool), 1)
    markers = (marker_of[:, None] != "") & (marker_of[None, :] != "") & upper
    same_type = markers & (marker_of[:, None] == marker_of[None, :])
    within, between = correlation.to_numpy()[same_type].mean(), correlation.to_numpy()[markers & ~same_type].mean()
    assert within > 0.015 and within > between + 0.02, (within, between)
    # and the draws follow the correlation of the decoded expression between cells
    upper = np.triu_indices(50, 1)
    decoded = np.corrcoef(rankdata(fitted.get_normalized_expression(return_numpy=True), axis=0), rowvar=False)
    assert np.corrcoef(correlation.to_numpy()[upper], decoded[upper])[0, 1] > 0.3
    # the same seed, the same draws (without one, fresh draws in every call, as scvi-tools); Pearson on request
    np.testing.assert_array_equal(fitted.get_feature_correlation_matrix(indices=np.arange(40), seed=3),
                                  fitted.get_feature_correlation_matrix(indices=np.arange(40), seed=3))
    both = fitted.get_feature_correlation_matrix(transform_batch=["control", "stimulated"], correlation_type="pearson",
                                                 seed=0)
    own = fitted.get_feature_correlation_matrix(correlation_type="pearson", seed=0)
    assert both.shape == (50, 50) and np.isfinite(both.to_numpy()).all()
    # every cell decoded in both conditions: other draws than each cell's own condition gives
    assert not np.allclose(both.to_numpy(), own.to_numpy(), atol=1e-3)
    # a list of categories: the mean of each category's matrix, as scvi-tools (pooling the draws added the
    # covariance between the conditions: genes that both respond looked correlated)
    each = [fitted.get_feature_correlation_matrix(transform_batch=c, correlation_type="pearson", seed=0).to_numpy()
            for c in ("control", "stimulated")]
    np.testing.assert_allclose(both.to_numpy(), np.mean(each, axis=0), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="correlation_type"):
        fitted.get_feature_correlation_matrix(correlation_type="kendall")
    with pytest.raises(ValueError, match="rna_size_factor"):
        fitted.get_feature_correlation_matrix(rna_size_factor=0)
