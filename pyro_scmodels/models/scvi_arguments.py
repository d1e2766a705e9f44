"""scvi-tools' setup and model arguments that have no direct counterpart here, and what to use instead.

A user coming from scvi-tools passes ``categorical_covariate_keys`` or ``gene_likelihood`` out of
habit; Python's own "unexpected keyword argument" would not say what this package does instead.
"""

from __future__ import annotations

import functools
import inspect

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

# the queries (get_normalized_expression, get_latent_representation, posterior_predictive_sample, ...)
QUERY = {
    "silent": "the queries here show no progress bar: there is nothing to silence",
    "n_samples_overall": ("not offered: choose the cells with indices= (e.g. a random subset of positions) and the "
                          "draws per cell with n_samples="),
    "dataloader": "not offered: pass the cells as adata= (and indices=); the model makes its own minibatches",
    "weights": ("the posterior draws are averaged with equal weights (scvi-tools' 'uniform'); importance weights are "
                "offered by differential_expression(weights='importance')"),
    "hide_state_registries": ("view_anndata_setup prints the setup the model reads (layer, keys, categories); it has no "
                              "state registries to hide"),
}
DIFFERENTIAL = {
    "n_samples": "num_samples (posterior draws of z per cell)",
    "pseudocounts": "pseudocount (one value, added to the expression before the log2 fold change)",
    "silent": "differential_expression prints no progress: there is nothing to silence",
    "use_permutation": "the (cell, sample) pairs of the two groups are always drawn at random; n_pairs sets how many",
    "m_permutation": "n_pairs (the random (cell, sample) pairs behind each gene's fold-change posterior)",
    "importance_weighting_kwargs": "weights='importance' takes no options here",
    "cred_interval_lvls": ("not offered: the table has each gene's fold-change posterior summaries (lfc_mean, "
                           "lfc_median, lfc_std, lfc_min, lfc_max, lfc_q05, lfc_q95)"),
}
QUERY_MAPPING = {
    "freeze_expression": "freeze_encoder (keeps the reference's z and library encoders fixed; freeze_decoder the decoder)",
    "freeze_batchnorm_encoder": "the encoders have no BatchNorm (a LayerNorm without affine parameters): nothing to freeze",
    "freeze_batchnorm_decoder": "the decoder has no BatchNorm (a LayerNorm without affine parameters): nothing to freeze",
    "freeze_decoder_first_layer": "freeze_decoder (the whole decoder; rows of the query's new categories still train)",
    "freeze_classifier": LABELS,
}

class _ANY_OF(tuple):
    """Several scvi-tools values of one argument that all say what this package does (e.g. weights None or 'uniform')."""

    def __new__(cls, *values):
        return super().__new__(cls, values)


def _is_same(value, accepted) -> bool:
    """Whether ``value`` is ``accepted`` (of the same type: ``1`` is not ``True``), or one of an :class:`_ANY_OF`."""
    if isinstance(accepted, _ANY_OF):
        return any(_is_same(value, one) for one in accepted)
    return type(value) is type(accepted) and value == accepted


# scvi-tools' values that say what this package does anyway: accepted, so that a script ported from scvi-tools runs
# ("dispersion": "gene" is not among them: with a dispersion_key this package's dispersion is per category)
# (per call: a model argument passed to train() is refused like any other)
SAME_AS_HERE = {
    "setup": {},
    "model": {"gene_likelihood": "nb", "latent_distribution": "normal", "use_observed_lib_size": False},
    "train": {"shuffle_set_split": True, "load_sparse_tensor": False, "early_stopping_monitor": "elbo_validation"},
    "query": {"silent": True, "n_samples_overall": None, "dataloader": None, "weights": _ANY_OF(None, "uniform"),
              "hide_state_registries": False},
    "differential": {"silent": True},
    # scvi-tools' defaults: the reference's weights stay fixed (freeze_encoder, freeze_decoder); no BatchNorm here
    "query_mapping": {"freeze_expression": True, "freeze_batchnorm_encoder": True, "freeze_batchnorm_decoder": False},
}
TABLES = {"setup": SETUP, "model": MODEL, "train": TRAIN, "query": QUERY, "differential": DIFFERENTIAL,
          "query_mapping": QUERY_MAPPING}


def refuse_scvi_arguments(given: dict, kind: str, call: str) -> None:
    """Raise ``TypeError`` for keyword arguments ``call`` does not take, saying what to use for scvi-tools' ones.

    Parameters
    ----------
    given
        The keyword arguments ``call`` did not recognise (empty: nothing to do). scvi-tools' values that are
        what this package does (:data:`SAME_AS_HERE` of this kind of call, e.g. ``gene_likelihood="nb"``) are
        accepted.
    kind
        ``"setup"``, ``"model"``, ``"train"``, ``"query"``, ``"differential"`` or ``"query_mapping"``: which of
        scvi-tools' arguments (:data:`SETUP`, :data:`MODEL`, :data:`TRAIN`, :data:`QUERY`, :data:`DIFFERENTIAL`,
        :data:`QUERY_MAPPING`: name -> what this package does instead).
    call
        The call's name, for the message (e.g. ``"RegularizedVI.setup_anndata"``).

    Raises
    ------
    TypeError
        Naming every argument; for scvi-tools' ones, this package's counterpart.
    """
    table, same = TABLES[kind], SAME_AS_HERE[kind]
    given = {name: value for name, value in given.items() if not (name in same and _is_same(value, same[name]))}
    if not given:
        return
    known = [name for name in given if name in table]
    unknown = [name for name in given if name not in table]
    parts = [f"{name}: {table[name]}" for name in known]
    if unknown:
        parts.append(f"{', '.join(unknown)}: not an argument of {call}")
    raise TypeError(f"{call}() got arguments it does not take. " + "; ".join(parts) + ".")


def refuses_scvi_arguments(kind: str):
    """Decorate a method so that keyword arguments it does not take go to :func:`refuse_scvi_arguments`.

    For the queries, ``differential_expression`` and ``load_query_data``, whose signatures have no ``**kwargs``:
    an scvi-tools argument (``n_samples_overall=``, ``pseudocounts=``, ``freeze_expression=``, ...) then raises
    ``TypeError`` naming this package's counterpart instead of Python's bare "unexpected keyword argument".

    Parameters
    ----------
    kind
        The table of :func:`refuse_scvi_arguments` (``"query"``, ``"differential"``, ``"query_mapping"``, ...).

    Returns
    -------
    callable
        The decorator; the method keeps its name, docstring and signature (``inspect.signature``).
    """
    def decorate(method):
        taken = inspect.signature(method).parameters

        @functools.wraps(method)
        def checked(self, *args, **kwargs):
            others = {name: kwargs.pop(name) for name in list(kwargs) if name not in taken}
            if others:
                owner = self if isinstance(self, type) else type(self)
                refuse_scvi_arguments(others, kind, f"{owner.__name__}.{method.__name__}")
            return method(self, *args, **kwargs)
        return checked
    return decorate
