"""Aligning a query's genes to a reference's: reorder, zero-pad, drop the unknown.

Used by reference mapping (``RegularizedVI.prepare_query_anndata``):
a model reads genes by position, so a query must have exactly the reference's genes, in order.
"""

from __future__ import annotations

import copy
import warnings

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._stacklevel import user_stacklevel
from .registry import SETUP_UNS_KEY


def _columns(matrix, take: np.ndarray):
    """Columns ``take`` of ``matrix`` (-1: a column of zeros), sparse or dense as given."""
    present = take >= 0
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)
        # a 0/1 selection matrix picks, reorders and pads the columns in one sparse product
        selection = sp.csr_matrix((np.ones(int(present.sum()), dtype=matrix.dtype), (take[present], np.flatnonzero(present))),
                                  shape=(matrix.shape[1], len(take)))
        return (matrix @ selection).tocsr()
    matrix = np.asarray(matrix)
    out = np.zeros((matrix.shape[0], len(take)), dtype=matrix.dtype)
    out[:, present] = matrix[:, take[present]]
    return out


def _padded_var(var: pd.DataFrame, genes) -> pd.DataFrame:
    """``var`` in the reference's gene order, a padded gene's row holding a value of its column's type.

    reindex leaves NaN there, which turns a bool column into an object column that h5py cannot write (the query's
    ``write_h5ad``, and ``save(save_anndata=True)``, failed): False for a bool column, "" for a text one.
    """
    padded = var.reindex(genes)
    added = ~pd.Index(genes).isin(var.index)
    if not added.any():
        return padded
    for column in var.columns:
        if pd.api.types.is_bool_dtype(var[column]):
            padded[column] = padded[column].astype(object).where(~added, False).astype(bool)
        elif var[column].dtype == object and var[column].map(lambda v: isinstance(v, str)).all():
            padded[column] = padded[column].where(~added, "")
    return padded


def _aligned_fields(adata, genes: pd.Index) -> dict | None:
    """The fields of ``adata`` with its genes reordered and padded to ``genes``; None if they already match."""
    query = pd.Index(adata.var_names)
    if query.has_duplicates:
        raise ValueError(f"adata.var_names has duplicates (e.g. {list(query[query.duplicated()][:3])}); "
                         "call adata.var_names_make_unique() first.")
    if query.equals(genes):
        return None
    if getattr(adata, "isbacked", False):
        # every cell's row is rewritten (reordered, zero-padded): anndata has no way to add or move columns on disk
        raise ValueError(
            f"adata is backed on disk ({adata.filename}) and its genes differ from the reference's; aligning them "
            "rewrites every cell's row, which is done in memory. If it fits in memory: `adata = adata.to_memory()`. "
            "If not, align it a block of cells at a time and join the blocks on disk: for each block, "
            "`part = adata[start:stop].to_memory()`, `RegularizedVI.prepare_query_anndata(part, model)`, "
            "`part.write_h5ad(f'part_{start}.h5ad')`; then `anndata.experimental.concat_on_disk(part_files, "
            "'query_aligned.h5ad')` and open that file with backed='r' (see 'Genes' under reference mapping in "
            "docs/query_mapping.md).")
    take = query.get_indexer(genes)
    n_missing, n_dropped = int((take < 0).sum()), int(len(query.difference(genes)))
    if n_missing == len(genes):
        raise ValueError(f"None of the reference's {len(genes)} genes are in adata.var_names (e.g. reference "
                         f"{list(genes[:3])}, query {list(query[:3])}); are both named the same way (symbols or IDs)?")
    if n_missing:
        warnings.warn(
            f"{n_missing} of the reference's {len(genes)} genes are missing from the query and are filled with zeros "
            f"({n_dropped} query genes unknown to the reference are dropped; gene-indexed .varm/.varp entries are dropped). "
            "Many zero-filled genes lower the quality of the mapping.", stacklevel=user_stacklevel(),
        )
    # gene-indexed tables follow the genes when nothing is padded; padded rows would have no value
    varm = {} if n_missing else {k: (v.iloc[take] if isinstance(v, pd.DataFrame) else v[take]) for k, v in adata.varm.items()}
    varp = {} if n_missing else {k: v[take][:, take] for k, v in adata.varp.items()}
    uns = {k: v for k, v in adata.uns.items() if k != SETUP_UNS_KEY}  # a setup of the old genes no longer applies
    return {
        "X": None if adata.X is None else _columns(adata.X, take), "obs": adata.obs.copy(), "var": _padded_var(adata.var, genes),
        "uns": uns, "obsm": dict(adata.obsm), "obsp": dict(adata.obsp), "varm": varm, "varp": varp,
        "layers": {k: _columns(v, take) for k, v in adata.layers.items()}, "raw": adata.raw,
    }


def align_genes(adata, genes: pd.Index, inplace: bool):
    """Reorder the genes of ``adata`` to ``genes``: missing ones become zero columns, unknown ones are dropped.

    Parameters
    ----------
    adata
        AnnData in memory (``.X`` and every layer are aligned; sparse stays sparse).
    genes
        The gene names wanted, in order.
    inplace
        Change ``adata`` and return None; False returns a new AnnData (a copy when nothing changes).

    Returns
    -------
    anndata.AnnData or None

    Notes
    -----
    ``.var`` is reindexed (NaN for padded genes); gene-indexed ``.varm``/``.varp`` entries are
    reordered, or dropped when genes were padded; a setup record in ``.uns`` is dropped. A
    warning says how many genes were filled with zeros.
    """
    if inplace and getattr(adata, "is_view", False):
        raise ValueError("adata is a view of another AnnData; align a copy instead: `adata = adata.copy()`.")
    fields = _aligned_fields(adata, genes)
    if inplace:
        if fields is not None:
            # anndata has no public way to change the genes of an object in place; scvi-tools does the same
            adata._init_as_actual(**fields)
        return None
    if fields is None:
        return adata.copy()
    # a new object: the cell-indexed fields shared the input's arrays, so an edit of the copy changed the input
    for name in ("uns", "obsm", "obsp"):
        fields[name] = copy.deepcopy(fields[name])
    # Raw.copy(), not a deep copy: that would copy the parent AnnData the Raw refers to, its counts and layers too
    fields["raw"] = None if fields["raw"] is None else fields["raw"].copy()
    return anndata.AnnData(**fields)
