"""The MMD statistic behind RegularizedVI's latent_independence penalty, and the option itself."""

import numpy as np
import pytest
import torch

import pyro_scmodels as ps
from pyro_scmodels.independence import category_mmd, squared_mmd


def test_mmd_is_zero_for_one_sample_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 5, generator=generator), torch.randn(300, 5, generator=generator)
    assert squared_mmd(a, a).abs() < 1e-6
    same = float(squared_mmd(a, b))
    shifted = [float(squared_mmd(a, b + shift)) for shift in (0.5, 1.0, 2.0)]
    assert 0 <= same < 0.2 * shifted[0]  # two samples of one distribution: only sampling noise
    assert shifted[0] < shifted[1] < shifted[2]


def test_category_mmd_sees_only_a_dependence_on_the_category():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(400, 4, generator=generator)
    random_labels = torch.randint(0, 2, (400, 1), generator=generator)
    dependent = z.clone()
    dependent[random_labels[:, 0] == 1] += 1.5  # the category written into z
    assert float(category_mmd(z, torch.zeros(400, 1, dtype=torch.long))) == 0.0  # one category
    independent_value = float(category_mmd(z, random_labels))
    assert float(category_mmd(dependent, random_labels)) > 10 * independent_value
    # a second covariate column adds its own term
    two = torch.cat([random_labels, random_labels + 2], 1)
    assert float(category_mmd(dependent, two)) == pytest.approx(2 * float(category_mmd(dependent, random_labels)), rel=1e-5)


def test_latent_independence_removes_the_condition_from_z(tmp_path):
    adata = ps.datasets.simulate(n_cells=600, n_genes=100, seed=2)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", nn_conditioning_covariate_keys=["condition"],
                                   encoder_covariate_keys=["condition"])
    condition = (adata.obs["condition"] == "stimulated").to_numpy()

    def condition_mmd(weight):
        model = ps.RegularizedVI(adata, n_hidden=64, n_latent=6, latent_independence=weight, seed=0)
        model.train(max_epochs=40, batch_size=200, lr=1e-2, early_stopping=False, device="cpu", progress_bar=False)
        z = torch.as_tensor(model.get_latent_representation())
        return float(category_mmd(z, torch.as_tensor(condition, dtype=torch.long)[:, None])), model

    free, _ = condition_mmd(0.0)
    penalised, model = condition_mmd(10.0)
    assert penalised < 0.5 * free, (free, penalised)
    model.save(str(tmp_path / "model"))
    loaded = ps.RegularizedVI.load(str(tmp_path / "model"), adata=adata)
    assert loaded.init_params["latent_independence"] == 10.0
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-5)
    # the penalty is a training device: posterior predictive draws (z with a sample dimension) still work
    draws = loaded.posterior_predictive(num_samples=2, indices=np.arange(50))
    assert np.asarray(draws.todense() if hasattr(draws, "todense") else draws).shape[-2:] == (50, adata.n_vars)


def test_latent_independence_needs_encoder_covariates():
    adata = ps.datasets.simulate(n_cells=100, n_genes=120, seed=0)
    ps.RegularizedVI.setup_anndata(adata, layer="counts", nn_conditioning_covariate_keys=["condition"])
    with pytest.raises(ValueError, match="encoder_covariate_keys"):
        ps.RegularizedVI(adata, latent_independence=10.0)
    with pytest.raises(ValueError, match="latent_independence"):
        ps.RegularizedVI(adata, latent_independence=-1.0)


def test_fit_command_refuses_the_penalty_without_encoder_keys(tmp_path, capsys):
    from pyro_scmodels.cli import main

    path = str(tmp_path / "cells.h5ad")
    ps.datasets.simulate(n_cells=100, n_genes=120, seed=0).write_h5ad(path)
    code = main(["fit", path, "--layer", "counts", "--latent-independence", "10", "-o", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "--encoder-keys" in capsys.readouterr().err  # the option, not the Python argument
    assert not (tmp_path / "out" / "results.h5ad").exists()



def test_a_commands_warning_reads_as_its_text_without_a_line_of_code(tmp_path, capsys):
    import warnings

    from pyro_scmodels.cli import main

    path = str(tmp_path / "cells.h5ad")
    ps.datasets.simulate(n_cells=100, n_genes=120, seed=0).write_h5ad(path)
    shown = warnings.showwarning
    code = main(["fit", path, "--layer", "counts", "--encoder-keys", "condition", "--max-epochs", "1", "--n-latent", "2",
                 "-o", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    # the leak warning (encoder keys without the penalty), printed as the command's own line: before, it named the
    # console script's or runpy's frame, or a package file
    assert "warning: encoder_covariate_keys=['condition']: the encoder sees" in err, err
    assert ".py:" not in err and "<frozen" not in err, err
    assert warnings.showwarning is shown  # the caller's display is back


def test_the_leak_warning_comes_with_a_model_that_lets_encoder_keys_into_z():
    # it came at setup, whatever the model then did: the documented setups (encoder keys, then
    # RegularizedVI(..., latent_independence=10)) could not run without a warning to do what their next line does
    import warnings

    adata = ps.datasets.simulate(n_cells=120, n_genes=30, n_markers_per_type=3, n_responding_genes=3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ps.RegularizedVI.setup_anndata(adata, layer="counts", encoder_covariate_keys=["condition"])
        ps.RegularizedVI(adata, n_latent=2, n_hidden=8, latent_independence=10.0)
    with pytest.warns(UserWarning, match=r"encoder_covariate_keys=\['condition'\].*can leak into the latent space") as caught:
        model = ps.RegularizedVI(adata, n_latent=2, n_hidden=8)
    assert [w.filename for w in caught if "can leak" in str(w.message)] == [__file__]  # at the user's line
    model.train(max_epochs=1, progress_bar=False)
    with warnings.catch_warnings():  # said when it was built, not again when it is loaded
        warnings.simplefilter("error", UserWarning)
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            model.save(folder, overwrite=True)
            ps.RegularizedVI.load(folder, adata=adata)
