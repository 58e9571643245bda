"""Sparse spatial neighbour graphs from spot centres (scipy KD-tree, O(N·k))."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from hespotex._sample import SAMPLE_KEY, get_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def knn_graph(
    coords: np.ndarray, n_neighbors: int | None = 6, *, radius: float | None = None, symmetric: bool = True
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Neighbour graph of points: ``(connectivities, distances)`` as CSR matrices, no self loops.

    With ``n_neighbors`` each point links to its ``n_neighbors`` nearest others (pruned to
    ``radius`` when both are given); with only ``radius``, to every point within it. With
    ``symmetric=True`` an edge in either direction is kept in both.
    """
    from scipy.spatial import cKDTree

    coords = np.ascontiguousarray(coords, dtype=np.float64)
    n = len(coords)
    if n_neighbors is None and radius is None:
        msg = "Give `n_neighbors`, `radius`, or both."
        raise ValueError(msg)
    tree = cKDTree(coords)
    if n_neighbors is not None:
        if n_neighbors < 1 or n < n_neighbors + 1:
            msg = (
                f"A {n_neighbors}-nearest-neighbour graph needs at least {n_neighbors + 1} spots, found {n}. Lower "
                "`n_neighbors`."
            )
            raise ValueError(msg)
        dist, idx = tree.query(coords, k=n_neighbors + 1, workers=-1)
        not_self = idx != np.arange(n)[:, None]
        keep = not_self & (np.cumsum(not_self, axis=1) <= n_neighbors)  # drops self, or the farthest if self was tied
        if radius is not None:
            keep &= dist <= radius
        rows = np.repeat(np.arange(n, dtype=np.int64), keep.sum(axis=1))
        cols = idx[keep].astype(np.int64)
    else:
        pairs = tree.query_pairs(radius, output_type="ndarray").astype(np.int64)
        rows, cols = pairs[:, 0], pairs[:, 1]
        symmetric = True  # a radius graph is symmetric by definition
    conn = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n))
    if symmetric:
        conn = conn.maximum(conn.T).tocsr()
    conn.sort_indices()
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(conn.indptr))
    d = np.linalg.norm(coords[rows] - coords[conn.indices], axis=1).astype(np.float32)
    # explicit zeros are kept in distances, so coincident spots stay linked
    dmat = sp.csr_matrix((d, conn.indices.copy(), conn.indptr.copy()), shape=(n, n))
    return conn, dmat


def spatial_graph(
    data: SpatialData | AnnData,
    *,
    n_neighbors: int | None = 6,
    radius_um: float | None = None,
    symmetric: bool = True,
    key_added: str = "spatial",
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Build a sparse k-nearest-neighbour (or radius) graph of spots in physical space.

    Distances are in microns (spot centres times ``microns_per_pixel`` of the sample), so
    ``radius_um`` means the same on every platform.

    Parameters
    ----------
    data
        A sample or its table; reads ``obsm["spatial"]`` and ``uns["hespotex_sample"]``.
    n_neighbors
        Neighbours per spot (``None`` for a pure radius graph).
    radius_um
        Keep only neighbours within this distance in µm.
    symmetric
        Keep an edge in both directions when either spot lists the other.
    key_added
        Prefix of the stored keys, as squidpy names them.
    overwrite
        Replace an existing graph under the same keys.
    copy
        Return a copy of the table instead of changing it.

    Returns
    -------
    ``None`` or the copy. Writes ``obsp[f"{key_added}_connectivities"]`` (binary, float32),
    ``obsp[f"{key_added}_distances"]`` (µm) and ``uns[f"{key_added}_neighbors"]`` (keys and params).
    """
    adata = get_table(data)
    if copy:
        adata = adata.copy()
    conn_key, dist_key, uns_key = f"{key_added}_connectivities", f"{key_added}_distances", f"{key_added}_neighbors"
    if not overwrite and (conn_key in adata.obsp or uns_key in adata.uns):
        msg = f"obsp[{conn_key!r}] already exists. Pass `overwrite=True` to replace it, or another `key_added`."
        raise ValueError(msg)
    from hespotex._sample import spot_centres_um

    if SAMPLE_KEY in adata.uns:
        coords, unit = spot_centres_um(adata), "um"
    elif radius_um is None:
        coords, unit = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2], "coordinate units"
    else:
        msg = (
            f"`radius_um` needs the microns per pixel stored in uns[{SAMPLE_KEY!r}]; build the sample with an "
            "`hx.io` reader."
        )
        raise KeyError(msg)
    conn, dist = knn_graph(coords, n_neighbors, radius=radius_um, symmetric=symmetric)
    adata.obsp[conn_key] = conn
    adata.obsp[dist_key] = dist
    adata.uns[uns_key] = {
        "connectivities_key": conn_key,
        "distances_key": dist_key,
        "params": {
            "n_neighbors": n_neighbors,
            "radius_um": radius_um,
            "symmetric": symmetric,
            "coord_type": "generic",
            "distance_unit": unit,
        },
    }
    return adata if copy else None
