"""Categories in which no cell has counts in a modality, while that modality has parameters per category.

A multimodal model masks the likelihood of a cell without counts in a modality m. When every cell of a category
(say batch ``batch_2``) lacks m, nothing in the ELBO informs m's parameters of that category (its feature scaling,
dispersion, ambient background, library-size group): their posterior is the prior, and would be reported and
exported like fitted values. The model says so when it is built.
"""

from __future__ import annotations

import warnings

import pandas as pd

from .._stacklevel import user_stacklevel
from ..data import CellData

#: per-category parameters of a modality: (their name in the warning, the covariate table, the key role)
_PER_CATEGORY = (("feature scaling", "scaling_index", "feature_scaling"), ("dispersion", "dispersion_index", "dispersion"),
                 ("ambient", "ambient_index", "ambient"), ("library size", "library_index", "library_size"))


def categories_without_counts(data: CellData, modality: str, parameters: set[str]) -> dict[tuple[str, str], list[str]]:
    """``{(key, category): [parameter names]}`` for the categories whose cells all lack counts in ``modality``.

    Parameters
    ----------
    data
        The model's cells, with counts under ``"x_<modality>"``.
    modality
        The modality.
    parameters
        The per-category parameters the modality has (names of :data:`_PER_CATEGORY`).
    """
    measured = data.modalities[f"x_{modality}"].totals() > 0
    encoding = data.encoding
    found: dict[tuple[str, str], list[str]] = {}
    for name, table, role in _PER_CATEGORY:
        keys = getattr(encoding.keys, role)
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        if name not in parameters or not keys:
            continue
        # the stacked codes run over the keys' categories in key order: code j is the j-th (key, category)
        levels = [(key, str(c)) for key in keys for c in encoding.categories[key]]
        codes = data.covariates[table].numpy().reshape(len(measured), -1)
        for j, level in enumerate(levels):
            cells = (codes == j).any(1)
            if cells.any() and not measured[cells].any():  # a category without cells here is not this case
                found.setdefault(level, []).append(name)
    return found


def warn_categories_without_counts(data: CellData, modalities: list[str], ambient_modalities: list[str],
                                   scaling_modalities: list[str]) -> dict[str, dict[tuple[str, str], list[str]]]:
    """Warn, per modality and category, when no cell of the category has counts in the modality while the
    modality's parameters are keyed by it: those parameters stay at their prior.

    Parameters
    ----------
    data
        The model's cells.
    modalities, ambient_modalities, scaling_modalities
        The modalities, and those with an ambient background and with feature scaling.

    Returns
    -------
    dict
        Per modality, :func:`categories_without_counts`'s ``{(key, category): [parameter names]}``.
    """
    found = {}
    for m in modalities:
        parameters = {"dispersion", "library size"}
        parameters |= {"ambient"} if m in ambient_modalities else set()
        parameters |= {"feature scaling"} if m in scaling_modalities else set()
        found[m] = categories_without_counts(data, m, parameters)
        for (key, category), names in found[m].items():
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            warnings.warn(
                f"modality {m!r} has no cell with counts in {key} {category!r}: its {category} {listed} are the "
                f"prior's, not fitted (the model masks the likelihood of a cell without {m!r} counts), and are "
                f"reported and exported as such. Leave {category!r} out of comparisons of {m!r}, or key these "
                f"parameters by a column whose every category has cells with {m!r} counts.", UserWarning,
                stacklevel=user_stacklevel())
    return found


def warn_categories_without_cells(obs, encoding) -> dict[str, list[str]]:
    """Warn when a category recorded at setup has no cell in the data a new model is built on.

    Set up on every cell and built on a subset, the model keeps the setup's categories: a category without a cell
    there has its ambient profile, feature scaling, dispersion, library prior and network columns at their initial
    values, and the getters and the export reported them like fitted ones (an ambient profile of 1e-8 for every gene).
    A loaded or query model is not built anew: its categories were fitted on other cells.

    Parameters
    ----------
    obs
        The cell table of the data the model is built on.
    encoding
        The covariate encoding recorded at setup.

    Returns
    -------
    dict
        ``{key: [categories without a cell]}``.
    """
    found = {}
    for key, categories in (encoding.categories or {}).items():
        column = obs[key]
        # the labels used, as text (as the setup records them): from the categories, or the distinct values
        used = (column.cat.remove_unused_categories().cat.categories if isinstance(column.dtype, pd.CategoricalDtype)
                else pd.Index(column.dropna().unique()))
        present = set(used.astype(str))
        missing = [c for c in categories if c not in present]
        if missing:
            found[key] = missing
    if found:
        listed = "; ".join(f"{key!r}: {missing[:5]}" for key, missing in found.items())
        warnings.warn(f"categories recorded at setup have no cell in the data this model is built on ({listed}): the "
                      "parameters keyed by them (ambient profile, feature scaling, dispersion, library prior, network "
                      "columns) stay at their initial values and are reported as such. Run setup_anndata on the cells "
                      "the model trains on to leave them out.", UserWarning, stacklevel=user_stacklevel())
    return found
