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
        The raw counts, or for several modalities a dict from minibatch key (e.g. ``"x_rna"``)
        to counts; a single matrix is served as ``"x"``.
    obs
        The cell table holding the covariate columns.
    encoding
        A fitted :class:`CovariateEncoding` (category order fixed).
    """

    def __init__(self, counts, obs, encoding: CovariateEncoding, table: str = "adata.obs"):
        self.modalities: dict[str, CountMatrix] = dict(counts) if isinstance(counts, dict) else {"x": counts}
        for key, matrix in self.modalities.items():
            if len(obs) != matrix.n_cells:
                raise ValueError(f"{table} has {len(obs)} rows but {matrix.name} has {matrix.n_cells} cells.")
        keys = encoding.keys
        self.counts = next(iter(self.modalities.values()))
        self.encoding = encoding
        self.n_cells = self.counts.n_cells
        self.n_features = self.counts.n_features
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
        self._device_counts: dict[str, DeviceCSR] | None = None
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
    def library_prior(self, variance_floor: float = 1e-2, key: str = "x") -> tuple[np.ndarray, np.ndarray, float]:
        """Mean and variance of log total counts per library group, means centred across groups.

        Cells with no counts in this modality (allowed with several modalities) are left out.
        Returns ``(centred_means, variances, centre)``; ``centre`` is what was subtracted.
        """
        totals = self.modalities[key].totals()
        counted = totals > 0
        log_total = np.log(totals[counted])
        group = self.covariates["library_index"].numpy()[counted]
        n = self.n_library
        means = np.array([log_total[group == p].mean() for p in range(n)])
        variances = np.array([log_total[group == p].var() if (group == p).sum() > 1 else 0.0 for p in range(n)])
        centre = float(means.mean())
        return means - centre, np.maximum(variances, variance_floor), centre

    def _inverse_size_factors(self, key: str) -> np.ndarray:
        # a cell's library factor: its total over the geometric-mean total (~1 at a typical cell);
        # cells with no counts in this modality get weight 0
        totals = self.modalities[key].totals()
        counted = totals > 0
        typical = np.exp(np.log(totals[counted]).mean())
        return np.where(counted, typical / np.maximum(totals, 1e-12), 0.0)

    def normalised_means(self, key: str = "x") -> np.ndarray:
        """Mean library-normalised expression over all cells (1 x features), in counts at a typical library."""
        return self.modalities[key].column_means(weights=self._inverse_size_factors(key))

    def stacked_normalised_means(self, index_key: str, n_levels: int, key: str = "x") -> np.ndarray:
        """Mean library-normalised expression per level of a stacked covariate (levels x features)."""
        codes = self.covariates[index_key]
        matrix = self.modalities[key]
        weights = self._inverse_size_factors(key)
        out = np.zeros((n_levels, matrix.n_features))
        for column in range(codes.shape[1]):
            out += matrix.column_means(weights=weights, groups=codes[:, column].numpy(), n_groups=n_levels)
        return out

    # --- minibatches ---------------------------------------------------------------------
    def to_device(self, device: torch.device, counts_on_device: bool = False) -> None:
        """Move the (small) covariate tensors, and optionally the whole sparse count matrix, to ``device``."""
        self._device = torch.device(device)
        self._device_covariates = {k: v.to(self._device) for k, v in self.covariates.items()}
        self._device_counts = (
            {key: matrix.to_torch_csr(self._device) for key, matrix in self.modalities.items()} if counts_on_device else None
        )

    def minibatch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Tensors of cells ``indices`` on the current device: counts, covariates and the indices."""
        device = self._device
        covariates = self._device_covariates or self.covariates
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        device_index = index.to(device)
        counts = {}
        for key, matrix in self.modalities.items():
            if self._device_counts is not None:
                counts[key] = self._device_counts[key].rows(device_index)
            else:
                # densify only this minibatch, on the host, then send it
                counts[key] = torch.from_numpy(matrix.rows(indices)).to(device, non_blocking=True)
        host_index = device_index if covariates is self._device_covariates else index
        batch = {name: value[host_index].to(device) for name, value in covariates.items()}
        batch["nn_onehot"] = _onehot(batch.pop("nn_codes"), self.n_nn_covariates) if self.n_nn_covariates else None
        batch["encoder_onehot"] = (
            _onehot(batch.pop("encoder_codes"), self.n_encoder_covariates) if self.n_encoder_covariates else None
        )
        batch.pop("nn_codes", None)
        batch.pop("encoder_codes", None)
        batch.update(counts)
        batch["index"] = device_index
        return batch


def iterate_minibatches(indices: np.ndarray, batch_size: int, shuffle: bool, rng: np.random.Generator | None = None):
    """Split ``indices`` into minibatches, shuffled by ``rng`` when ``shuffle``."""
    indices = np.asarray(indices)
    if shuffle:
        indices = indices[rng.permutation(len(indices))]
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]
