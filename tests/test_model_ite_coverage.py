"""The model ITE's 90 % bounds where one cell type of five responds: the disagreement with the matched ITE
(``widen_by_matching=True``) misses there, because the two routes' errors correlate; ``widen_by_matching="hull"``
(the matched interval extended to the model ITE, the default) covers near its level. The standard design is in
test_ndreamer_real_data.py::test_from_model_matching_and_model_based_counterfactuals."""

import warnings

import numpy as np

import pyro_scmodels as ps
from pyro_scmodels import metrics as M
from pyro_scmodels.ndreamer import NDreamer


def test_the_hull_covers_where_one_cell_type_responds():
    adata = ps.datasets.simulate(n_cells=2000, n_genes=200, seed=0, effect_modifier=1.0,
                                 responding_cell_types=["type_0"])
    ps.RegularizedVI.setup_anndata(adata, layer="counts", ambient_covariate_keys=["batch"],
                                   feature_scaling_covariate_keys=["batch"], library_size_key="batch",
                                   nn_conditioning_covariate_keys=["condition"], encoder_covariate_keys=["condition"])
    model = ps.RegularizedVI(adata, latent_independence=10.0)
    model.train(max_epochs=120, batch_size=256, lr=5e-3, kl_warmup_epochs=12, early_stopping=False, device="cpu",
                progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu")
        coverage = {}
        for mode in (True, "hull"):
            result = nd.estimate_model_ite(num_samples=20, widen_by_matching=mode)
            bounds = result.layers["ite_model_stimulated_q05"], result.layers["ite_model_stimulated_q95"]
            coverage[mode] = M.effect_recovery(adata, result.layers["ite_model_stimulated"], low=bounds[0],
                                               high=bounds[1])["coverage"]
    print("coverage of the 90 % bounds, one responding type:", coverage)
    # measured on data seeds 0-2 with both decoders (2026-12-06): True 0.58-0.71, the hull 0.90-0.92
    assert 0.85 <= coverage["hull"] <= 0.95
    assert coverage["hull"] > coverage[True] + 0.1
    assert np.isfinite(list(coverage.values())).all()
