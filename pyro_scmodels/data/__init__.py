"""AnnData/MuData in, tensors by cell index out: setup, covariate encoding, validation, minibatches.

* :mod:`.registry`: ``setup_anndata`` / ``read_setup`` (AnnData), ``check_var_names``.
* :mod:`.mudata_registry`: ``setup_mudata`` / ``read_mudata_setup`` / ``modality_counts`` (MuData).
* :mod:`.cells`: :class:`CellData` and ``CellData.from_setup``, the one way a model gets its cells.
* :mod:`.covariates`, :mod:`.counts`: covariate roles and encoding; count matrices.
"""

from .cells import CellData, iterate_minibatches
from .counts import CountMatrix, DeviceCSR, fingerprint
from .covariates import CovariateEncoding, CovariateKeys, resolve_covariate_keys, setup_arguments
from .mudata_registry import MuDataSetup, modality_counts, read_mudata_setup, require_mudata, setup_mudata
from .registry import (SETUP_UNS_KEY, AnnDataSetup, check_unique_names, check_var_names, counts_matrix, read_setup,
                       refuse_mudata, setup_anndata)

__all__ = [
    "SETUP_UNS_KEY",
    "AnnDataSetup",
    "CellData",
    "CountMatrix",
    "CovariateEncoding",
    "CovariateKeys",
    "DeviceCSR",
    "MuDataSetup",
    "check_unique_names",
    "check_var_names",
    "counts_matrix",
    "fingerprint",
    "iterate_minibatches",
    "modality_counts",
    "read_mudata_setup",
    "refuse_mudata",
    "require_mudata",
    "read_setup",
    "resolve_covariate_keys",
    "setup_anndata",
    "setup_arguments",
    "setup_mudata",
]
