"""From an AnnData to tensors by cell index.

``setup_anndata`` records which layer and columns a model reads (in ``adata.uns``, as JSON so
the AnnData stays writable); :class:`CellData` validates them and serves minibatches.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from .counts import CountMatrix, DeviceCSR
from .covariates import CovariateEncoding, CovariateKeys, resolve_covariate_keys

SETUP_UNS_KEY = "_pyro_scmodels_setup"


def counts_matrix(adata, layer: str | None, validate: bool = True) -> CountMatrix:
    """The raw-count matrix of ``adata`` (``.X`` or ``.layers[layer]``), validated."""
    if layer is None:
        return CountMatrix(adata.X, name="adata.X", validate=validate)
    if layer not in adata.layers:
        available = ", ".join(adata.layers.keys()) or "(none)"
        raise KeyError(f"Layer {layer!r} not found in adata.layers. Available layers: {available}.")
    return CountMatrix(adata.layers[layer], name=f"adata.layers[{layer!r}]", validate=validate)


def setup_anndata(adata, layer: str | None = None, **covariate_arguments) -> CovariateKeys:
    """Validate the inputs and record the setup in ``adata.uns``. See ``RegularizedVI.setup_anndata``."""
    if getattr(adata, "is_view", False):
        raise ValueError("adata is a view of another AnnData; set up a copy instead: `adata = adata.copy()`.")
    keys = resolve_covariate_keys(**covariate_arguments)
    counts_matrix(adata, layer)  # validates counts before anything is stored
    encoding = CovariateEncoding(keys).fit(adata.obs)  # validates the categorical columns
    encoding.continuous(adata.obs)  # and the continuous ones
    adata.uns[SETUP_UNS_KEY] = json.dumps({"layer": layer, "keys": keys.to_dict()})
    return keys


def read_setup(adata) -> tuple[str | None, CovariateKeys]:
    """The layer and covariate keys recorded by ``setup_anndata``."""
    if SETUP_UNS_KEY not in adata.uns:
        raise ValueError(
            "This AnnData has not been set up. Call `RegularizedVI.setup_anndata(adata, ...)` first."
        )
    setup = json.loads(adata.uns[SETUP_UNS_KEY])
    return setup["layer"], CovariateKeys(**setup["keys"])


def _onehot(codes: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(codes.shape[0], n, device=codes.device)
    if n:
        out.scatter_(1, codes, 1.0)
    return out


class CellData:
    """Counts and encoded covariates of a set of cells, served by index.

    Parameters
    ----------
    counts
        The raw counts.
    obs
        The cell table holding the covariate columns.
    encoding
        A fitted :class:`CovariateEncoding` (category order fixed).
    """

    def __init__(self, counts: CountMatrix, obs, encoding: CovariateEncoding, table: str = "adata.obs"):
        if len(obs) != counts.n_cells:
            raise ValueError(f"{table} has {len(obs)} rows but the counts have {counts.n_cells} cells.")
        keys = encoding.keys
        self.counts = counts
        self.encoding = encoding
        self.n_cells = counts.n_cells
        self.n_features = counts.n_features
        as_long = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
        single = lambda key: encoding.stacked_codes(obs, [key] if key else [], table)[:, 0]  # noqa: E731
        self.covariates = {
            "ambient_index": as_long(encoding.stacked_codes(obs, keys.ambient, table)),
            "scaling_index": as_long(encoding.stacked_codes(obs, keys.feature_scaling, table)),
            "dispersion_index": as_long(single(keys.dispersion)),
            "library_index": as_long(single(keys.library_size)),
            "nn_codes": as_long(encoding.stacked_codes(obs, keys.nn_conditioning, table)),
            "encoder_codes": as_long(encoding.stacked_codes(obs, keys.encoder, table)),
            "continuous": torch.as_tensor(encoding.continuous(obs, table)),
        }
        self.n_nn_covariates = encoding.n_categories(keys.nn_conditioning)
        self.n_encoder_covariates = encoding.n_categories(keys.encoder)
        self._device_counts: DeviceCSR | None = None
        self._device_covariates: dict[str, torch.Tensor] | None = None
        self._device = torch.device("cpu")

    # --- sizes of the stacked category tables -------------------------------------------
    @property
    def n_ambient(self) -> int:
        return max(1, self.encoding.n_categories(self.encoding.keys.ambient))

    @property
    def n_scaling(self) -> int:
        return max(1, self.encoding.n_categories(self.encoding.keys.feature_scaling))

    @property
    def n_dispersion(self) -> int:
        key = self.encoding.keys.dispersion
        return len(self.encoding.categories[key]) if key else 1

    @property
    def n_library(self) -> int:
        key = self.encoding.keys.library_size
        return len(self.encoding.categories[key]) if key else 1

    @property
    def n_continuous(self) -> int:
        return int(self.covariates["continuous"].shape[1])

    # --- summaries used for priors and initial values --------------------------------------
    def library_prior(self, variance_floor: float = 1e-2) -> tuple[np.ndarray, np.ndarray, float]:
        """Mean and variance of log total counts per library group, means centred across groups.

        Returns ``(centred_means, variances, centre)``; ``centre`` is what was subtracted.
        """
        log_total = np.log(self.counts.totals())
        group = self.covariates["library_index"].numpy()
        n = self.n_library
        means = np.array([log_total[group == p].mean() for p in range(n)])
        variances = np.array([log_total[group == p].var() if (group == p).sum() > 1 else 0.0 for p in range(n)])
        centre = float(means.mean())
        return means - centre, np.maximum(variances, variance_floor), centre

    def _size_factors(self) -> np.ndarray:
        # a cell's library factor: its total over the geometric-mean total (~1 at a typical cell)
        totals = self.counts.totals()
        return totals / np.exp(np.log(totals).mean())

    def normalised_means(self) -> np.ndarray:
        """Mean library-normalised expression over all cells (1 x features), in counts at a typical library."""
        return self.counts.column_means(weights=1.0 / self._size_factors())

    def stacked_normalised_means(self, index_key: str, n_levels: int) -> np.ndarray:
        """Mean library-normalised expression per level of a stacked covariate (levels x features)."""
        codes = self.covariates[index_key]
        weights = 1.0 / self._size_factors()
        out = np.zeros((n_levels, self.n_features))
        for column in range(codes.shape[1]):
            out += self.counts.column_means(weights=weights, groups=codes[:, column].numpy(), n_groups=n_levels)
        return out

    # --- minibatches ---------------------------------------------------------------------
    def to_device(self, device: torch.device, counts_on_device: bool = False) -> None:
        """Move the (small) covariate tensors, and optionally the whole sparse count matrix, to ``device``."""
        self._device = torch.device(device)
        self._device_covariates = {k: v.to(self._device) for k, v in self.covariates.items()}
        self._device_counts = self.counts.to_torch_csr(self._device) if counts_on_device else None

    def minibatch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Tensors of cells ``indices`` on the current device: counts, covariates and the indices."""
        device = self._device
        covariates = self._device_covariates or self.covariates
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        device_index = index.to(device)
        if self._device_counts is not None:
            x = self._device_counts.rows(device_index)
        else:
            # densify only this minibatch, on the host, then send it
            x = torch.from_numpy(self.counts.rows(indices)).to(device, non_blocking=True)
        host_index = device_index if covariates is self._device_covariates else index
        batch = {name: value[host_index].to(device) for name, value in covariates.items()}
        batch["nn_onehot"] = _onehot(batch.pop("nn_codes"), self.n_nn_covariates) if self.n_nn_covariates else None
        batch["encoder_onehot"] = (
            _onehot(batch.pop("encoder_codes"), self.n_encoder_covariates) if self.n_encoder_covariates else None
        )
        batch.pop("nn_codes", None)
        batch.pop("encoder_codes", None)
        batch["x"] = x
        batch["index"] = device_index
        return batch


def iterate_minibatches(indices: np.ndarray, batch_size: int, shuffle: bool, rng: np.random.Generator | None = None):
    """Split ``indices`` into minibatches, shuffled by ``rng`` when ``shuffle``."""
    indices = np.asarray(indices)
    if shuffle:
        indices = indices[rng.permutation(len(indices))]
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]
