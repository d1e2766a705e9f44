"""AnnData in, tensors by cell index out: registry, covariate encoding, validation, minibatches."""

from .counts import CountMatrix, DeviceCSR
from .covariates import CovariateEncoding, CovariateKeys, resolve_covariate_keys
from .registry import CellData, counts_matrix, iterate_minibatches, read_setup, setup_anndata

__all__ = [
    "CellData",
    "CountMatrix",
    "CovariateEncoding",
    "CovariateKeys",
    "DeviceCSR",
    "counts_matrix",
    "iterate_minibatches",
    "read_setup",
    "resolve_covariate_keys",
    "setup_anndata",
]
