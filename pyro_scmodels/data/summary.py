"""A readable summary of what a setup recorded (scvi-tools' ``view_anndata_setup``)."""

from __future__ import annotations

from .mudata_registry import read_mudata_setup
from .registry import read_setup

# setup argument -> (CovariateKeys field, what "none" means for it)
_ROLES = (
    ("ambient_covariate_keys", "ambient", "no ambient background term per category"),
    ("nn_conditioning_covariate_keys", "nn_conditioning", "decoder not conditioned on covariates"),
    ("feature_scaling_covariate_keys", "feature_scaling", "one scaling factor per gene for all cells"),
    ("dispersion_key", "dispersion", "one dispersion per gene"),
    ("library_size_key", "library_size", "one library-size prior"),
    ("encoder_covariate_keys", "encoder", "encoder sees counts only"),
    ("continuous_covariate_keys", "continuous", "none"),
)
_SHOWN_CATEGORIES = 8


def describe_setup(data, setup=None) -> str:
    """What ``setup_anndata`` / ``setup_mudata`` recorded for ``data``, as printable text.

    Parameters
    ----------
    data
        An AnnData or MuData that has been set up.
    setup
        The setup to describe instead of the one recorded in ``data`` (a model's own: its keys and category
        order, which a later ``setup_anndata`` on the same object does not change).

    Returns
    -------
    str
        Cells and features, where the counts are read, and for each covariate role the
        ``.obs`` columns with their categories.
    """
    is_mudata = hasattr(data, "mod")
    if setup is None:
        setup = read_mudata_setup(data) if is_mudata else read_setup(data)
    lines = [f"{'MuData' if is_mudata else 'AnnData'} set up for pyro_scmodels: {data.n_obs} cells"]
    if is_mudata:
        for m in setup.modalities:
            lines.append(f"  modality {m!r}: {data.mod[m].n_vars} features, counts in {_where(f'mdata.mod[{m!r}]', setup.layers.get(m))}")
    else:
        lines.append(f"  {data.n_vars} genes, counts in {_where('adata', setup.layer)}")
    categories = setup.categories or {}
    lines.append("  covariates (setup argument: column -> categories):")
    for argument, field, meaning in _ROLES:
        keys = getattr(setup.keys, field)
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        if not keys:
            lines.append(f"    {argument}: none ({meaning})" if meaning != "none" else f"    {argument}: none")
            continue
        for key in keys:
            lines.append(f"    {argument}: {key!r} -> {_categories(categories.get(key))}")
    return "\n".join(lines)


def _where(table: str, layer: str | None) -> str:
    return f"{table}.X" if layer is None else f"{table}.layers[{layer!r}]"


def _categories(levels: list[str] | None) -> str:
    if levels is None:
        return "numeric"
    shown = ", ".join(levels[:_SHOWN_CATEGORIES]) + (", ..." if len(levels) > _SHOWN_CATEGORIES else "")
    return f"{len(levels)} categories ({shown})"
