"""Covariates: which ``.obs`` column drives which technical effect, and their encoding.

The user names columns by purpose (SPEC 1.1). :func:`resolve_covariate_keys` turns the
arguments of ``setup_anndata`` into a :class:`CovariateKeys`, and :class:`CovariateEncoding`
turns an ``.obs`` table into integer codes with the category order frozen, so that a new
AnnData is encoded exactly as the training data was.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .. import _validation as V
from .._stacklevel import user_stacklevel

# the purpose-specific arguments that `batch_key` fills in (and so clashes with)
_BATCH_FANOUT = ("ambient_covariate_keys", "dispersion_key", "library_size_key")


@dataclass
class CovariateKeys:
    """The ``.obs`` columns assigned to each role. Lists may be empty; single keys may be None."""

    ambient: list[str] = field(default_factory=list)
    nn_conditioning: list[str] = field(default_factory=list)
    feature_scaling: list[str] = field(default_factory=list)
    dispersion: str | None = None
    library_size: str | None = None
    encoder: list[str] = field(default_factory=list)
    continuous: list[str] = field(default_factory=list)

    def categorical_keys(self) -> list[str]:
        """Every categorical column used, each once, in a stable order."""
        keys = [*self.ambient, *self.nn_conditioning, *self.feature_scaling, *self.encoder]
        keys += [k for k in (self.dispersion, self.library_size) if k is not None]
        return list(dict.fromkeys(keys))

    def to_dict(self) -> dict:
        return asdict(self)


def setup_arguments(keys: dict) -> dict:
    """The ``setup_anndata`` / ``setup_mudata`` keyword arguments that reproduce recorded keys.

    Parameters
    ----------
    keys
        :meth:`CovariateKeys.to_dict` of a recorded setup.

    Returns
    -------
    dict
        ``ambient_covariate_keys``, ``nn_conditioning_covariate_keys``, ... as ``setup_anndata`` takes them.
    """
    return {
        "ambient_covariate_keys": keys["ambient"], "nn_conditioning_covariate_keys": keys["nn_conditioning"],
        "feature_scaling_covariate_keys": keys["feature_scaling"], "dispersion_key": keys["dispersion"],
        "library_size_key": keys["library_size"], "encoder_covariate_keys": keys["encoder"],
        "continuous_covariate_keys": keys["continuous"],
    }


def _as_list(value, argument: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    value = list(value)
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"`{argument}` must be a list of .obs column names, got {value!r}.")
    duplicated = sorted({v for v in value if value.count(v) > 1})
    if duplicated:
        raise ValueError(f"`{argument}` names {duplicated} more than once.")
    return value


def resolve_covariate_keys(
    batch_key=None,
    ambient_covariate_keys=None,
    nn_conditioning_covariate_keys=None,
    feature_scaling_covariate_keys=None,
    dispersion_key=None,
    library_size_key=None,
    encoder_covariate_keys=None,
    continuous_covariate_keys=None,
) -> CovariateKeys:
    """Apply the ``batch_key`` fan-out and the feature-scaling default; reject ambiguous combinations.

    ``batch_key`` means ``ambient_covariate_keys=[batch_key]``, ``dispersion_key=batch_key`` and
    ``library_size_key=batch_key``. It clashes only with those three (``ValueError`` naming the
    clash) and combines with every other key. When ``nn_conditioning_covariate_keys`` are given
    and ``feature_scaling_covariate_keys`` is None, the feature-scaling keys default to the
    conditioning keys (as in the public regularizedvi); pass ``feature_scaling_covariate_keys=[]``
    for a single shared scaling factor instead.
    """
    if batch_key is not None:
        given = {"ambient_covariate_keys": ambient_covariate_keys, "dispersion_key": dispersion_key,
                 "library_size_key": library_size_key}
        clashes = [name for name in _BATCH_FANOUT if given[name] is not None]  # [] or "" too: they ask for none
        if clashes:
            raise ValueError(
                f"`batch_key={batch_key!r}` cannot be combined with {', '.join(f'`{c}`' for c in clashes)}: "
                f"`batch_key` is a shortcut that fills {', '.join(_BATCH_FANOUT)}. Either drop `batch_key` and name "
                "each of those effects with its own key, or drop the clashing key(s). (Unlike scvi-tools' single "
                "batch_key, each technical effect has its own purpose-specific key here.)"
            )
        if not isinstance(batch_key, str):
            raise TypeError(f"`batch_key` must be one .obs column name, got {batch_key!r}.")
        ambient_covariate_keys, dispersion_key, library_size_key = [batch_key], batch_key, batch_key
    if nn_conditioning_covariate_keys is not None and feature_scaling_covariate_keys is None:
        # the public regularizedvi's default: each decoder-conditioning category gets its own scaling
        feature_scaling_covariate_keys = nn_conditioning_covariate_keys
    for name, value in (("dispersion_key", dispersion_key), ("library_size_key", library_size_key)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"`{name}` must be one .obs column name, got {value!r}.")
    keys = CovariateKeys(
        ambient=_as_list(ambient_covariate_keys, "ambient_covariate_keys"),
        nn_conditioning=_as_list(nn_conditioning_covariate_keys, "nn_conditioning_covariate_keys"),
        feature_scaling=_as_list(feature_scaling_covariate_keys, "feature_scaling_covariate_keys"),
        dispersion=dispersion_key,
        library_size=library_size_key,
        encoder=_as_list(encoder_covariate_keys, "encoder_covariate_keys"),
        continuous=_as_list(continuous_covariate_keys, "continuous_covariate_keys"),
    )
    return keys


def warn_if_encoder_keys_leak(keys: CovariateKeys, latent_independence: float) -> None:
    """Warn when the encoder is told covariates the decoder is not, and nothing keeps them out of z.

    A key the decoder is also given is the basal-state design (the encoder can remove the key's effect from z
    because the decoder adds it back); an encoder-only key can leak into z unless ``latent_independence`` > 0
    penalises z for carrying it. Raised when the model is built (at setup it warned to do what the documented
    setups' next line, ``RegularizedVI(..., latent_independence=10)``, does).

    Parameters
    ----------
    keys
        The model's covariate keys.
    latent_independence
        The model's penalty weight (0: off).
    """
    leaking = [key for key in keys.encoder if key not in keys.nn_conditioning]
    if leaking and not latent_independence > 0:
        warnings.warn(
            f"encoder_covariate_keys={leaking}: the encoder sees these covariates and the decoder does not, so their "
            "effects can leak into the latent space z (to keep them out of z, give them to "
            "nn_conditioning_covariate_keys as well, or train with RegularizedVI(..., latent_independence=10), which "
            "penalises z for carrying them).", stacklevel=user_stacklevel()
        )


def _check_present(obs: pd.DataFrame, key: str, table: str) -> None:
    V.present(key, obs.columns, table, "column")


def _refuse_numeric_as_category(column: pd.Series, key: str, table: str) -> None:
    """A numeric column is not taken as categories unless the user made it categorical (or text).

    A float or integer column (a QC metric, a continuous score) passed as a categorical key would
    silently become one category per distinct value: hundreds of ambient profiles, for example.
    """
    if isinstance(column.dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(column):
        return
    if pd.api.types.is_numeric_dtype(column):
        n_values = int(column.nunique())
        raise ValueError(
            f"{table}[{key!r}] is numeric ({column.dtype}, {n_values} distinct values) but is used as a categorical "
            f"covariate: each value would become its own category. If the values are labels, make the column "
            f"categorical first: {table}[{key!r}] = {table}[{key!r}].astype(str).astype('category'); if it is a "
            "continuous quantity, pass it in continuous_covariate_keys instead."
        )


def stacked_level_names(categories: dict[str, list]) -> list[str]:
    """Names of the stacked categories of several keys, as the models name a per-category table's rows.

    Parameters
    ----------
    categories
        ``{key: categories}``, in key order.

    Returns
    -------
    list of str
        ``"key=category"`` with several keys, the category alone with one, ``["all"]`` with none.
    """
    if not categories:
        return ["all"]
    several = len(categories) > 1
    return [f"{key}={c}" if several else str(c) for key, levels in categories.items() for c in levels]


class CovariateEncoding:
    """Integer codes of categorical covariates and values of continuous ones.

    Parameters
    ----------
    keys
        The roles of the columns.
    categories
        Category order per categorical key. When None, it is learned from ``obs`` (observed
        categories only, in the column's categorical order); when given (a trained model), a
        category absent from it raises ``ValueError``.
    """

    def __init__(self, keys: CovariateKeys, categories: dict[str, list[str]] | None = None):
        self.keys = keys
        self.categories = None if categories is None else {k: list(v) for k, v in categories.items()}

    def fit(self, obs: pd.DataFrame, table: str = "adata.obs") -> "CovariateEncoding":
        """Learn the category order of every categorical key from ``obs``."""
        categories = {}
        for key in self.keys.categorical_keys():
            _check_present(obs, key, table)
            column = obs[key]
            if column.isna().any():
                raise ValueError(
                    f"{table}[{key!r}] has {int(column.isna().sum())} missing (NaN) value(s); "
                    "fill or drop those cells before setup."
                )
            _refuse_numeric_as_category(column, key, table)
            cat = pd.Categorical(column).remove_unused_categories()
            categories[key] = [str(c) for c in cat.categories]
            if len(set(categories[key])) < len(categories[key]):  # e.g. 1 and "1": one label as text, two categories
                same = sorted({c for c in categories[key] if categories[key].count(c) > 1})[:5]
                raise ValueError(f"{table}[{key!r}] holds labels of different types that read the same as text "
                                 f"({same}, e.g. 1 and '1'); make the column one type first: "
                                 f"{table}[{key!r}] = {table}[{key!r}].astype(str).")
        for key in self.keys.continuous:
            _check_present(obs, key, table)
        self.categories = categories
        return self

    def codes(self, obs: pd.DataFrame, key: str, table: str = "adata.obs") -> np.ndarray:
        """Codes of ``obs[key]`` under the frozen category order; unseen categories raise."""
        _check_present(obs, key, table)
        column = obs[key]
        if column.isna().any():
            raise ValueError(f"{table}[{key!r}] has {int(column.isna().sum())} missing (NaN) value(s).")
        known = self.categories[key]
        values = column.astype(str).to_numpy()
        codes = pd.Categorical(values, categories=known).codes.astype(np.int64)
        if (codes < 0).any():
            unseen = sorted(set(values[codes < 0]))[:5]
            raise ValueError(
                f"{table}[{key!r}] has categories {unseen} that the model was not trained on "
                f"(known: {known[:10]}). A model cannot predict for an unseen {key!r}."
            )
        return codes

    def n_categories(self, keys: list[str]) -> int:
        return int(sum(len(self.categories[k]) for k in keys))

    def stacked_codes(self, obs: pd.DataFrame, keys: list[str], table: str = "adata.obs") -> np.ndarray:
        """Codes of several keys as columns, each offset so they index one stacked table.

        With no keys, one column of zeros (every cell in one shared category).
        """
        if not keys:
            return np.zeros((len(obs), 1), dtype=np.int64)
        columns, offset = [], 0
        for key in keys:
            columns.append(self.codes(obs, key, table) + offset)
            offset += len(self.categories[key])
        return np.stack(columns, axis=1)

    def stacked_span(self, keys: list[str], key: str, category) -> tuple[int, int, int]:
        """Where ``key``'s categories, and ``category`` among them, sit in a table stacked over ``keys``.

        Returns
        -------
        tuple
            ``(start, stop, column)``: the columns of ``key`` are ``start..stop-1`` (the order of
            :meth:`stacked_codes` and :meth:`level_names`) and ``category``'s is ``column``.

        Raises
        ------
        ValueError
            ``category`` is not one the encoding knows for ``key``.
        """
        known = self.categories[key]
        if str(category) not in known:
            raise ValueError(f"{category!r} is not a category of {key!r} known to the model ({known}).")
        start = self.n_categories(list(keys)[: list(keys).index(key)])
        return start, start + len(known), start + known.index(str(category))

    def continuous(self, obs: pd.DataFrame, table: str = "adata.obs") -> np.ndarray:
        """Continuous covariates as a float32 matrix (cells x keys)."""
        if not self.keys.continuous:
            return np.zeros((len(obs), 0), dtype=np.float32)
        values = []
        for key in self.keys.continuous:
            _check_present(obs, key, table)
            try:
                column = pd.to_numeric(obs[key]).to_numpy(dtype=np.float64)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{table}[{key!r}] is a continuous covariate but is not numeric.") from err
            if not np.all(np.isfinite(column)):
                raise ValueError(f"{table}[{key!r}] has NaN or Inf values; continuous covariates must be finite.")
            values.append(column)
        return np.stack(values, axis=1).astype(np.float32)

    def level_names(self, keys: list[str]) -> list[str]:
        """Names of the stacked categories of ``keys`` (``"key=category"``); ``["all"]`` with no keys."""
        return stacked_level_names({k: self.categories[k] for k in keys})
