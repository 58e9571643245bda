"""Evaluation metrics on arrays: per-gene Pearson correlation, its significance, gene rankings, summaries.

Everything here works on plain arrays (``numpy`` or ``scipy.sparse``) of shape ``(n_spots, n_genes)``;
the AnnData wrappers live elsewhere in :mod:`hespotex.tl`.

Scores that cannot be gamed
---------------------------
A gene whose **prediction** is constant (or not finite) carries no information about where the gene
is expressed: it scores ``r = 0``, in every mean, instead of being left out (leaving it out would let a
model raise its mean by predicting its worst genes flat). A gene whose **truth** is constant on the
scored spots has no defined correlation with anything: it gets ``NaN``, is flagged
(``truth_constant``), left out of the means and counted apart (``n_truth_constant``).

Honest evaluation
-----------------
Gene sets such as "the top 50 highly variable genes" must be chosen **without looking at the test
slide**: compute them with :func:`top_genes` on the *training* expression and pass the resulting
names to :func:`summarize` for the test scores. :func:`top_genes` is purely a ranking of whatever
matrix it is given; it has no notion of train or test.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse, stats

logger = logging.getLogger("hespotex")

__all__ = [
    "gene_scores",
    "n_significant",
    "pearson_per_gene",
    "pearson_pvalues",
    "summarize",
    "summarize_samples",
    "top_genes",
]

POOLED = "pooled"
_BLOCK_BYTES = 64 * 2**20  # dense float64 working set per block of genes


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _check_2d(x: Any, name: str) -> np.ndarray | sparse.spmatrix | sparse.sparray:
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


def _check_pair(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    yt = _check_2d(y_true, "y_true")
    yp = _check_2d(y_pred, "y_pred")
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


def _per_gene_stats(y_true: Any, y_pred: Any) -> dict[str, np.ndarray]:
    """Pearson r, MSE, mean and variance (ddof=1) of the truth, per gene, in blocks of genes; and
    which genes are constant in the truth and in the prediction (see the module docstring)."""
    yt, yp = _check_pair(y_true, y_pred)
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


# --------------------------------------------------------------------------------------------------
# correlation and significance
# --------------------------------------------------------------------------------------------------


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
    :func:`scipy.stats.pearsonr`), whatever the prediction. Values are clipped to ``[-1, 1]``. Neither input is modified; sparse inputs are densified one block
    of genes at a time, so memory stays bounded.
    """
    return _per_gene_stats(y_true, y_pred)["pearson"]


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


# --------------------------------------------------------------------------------------------------
# gene rankings
# --------------------------------------------------------------------------------------------------


