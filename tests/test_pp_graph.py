"""Spatial graph: k-NN / radius structure, physical units, symmetry, stored keys."""

from __future__ import annotations

import numpy as np
import pytest

import hespotex as hx
from hespotex.pp._graph import knn_graph


def test_knn_graph_matches_brute_force():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (300, 2))
    conn, dist = knn_graph(xy, 5, symmetric=False)
    full = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(full, np.inf)
    expected = np.argsort(full, axis=1)[:, :5]
    for i in range(len(xy)):
        assert set(conn[i].indices) == set(expected[i])
        np.testing.assert_allclose(np.sort(dist[i].data), np.sort(full[i, expected[i]]), rtol=1e-5)
    assert conn.diagonal().sum() == 0


def test_symmetric_graph_is_symmetric_and_contains_knn():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 100, (200, 2))
    directed, _ = knn_graph(xy, 4, symmetric=False)
    conn, dist = knn_graph(xy, 4)
    assert (conn != conn.T).nnz == 0
    assert (dist != dist.T).nnz == 0
    assert (directed.multiply(conn) != directed).nnz == 0  # every directed edge kept
    assert (np.diff(conn.indptr) >= 4).all()


def test_radius_graph_and_pruning():
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [10.0, 0.0]])
    conn, _ = knn_graph(xy, None, radius=2.5)
    assert conn.toarray().tolist() == [[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    conn, _ = knn_graph(xy, 1, radius=2.5)
    assert conn[3].nnz == 0  # its nearest neighbour is 7 units away


def test_coincident_spots_stay_linked():
    xy = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    conn, dist = knn_graph(xy, 1)
    assert conn[0, 1] == 1 and conn[1, 0] == 1
    assert dist.nnz == conn.nnz  # the zero distance is stored explicitly


def test_spatial_graph_uses_microns_and_records_params(sample_factory):
    sdata = sample_factory(n_spots=50, mpp=0.5)
    hx.pp.spatial_graph(sdata, n_neighbors=4)
    table = sdata["table"]
    conn, dist = table.obsp["spatial_connectivities"], table.obsp["spatial_distances"]
    xy = table.obsm["spatial"]
    i, j = conn.nonzero()
    np.testing.assert_allclose(dist[i, j].A1, 0.5 * np.linalg.norm(xy[i] - xy[j], axis=1), rtol=1e-5)
    params = table.uns["spatial_neighbors"]["params"]
    assert params["n_neighbors"] == 4 and params["distance_unit"] == "um"
    with pytest.raises(ValueError, match="overwrite=True"):
        hx.pp.spatial_graph(sdata, n_neighbors=6)
    hx.pp.spatial_graph(sdata, n_neighbors=6, overwrite=True)
    assert table.uns["spatial_neighbors"]["params"]["n_neighbors"] == 6


def test_spatial_graph_copy_leaves_input_untouched(sample_factory):
    table = sample_factory(n_spots=30)["table"]
    out = hx.pp.spatial_graph(table, n_neighbors=3, copy=True)
    assert "spatial_connectivities" in out.obsp
    assert "spatial_connectivities" not in table.obsp


def test_too_few_spots_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 7 spots, found 3"):
        knn_graph(np.zeros((3, 2)), 6)
