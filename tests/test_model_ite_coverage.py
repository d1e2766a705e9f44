"""The model ITE where one cell type of five responds, with the setup docs/ndreamer_model_route.md recommends
(basal state, ``latent_independence=10``, two hidden layers): the decoded effect is unbiased in scale and follows the
within-type state (one hidden layer shrinks it to a slope of 0.51-0.81 here), and its 90 % bounds at the default,
``widen_by_matching="hull"`` (the matched interval extended to the model ITE), cover near their level, where the
disagreement with the matched ITE (``widen_by_matching=True``) misses, because the two routes' errors correlate. The
standard design, with the package's default one hidden layer, is in
test_ndreamer_real_data.py::test_from_model_matching_and_model_based_counterfactuals."""

import warnings

import numpy as np

import pyro_scmodels as ps
from pyro_scmodels import metrics as M
from pyro_scmodels.ndreamer import NDreamer


def test_two_hidden_layers_recover_the_effect_and_the_hull_covers_where_one_cell_type_responds():
    adata = ps.datasets.simulate(n_cells=2000, n_genes=200, seed=0, effect_modifier=1.0,
                                 responding_cell_types=["type_0"])
    ps.RegularizedVI.setup_anndata(adata, layer="counts", ambient_covariate_keys=["batch"],
                                   feature_scaling_covariate_keys=["batch"], library_size_key="batch",
                                   nn_conditioning_covariate_keys=["condition"], encoder_covariate_keys=["condition"])
    model = ps.RegularizedVI(adata, n_layers=2, latent_independence=10.0)
    model.train(max_epochs=120, batch_size=256, lr=5e-3, kl_warmup_epochs=12, early_stopping=False, device="cpu",
                progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd = NDreamer.from_model(model, "condition", "control", batch_key="batch", device="cpu")
        coverage = {}
        for mode in (True, "hull"):
            result = nd.estimate_model_ite(num_samples=20, widen_by_matching=mode)
            bounds = result.layers["ite_model_stimulated_q05"], result.layers["ite_model_stimulated_q95"]
            recovery = M.effect_recovery(adata, result.layers["ite_model_stimulated"], low=bounds[0], high=bounds[1])
            coverage[mode] = recovery["coverage"]
    print("one responding type, two hidden layers:", recovery, "coverage of the 90 % bounds:", coverage)
    # measured on data seeds 0-2 (2026-12-07, benchmarks/RESULTS.md, "Model ITE with two hidden layers"): slope
    # 0.90-1.08, per-cell r 0.91-0.93, false effect 0.04-0.07; coverage True 0.72-0.81; the hull 0.86-0.90 ("Model
    # ITE: the hull's own term observed"; 0.91-0.94 with the matched own term). One hidden
    # layer: slope 0.51-0.81, per-cell r 0.20-0.74
    assert 0.8 <= recovery["slope"] <= 1.25
    assert recovery["per_cell_r"] >= 0.75
    assert recovery["false_effect_ratio"] <= 0.1
    assert 0.85 <= coverage["hull"] <= 0.95
    assert coverage["hull"] > coverage[True] + 0.05
    assert np.isfinite(list(coverage.values())).all()
