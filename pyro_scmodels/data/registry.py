"""AnnData setup: which layer and ``.obs`` columns a model reads, validated once.

``setup_anndata`` validates the counts and the covariate columns, fits the covariate encoding
and records all of it in ``adata.uns`` (as JSON, so the AnnData stays writable): the layer, the
covariate keys, the category order of every categorical key, and a fingerprint of the counts.
A model reads this record with :func:`read_setup` instead of validating and fitting again, and
gets its cells from :meth:`~pyro_scmodels.data.CellData.from_setup`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _validation as V
from .._labels import names_as_text
from .counts import CountMatrix, stored_x
from .on_disk import refuse_backed_csc
from .covariates import CovariateEncoding, CovariateKeys, resolve_covariate_keys

SETUP_UNS_KEY = "_pyro_scmodels_setup"


def counts_matrix(adata, layer: str | None, validate: bool = True) -> CountMatrix:
    """The raw-count matrix of an AnnData.

    Parameters
    ----------
    adata
        The AnnData.
    layer
        Layer holding the counts; None for ``adata.X``.
    validate
        Check every value (see :meth:`CountMatrix.validate`).

    Returns
    -------
    CountMatrix

    Raises
    ------
    KeyError
        ``layer`` is not in ``adata.layers``.
    ValueError
        The counts are a backed matrix stored as CSC (every read of cells would load all of it).
    """
    if layer is None:
        matrix, name = stored_x(adata), "adata.X"
    else:
        V.present(layer, adata.layers, "adata.layers", "layer")
        matrix, name = adata.layers[layer], f"adata.layers[{layer!r}]"
    refuse_backed_csc(matrix, name)
    try:
        return CountMatrix(matrix, name=name, validate=validate)
    except ValueError as err:
        if layer is not None or "raw count" not in str(err):
            raise
        hint = _raw_counts_hint(adata)
        if getattr(adata, "isbacked", False):
            # the message's `layer=` (and the raw hint's layer) would load into memory, and `fit --backed` refuses
            # --layer: the one route that stays on disk is a file whose .X holds the counts
            hint = (("adata.raw holds raw counts (scanpy's layout). " if hint else "")
                    + "Opened with backed='r', only .X stays on disk: to train from disk, write a file whose .X holds "
                    "the raw counts and open that one (`fit --backed` takes no --layer).")
        if not hint:
            raise
        raise type(err)(f"{err} {hint.strip()}") from None


def _raw_counts_hint(adata, rows: int = 200) -> str:
    """A sentence pointing to ``adata.raw`` when it holds counts (scanpy keeps them there), else ``""``.

    Only the first ``rows`` cells of ``adata.raw.X`` are looked at: enough to tell counts from normalised values.
    """
    raw = getattr(adata, "raw", None)
    if raw is None:
        return ""
    try:
        block = raw.X[: min(rows, raw.n_obs)]
        values = block.data if sp.issparse(block) else np.asarray(block).ravel()
    except Exception:  # noqa: BLE001 - a hint only: an unreadable .raw gives none
        return ""
    if values.size == 0 or not np.all(np.isfinite(values)) or values.min() < 0 or np.any(values != np.round(values)):
        return ""
    return ("adata.raw holds raw counts (scanpy's layout): put them in a layer with the data's genes, "
            "`adata.layers['counts'] = adata.raw[:, adata.var_names].X` (then `adata.write_h5ad(...)` for the "
            "command line), and pass layer='counts'.")


def validated(matrix: CountMatrix, recorded: dict | None, validate: bool | None = None) -> CountMatrix:
    """``matrix``, validated when asked to or when it changed since setup.

    Parameters
    ----------
    matrix
        A count matrix built with ``validate=False``.
    recorded
        The fingerprint recorded at setup (see :func:`~pyro_scmodels.data.counts.fingerprint`).
    validate
        True: always validate; False: never; None: only when ``matrix.fingerprint`` differs
        from ``recorded`` (counts replaced or edited since setup).

    Returns
    -------
    CountMatrix
        The same object.
    """
    if validate or (validate is None and matrix.fingerprint != recorded):
        matrix.validate()
    return matrix


class _RecordedEncoding:
    """The covariate encoding of a setup record (shared by the AnnData and MuData records)."""

    table: ClassVar[str] = "adata.obs"
    keys: CovariateKeys
    categories: dict[str, list[str]] | None

    def encoding(self, obs: pd.DataFrame | None = None) -> CovariateEncoding:
        """The covariate encoding fitted at setup.

        Parameters
        ----------
        obs
            The cell table; used only for a record written before setup recorded the
            categories (older versions), whose encoding is then fitted on it.

        Returns
        -------
        CovariateEncoding
        """
        encoding = CovariateEncoding(self.keys, self.categories)
        if self.categories is None:
            if obs is None:
                raise ValueError("This setup records no categories; run the setup again.")
            encoding.fit(obs, self.table)
        return encoding


@dataclass
class AnnDataSetup(_RecordedEncoding):
    """What :func:`setup_anndata` recorded in ``adata.uns``.

    Attributes
    ----------
    layer
        Layer of raw counts; None for ``.X``.
    keys
        The ``.obs`` columns of each covariate role.
    categories
        Category order of every categorical key, fitted at setup.
    counts
        Fingerprint of the count matrix validated at setup.
    """

    layer: str | None
    keys: CovariateKeys
    categories: dict[str, list[str]] | None = None
    counts: dict | None = None

    def count_sources(self, adata) -> dict[str, object]:
        """The matrix holding the counts, as stored (not read or converted).

        Parameters
        ----------
        adata
            An AnnData with this setup's layout.

        Returns
        -------
        dict
            ``{"adata.X" or "adata.layers['<layer>']": matrix}``, named for messages.

        Raises
        ------
        KeyError
            The setup's layer is not in ``adata.layers``.
        """
        if self.layer is None:
            return {"adata.X": adata.X}
        V.present(self.layer, adata.layers, "adata.layers", "layer")
        return {f"adata.layers[{self.layer!r}]": adata.layers[self.layer]}

    def count_matrices(self, adata, validate: bool | None = None) -> dict[str, CountMatrix]:
        """The counts of ``adata`` under this setup, as ``{"x": CountMatrix}``.

        ``validate`` as in :func:`validated`: by default only counts changed since setup are
        validated again.
        """
        return {"x": validated(counts_matrix(adata, self.layer, validate=False), self.counts, validate)}

    def to_json(self) -> str:
        """The record as stored in ``.uns``."""
        return json.dumps({"layer": self.layer, "keys": self.keys.to_dict(), "categories": self.categories,
                           "counts": self.counts})


def load_record(data, what: str, call: str) -> dict:
    """The setup record of ``data`` as a dict; ``ValueError`` telling how to set up if there is none."""
    if SETUP_UNS_KEY not in data.uns:
        raise ValueError(f"This {what} has not been set up. Call `{call}` first.")
    return json.loads(data.uns[SETUP_UNS_KEY])


def setup_anndata(adata, layer: str | None = None, **covariate_arguments) -> AnnDataSetup:
    """Validate ``adata`` once, fit the covariate encoding once, and record both in ``adata.uns``.

    See :meth:`pyro_scmodels.RegularizedVI.setup_anndata` for the arguments.

    Parameters
    ----------
    adata
        AnnData of raw counts (not a view).
    layer
        Layer of raw counts; None for ``.X``.
    **covariate_arguments
        Passed to :func:`~pyro_scmodels.data.resolve_covariate_keys`.

    Returns
    -------
    AnnDataSetup
        The record, as also stored in ``adata.uns``.
    """
    refuse_mudata(adata, "RegularizedVI.setup_anndata")
    if getattr(adata, "is_view", False):
        fix = ("`adata = adata.copy(filename='subset.h5ad')` (a backed view is copied to a new file)"
               if getattr(adata, "isbacked", False) else "`adata = adata.copy()`")
        raise ValueError(f"adata is a view of another AnnData; set up a copy instead: {fix}.")
    keys = resolve_covariate_keys(**covariate_arguments)
    check_unique_names(adata)
    counts = counts_matrix(adata, layer)  # validates counts before anything is stored
    encoding = CovariateEncoding(keys).fit(adata.obs)  # validates the categorical columns
    encoding.continuous(adata.obs)  # and the continuous ones
    setup = AnnDataSetup(layer, keys, encoding.categories, counts.fingerprint)
    adata.uns[SETUP_UNS_KEY] = setup.to_json()
    return setup


def refuse_mudata(data, call: str) -> None:
    """Raise ``TypeError`` when ``data``, given to ``call`` (named in the message), is a MuData: the mirror of
    :func:`~pyro_scmodels.data.mudata_registry.require_mudata`, for the calls that take one AnnData.

    The message names the modalities and the one to pass; a MuData's empty ``.X`` and ``.obs`` gave errors about a
    missing matrix or column.

    Parameters
    ----------
    data, call
        What was given, and the call that takes one AnnData (e.g. ``"RegularizedVI.setup_anndata"``).
    """
    if not hasattr(data, "mod"):
        return
    names = list(data.mod)
    raise TypeError(f"{call} takes an AnnData (one modality); it was given a MuData with modalities {names}. Pass one "
                    f"of them, e.g. mdata.mod[{names[0] if names else 'rna'!r}]; for paired modalities use "
                    "RegularizedMultimodalVI (RegularizedMultimodalVI.setup_mudata(mdata, ...)).")


def check_unique_names(adata, name: str = "adata") -> None:
    """Raise unless cell and gene names are unique: outputs are indexed by them, and repeats would make them ambiguous.

    Parameters
    ----------
    adata
        The AnnData (its ``obs_names`` and ``var_names``), or a MuData modality.
    name
        How to call ``adata`` in the message (e.g. ``"mdata.mod['rna']"``).

    Raises
    ------
    ValueError
        Naming the repeated names and the anndata call that makes them unique.
    """
    for axis, names, fix in (("obs_names", adata.obs_names, "obs_names_make_unique"),
                             ("var_names", adata.var_names, "var_names_make_unique")):
        if not names.is_unique:
            repeated = names[names.duplicated()].unique()[:5].tolist()
            raise ValueError(f"{name}.{axis} are not unique (e.g. {repeated} repeat); outputs indexed by these names "
                             f"would be ambiguous. Call `{name}.{fix}()` first.")


def read_setup(adata) -> AnnDataSetup:
    """The setup recorded by :func:`setup_anndata`.

    Raises
    ------
    ValueError
        ``adata`` was not set up, or was set up with ``setup_mudata``.
    """
    record = load_record(adata, "AnnData", "RegularizedVI.setup_anndata(adata, ...)")
    if "modalities" in record:
        raise ValueError("This object was set up with setup_mudata (for RegularizedMultimodalVI), not setup_anndata.")
    return AnnDataSetup(layer=record["layer"], keys=CovariateKeys(**record["keys"]),
                        categories=record.get("categories"), counts=record.get("counts"))


def check_var_names(expected, adata, what: str = "adata") -> None:
    """Raise ``ValueError`` when ``adata`` does not have exactly the genes ``expected``, in order.

    Parameters
    ----------
    expected
        The model's feature names.
    adata
        The AnnData (or one modality of a MuData) to check.
    what
        What to call ``adata`` in the message, e.g. ``"mdata.mod['rna']"``.
    """
    # as text: h5ad stores names as strings, so a model of integer-named genes must load onto its file
    actual, expected = names_as_text(adata.var_names), names_as_text(expected)
    if actual.equals(expected):
        return
    # a modality of a MuData holds features (peaks, genes): named as such
    noun = "features" if ".mod[" in what else "genes"
    missing = expected.difference(actual)
    extra = actual.difference(expected)
    detail = []
    if len(missing):
        detail.append(f"{len(missing)} of the model's {noun} missing (e.g. {list(missing[:3])})")
    if len(extra):
        detail.append(f"{len(extra)} {noun} unknown to the model (e.g. {list(extra[:3])})")
    if not detail:
        detail.append(f"the same {noun} in a different order")
    # a backed AnnData's subset is a view that cannot be copied into memory: a new backed file holds it, written a
    # block of cells at a time (anndata's copy(filename=) of a gene subset reads the whole matrix)
    fix = (f"a new backed file written a block of cells at a time: for each block `part = {what}[start:stop]"
           f".to_memory()[:, model_genes]` and `part.write_h5ad(f'part_{{start}}.h5ad')`, then "
           "`anndata.experimental.concat_on_disk(part_files, 'subset.h5ad')`, opened with backed='r' "
           f"(`{what}[:, model_genes].copy(filename='subset.h5ad')` does it in one step where the whole matrix fits in "
           "memory)" if getattr(adata, "isbacked", False) else f"`{what}[:, model_genes]`")
    raise ValueError(
        f"The {noun} of {what} do not match the model's ({len(expected)} {noun}): {'; '.join(detail)}. "
        f"Subset and order them with {fix}, model_genes being the model's {noun} in its order (the var_names of the "
        "data it was trained on)."
    )
