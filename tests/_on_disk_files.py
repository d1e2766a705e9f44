"""Writing simulated cells to an ``.h5ad`` that the on-disk tests open with ``backed="r"``."""

import numpy as np
import scipy.sparse as sp


def write_counts_h5ad(adata, path, keep_counts_layer: bool = False) -> str:
    """Put ``adata.layers["counts"]`` in ``X`` as a float32 CSR and write ``adata`` to ``path``.

    Parameters
    ----------
    adata
        Cells from :func:`pyro_scmodels.datasets.simulate` (raw counts in ``layers["counts"]``);
        changed in place, so the in-memory copy and the file hold the same ``X``.
    path
        Where to write.
    keep_counts_layer
        Keep the ``"counts"`` layer as well (by default it is dropped, so only ``X`` holds counts).

    Returns
    -------
    str
        ``path``.
    """
    counts = adata.layers["counts"] if keep_counts_layer else adata.layers.pop("counts")
    adata.X = sp.csr_matrix(counts, dtype=np.float32)
    adata.write_h5ad(path)
    return str(path)
