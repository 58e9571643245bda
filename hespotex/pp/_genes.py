"""Gene selection fitted on training samples only, recorded so it applies to any other sample."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hespotex._compat import renamed_arguments
from hespotex._constants import GENES_KEY
from hespotex._sample import as_sample_dict, get_table
from hespotex.pp._normalize import is_integer_valued, log_expression

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("hespotex")


def gene_hash(genes: Sequence[str]) -> str:
    """A short, order-sensitive fingerprint of a gene list (recorded with models and predictions)."""
    return hashlib.sha256("\n".join(genes).encode()).hexdigest()[:16]


def shared_genes(tables: Iterable[AnnData]) -> pd.Index:
    """Genes present in every table, in the order of the first."""
    tables = list(tables)
    common = pd.Index(tables[0].var_names)
    for t in tables[1:]:
        common = common[common.isin(t.var_names)]
    return common


# skmisc's loess (scanpy's seurat_v3, span 0.3, degree 2) kills the interpreter (segmentation fault)
# when a sample has 3 or fewer genes that vary, and cannot fit fewer than 14 (floor(0.3 * k) >= 4)
_LOESS_MIN_GENES = 14


def check_samples(
    tables: Sequence[AnnData],
    names: Sequence[str],
    genes: Sequence[str],
    *,
    counts_layer: str = "counts",
    min_spots: int = 1,
    min_varying_genes: int = 0,
    purpose: str = "gene selection",
) -> None:
    """Refuse degenerate samples by name before any library sees them: fewer than ``min_spots`` spots,
    no counts at all in ``genes``, or fewer than ``min_varying_genes`` of ``genes`` that vary across
    spots (what scanpy's seurat_v3 needs, see ``_LOESS_MIN_GENES``)."""
    for t, name in zip(tables, names, strict=True):
        if t.n_obs < max(min_spots, 1):
            msg = (
                f"Sample {name!r} has {t.n_obs} spot{'s' if t.n_obs != 1 else ''}; {purpose} needs at least "
                f"{max(min_spots, 1)} per sample. Drop the sample or check how it was read."
            )
            raise ValueError(msg)
        x = t.layers.get(counts_layer, t.X)
        idx = t.var_names.get_indexer(list(genes))
        x = sp.csr_matrix(x[:, idx[idx >= 0]])
        if x.nnz == 0 or not np.any(x.data):
            msg = (
                f"Sample {name!r} has no counts: all {t.n_obs} spots are zero in the {len(genes)} genes used "
                f"for {purpose}. "
                "Drop the sample, or check its counts (an empty or misread matrix)."
            )
            raise ValueError(msg)
        if min_varying_genes:
            varying = int(np.count_nonzero(x.max(axis=0).toarray().ravel() != x.min(axis=0).toarray().ravel()))
            if varying < min_varying_genes:
                msg = (
                    f"Sample {name!r} has only {varying} genes that vary across its {t.n_obs} spots; seurat_v3 "
                    f"{purpose} fits a mean-variance curve per sample and needs at least {min_varying_genes}. "
                    "Drop the sample, use flavor='mean', or pass `genes=`."
                )
                raise ValueError(msg)


def _counts(adata: AnnData, layer: str):
    if layer in adata.layers:
        return adata.layers[layer]
    if is_integer_valued(adata.X):
        return adata.X
    msg = (
        f"flavor='seurat_v3' needs raw counts in layers[{layer!r}] or X; found neither. Use flavor='mean' on "
        "log-normalised data."
    )
    raise ValueError(msg)


@renamed_arguments("pp.select_genes")
def select_genes(
    samples,
    *,
    n_top_genes: int | None = 2000,
    flavor: Literal["seurat_v3", "mean"] = "seurat_v3",
    genes: Sequence[str] | None = None,
    counts_layer: str = "counts",
    key_added: str | None = GENES_KEY,
    overwrite: bool = False,
) -> list[str]:
    """Select the genes a model predicts, fitted on the given (training) samples only.

    Only genes present in every sample are eligible. ``flavor="seurat_v3"`` ranks highly
    variable genes on raw counts with each sample as a batch (scanpy); ``"mean"`` ranks by mean
    log-normalised expression (CP10k, library over all genes). ``genes=`` checks a given list.

    Parameters
    ----------
    samples
        Training samples (SpatialData or AnnData, one, a list or a dict).
    n_top_genes
        Number of genes to keep (ignored with ``genes=``).
    flavor
        Ranking, see above.
    genes
        A given gene list; every gene must be present in every sample.
    counts_layer
        Where raw counts live after :func:`hespotex.pp.normalize`.
    key_added
        Name of the ``var`` column and ``uns`` entry written on each sample; ``None`` writes nothing.
    overwrite
        Replace an earlier selection stored under ``key_added``.

    Returns
    -------
    The selected genes, ranked. Writes to each sample's table ``var[key_added]`` (bool) and
    ``uns[key_added]`` (``genes``, ``flavor``, ``n_top`` (the number kept), ``fitted_on``, ``hash``).
    """
    named = as_sample_dict(samples)
    tables = [get_table(s) for s in named.values()]
    for t in tables:
        if key_added is not None and not overwrite and (key_added in t.var or key_added in t.uns):
            msg = f"A gene selection is already stored under {key_added!r}; pass `overwrite=True` to replace it."
            raise ValueError(msg)
    names = list(named)
    common = shared_genes(tables)
    if len(common) == 0:
        msg = (
            f"The samples share no genes ({[t.n_vars for t in tables]} genes each); check that they use the same "
            "gene symbols."
        )
        raise ValueError(msg)
    if genes is not None:
        genes = [str(g) for g in genes]
        dup = pd.Index(genes)[pd.Index(genes).duplicated()]
        if len(dup):
            msg = f"The given gene list has duplicates, e.g. {list(dup[:5])}."
            raise ValueError(msg)
        common_set = set(common)  # once: a set per gene made this quadratic (20 s for 5,000 genes)
        missing = [g for g in genes if g not in common_set]
        if missing:
            msg = (
                f"{len(missing)} of {len(genes)} given genes are absent from at least one sample, e.g. "
                f"{missing[:5]}. Drop them or use other samples."
            )
            raise ValueError(msg)
        check_samples(tables, names, genes, counts_layer=counts_layer)
        selected, flavor_used = genes, "given"
    else:
        if n_top_genes is None or n_top_genes < 1:
            msg = f"Expected `n_top_genes` >= 1, found {n_top_genes}."
            raise ValueError(msg)
        if n_top_genes > len(common):
            msg = f"Asked for {n_top_genes} genes but the samples share only {len(common)}; lower `n_top_genes`."
            raise ValueError(msg)
        seurat = flavor == "seurat_v3"
        check_samples(
            tables, names, common, counts_layer=counts_layer,
            min_spots=2 if seurat else 1, min_varying_genes=_LOESS_MIN_GENES if seurat else 0,
        )  # fmt: skip
        if seurat:
            selected = _seurat_v3(tables, names, common, n_top_genes, counts_layer)
        elif flavor == "mean":
            means = np.zeros(len(common))
            for t in tables:
                x = log_expression(t, common, counts_layer=counts_layer, dense=False)
                means += np.asarray(x.mean(axis=0)).ravel() * t.n_obs
            order = np.argsort(-means, kind="stable")[:n_top_genes]
            selected = list(common[order])
        else:
            msg = f"Unknown flavor {flavor!r}; expected 'seurat_v3' or 'mean', or pass `genes=`."
            raise ValueError(msg)
        flavor_used = flavor
    record = {
        "genes": list(selected),
        "flavor": flavor_used,
        "n_top": len(selected),
        "fitted_on": names,
        "hash": gene_hash(selected),
    }
    chosen = set(selected)
    for t in tables if key_added is not None else ():
        t.var[key_added] = [g in chosen for g in t.var_names]
        t.uns[key_added] = record
    logger.info("Selected %d genes (%s) on %d sample(s).", len(selected), flavor_used, len(tables))
    return list(selected)


def _seurat_v3(tables: list[AnnData], names: list[str], common: pd.Index, n_top: int, counts_layer: str) -> list[str]:
    import anndata as ad
    import scanpy as sc

    parts = []
    for t, name in zip(tables, names, strict=True):
        x = _counts(t, counts_layer)[:, t.var_names.get_indexer(common)]
        parts.append(
            ad.AnnData(
                X=sp.csr_matrix(x, dtype=np.float32),
                obs=pd.DataFrame({"sample": name}, index=t.obs_names.astype(str)),
                var=pd.DataFrame(index=common),
            )
        )
    joint = ad.concat(parts, index_unique="-") if len(parts) > 1 else parts[0]
    batch_key = "sample" if len(parts) > 1 else None
    try:
        hvg = sc.pp.highly_variable_genes(
            joint, flavor="seurat_v3", n_top_genes=n_top, batch_key=batch_key, inplace=False
        )
    except ValueError as err:  # skmisc's loess cannot fit a sample's mean-variance curve
        smallest = min(zip(tables, names, strict=True), key=lambda tn: tn[0].n_obs)[1]
        msg = (
            f"seurat_v3 gene selection could not fit the mean-variance curve of a sample ({err}); the smallest "
            f"sample is {smallest!r}. Drop samples with few spots or little expression, use flavor='mean', or "
            "pass `genes=`."
        )
        raise ValueError(msg) from err
    hvg.index = common
    rank_col = "highly_variable_rank"
    hvg = hvg[hvg["highly_variable"]]
    if batch_key is not None:
        hvg = hvg.sort_values(["highly_variable_nbatches", rank_col], ascending=[False, True])
    else:
        hvg = hvg.sort_values(rank_col)
    return list(hvg.index[:n_top])
