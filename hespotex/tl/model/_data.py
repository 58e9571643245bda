"""Turn sample tables into arrays for the model: expression, embeddings, graphs, splits.

Nothing here touches torch modules; it prepares numpy arrays that the training and
prediction loops move to tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from hespotex._constants import EMBEDDING_KEY
from hespotex._sample import SAMPLE_KEY, spot_centres
from hespotex.pp._graph import knn_graph
from hespotex.pp._targets import target_expression
from hespotex.tl.model._lazy import LazyRows, check_finite, take

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("hespotex")


def embeddings(adata: AnnData, key: str = EMBEDDING_KEY, *, lazy: bool = False) -> np.ndarray | LazyRows:
    """Embeddings ``obsm[key]`` as float32, checked for NaN.

    ``lazy=True``: a :class:`~hespotex.tl.model._lazy.LazyRows` reader of ``obsm[key]`` (a zarr or dask
    array stays on disk; it is scanned chunk by chunk for NaN and checked to be ``(n_obs, width)``).
    """
    if key not in adata.obsm:
        msg = (
            f"Expected image embeddings in obsm[{key!r}], found none. Run `hx.pp.embed(sdata)` on the sample with "
            "its image first."
        )
        raise KeyError(msg)
    if lazy:
        rows = LazyRows(adata.obsm[key], name=f"obsm[{key!r}]")
        if rows.ndim != 2 or len(rows) != adata.n_obs:
            msg = (
                f"Expected obsm[{key!r}] of shape (n_obs, width) = ({adata.n_obs}, width), found {rows.shape}. "
                "Store one embedding row per spot, in the table's order."
            )
            raise ValueError(msg)
        check_finite(rows, f"obsm[{key!r}]")
        return rows
    emb = np.asarray(adata.obsm[key], dtype=np.float32)
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb)).any(axis=1).sum())
        msg = (
            f"obsm[{key!r}] holds NaN or infinite values in {bad} spots; recompute the embeddings "
            "(hx.pp.embed(..., overwrite=True))."
        )
        raise ValueError(msg)
    return emb


def edge_index(coords_um: np.ndarray, n_neighbors: int) -> np.ndarray:
    """``(2, n_edges)`` int64 edge index (source, target) of a symmetric k-NN graph."""
    conn, _ = knn_graph(coords_um, n_neighbors)
    coo = conn.tocoo()
    return np.vstack([coo.col, coo.row]).astype(np.int64)  # messages flow from neighbour (col) to target (row)


@dataclass
class GraphData:
    """One sample's arrays: embeddings, expression (when known), coordinates in µm and graphs."""

    name: str
    emb: np.ndarray | LazyRows  # LazyRows: read (and standardised) block by block, see _lazy
    coords_um: np.ndarray
    expr: np.ndarray | sp.csr_matrix | None = None  # sparse with lazy embeddings, densified per block
    edges: dict[int, np.ndarray] = field(default_factory=dict)
    views: np.ndarray | LazyRows | None = None  # stain-augmented views of emb, (n, n_views, dim), training only

    @property
    def n(self) -> int:
        return len(self.emb)

    def graph(self, k: int) -> np.ndarray:
        """Edge index of the ``k``-NN graph (built once, cached)."""
        if k not in self.edges:
            self.edges[k] = edge_index(self.coords_um, k)
        return self.edges[k]

    def subset(self, mask: np.ndarray, name: str | None = None) -> GraphData:
        """The induced sample on ``mask`` (graphs rebuilt on the kept spots)."""
        return GraphData(
            name or self.name,
            take(self.emb, mask),
            self.coords_um[mask],
            None if self.expr is None else self.expr[mask],
            views=None if self.views is None else take(self.views, mask),
        )


