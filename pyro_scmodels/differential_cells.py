"""Which cells of a comparison enter the posterior draws of differential expression.

Two narrowings of the groups :func:`pyro_scmodels.differential.comparisons` chose: cells without counts in the tested
modality (a multimodal model masks their likelihood) and, with ``filter_outlier_cells=True``, the cells that lie
outside their group's bulk in the latent space (scvi-tools' ``DifferentialComputation.filter_outlier_cells``).
"""

from __future__ import annotations

import warnings

import numpy as np

from ._stacklevel import user_stacklevel

OUTLIER_CONTAMINATION = 0.1  # sklearn's EllipticEnvelope default, which scvi-tools uses: a tenth of each group


def measured_cells_only(tests: list[tuple], totals: np.ndarray, modality: str) -> list[tuple]:
    """The comparisons without the cells that have no counts in ``modality`` (a multimodal model masks their
    likelihood, so their decoded expression carries nothing of that modality: counted, they pulled every LFC toward 0).
    Says how many cells were left out; a comparison with a group left without cells is left out with a warning when
    there are others, and refused when it is the only one."""
    measured = totals > 0
    kept, left_out, skipped = [], set(), []
    for name1, name2, cells1, cells2 in tests:
        empty = [(name, cells.size) for name, cells in ((name1, cells1), (name2, cells2))
                 if cells.size and not measured[cells].any()]
        if empty:
            message = (f"differential_expression: none of the {empty[0][1]} cells of {empty[0][0]!r} has counts in "
                       f"modality {modality!r}, so the model has nothing of that modality to compare for them")
            if len(tests) == 1:
                raise ValueError(message + "; choose groups with measured cells, or another modality=.")
            skipped.append(f"{name1} vs {name2}")  # one group of several (groupby, every group in turn): the others go on
            warnings.warn(message + f": the comparison {name1} vs {name2} is left out.", UserWarning,
                          stacklevel=user_stacklevel())
            continue
        for cells in (cells1, cells2):
            left_out.update(cells[~measured[cells]].tolist())
        kept.append((name1, name2, cells1[measured[cells1]], cells2[measured[cells2]]))
    if not kept:
        raise ValueError(f"differential_expression: no comparison has cells with counts in modality {modality!r} in both "
                         f"groups ({', '.join(skipped)}).")
    if left_out:
        warnings.warn(f"differential_expression: {len(left_out)} of the compared cells have no counts in modality "
                      f"{modality!r} (their likelihood is masked, their decoded {modality!r} is the model's guess from "
                      "the other modalities); they are left out of the test.", UserWarning,
                      stacklevel=user_stacklevel())
    return kept


def latent_inliers(latent: np.ndarray, seed: int = 0) -> np.ndarray:
    """Which cells of one group lie inside its bulk in the latent space: scvi-tools' outlier rule.

    A robust Gaussian (sklearn's ``EllipticEnvelope``: the minimum covariance determinant estimate of the group's
    mean and covariance) is fitted to the cells' latent representations; the cells whose robust Mahalanobis distance
    is among the largest ``OUTLIER_CONTAMINATION`` (a tenth, sklearn's default, as in scvi-tools) are outliers. So
    about a tenth of every group is left out, the farthest cells first, whether or not they are far in absolute
    terms. Where the covariance cannot be estimated (sklearn raises ``ValueError``, e.g. a group of one cell), every cell
    is kept with a warning, as scvi-tools does; a singular one (fewer cells than latent dimensions) is sklearn's
    warning, and its fit is used.

    Parameters
    ----------
    latent
        Cells x latent: the posterior means of z of the group's cells.
    seed
        Seed of the estimator's random subsets.

    Returns
    -------
    numpy.ndarray
        A boolean per cell, True for the cells kept.
    """
    from sklearn.covariance import EllipticEnvelope

    try:
        envelope = EllipticEnvelope(contamination=OUTLIER_CONTAMINATION, random_state=seed)
        return envelope.fit_predict(np.asarray(latent, dtype=np.float64)) == 1
    except ValueError as error:
        warnings.warn(f"filter_outlier_cells: the covariance of a group of {len(latent)} cells could not be estimated "
                      f"({error}); every cell of it is kept.", UserWarning, stacklevel=user_stacklevel())
        return np.ones(len(latent), dtype=bool)


def filter_outlier_cells(model, adata, tests: list[tuple], batch_size: int | None = None, seed: int = 0) -> list[tuple]:
    """The comparisons with each group's latent outliers left out (``differential_expression(filter_outlier_cells=True)``).

    As scvi-tools' ``filter_outlier_cells``: each group is filtered on its own, on the posterior means of z
    (``model.posterior_z``, what ``get_latent_representation`` returns), by :func:`latent_inliers`. One warning
    says how many cells of each group were left out.

    Parameters
    ----------
    model
        The fitted model (``posterior_z``).
    adata
        The data the cell positions refer to.
    tests
        ``(group1, group2, cells1, cells2)`` tuples (:func:`pyro_scmodels.differential.comparisons`).
    batch_size, seed
        Minibatch size of the latent query; seed of the robust fit.

    Returns
    -------
    list
        The comparisons with the outliers removed from ``cells1`` and ``cells2``.
    """
    cells = np.unique(np.concatenate([np.concatenate([c1, c2]) for _, _, c1, c2 in tests]))
    latent = model.posterior_z(adata, cells, batch_size)  # once per cell, shared by every comparison it enters
    kept, report = [], []
    for name1, name2, cells1, cells2 in tests:
        groups = []
        for name, group in ((name1, cells1), (name2, cells2)):
            inside = latent_inliers(latent[np.searchsorted(cells, group)], seed)  # cells: np.unique's, sorted
            groups.append(group[inside])
            report.append(f"{int((~inside).sum())} of {len(group)} in {name!r}" + ("" if len(tests) == 1 else
                                                                                 f" ({name1} vs {name2})"))
        kept.append((name1, name2, *groups))
    warnings.warn("filter_outlier_cells: left out of the posterior draws the cells outside their group's bulk in the "
                  f"latent space (a tenth of each group, scvi-tools' rule): {'; '.join(report)}. The raw_* columns "
                  "use every cell.", UserWarning, stacklevel=user_stacklevel())
    return kept
