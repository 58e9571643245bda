"""Gene rankings of an expression matrix (variance, mean, Seurat dispersion): choose gene sets on the training
expression, never on the test slide (see :mod:`hespotex.tl.evaluation._metrics`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy import sparse

from hespotex.tl.evaluation._correlation import check_2d


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
    x = check_2d(y, "y")
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
