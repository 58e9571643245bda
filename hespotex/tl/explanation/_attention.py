"""``hx.tl.attention``: per-spot summaries of the decoder attention stored by :func:`hespotex.tl.predict`.

The attention matrix ``obsp["hespotex_attention"]`` holds, in row ``i``, how much each source spot
(the spot itself through its self loop, and its graph neighbours) shaped the prediction at target
spot ``i``; every row sums to 1 (averaged over heads and hops, see
:mod:`hespotex.models._decoder`). This module condenses each row into a few numbers per spot.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from hespotex._constants import PREDICTION_KEY, attention_key, attention_stats_key
from hespotex.tl.prediction._tables import resolve_attention, resolve_prediction, spot_tables

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("hespotex")

__all__ = ["attention"]

ROW_SUM_TOL = 1e-3


def _attention_table(data: Any, key: str) -> tuple[AnnData, str]:
    """The table holding the attention of the prediction ``key`` and its ``obsp`` key."""
    try:
        found = resolve_prediction(data, key)
    except KeyError:
        # an obsp key given directly (before 0.2 `key` named the attention matrix): still read it
        tables = [t for _, t in spot_tables(data, same_spots=False, prefer=key)]
        for table in tables:
            if key in table.obsp:
                return table, key
        found_keys = sorted({k for t in tables for k in t.obsp})
        msg = (
            f"Found no prediction {key!r} (uns[{key!r}]['params']) nor obsp[{key!r}] (obsp keys: {found_keys}). "
            "Pass `key=` as given to `hx.tl.predict(..., key_added=...)`, or predict first."
        )
        raise KeyError(msg) from None
    att = resolve_attention(found)
    if att is None:
        conv = (found.params.get("config") or {}).get("decoder_conv", "unknown")
        msg = (
            f"The prediction {key!r} carries no attention weights: the model's graph decoder is {conv!r} (the 'paper' "
            "preset uses SAGE, which has no attention). Train with the 'hespotex' preset (GATv2 attention, "
            f"`hx.tl.train(..., config='hespotex')`) and predict again to get obsp[{attention_key(key)!r}]."
        )
        raise ValueError(msg)
    if att not in found.target.obsp:
        msg = f"uns[{key!r}]['params'] names obsp[{att!r}] but the table has no such entry; predict again."
        raise KeyError(msg)
    return found.target, att


def _checked_matrix(table: AnnData, key: str) -> sp.csr_matrix:
    mat = table.obsp[key]
    mat = sp.csr_matrix(mat, dtype=np.float64) if sp.issparse(mat) else sp.csr_matrix(np.asarray(mat, dtype=np.float64))
    mat.sum_duplicates()
    mat.sort_indices()
    if not np.isfinite(mat.data).all() or (mat.data < 0).any():
        msg = (
            f"obsp[{key!r}] holds negative, NaN or infinite weights; expected attention weights in [0, 1]. Predict "
            "again."
        )
        raise ValueError(msg)
    sums = np.asarray(mat.sum(axis=1)).ravel()
    bad = np.abs(sums - 1.0) > ROW_SUM_TOL
    if bad.any():
        msg = (
            f"Expected every row of obsp[{key!r}] (a target spot) to sum to 1, as hx.tl.predict writes the attention; "
            f"found {int(bad.sum())} of {len(sums)} rows that do not (row sums from {sums.min():.4g} to "
            f"{sums.max():.4g}). "
            "Is this an attention matrix (and not, e.g., spatial connectivities or a transposed matrix)?"
        )
        raise ValueError(msg)
    return mat


def summarise(mat: sp.csr_matrix, top_k: int) -> dict[str, np.ndarray]:
    """Per-row summaries of a row-stochastic sparse matrix (rows = targets); see :func:`attention`."""
    n = mat.shape[0]
    rows = np.repeat(np.arange(n), np.diff(mat.indptr))
    cols, w = mat.indices, mat.data
    plogp = np.zeros_like(w)
    pos = w > 0
    plogp[pos] = w[pos] * np.log(w[pos])
    entropy = -np.bincount(rows, weights=plogp, minlength=n)
    self_w = np.asarray(mat.diagonal()).ravel()
    is_self = rows == cols
    degree = np.bincount(rows[~is_self], minlength=n)
    n_sources = degree + 1  # the self loop is always a possible source
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy_norm = np.where(n_sources > 1, entropy / np.log(n_sources), np.nan)
    top_index = np.full((n, top_k), -1, dtype=np.int64)
    top_weight = np.zeros((n, top_k), dtype=np.float64)
    if top_k:
        r, c, v = rows[~is_self], cols[~is_self], w[~is_self]
        order = np.lexsort((c, -v, r))  # per row, strongest first (ties: lower position first)
        r, c, v = r[order], c[order], v[order]
        start = np.searchsorted(r, np.arange(n))
        rank = np.arange(len(r)) - start[r]
        keep = rank < top_k
        top_index[r[keep], rank[keep]] = c[keep]
        top_weight[r[keep], rank[keep]] = v[keep]
    return {
        "entropy": entropy,
        "entropy_normalised": entropy_norm,
        "self": self_w,
        "neighbours": 1.0 - self_w,
        "degree": degree,
        "top_index": top_index,
        "top_weight": top_weight,
    }


def attention(
    data: Any,
    *,
    key: str = PREDICTION_KEY,
    top_k: int = 3,
    key_added: str | None = None,
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | None:
    """Summarise the stored decoder attention of every spot.

    Reads the sparse attention matrix ``obsp[f"{key}_attention"]`` written by
    :func:`hespotex.tl.predict` ``(key_added=key)`` (the one its record names; row ``i``:
    the weights with which the spot itself, through its self loop, and its graph neighbours shaped
    the prediction at spot ``i``; every row sums to 1).

    Parameters
    ----------
    data
        A SpatialData sample (the table holding the attention is found among its tables) or its
        table (AnnData).
    key
        The prediction whose attention is read: the ``key_added`` given to :func:`hespotex.tl.predict`
        (found in whichever table holds it). An ``obsp`` key naming the matrix itself is still read
        (what ``key`` meant before 0.2).
    top_k
        Number of strongest neighbours (self excluded) to record per spot.
    key_added
        Prefix of the keys written; default ``f"{key}_attention_stats"`` (never the ``obsp`` key of the
        attention itself, ``f"{key}_attention"``).
    copy
        Return a copy of the table with the summaries instead of writing to it.
    overwrite
        Replace summaries already stored under ``key_added``.

    Returns
    -------
    ``None``, or the table copy when ``copy=True``. Written to the table:

    - ``obs[f"{key_added}_entropy"]``: Shannon entropy of the row, in nats (0: all weight on one source);
    - ``obs[f"{key_added}_entropy_normalised"]``: entropy over its maximum ``log(degree + 1)``, in [0, 1]
      (NaN for a spot without neighbours);
    - ``obs[f"{key_added}_self"]``: weight on the spot's own latent (self loop);
    - ``obs[f"{key_added}_neighbours"]``: weight on its neighbours, ``1 - self``;
    - ``obs[f"{key_added}_degree"]``: number of neighbours (sources other than the spot itself);
    - ``obsm[f"{key_added}_top_index"]``: ``(n_spots, top_k)`` int64 positions (rows of the table) of the
      strongest neighbours, strongest first, ``-1`` where a spot has fewer than ``top_k`` neighbours;
    - ``obsm[f"{key_added}_top_weight"]``: their weights (0 for padding);
    - ``uns[f"{key_added}_summary"]["params"]``: ``key``, ``attention_key`` (the ``obsp`` key read),
      ``top_k``, ``key_added`` and the number of spots.

    Raises
    ------
    ValueError
        The predictions have no attention (a decoder without attention, e.g. the ``"paper"`` preset),
        or the matrix is not a row-normalised attention matrix; existing keys without ``overwrite``.
    KeyError
        No attention matrix under ``key``, or no predictions to read the key from.
    """
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        msg = f"Expected `top_k` to be a non-negative integer, found {top_k!r}."
        raise ValueError(msg)
    key_added = key_added or attention_stats_key(key)
    table, att = _attention_table(data, key)
    mat = _checked_matrix(table, att)
    if mat.shape != (table.n_obs, table.n_obs):
        msg = f"Expected obsp[{att!r}] of shape ({table.n_obs}, {table.n_obs}), found {mat.shape}."
        raise ValueError(msg)
    stats = summarise(mat, int(top_k))
    obs_keys = [f"{key_added}_{s}" for s in ("entropy", "entropy_normalised", "self", "neighbours", "degree")]
    obsm_keys = [f"{key_added}_top_index", f"{key_added}_top_weight"]
    uns_key = f"{key_added}_summary"
    if not overwrite:
        taken = [k for k in obs_keys if k in table.obs] + [k for k in obsm_keys if k in table.obsm]
        taken += [uns_key] if uns_key in table.uns else []
        if taken:
            msg = f"{taken} already exist; pass `overwrite=True` to replace them, or another `key_added`."
            raise ValueError(msg)
    target = table.copy() if copy else table
    for name in ("entropy", "entropy_normalised", "self", "neighbours", "degree"):
        target.obs[f"{key_added}_{name}"] = stats[name]
    target.obsm[f"{key_added}_top_index"] = stats["top_index"]
    target.obsm[f"{key_added}_top_weight"] = stats["top_weight"]
    target.uns[uns_key] = {
        "params": {
            "key": key,
            "attention_key": att,
            "top_k": int(top_k),
            "key_added": key_added,
            "n_spots": int(table.n_obs),
        }
    }
    logger.info(
        "Summarised obsp[%r] at %d spots: mean weight on self %.3f, mean normalised entropy %.3f.",
        att,
        table.n_obs,
        float(np.mean(stats["self"])),
        float(np.nanmean(stats["entropy_normalised"]))
        if np.isfinite(stats["entropy_normalised"]).any()
        else float("nan"),
    )
    return target if copy else None