def graph_data(
    adata: AnnData,
    name: str,
    *,
    genes: Sequence[str] | None,
    embedding_key: str = EMBEDDING_KEY,
    target_sum: float = 1e4,
    target_norm: str = "library_all",
    lazy: bool = False,
) -> GraphData:
    """Collect a table's arrays; ``genes=None`` skips expression (prediction).

    The expression is normalised as ``target_norm`` says (see :mod:`hespotex.pp._targets`). ``lazy=True``:
    the embeddings stay where ``obsm`` holds them (a :class:`~hespotex.tl.model._lazy.LazyRows` reader) and
    the expression is kept sparse (CSR), to be densified block by block.
    """
    info = adata.uns.get(SAMPLE_KEY)
    mpp = float(info["microns_per_pixel"]) if info else 1.0
    if info is None:
        logger.warning("Table %r has no uns[%r]; treating obsm['spatial'] as microns.", name, SAMPLE_KEY)
    expr = None
    if genes is not None:
        expr = target_expression(adata, genes, target_norm=target_norm, target_sum=target_sum, dense=not lazy)
    return GraphData(name, embeddings(adata, embedding_key, lazy=lazy), spot_centres(adata) * mpp, expr)


def spatial_block_mask(coords: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray:
    """A contiguous spatial block holding about ``fraction`` of the spots (True = in block).

    The block is a strip along the longer axis of the section, at a seeded random position,
    so validation spots are spatially apart from most training spots.
    """
    if not 0 < fraction < 1:
        msg = f"Expected a validation fraction in (0, 1), found {fraction}."
        raise ValueError(msg)
    axis = int(np.ptp(coords[:, 1]) > np.ptp(coords[:, 0]))
    ranks = np.argsort(np.argsort(coords[:, axis], kind="stable"), kind="stable") / len(coords)
    start = np.random.default_rng(seed).uniform(0, 1 - fraction)
    return (ranks >= start) & (ranks < start + fraction)


def spatial_blocks(coords: np.ndarray, max_nodes: int) -> list[np.ndarray]:
    """Partition spots into compact square tiles of at most about ``max_nodes`` spots (index arrays)."""
    n = len(coords)
    if n <= max_nodes:
        return [np.arange(n)]
    n_tiles = int(np.ceil(n / max_nodes))
    side = int(np.ceil(np.sqrt(n_tiles)))
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1e-9
    cell = np.floor((coords - lo) / (hi - lo) * side).astype(np.int64)
    tile = cell[:, 1] * side + cell[:, 0]
    order = np.argsort(tile, kind="stable")
    bounds = np.flatnonzero(np.diff(tile[order])) + 1
    return [b for b in np.split(order, bounds) if len(b)]


def k_hop_halo(edges: np.ndarray, core: np.ndarray, n: int, hops: int) -> np.ndarray:
    """Nodes within ``hops`` of ``core`` (core first), so predictions on the core are exact."""
    adj = sp.csr_matrix((np.ones(edges.shape[1], dtype=bool), (edges[1], edges[0])), shape=(n, n))
    inside = np.zeros(n, dtype=bool)
    inside[core] = True
    frontier = inside.copy()
    for _ in range(hops):
        frontier = (adj @ frontier) & ~inside
        if not frontier.any():
            break
        inside |= frontier
    rest = np.flatnonzero(inside & ~np.isin(np.arange(n), core))
    return np.concatenate([core, rest])


def induced_edges(edges: np.ndarray, nodes: np.ndarray, n: int) -> np.ndarray:
    """Edges among ``nodes``, relabelled to positions in ``nodes``."""
    pos = np.full(n, -1, dtype=np.int64)
    pos[nodes] = np.arange(len(nodes))
    src, dst = pos[edges[0]], pos[edges[1]]
    keep = (src >= 0) & (dst >= 0)
    return np.vstack([src[keep], dst[keep]])


def embedding_scale(emb: np.ndarray, *, floor: float = 0.1) -> np.ndarray:
    """Per-feature standard deviation of the training embeddings, floored at ``floor`` times the median.

    Features (nearly) constant on the training patches would otherwise get a tiny scale, and any
    activity on a new slide would become a standardised value in the hundreds of thousands.
    """
    return floored_scale(emb.std(axis=0), floor=floor)


def floored_scale(std: np.ndarray, *, floor: float = 0.1) -> np.ndarray:
    """:func:`embedding_scale` from the per-feature standard deviation ``std``."""
    median = float(np.median(std))
    return np.maximum(std, floor * median if median > 0 else 1.0).astype(np.float32)
