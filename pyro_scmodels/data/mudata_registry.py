"""MuData setup: the modalities, layers and ``.obs`` columns a multimodal model reads, validated once.

The MuData counterpart of :mod:`.registry`: ``setup_mudata`` validates the counts of every
modality, fits the covariate encoding on ``mdata.obs`` and records the modalities, layers,
covariate keys, categories and count fingerprints in ``mdata.uns`` (as JSON).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _validation as V
from .._stacklevel import user_stacklevel
from .counts import CountMatrix
from .covariates import CovariateEncoding, CovariateKeys, resolve_covariate_keys
from .on_disk import refuse_backed_csc
from .registry import SETUP_UNS_KEY, _RecordedEncoding, check_unique_names, load_record, validated


def _unaligned(modality: str, held, cells) -> str:
    """What is wrong with a modality's cells against ``mdata.obs``, and the fix for that case.

    One hint (``mu.pp.intersect_obs``) was given for every case: it drops cells without the modality, which the
    model can keep, and does not reorder cells.
    """
    held, cells = pd.Index(held), pd.Index(cells)
    start = f"Modality {modality!r} does not hold the cells of mdata.obs in the same order"
    if not held.is_unique:
        repeated = list(held[held.duplicated()].unique()[:3])
        return (f"{start}: it names cells more than once (e.g. {repeated}); make them unique "
                f"(`mdata.mod[{modality!r}].obs_names_make_unique()`, then `mdata.update()`).")
    fix_order = f"`mdata.mod[{modality!r}] = mdata.mod[{modality!r}][mdata.obs_names].copy()`"
    missing, extra = cells.difference(held, sort=False), held.difference(cells, sort=False)
    if not len(missing) and not len(extra):
        return f"{start}: it holds the same cells in another order. Reorder it: {fix_order}."
    parts = []
    if len(extra):
        parts.append(f"it holds {len(extra)} cell(s) not in mdata.obs (e.g. {list(extra[:3])}): call `mdata.update()` "
                     "after changing a modality, or drop them")
    if len(missing):
        parts.append(f"it lacks {len(missing)} of its cells (e.g. {list(missing[:3])}). A cell without a modality's "
                     "counts is modelled from its other modalities when the modality holds it as a row of zeros: add "
                     f"such rows in mdata.obs order (then {fix_order}), or keep only the cells with every modality "
                     "(`mu.pp.intersect_obs(mdata)`)")
    return f"{start}: " + "; ".join(parts) + "."


def modality_counts(mdata, modality: str, layer: str | None, validate: bool = True) -> CountMatrix:
    """The raw-count matrix of one modality of a MuData (cells without counts are allowed).

    Parameters
    ----------
    mdata
        MuData whose modalities hold the cells of ``mdata.obs`` in the same order.
    modality
        Name of the modality in ``mdata.mod``.
    layer
        Layer of raw counts in that modality; None for ``.X``.
    validate
        Check every value (see :meth:`CountMatrix.validate`).

    Returns
    -------
    CountMatrix

    Raises
    ------
    ValueError
        The modality's cells are not those of ``mdata.obs`` in the same order, or its counts are a backed matrix
        stored as CSC.
    KeyError
        ``layer`` is not a layer of the modality.
    """
    adata = mdata.mod[modality]
    if list(adata.obs_names) != list(mdata.obs_names):
        raise ValueError(_unaligned(modality, adata.obs_names, mdata.obs_names))
    if layer is None:
        matrix, name = adata.X, f"mdata.mod[{modality!r}].X"
    else:
        V.present(layer, adata.layers, f"mdata.mod[{modality!r}].layers", "layer")
        matrix, name = adata.layers[layer], f"mdata.mod[{modality!r}].layers[{layer!r}]"
    refuse_backed_csc(matrix, name)  # a backed modality (read_h5mu(backed=True)) stored as CSC
    return CountMatrix(matrix, name=name, validate=validate, allow_empty_cells=True)


@dataclass
class MuDataSetup(_RecordedEncoding):
    """What :func:`setup_mudata` recorded in ``mdata.uns``.

    Attributes
    ----------
    modalities
        Modalities to model, in the order of the latent blocks.
    layers
        Layer of raw counts per modality (None: ``.X``).
    keys
        The ``mdata.obs`` columns of each covariate role, shared by all modalities.
    categories
        Category order of every categorical key, fitted at setup.
    counts
        Fingerprint per modality of the count matrix validated at setup.
    """

    table: ClassVar[str] = "mdata.obs"

    modalities: list[str]
    layers: dict[str, str | None]
    keys: CovariateKeys
    categories: dict[str, list[str]] | None = None
    counts: dict[str, dict] | None = None

    def count_sources(self, mdata) -> dict[str, object]:
        """Each modality's count matrix, as stored (not read or converted).

        Parameters
        ----------
        mdata
            A MuData with this setup's modalities and layers.

        Returns
        -------
        dict
            ``{"mdata.mod['<m>']" (+ ``.layers['<layer>']``): matrix}`` per modality, named for messages.

        Raises
        ------
        KeyError
            A modality's layer is missing.
        """
        sources = {}
        for m in self.modalities:
            modality, layer = mdata.mod[m], self.layers.get(m)
            if layer is not None:
                V.present(layer, modality.layers, f"mdata.mod[{m!r}].layers", "layer")
            sources[f"mdata.mod[{m!r}]" + ("" if layer is None else f".layers[{layer!r}]")] = (
                modality.X if layer is None else modality.layers[layer])
        return sources

    def count_matrices(self, mdata, validate: bool | None = None) -> dict[str, CountMatrix]:
        """The counts of every modality of ``mdata``, as ``{"x_<modality>": CountMatrix}``.

        ``validate`` as in :func:`~pyro_scmodels.data.registry.validated`: by default only the
        counts changed since setup are validated again.
        """
        recorded = self.counts or {}
        matrices = {
            f"x_{m}": validated(modality_counts(mdata, m, self.layers.get(m), validate=False), recorded.get(m), validate)
            for m in self.modalities
        }
        if any(matrix.validated for matrix in matrices.values()):  # read again (new or changed counts): checked again
            _check_every_cell_has_counts(matrices.values(), mdata.n_obs)
        return matrices

    def to_json(self) -> str:
        """The record as stored in ``.uns``."""
        return json.dumps({"modalities": self.modalities, "layers": self.layers, "keys": self.keys.to_dict(),
                           "categories": self.categories, "counts": self.counts})


def _check_every_cell_has_counts(matrices, n_cells: int) -> None:
    """Raise if a cell has no counts in any modality (one empty modality is fine: its terms are masked)."""
    totals = np.zeros(n_cells)
    for counts in matrices:
        totals += counts.totals()
    if (totals <= 0).any():
        raise ValueError(f"{int((totals <= 0).sum())} cell(s) have no counts in any modality (first at row "
                         f"{int(np.flatnonzero(totals <= 0)[0])}); remove them first.")



#: stored values a modality's first block must hold before its 0/1 content is read as binarised
BINARISED_MIN_VALUES = 1000


def _warn_if_binarised(counts: CountMatrix, name: str) -> None:
    """Warn when the first block of cells of a modality holds only 0 and 1 (binarised peaks, a common ATAC
    preprocessing): the likelihood is a count model, and such data fit it badly without an error (docs/multimodal.md:
    the predictive check flags them). Only the first block is read, so a backed modality is not read twice."""
    start, stop, block = next(counts.chunks())
    values = block.data if sp.issparse(block) else np.asarray(block).ravel()
    values = values[values != 0]
    if values.size >= BINARISED_MIN_VALUES and values.max() <= 1:
        warnings.warn(f"{name} holds only 0 and 1 in its first {stop - start} cells ({values.size} non-zero values): "
                      "binarised, not counts. The model's likelihood is for counts (negative binomial): it trains, but "
                      "fits such data badly (the predictive check flags binarised ATAC). Pass the fragment or read "
                      "counts if you have them.", UserWarning, stacklevel=user_stacklevel())

def _refuse_keys_only_in_a_modality(mdata, keys: list[str]) -> None:
    """``KeyError`` for a covariate column that is in a modality's obs but not in ``mdata.obs`` (the message listed
    no columns, without saying where the column was nor that MuData copies them up on request)."""
    for key in keys:
        if key in mdata.obs.columns:
            continue
        holders = [m for m, modality in mdata.mod.items() if key in modality.obs.columns]
        if holders:
            raise KeyError(f"Column {key!r} is in mdata.mod[{holders[0]!r}].obs but not in mdata.obs, where the covariates "
                           f"are read: copy it up with mdata.pull_obs(prefix_unique=False) (plain pull_obs() names it "
                           f"'{holders[0]}:{key}'), or set mdata.obs[{key!r}] yourself.")


def require_mudata(data, call: str) -> None:
    """Refuse an object without modalities (e.g. an AnnData) where a MuData is needed.

    Parameters
    ----------
    data
        What ``call`` was given.
    call
        The call that needs a MuData, for the message (e.g. ``"RegularizedMultimodalVI.setup_mudata"``).

    Raises
    ------
    TypeError
        ``data`` has no ``.mod``: naming its type and shape, and what to use instead.
    """
    if hasattr(data, "mod"):
        return
    shape = f" of {data.shape[0]} cells x {data.shape[1]} features" if len(getattr(data, "shape", ())) == 2 else ""
    raise TypeError(f"{call} takes a MuData (paired modalities in mdata.mod); it was given {type(data).__name__}{shape}. "
                    "For one modality use RegularizedVI (RegularizedVI.setup_anndata(adata, ...), then RegularizedVI(adata)); "
                    "for several, build a MuData of them, e.g. mudata.MuData({'rna': rna, 'atac': atac}).")


def setup_mudata(mdata, modalities=None, layer=None, **covariate_arguments) -> MuDataSetup:
    """Validate ``mdata`` once, fit the covariate encoding once, and record both in ``mdata.uns``.

    See :meth:`pyro_scmodels.RegularizedMultimodalVI.setup_mudata` for the arguments.

    Parameters
    ----------
    mdata
        MuData of raw counts with paired cells; covariates are read from ``mdata.obs``.
    modalities
        Modalities to model, in the order of the latent blocks; default all of ``mdata.mod``.
    layer
        Layer of raw counts: one name for every modality, or a dict per modality; None for ``.X``.
    **covariate_arguments
        Passed to :func:`~pyro_scmodels.data.resolve_covariate_keys`.

    Returns
    -------
    MuDataSetup
        The record, as also stored in ``mdata.uns``.
    """
    if isinstance(modalities, str):  # one name, not its letters
        modalities = [modalities]
    if isinstance(modalities, dict):
        raise V.ArgumentTypeError("modalities must be a list of modality names (in the order of the latent blocks); "
                                  "give each modality's counts layer with layer={modality: layer} instead of a dict here.")
    require_mudata(mdata, "RegularizedMultimodalVI.setup_mudata")
    modalities = list(mdata.mod) if modalities is None else list(modalities)
    unknown = [m for m in modalities if m not in mdata.mod]
    if unknown or not modalities:
        raise ValueError(f"Unknown modalities {unknown} (mdata has {list(mdata.mod)}).")
    repeated = sorted({m for m in modalities if modalities.count(m) > 1})
    if repeated:
        raise ValueError(f"modalities names {repeated} more than once; name each modality once.")
    # a dict must name every modality: a misspelt or missing key silently read that modality's .X (None: .X)
    layers = per_modality("layer", layer, modalities)
    keys = resolve_covariate_keys(**covariate_arguments)
    for m in modalities:  # a feature named twice passed setup and training, then DE and gene_list= failed in pandas
        check_unique_names(mdata.mod[m], f"mdata.mod[{m!r}]")
    matrices = {m: modality_counts(mdata, m, layers.get(m)) for m in modalities}  # validated here, once
    fingerprints = {m: counts.fingerprint for m, counts in matrices.items()}
    _check_every_cell_has_counts(matrices.values(), mdata.n_obs)
    for m, counts in matrices.items():
        _warn_if_binarised(counts, f"mdata.mod[{m!r}]")
    _refuse_keys_only_in_a_modality(mdata, [*keys.categorical_keys(), *keys.continuous])
    encoding = CovariateEncoding(keys).fit(mdata.obs, "mdata.obs")
    encoding.continuous(mdata.obs, "mdata.obs")
    setup = MuDataSetup(modalities, layers, keys, encoding.categories, fingerprints)
    mdata.uns[SETUP_UNS_KEY] = setup.to_json()
    return setup


def read_mudata_setup(mdata) -> MuDataSetup:
    """The setup recorded by :func:`setup_mudata`.

    Raises
    ------
    TypeError
        ``mdata`` is not a MuData (:func:`require_mudata`).
    ValueError
        ``mdata`` was not set up, or was set up with ``setup_anndata``.
    """
    require_mudata(mdata, "RegularizedMultimodalVI")
    record = load_record(mdata, "MuData", "RegularizedMultimodalVI.setup_mudata(mdata, ...)")
    if "modalities" not in record:
        raise ValueError("This object was set up for RegularizedVI (setup_anndata), not with setup_mudata.")
    return MuDataSetup(modalities=record["modalities"], layers=record["layers"], keys=CovariateKeys(**record["keys"]),
                       categories=record.get("categories"), counts=record.get("counts"))


def per_modality(name: str, value, modalities: list[str], check=None, loading: bool = False) -> dict:
    """One value for every modality: ``value`` itself for each, or a dict with exactly one entry per modality.

    Parameters
    ----------
    name
        The argument's name, for messages (``"layer"``, ``"n_latent"``).
    value
        One value, or a dict ``{modality: value}``.
    modalities
        The modalities, in order.
    check
        ``check(label, value) -> value`` applied to each value (e.g. ``_validation.positive_int``); None keeps them.
    loading
        A dict naming modalities the model does not have warns instead of raising (a saved model still loads).

    Returns
    -------
    dict
        ``{modality: value}`` in the order of ``modalities``.

    Raises
    ------
    ValueError
        A dict without an entry for a modality (a misspelt key left it to the default silently), or with
        entries for modalities that do not exist.
    """
    check = check or (lambda label, item: item)
    if not isinstance(value, dict):
        return {m: check(name, value) for m in modalities}
    missing = [m for m in modalities if m not in value]
    unknown = [m for m in value if m not in modalities]
    if missing:
        hint = f" (did you mean {unknown} for {missing}?)" if unknown else ""
        raise ValueError(f"{name} has no entry for modality {missing}{hint}; give one per modality {modalities}.")
    if unknown:
        message = f"{name} names modalities the model does not have: {unknown}; its modalities are {modalities}."
        if not loading:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=user_stacklevel())
    return {m: check(f"{name}[{m!r}]", value[m]) for m in modalities}
