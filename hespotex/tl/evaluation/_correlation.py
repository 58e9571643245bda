"""Per-gene Pearson correlation on arrays and its significance, computed in blocks of genes so a sparse
``(n_spots, n_genes)`` matrix is never densified whole (see :mod:`hespotex.tl.evaluation._metrics`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from scipy import sparse, stats

_BLOCK_BYTES = 64 * 2**20  # dense float64 working set per block of genes


def check_2d(x: Any, name: str) -> np.ndarray | sparse.spmatrix | sparse.sparray:
    if sparse.issparse(x):
        if x.ndim != 2:
            msg = f"`{name}` must be 2-D (n_spots, n_genes); found a sparse array with shape {x.shape}."
            raise ValueError(msg)
        return x.tocsc()
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        msg = f"`{name}` must be 2-D (n_spots, n_genes); found shape {arr.shape}. Reshape it to spots x genes."
        raise ValueError(msg)
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        msg = f"`{name}` must be numeric; found dtype {arr.dtype}."
        raise TypeError(msg)
    return arr


def check_pair(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    yt = check_2d(y_true, "y_true")
    yp = check_2d(y_pred, "y_pred")
    if yt.shape != yp.shape:
        msg = (
            f"`y_true` and `y_pred` must have the same shape (n_spots, n_genes); found {yt.shape} and {yp.shape}. "
            "Align predictions to the truth's spots and genes first."
        )
        raise ValueError(msg)
    return yt, yp


def _dense_block(x: Any, sl: slice) -> np.ndarray:
    block = x[:, sl]
    block = block.toarray() if sparse.issparse(block) else np.asarray(block)
    return block.astype(np.float64, copy=True)


def _gene_blocks(n_spots: int, n_genes: int) -> Iterator[slice]:
    """Slices over genes so that a few dense float64 blocks stay within ``_BLOCK_BYTES``."""
    width = max(1, _BLOCK_BYTES // (8 * max(n_spots, 1)))
    for start in range(0, n_genes, width):
        yield slice(start, min(start + width, n_genes))


def per_gene_stats(y_true: Any, y_pred: Any) -> dict[str, np.ndarray]:
    """Pearson r, MSE, mean and variance (ddof=1) of the truth, per gene, in blocks of genes; and
    which genes are constant in the truth and in the prediction (see the module docstring)."""
    yt, yp = check_pair(y_true, y_pred)
    n, g = yt.shape
    out = {k: np.full(g, np.nan) for k in ("pearson", "mse", "mean_true", "var_true")}
    out["truth_constant"] = np.ones(g, dtype=bool)
    out["prediction_constant"] = np.ones(g, dtype=bool)
    for sl in _gene_blocks(n, g):
        t = _dense_block(yt, sl)
        p = _dense_block(yp, sl)
        if n == 0:
            continue
        out["mse"][sl] = np.mean((t - p) ** 2, axis=0)
        # exactly constant columns (float means need not be exact): truth -> NaN, prediction -> 0
        truth_constant = (t == t[:1]).all(axis=0)
        mean_p = p.mean(axis=0)
        pred_constant = (p == p[:1]).all(axis=0) | ~np.isfinite(mean_p)  # NaN / inf reach the mean
        out["truth_constant"][sl] = truth_constant
        out["prediction_constant"][sl] = pred_constant
        if pred_constant.any():
            p[:, pred_constant] = 0.0
            mean_p[pred_constant] = 0.0
        mean_t = t.mean(axis=0)
        out["mean_true"][sl] = mean_t
        t -= mean_t
        p -= mean_p
        ss_t = np.einsum("ij,ij->j", t, t)
        ss_p = np.einsum("ij,ij->j", p, p)
        cross = np.einsum("ij,ij->j", t, p)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = cross / np.sqrt(ss_t * ss_p)
        r = np.clip(r, -1.0, 1.0)
        r[pred_constant] = 0.0
        r[truth_constant] = np.nan
        out["pearson"][sl] = r
        if n > 1:
            out["var_true"][sl] = ss_t / (n - 1)
    return out


def pearson_per_gene(y_true: Any, y_pred: Any) -> np.ndarray:
    """Pearson correlation between truth and prediction for every gene (column), vectorised.

    Parameters
    ----------
    y_true
        Observed expression, ``(n_spots, n_genes)``, dense or ``scipy.sparse``.
    y_pred
        Predicted expression, same shape and gene order.

    Returns
    -------
    ``float64`` array of length ``n_genes``: the correlation across spots of each gene. A gene whose
    prediction is exactly constant (or holds NaN or infinite values) scores ``0``: it says nothing about
    where the gene is expressed. A gene exactly constant in the truth gets ``NaN`` (undefined, as
    :func:`scipy.stats.pearsonr`), whatever the prediction. Values are clipped to ``[-1, 1]``. Neither input is
    modified; sparse inputs are densified one block
    of genes at a time, so memory stays bounded.
    """
    return per_gene_stats(y_true, y_pred)["pearson"]


def pearson_pvalues(
    r: Any,
    n: Any,
    *,
    alternative: Literal["greater", "less", "two-sided"] = "greater",
) -> np.ndarray:
    """P-values of Pearson correlations under the null of no correlation (bivariate normal).

    Uses the t statistic ``t = r * sqrt((n - 2) / (1 - r**2))`` with ``n - 2`` degrees of freedom
    (:data:`scipy.stats.t`), which is exactly the test of :func:`scipy.stats.pearsonr`.

    Parameters
    ----------
    r
        Correlations (any shape).
    n
        Number of spots each correlation was computed over; a scalar or an array broadcastable to ``r``.
    alternative
        ``"greater"`` (default) tests for a positive correlation, ``"less"`` for a negative one,
        ``"two-sided"`` for either.

    Returns
    -------
    ``float64`` array shaped like ``r``. ``NaN`` where ``r`` is ``NaN`` or ``n < 3``.
    """
    if alternative not in ("greater", "less", "two-sided"):
        msg = f"`alternative` must be 'greater', 'less' or 'two-sided'; found {alternative!r}."
        raise ValueError(msg)
    r = np.asarray(r, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    r, n = np.broadcast_arrays(r, n)
    df = n - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(df / ((1.0 - r) * (1.0 + r)))
        if alternative == "greater":
            p = stats.t.sf(t, df)
        elif alternative == "less":
            p = stats.t.cdf(t, df)
        else:
            p = 2.0 * stats.t.sf(np.abs(t), df)
    p = np.where((df < 1) | np.isnan(r), np.nan, np.clip(p, 0.0, 1.0))
    return p.astype(np.float64)


def n_significant(
    r: Any,
    n: Any,
    *,
    alpha: float = 0.05,
    correction: Literal["fdr_bh", "bonferroni"] | None = "fdr_bh",
) -> int:
    """Number of genes with a significantly **positive** correlation between prediction and truth.

    One-sided p-values (:func:`pearson_pvalues`, ``alternative="greater"``) are corrected for the
    number of genes tested, then compared with ``alpha`` (a gene counts when its corrected p-value is
    ``<= alpha``). Genes with an undefined correlation (``NaN``) are neither tested nor counted.

    Parameters
    ----------
    r
        Per-gene correlations.
    n
        Number of spots (scalar, or per gene).
    alpha
        Significance level (false discovery rate for ``"fdr_bh"``, family-wise error for ``"bonferroni"``).
    correction
        ``"fdr_bh"``: Benjamini-Hochberg (:func:`scipy.stats.false_discovery_control`);
        ``"bonferroni"``; ``None``: no correction.

    Returns
    -------
    The count, an ``int``.
    """
    if not 0 < alpha < 1:
        msg = f"`alpha` must lie in (0, 1); found {alpha}."
        raise ValueError(msg)
    p = pearson_pvalues(r, n, alternative="greater").ravel()
    p = p[~np.isnan(p)]
    if p.size == 0:
        return 0
    if correction == "fdr_bh":
        p = stats.false_discovery_control(p, method="bh")
    elif correction == "bonferroni":
        p = np.minimum(p * p.size, 1.0)
    elif correction is not None:
        msg = f"`correction` must be 'fdr_bh', 'bonferroni' or None; found {correction!r}."
        raise ValueError(msg)
    return int(np.count_nonzero(p <= alpha))
