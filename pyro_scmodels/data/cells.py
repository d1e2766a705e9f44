"""The cells of a set-up AnnData or MuData as tensors by cell index: :class:`CellData`.

:meth:`CellData.from_setup` is the one way a model gets its cells: it reads the setup record
(see :mod:`.registry` and :mod:`.mudata_registry`), validates the counts only if they changed
since setup, encodes the covariates with the encoding fitted at setup (or the model's own) and
serves minibatches.
"""

from __future__ import annotations

import numpy as np
import torch

from .count_positions import CountPositions
from .counts import POSITIONS_SUFFIX, CountMatrix, DeviceCSR
from .covariates import CovariateEncoding
from .mudata_registry import MuDataSetup, read_mudata_setup
from .registry import AnnDataSetup, read_setup


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

    @classmethod
    def from_setup(cls, data, encoding: CovariateEncoding | None = None, setup: AnnDataSetup | MuDataSetup | None = None,
                   validate: bool | None = None) -> "CellData":
        """The cells of an AnnData or MuData, read as its setup says.

        Parameters
        ----------
        data
            AnnData set up with :func:`~pyro_scmodels.data.setup_anndata`, or MuData set up with
            :func:`~pyro_scmodels.data.setup_mudata`; with ``setup``, any AnnData/MuData with the
            same layout (e.g. new cells for a trained model).
        encoding
            Category order to encode the covariates with; default the one fitted at setup. A
            trained model passes its own (e.g. loaded with saved categories): a category it does
            not know then raises ``ValueError``.
        setup
            The setup to apply; default the one recorded in ``data.uns``. A model passes the
            setup of its training data to read new data with the same layer(s) and keys.
        validate
            None: validate the counts only when they changed since setup (their fingerprint
            differs from the recorded one); True: always (new data); False: never.

        Returns
        -------
        CellData
            ``"x"`` for an AnnData, ``"x_<modality>"`` per modality for a MuData.
        """
        if setup is None:
            setup = read_mudata_setup(data) if hasattr(data, "mod") else read_setup(data)
        if encoding is None:
            encoding = setup.encoding(data.obs)
        return cls(setup.count_matrices(data, validate), data.obs, encoding, setup.table)

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
        means = np.array([log_total[group == p].mean() if (group == p).any() else np.nan for p in range(n)])
        variances = np.array([log_total[group == p].var() if (group == p).sum() > 1 else 0.0 for p in range(n)])
        centre = float(np.nanmean(means))
        # a group without cells here (a category of the model absent from these cells) gets the average mean
        means = np.where(np.isnan(means), centre, means)
        return means - centre, np.maximum(variances, variance_floor), centre

    def _inverse_size_factors(self, key: str) -> np.ndarray:
        # a cell's library factor: its total over the geometric-mean total (~1 at a typical cell);
        # cells with no counts in this modality get weight 0
        totals = self.modalities[key].totals()
        counted = totals > 0
        typical = np.exp(np.log(totals[counted]).mean())
        return np.where(counted, typical / np.maximum(totals, 1e-12), 0.0)

    def normalised_means(self, key: str = "x") -> np.ndarray:
        """Mean library-normalised expression over the cells with counts in ``key`` (1 x features), in counts at a
        typical library."""
        weights = self._inverse_size_factors(key)
        # cells without counts in the modality (weight 0) go to a second group, left out: they diluted the mean
        measured = np.where(weights > 0, 0, 1)
        return self.modalities[key].column_means(weights=weights, groups=measured, n_groups=2)[:1]

    def stacked_normalised_means(self, index_key: str, n_levels: int, key: str = "x") -> np.ndarray:
        """Mean library-normalised expression per level of a stacked covariate (levels x features)."""
        codes = self.covariates[index_key]
        matrix = self.modalities[key]
        weights = self._inverse_size_factors(key)
        out = np.zeros((n_levels, matrix.n_features))
        for column in range(codes.shape[1]):
            # cells without counts in the modality go to an extra level, left out (see normalised_means)
            levels = np.where(weights > 0, codes[:, column].numpy(), n_levels)
            out += matrix.column_means(weights=weights, groups=levels, n_groups=n_levels + 1)[:n_levels]
        return out

    # --- minibatches ---------------------------------------------------------------------
    def to_device(self, device: torch.device, counts_on_device: bool = False) -> None:
        """Move the (small) covariate tensors, and optionally the whole sparse count matrix, to ``device``."""
        self._device = torch.device(device)
        self._device_covariates = {k: v.to(self._device) for k, v in self.covariates.items()}
        self._device_counts = (
            {key: matrix.to_torch_csr(self._device) for key, matrix in self.modalities.items()} if counts_on_device else None
        )

    @property
    def on_disk(self) -> bool:
        """Whether some counts stay in a file (a backed AnnData) and are read as minibatches need them.

        False once the counts are held on the device (``to_device(counts_on_device=True)``).
        """
        return self._device_counts is None and any(matrix.on_disk for matrix in self.modalities.values())

    def read_ahead(self, indices: np.ndarray | None) -> None:
        """Read the counts of cells ``indices`` from disk in one pass and keep them until the next call.

        Minibatches of these cells are then served from memory; None drops what is held. Counts
        held in memory ignore it.
        """
        for matrix in self.modalities.values():
            matrix.hold(indices)

    def minibatch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Tensors of cells ``indices`` on the current device: counts, covariates and the indices."""
        device = self._device
        covariates = self._device_covariates or self.covariates
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        device_index = index.to(device)
        counts = {}
        for key, matrix in self.modalities.items():
            if self._device_counts is not None:
                counts[key], positions = self._device_counts[key].rows_and_positions(device_index)
            else:
                # densify only this minibatch, on the host, then send it
                rows, positions = matrix.rows_and_positions(indices)
                counts[key] = torch.from_numpy(rows).to(device, non_blocking=True)
                if positions is not None:
                    positions = tuple(torch.from_numpy(p).to(device, non_blocking=True) for p in positions)
            # where the stored (non-zero) counts are: the likelihood's count-only terms are taken there, for this
            # very tensor only (CountPositions holds it)
            counts[key + POSITIONS_SUFFIX] = None if positions is None else CountPositions(positions, counts[key])
        host_index = device_index if covariates is self._device_covariates else index
        batch = {name: value[host_index].to(device) for name, value in covariates.items()}
        batch["nn_onehot"] = _onehot(batch.pop("nn_codes"), self.n_nn_covariates) if self.n_nn_covariates else None
        batch["encoder_onehot"] = (
            _onehot(batch["encoder_codes"], self.n_encoder_covariates) if self.n_encoder_covariates else None
        )
        batch.pop("nn_codes", None)
        if not self.n_encoder_covariates:  # kept otherwise: the latent-independence penalty reads the categories
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
