"""NDreamer's Leiden pseudo-labels: small groups keep positives for the triplet term."""
from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

import pyro_scmodels as ps
from pyro_scmodels.ndreamer import preprocess
from pyro_scmodels.ndreamer.preprocess import pseudo_labels


def _log_expression(n_cells: int, seed: int = 0) -> sp.csr_matrix:
    counts = ps.datasets.simulate(n_cells=n_cells, n_genes=200, seed=seed).layers["counts"]
    counts = np.asarray(counts.todense() if sp.issparse(counts) else counts, dtype=float)
    return sp.csr_matrix(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4), dtype=np.float32)


def _share_with_a_positive(labels: np.ndarray) -> float:
    sizes = np.bincount(labels)
    return float((sizes[labels] > 1).mean())


def test_a_small_group_keeps_positives_at_the_high_resolution(caplog, monkeypatch):
    # 60 cells at resolution 7 left 57 % of them alone in their label (no positive for the triplet term)
    groups = np.repeat(np.array(["batch_0|ctrl", "batch_1|ctrl"]), 60)  # NDreamer's batch x condition labels
    x = sp.vstack([_log_expression(60, seed=0), _log_expression(60, seed=1)]).tocsr()
    with monkeypatch.context() as plain:  # the case is real here: without the lowering most cells are alone
        plain.setattr(preprocess, "LEIDEN_MAX_SINGLETON_SHARE", 1.0)
        _, at_seven = pseudo_labels(x, groups)
    assert max(_share_with_a_positive(at_seven[groups == group]) for group in set(groups)) < 0.7
    with caplog.at_level(logging.INFO, logger=preprocess.__name__):
        low, high = pseudo_labels(x, groups)
    for group in ("batch_0|ctrl", "batch_1|ctrl"):
        assert _share_with_a_positive(high[groups == group]) >= 0.9
        assert len(np.unique(high[groups == group])) >= len(np.unique(low[groups == group]))
    assert not set(high[groups == "batch_0|ctrl"]) & set(high[groups == "batch_1|ctrl"])  # unique across groups
    # the label as the user knows it (it read "group np.str_('batch_0|ctrl')")
    assert "group 'batch_0|ctrl' (60 cells) split into single cells" in caplog.text


def test_a_large_group_keeps_its_high_resolution_labels(monkeypatch):
    x, groups = _log_expression(480), np.zeros(480, dtype=int)
    _, high = pseudo_labels(x, groups)
    monkeypatch.setattr(preprocess, "LEIDEN_MAX_SINGLETON_SHARE", 1.0)  # never lowered: the plain resolution 7
    _, plain = pseudo_labels(x, groups)
    np.testing.assert_array_equal(high, plain)
