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
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from hespotex.tl.evaluation._correlation import (
    check_pair,
    n_significant,
    pearson_per_gene,
    pearson_pvalues,
    per_gene_stats,
)
from hespotex.tl.evaluation._gene_ranking import top_genes

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


# --------------------------------------------------------------------------------------------------
# per-gene tables and summaries
# --------------------------------------------------------------------------------------------------

_SCORE_COLUMNS = [
    "pearson",
    "pvalue",
    "mse",
    "mean_true",
    "var_true",
    "n_spots",
    "truth_constant",
    "prediction_constant",
]


def _score_frame(yt: Any, yp: Any, names: pd.Index, alternative: str) -> pd.DataFrame:
    s = per_gene_stats(yt, yp)
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
    yt, yp = check_pair(y_true, y_pred)
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
