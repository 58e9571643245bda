"""Library-size normalisation and log1p, keeping raw counts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from hespotex._constants import NORMALIZE_KEY
from hespotex._sample import get_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")


def is_log_normalized(adata: AnnData) -> bool:
    """Whether ``X`` holds log-normalised values (scanpy's ``uns["log1p"]`` marker)."""
    return "log1p" in adata.uns


def log_expression(
    adata: AnnData,
    genes: Sequence[str] | None,
    *,
    target_sum: float = 1e4,
    counts_layer: str = "counts",
    dense: bool = True,
):
    """Log-normalised expression ``(n_spots, len(genes))`` float32 (dense or CSR), library over all genes.

    Uses ``X`` when it is already log-normalised (``uns["log1p"]``), else normalises the raw
    counts (``layers[counts_layer]`` or ``X``) without changing ``adata``.
    """
    genes = list(adata.var_names) if genes is None else list(genes)
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        msg = f"{len(missing)} of {len(genes)} genes are missing from this table, e.g. {missing[:5]}."
        raise KeyError(msg)
    idx = adata.var_names.get_indexer(list(genes))
    if is_log_normalized(adata):
        x = adata.X[:, idx]
        if not dense:
            return sp.csr_matrix(x, dtype=np.float32)
        return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)
    counts = sp.csr_matrix(adata.layers.get(counts_layer, adata.X), dtype=np.float64)
    data = counts.data
    if data.size and (data.min() < 0 or not np.allclose(data, np.round(data))):
        msg = (
            "Expected raw counts or log-normalised X (uns['log1p']); found neither. Run `hx.pp.normalize` on raw "
            "counts."
        )
        raise ValueError(msg)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    sub = sp.diags(scale) @ counts[:, idx]
    sub.data = np.log1p(sub.data)
    return sub.astype(np.float32).toarray() if dense else sub.astype(np.float32).tocsr()


def log_normalize(
    data: SpatialData | AnnData,
    genes: Sequence[str] | None = None,
    *,
    target_sum: float = 1e4,
    counts_layer: str = "counts",
    dense: bool = True,
) -> np.ndarray | sp.csr_matrix:
    """Log-normalised expression of ``genes``, as hespotex scores it, without changing the table.

    The definition of :func:`normalize` (log1p of counts per ``target_sum``, library size over
    **all** genes of the table, before the gene subset), returned as a matrix: use it for the truth
    of a comparison, or for the targets of a baseline trained beside HESpotEx.

    Parameters
    ----------
    data
        A sample (its table) or an AnnData: raw counts in ``layers[counts_layer]`` or ``X``, or
        ``X`` already log-normalised (``uns["log1p"]`` set, e.g. by :func:`normalize`), used as is.
    genes
        Genes (columns, in this order); default: every gene of the table.
    target_sum
        Counts per spot after scaling (1e4 = CP10k); ignored when ``X`` is already log-normalised.
    counts_layer
        Layer holding the raw counts (``X`` when absent).
    dense
        Return a dense array; ``False`` returns a CSR matrix.

    Returns
    -------
    ``(n_spots, len(genes))`` float32 values. Reads ``X`` or ``layers[counts_layer]`` and ``uns["log1p"]``;
    writes nothing. A gene missing from the table is a ``KeyError``; values that are neither counts nor
    log-normalised are a ``ValueError``.
    """
    return log_expression(get_table(data), genes, target_sum=target_sum, counts_layer=counts_layer, dense=dense)


def is_integer_valued(x) -> bool:
    """Whether a (dense or sparse) matrix holds only finite, non-negative whole numbers: raw counts."""
    data = x.data if sp.issparse(x) else np.asarray(x)
    return bool(np.all(np.isfinite(data)) and np.all(data >= 0) and np.allclose(data, np.round(data)))


def normalize(
    data: SpatialData | AnnData,
    *,
    target_sum: float = 1e4,
    counts_layer: str = "counts",
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Normalise counts to ``target_sum`` per spot (library over all genes) and take ``log1p``.

    The definition every hespotex score uses: log1p of counts per ``target_sum`` with the library
    size taken over **all** genes of the table, before any gene subset. Uses scanpy's
    ``normalize_total`` and ``log1p``.

    Parameters
    ----------
    data
        A sample (its table is changed in place) or an AnnData whose ``X`` holds raw counts.
    target_sum
        Counts per spot after scaling (1e4 = CP10k).
    counts_layer
        Layer that keeps the raw counts.
    overwrite
        Renormalise a table that was normalised before (from ``layers[counts_layer]``).
    copy
        Return a normalised copy of the table instead of changing it.

    Returns
    -------
    ``None``, or the copy with ``copy=True``. Writes ``layers[counts_layer]`` (raw counts),
    ``X`` (log-normalised), ``obs["total_counts"]``, ``uns["log1p"]`` and
    ``uns["hespotex_normalize"]`` (parameters).
    """
    import scanpy as sc

    adata = get_table(data)
    if copy:
        adata = adata.copy()
    if NORMALIZE_KEY in adata.uns or is_log_normalized(adata):
        if not overwrite:
            msg = (
                "This table is already log-normalised (uns['log1p'] is set). Pass `overwrite=True` to "
                f"renormalise from layers[{counts_layer!r}], or skip `normalize`."
            )
            raise ValueError(msg)
        if counts_layer not in adata.layers:
            msg = (
                f"Cannot renormalise: the raw counts are not in layers[{counts_layer!r}]; found layers "
                f"{list(adata.layers)}."
            )
            raise ValueError(msg)
        adata.X = adata.layers[counts_layer].copy()
        adata.uns.pop("log1p", None)
    else:
        if counts_layer in adata.layers and not overwrite:
            msg = (
                f"layers[{counts_layer!r}] already exists; pass `overwrite=True` to replace it with X, or another "
                "`counts_layer`."
            )
            raise ValueError(msg)
        if not is_integer_valued(adata.X):
            msg = (
                "Expected raw integer counts in X, found non-integer or negative values. If X is already "
                "log-normalised, mark it with `adata.uns['log1p'] = {'base': None}` and skip `normalize`."
            )
            raise ValueError(msg)
        adata.layers[counts_layer] = adata.X.copy()
    totals = np.asarray(adata.layers[counts_layer].sum(axis=1)).ravel()
    if (totals == 0).any():
        logger.warning("%d spots have no counts; their normalised expression is 0.", int((totals == 0).sum()))
    adata.obs["total_counts"] = totals
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    adata.uns[NORMALIZE_KEY] = {
        "params": {"target_sum": float(target_sum), "library": "all genes", "counts_layer": counts_layer}
    }
    return adata if copy else None
