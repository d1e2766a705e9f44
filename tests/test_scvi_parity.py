"""The same calls, written once for scvi-tools' SCVI, run on RegularizedVI (skipped without scvi-tools).

Our setup differs where the models differ (purpose-specific covariate keys): the batch conditions
the decoder through ``nn_conditioning_covariate_keys``, which is what scvi-tools' ``batch_key`` does.
"""

import numpy as np
import pandas as pd
import pytest

import pyro_scmodels as ps

scvi = pytest.importorskip("scvi")

CORE_DE_COLUMNS = {"proba_de", "bayes_factor", "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max", "scale1",
                   "scale2", "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
                   "raw_normalized_mean1", "raw_normalized_mean2", "is_de_fdr_0.05", "comparison", "group1", "group2"}


def _data():
    adata = ps.datasets.simulate(n_cells=200, n_genes=40, n_markers_per_type=4, n_responding_genes=4, seed=5)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    return adata


def _scvi():
    adata = _data()
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    return scvi.model.SCVI(adata, n_latent=4, n_hidden=32)


def _ours():
    adata = _data()
    ps.RegularizedVI.setup_anndata(adata, layer="counts", batch_key="batch", nn_conditioning_covariate_keys=["batch"])
    return ps.RegularizedVI(adata, n_latent=4, n_hidden=32)


def _same_calls(model) -> dict:
    """What a scvi-tools user writes, unchanged for either model."""
    model.train(max_epochs=2, batch_size=64, train_size=0.8, early_stopping=False, accelerator="cpu", devices=1,
                plan_kwargs={"lr": 1e-2, "weight_decay": 1e-6}, check_val_every_n_epoch=1)
    genes = list(model.adata.var_names[:5])
    mean, variance = model.get_latent_representation(return_dist=True)
    return {
        "elbo_train": model.history["elbo_train"],
        "elbo_validation": model.history["elbo_validation"],
        "latent": (mean.shape, variance.shape),
        "latent_positional": model.get_latent_representation(None, np.arange(6), True, 50, 4).shape,
        "expression": model.get_normalized_expression(transform_batch="batch_1", gene_list=genes, library_size=1).shape,
        "samples": model.get_normalized_expression(n_samples=3, return_mean=False, gene_list=genes).shape,
        "de": model.differential_expression(groupby="cell_type", mode="change"),
        "de_vanilla": model.differential_expression(groupby="cell_type", group1="type_0", mode="vanilla"),
        "reconstruction": model.get_reconstruction_error(),
        "elbo": model.get_elbo(),
        "marginal": model.get_marginal_ll(n_mc_samples=5),
        "predictive": model.posterior_predictive_sample(n_samples=3, gene_list=genes).shape,
        "predictive_one": model.posterior_predictive_sample(indices=np.arange(7)).shape,
        "likelihood": {k: v.shape for k, v in model.get_likelihood_parameters(indices=np.arange(9)).items()},
        "likelihood_draws": model.get_likelihood_parameters(indices=np.arange(9), n_samples=3)["mean"].shape,
        "correlation": model.get_feature_correlation_matrix(indices=np.arange(20), n_samples=2).shape,
        "likelihood_mean": model.get_likelihood_parameters(indices=np.arange(9), n_samples=3, give_mean=True)["mean"].shape,
    }


@pytest.fixture(scope="module")
def both():
    return _same_calls(_scvi()), _same_calls(_ours())


def test_history_keys_have_scvi_shape(both):
    for result in both:
        for key in ("elbo_train", "elbo_validation"):
            frame = result[key]
            assert isinstance(frame, pd.DataFrame) and list(frame.columns) == [key] and len(frame) == 2


def test_latent_distribution_and_expression_shapes_match(both):
    reference, ours = both
    for key in ("latent", "latent_positional", "correlation", "expression", "samples", "predictive", "predictive_one", "likelihood_draws", "likelihood_mean"):
        assert tuple(ours[key]) == tuple(reference[key]), key
    # SCVI's default likelihood (zinb) adds "dropout"; ours is a negative binomial
    assert ours["likelihood"] == {k: reference["likelihood"][k] for k in ("mean", "dispersions")} == {
        "mean": (9, 40), "dispersions": (9, 40)}


def test_one_vs_rest_de_has_the_core_columns(both):
    reference, ours = both
    assert CORE_DE_COLUMNS <= set(reference["de"].columns)
    assert CORE_DE_COLUMNS <= set(ours["de"].columns)
    assert set(ours["de"]["comparison"]) == set(reference["de"]["comparison"])
    assert list(ours["de_vanilla"].columns) == list(reference["de_vanilla"].columns)


def test_evidence_getters_answer(both):
    for result in both:
        assert "reconstruction_loss" in result["reconstruction"]
        assert np.isfinite(float(result["elbo"])) and np.isfinite(float(result["marginal"]))
