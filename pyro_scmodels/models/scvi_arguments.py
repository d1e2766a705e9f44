"""scvi-tools' setup and model arguments that have no direct counterpart here, and what to use instead.

A user coming from scvi-tools passes ``categorical_covariate_keys`` or ``gene_likelihood`` out of
habit; Python's own "unexpected keyword argument" would not say what this package does instead.
"""

from __future__ import annotations

#: scvi-tools' default ``mc_samples`` of ``get_latent_representation``: taken, unused here (z is Normal)
MC_SAMPLES = 5000

LABELS = ("RegularizedVI is unsupervised: cell labels are not part of the model (use them in "
          "differential_expression(groupby=...) or NDreamer instead)")

SETUP = {
    "categorical_covariate_keys": (
        "each technical effect has its own key here: nn_conditioning_covariate_keys (the decoder, where scvi-tools puts "
        "categorical covariates), encoder_covariate_keys (the encoder), ambient_covariate_keys, "
        "feature_scaling_covariate_keys, dispersion_key and library_size_key"),
    "size_factor_key": ("the library size is a latent variable with a LogNormal prior (one per category of "
                        "library_size_key), not read from a column"),
    "labels_key": LABELS,
    "unlabeled_category": LABELS,
}

MODEL = {
    "gene_likelihood": ("the counts are negative binomial (GammaPoisson, as scvi-tools' 'nb') with an ambient "
                        "background; zero inflation and Poisson are not offered"),
    "dispersion": ("one dispersion per gene by default (scvi-tools' 'gene'); one per category of a column with "
                   "setup_anndata(..., dispersion_key=...) (scvi-tools' 'gene-batch')"),
    "latent_distribution": "z is Normal (scvi-tools' default 'normal')",
    "encode_covariates": "give the encoder covariates with setup_anndata(..., encoder_covariate_keys=[...])",
    "deeply_inject_covariates": ("the decoder's covariates (nn_conditioning_covariate_keys) enter every hidden layer "
                                 "already"),
    "use_observed_lib_size": "the library size is always a latent variable with a LogNormal prior",
    "use_batch_norm": "every hidden layer has a LayerNorm without affine parameters and no BatchNorm",
    "use_layer_norm": "every hidden layer has a LayerNorm without affine parameters and no BatchNorm",
}

TRAIN = {
    "validation_size": "pass train_size; the validation cells are the rest",
    "shuffle_set_split": ("the split is random, seeded by seed (scvi-tools' default True); fix it with "
                          "datasplitter_kwargs={'external_indexing': [train, validation]}"),
    "load_sparse_tensor": ("the counts stay sparse and only each minibatch's rows are made dense; counts_on_device=True "
                           "holds them on the GPU"),
    "early_stopping_monitor": ("early stopping watches the validation loss (scvi-tools' 'elbo_validation'), or the "
                               "training loss when there are no validation cells"),
    "enable_progress_bar": "progress_bar",
}

# scvi-tools' values that say what this package does anyway: accepted, so that a script ported from scvi-tools runs
# ("dispersion": "gene" is not among them: with a dispersion_key this package's dispersion is per category)
# (per call: a model argument passed to train() is refused like any other)
SAME_AS_HERE = {
    "setup": {},
    "model": {"gene_likelihood": "nb", "latent_distribution": "normal", "use_observed_lib_size": False},
    "train": {"shuffle_set_split": True, "load_sparse_tensor": False, "early_stopping_monitor": "elbo_validation"},
}
TABLES = {"setup": SETUP, "model": MODEL, "train": TRAIN}


def refuse_scvi_arguments(given: dict, kind: str, call: str) -> None:
    """Raise ``TypeError`` for keyword arguments ``call`` does not take, saying what to use for scvi-tools' ones.

    Parameters
    ----------
    given
        The keyword arguments ``call`` did not recognise (empty: nothing to do). scvi-tools' values that are
        what this package does (:data:`SAME_AS_HERE` of this kind of call, e.g. ``gene_likelihood="nb"``) are
        accepted.
    kind
        ``"setup"``, ``"model"`` or ``"train"``: which of scvi-tools' arguments (:data:`SETUP`, :data:`MODEL`,
        :data:`TRAIN`: name -> what this package does instead).
    call
        The call's name, for the message (e.g. ``"RegularizedVI.setup_anndata"``).

    Raises
    ------
    TypeError
        Naming every argument; for scvi-tools' ones, this package's counterpart.
    """
    table, same = TABLES[kind], SAME_AS_HERE[kind]
    given = {name: value for name, value in given.items()
             if not (name in same and type(value) is type(same[name]) and value == same[name])}
    if not given:
        return
    known = [name for name in given if name in table]
    unknown = [name for name in given if name not in table]
    parts = [f"{name}: {table[name]}" for name in known]
    if unknown:
        parts.append(f"{', '.join(unknown)}: not an argument of {call}")
    raise TypeError(f"{call}() got arguments it does not take. " + "; ".join(parts) + ".")
