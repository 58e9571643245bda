"""hx.pp.log_normalize: hespotex's normalisation returned as a matrix, the table left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import hespotex as hx


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def test_log_normalize_equals_normalize_and_changes_nothing(sample_factory):
    sdata = sample_factory(n_spots=30, n_genes=12, seed=4)
    table = sdata.tables["table"]
    before = table.X.copy()
    genes = ["g7", "g2", "g5"]
    values = hx.pp.log_normalize(sdata, genes)  # a SpatialData: its table
    expected = hx.pp.normalize(table, copy=True)[:, genes].X  # library over all 12 genes, then the subset
    np.testing.assert_allclose(values, _dense(expected), rtol=1e-5)
    assert values.dtype == np.float32 and values.shape == (30, 3)
    np.testing.assert_array_equal(_dense(table.X), _dense(before))
    assert "log1p" not in table.uns and "counts" not in table.layers
    assert sp.issparse(hx.pp.log_normalize(table, genes, dense=False))
    # a table normalised before: its X is used as it is
    hx.pp.normalize(table)
    np.testing.assert_allclose(hx.pp.log_normalize(table, genes), _dense(table[:, genes].X), rtol=1e-6)
    with pytest.raises(KeyError, match="missing"):
        hx.pp.log_normalize(table, ["g1", "not_a_gene"])