def _mean_var(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Column means and variances (ddof=1), dense or sparse, without densifying a sparse matrix."""
    n = x.shape[0]
    if sparse.issparse(x):
        x = x.tocsc().astype(np.float64)
        mean = np.asarray(x.mean(axis=0)).ravel()
        sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
        var = np.maximum(sq - mean**2, 0.0)
    else:
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        var = x.var(axis=0)
    if n > 1:
        var = var * n / (n - 1)
    return mean, var


def _seurat_dispersion(x: Any, n_bins: int) -> np.ndarray:
    """Normalised dispersion of scanpy's ``flavor="seurat"`` (NaN for genes never expressed)."""
    import anndata as ad
    import scanpy as sc

    if sparse.issparse(x):
        x = sparse.csr_matrix(x, dtype=np.float64)
        expressed = np.asarray((x > 0).sum(axis=0)).ravel() > 0
    else:
        x = np.asarray(x, dtype=np.float64)
        expressed = (x > 0).any(axis=0)
    tmp = ad.AnnData(x)
    df = sc.pp.highly_variable_genes(tmp, flavor="seurat", n_bins=n_bins, inplace=False, subset=False)
    score = df["dispersions_norm"].to_numpy(dtype=np.float64)
    score[~expressed] = np.nan
    return score


def top_genes(
    y: Any,
    k: int = 50,
    *,
    by: Literal["hvg", "mean"] = "hvg",
    hvg_method: Literal["variance", "dispersion"] = "variance",
    gene_names: Sequence[str] | None = None,
    n_bins: int = 20,
) -> np.ndarray:
    """Rank genes of a matrix and return the top ``k``: highly variable or highly expressed genes.

    This is purely a ranking of the matrix it is given. **For honest evaluation, pass the training
    expression** and apply the returned genes to the test scores (see :func:`summarize`); ranking on
    the test slide selects genes with knowledge of the test truth.

    Parameters
    ----------
    y
        Expression, ``(n_spots, n_genes)``, dense or sparse; expected log-normalised
        (e.g. ``log1p`` of counts per 10,000).
    k
        Number of genes; values above ``n_genes`` return all genes.
    by
        ``"hvg"``: highly variable genes (see ``hvg_method``); ``"mean"``: highly expressed genes,
        ranked by the mean of ``y`` over spots.
    hvg_method
        ``"variance"`` (default): variance (ddof=1) of ``y`` itself, i.e. of log-normalised expression.
        ``"dispersion"``: scanpy's ``highly_variable_genes(flavor="seurat")`` normalised dispersion:
        variance / mean of ``expm1(y)``, log-transformed and z-scored within ``n_bins`` bins of mean
        expression. Genes never expressed (no value > 0) rank last.
    gene_names
        Names of the columns; when given, names are returned instead of indices.
    n_bins
        Number of mean-expression bins for ``hvg_method="dispersion"``.

    Returns
    -------
    Array of the top ``min(k, n_genes)`` column indices (``int``), or names when ``gene_names`` is
    given, best first. Ties keep column order; genes whose score is ``NaN`` come last.
    """
    x = _check_2d(y, "y")
    n_genes = x.shape[1]
    if k < 1:
        msg = f"`k` must be a positive number of genes; found {k}."
        raise ValueError(msg)
    if gene_names is not None and len(gene_names) != n_genes:
        msg = f"`gene_names` has {len(gene_names)} entries but `y` has {n_genes} genes (columns)."
        raise ValueError(msg)
    if by == "mean":
        score, _ = _mean_var(x)
    elif by == "hvg":
        if hvg_method == "variance":
            _, score = _mean_var(x)
        elif hvg_method == "dispersion":
            score = _seurat_dispersion(x, n_bins)
        else:
            msg = f"`hvg_method` must be 'variance' or 'dispersion'; found {hvg_method!r}."
            raise ValueError(msg)
    else:
        msg = f"`by` must be 'hvg' (highly variable) or 'mean' (highly expressed); found {by!r}."
        raise ValueError(msg)
    key = np.where(np.isnan(score), np.inf, -score)
    order = np.argsort(key, kind="stable")[: min(k, n_genes)]
    if gene_names is not None:
        return np.asarray(gene_names, dtype=object)[order]
    return order


# --------------------------------------------------------------------------------------------------
# per-gene tables and summaries
# --------------------------------------------------------------------------------------------------

_SCORE_COLUMNS = ["pearson", "pvalue", "mse", "mean_true", "var_true", "n_spots", "truth_constant", "prediction_constant"]


def _score_frame(yt: Any, yp: Any, names: pd.Index, alternative: str) -> pd.DataFrame:
    s = _per_gene_stats(yt, yp)
    n = yt.shape[0]
    df = pd.DataFrame(
        {
            "pearson": s["pearson"],
            "pvalue": pearson_pvalues(s["pearson"], n, alternative=alternative),
            "mse": s["mse"],
            "mean_true": s["mean_true"],
            "var_true": s["var_true"],
            "n_spots": np.full(len(names), n, dtype=np.int64),
            "truth_constant": s["truth_constant"],
            "prediction_constant": s["prediction_constant"],
        },
        index=names,
    )
    return df


def _rows(x: Any, mask: np.ndarray) -> Any:
    idx = np.flatnonzero(mask)
    return x.tocsr()[idx] if sparse.issparse(x) else x[idx]


def gene_scores(
    y_true: Any,
    y_pred: Any,
    gene_names: Sequence[str] | None = None,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    alternative: Literal["greater", "less", "two-sided"] = "greater",
) -> pd.DataFrame:
    """Per-gene evaluation table: Pearson correlation, its p-value, MSE and truth statistics.

    Parameters
    ----------
    y_true
        Observed expression, ``(n_spots, n_genes)``, dense or sparse.
    y_pred
        Predicted expression, same shape and gene order.
    gene_names
        Gene names (columns); default ``"0", "1", ...``.
    groups
        Optional sample label of each spot (length ``n_spots``). When given, scores are computed
        within each sample **and** over all spots pooled, and a tidy table is returned.
    alternative
        Alternative hypothesis of the ``pvalue`` column (see :func:`pearson_pvalues`); one-sided
        ``"greater"`` by default, the test behind :func:`n_significant`.

    Returns
    -------
    Without ``groups``: a :class:`pandas.DataFrame` indexed by gene (index name ``"gene"``) with columns

    - ``pearson``: correlation across spots (``0`` when the prediction is constant, ``NaN`` when the
      truth is, see :func:`pearson_per_gene`);
    - ``pvalue``: its p-value (t test with ``n_spots - 2`` degrees of freedom);
    - ``mse``: mean squared error;
    - ``mean_true``, ``var_true``: mean and variance (ddof=1) of the truth;
    - ``n_spots``: number of spots scored;
    - ``truth_constant``, ``prediction_constant``: whether the gene is exactly constant on these spots
      in the truth / in the prediction (a non-finite prediction counts as constant).

    With ``groups``: a tidy frame with a ``sample`` column (labels as strings, in order of first
    appearance, then ``"pooled"`` for all spots together), a ``gene`` column and the columns above.
    Pooled correlations mix between-sample and within-sample variation; per-sample ones do not.
    """
    yt, yp = _check_pair(y_true, y_pred)
    n_spots, n_genes = yt.shape
    if gene_names is None:
        names = pd.Index([str(i) for i in range(n_genes)], name="gene")
    else:
        if len(gene_names) != n_genes:
            msg = f"`gene_names` has {len(gene_names)} entries but the arrays have {n_genes} genes (columns)."
            raise ValueError(msg)
        names = pd.Index(np.asarray(gene_names, dtype=object), name="gene")
    if groups is None:
        return _score_frame(yt, yp, names, alternative)

    labels = pd.Series(np.asarray(groups)).astype(str)
    if len(labels) != n_spots:
        msg = f"`groups` has {len(labels)} labels but the arrays have {n_spots} spots (rows)."
        raise ValueError(msg)
    uniques = pd.unique(labels)
    if POOLED in uniques:
        msg = f"`groups` contains the label {POOLED!r}, which is reserved for the pooled rows; rename that sample."
        raise ValueError(msg)
    frames = []
    for label in [*uniques, POOLED]:
        if label == POOLED:
            t, p = yt, yp
        else:
            mask = (labels == label).to_numpy()
            t, p = _rows(yt, mask), _rows(yp, mask)
        df = _score_frame(t, p, names, alternative).reset_index()
        df.insert(0, "sample", label)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _select(pearson: pd.Series, genes: Sequence[Any] | None, what: str) -> pd.Series:
    idx = pd.Index(genes)
    missing = idx.difference(pearson.index)
    if len(missing):
        msg = (
            f"{len(missing)} of the {what} genes are not in the score table (e.g. {list(missing[:3])}). "
            "Pass gene names present in the evaluated gene set."
        )
        raise KeyError(msg)
    return pearson.loc[idx]


def summarize(
    scores: pd.DataFrame,
    *,
    hvg: Sequence[Any] | None = None,
    heg: Sequence[Any] | None = None,
    alpha: float = 0.05,
    correction: Literal["fdr_bh", "bonferroni"] | None = "fdr_bh",
) -> dict[str, float | int]:
    """Summary numbers of a per-gene table from :func:`gene_scores` (without ``groups``).

    Parameters
    ----------
    scores
        Per-gene table indexed by gene, with columns ``pearson``, ``mse`` and ``n_spots``.
    hvg
        Highly variable genes to average over, **ranked on training data** (:func:`top_genes`).
    heg
        Highly expressed genes to average over, ranked on training data.
    alpha, correction
        Passed to :func:`n_significant`.

    Returns
    -------
    A dict with

    - ``pearson_mean``, ``pearson_median``: over every gene whose truth varies; genes with a constant
      prediction count as ``0``;
    - ``pearson_mean_hvg``, ``pearson_mean_heg``: the same over the given genes (only when given);
    - ``mse``: mean over genes of the per-gene MSE;
    - ``n_significant``: genes with significantly positive correlation (:func:`n_significant`);
    - ``n_genes``: genes in the table;
    - ``n_truth_constant`` (and ``n_truth_constant_hvg`` / ``_heg`` when given): genes whose truth is
      constant on the scored spots: no correlation is defined, they are left out of the means and
      counted here (a warning is logged when there are any);
    - ``n_prediction_constant``: genes whose prediction is constant (scored ``0``, in the means);
    - ``n_nan``: genes left out of the means (constant truth, or a ``NaN`` score in an older table).
    """
    if "sample" in scores.columns:
        msg = "`scores` is a tidy per-sample table (it has a 'sample' column); use `summarize_samples` for it."
        raise ValueError(msg)
    missing = {"pearson", "mse", "n_spots"} - set(scores.columns)
    if missing:
        msg = f"`scores` lacks the columns {sorted(missing)}; build it with `gene_scores`."
        raise ValueError(msg)
    r = scores["pearson"]
    truth_constant = truth_constant_genes(scores)
    out: dict[str, float | int] = {
        "pearson_mean": float(np.nanmean(r)) if r.notna().any() else float("nan"),
        "pearson_median": float(np.nanmedian(r)) if r.notna().any() else float("nan"),
    }
    for key, genes in (("hvg", hvg), ("heg", heg)):
        if genes is not None:
            sel = _select(r, genes, key)
            out[f"pearson_mean_{key}"] = float(np.nanmean(sel)) if sel.notna().any() else float("nan")
    out["mse"] = float(np.nanmean(scores["mse"])) if len(scores) else float("nan")
    out["n_significant"] = n_significant(r.to_numpy(), scores["n_spots"].to_numpy(), alpha=alpha, correction=correction)
    out["n_genes"] = len(scores)
    out["n_truth_constant"] = int(truth_constant.sum())
    for key, genes in (("hvg", hvg), ("heg", heg)):
        if genes is not None:
            out[f"n_truth_constant_{key}"] = int(truth_constant.loc[pd.Index(genes)].sum())
    if "prediction_constant" in scores:
        out["n_prediction_constant"] = int(scores["prediction_constant"].astype(bool).sum())
    out["n_nan"] = int(r.isna().sum())
    if out["n_truth_constant"]:
        logger.warning(
            "%d of %d genes are constant in the truth on the scored spots (e.g. %s): no correlation is defined for "
            "them; they are left out of the means and counted in `n_truth_constant`.",
            out["n_truth_constant"], len(scores), list(truth_constant.index[truth_constant][:3]),
        )  # fmt: skip
    return out


def truth_constant_genes(scores: pd.DataFrame) -> pd.Series:
    """Boolean per gene of a :func:`gene_scores` table: the truth is constant on the scored spots
    (the ``truth_constant`` column; for tables without it, a zero truth variance)."""
    if "truth_constant" in scores:
        return scores["truth_constant"].astype(bool)
    if "var_true" in scores:
        return scores["var_true"].fillna(0.0) == 0.0
    return pd.Series(False, index=scores.index)


def summarize_samples(
    scores: pd.DataFrame,
    *,
    hvg: Sequence[Any] | None = None,
    heg: Sequence[Any] | None = None,
    alpha: float = 0.05,
    correction: Literal["fdr_bh", "bonferroni"] | None = "fdr_bh",
) -> pd.DataFrame:
    """:func:`summarize` for each sample of a tidy table from :func:`gene_scores` with ``groups``.

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by ``sample`` (including ``"pooled"``), one column per key of
    :func:`summarize`.
    """
    if not {"sample", "gene"} <= set(scores.columns):
        msg = "`scores` must be the tidy table of `gene_scores(..., groups=...)` with 'sample' and 'gene' columns."
        raise ValueError(msg)
    rows = {
        label: summarize(
            df.drop(columns="sample").set_index("gene"), hvg=hvg, heg=heg, alpha=alpha, correction=correction
        )
        for label, df in scores.groupby("sample", sort=False)
    }
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "sample"
    return out
