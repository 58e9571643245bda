"""Expression targets of a model: how counts become the values it learns and predicts.

How the training targets are normalised decides much of how a model transfers to a section of
another patient, mostly through the library size: a shallow section's library over *all* genes is
dominated by a few abundant (often mitochondrial or ribosomal) genes, so per-spot scaling by it
adds noise the image cannot explain. The choices (``target_norm``):

``"library_all"``
    log1p(counts per ``target_sum``), library over all genes of the table (scanpy's
    ``normalize_total`` + ``log1p`` before any gene subset).
``"library_modelled"``
    log1p(counts per ``target_sum``), library over the modelled genes only.
``"log1p_counts"``
    log1p of the raw counts, no library scaling (HEST-Benchmark's targets).

The choice is a model setting: :func:`hespotex.tl.train` records it, saved models keep it, and
predictions state it in ``uns[key]["params"]["target_norm"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData

TargetNorm = Literal["library_all", "library_modelled", "log1p_counts"]
TARGET_NORMS: dict[str, str] = {
    "library_all": "log1p(counts per target_sum), library over all genes",
    "library_modelled": "log1p(counts per target_sum), library over the modelled genes",
    "log1p_counts": "log1p(raw counts), no library scaling (HEST-Benchmark)",
}


def check_target_norm(target_norm: str) -> str:
    """``target_norm`` if known, else a ``ValueError`` listing the choices."""
    if target_norm not in TARGET_NORMS:
        msg = f"Unknown target_norm {target_norm!r}; expected one of {sorted(TARGET_NORMS)}."
        raise ValueError(msg)
    return target_norm


def raw_counts(adata: AnnData, counts_layer: str = "counts") -> sp.csr_matrix:
    """The raw count matrix of a table: ``layers[counts_layer]``, else ``X`` when it holds integer counts."""
    if counts_layer in adata.layers:
        counts = adata.layers[counts_layer]
    elif "log1p" in adata.uns:
        msg = (
            f"This table is log-normalised and keeps no raw counts in layers[{counts_layer!r}]; the target "
            "normalisation needs them. Keep the counts (hx.pp.normalize stores them) or use target_norm='library_all'."
        )
        raise ValueError(msg)
    else:
        counts = adata.X
    counts = sp.csr_matrix(counts, dtype=np.float64)
    if counts.data.size and (counts.data.min() < 0 or not np.allclose(counts.data, np.round(counts.data))):
        msg = f"Expected raw integer counts in layers[{counts_layer!r}] or X; found negative or non-integer values."
        raise ValueError(msg)
    return counts


def normalize_counts(
    counts,
    genes_idx: np.ndarray | None = None,
    *,
    target_norm: str = "library_all",
    target_sum: float = 1e4,
    dense: bool = True,
) -> np.ndarray | sp.csr_matrix:
    """Targets ``(n_spots, n_selected)`` float32 from a raw count matrix (spots × all genes); CSR with ``dense=False``.

    ``genes_idx`` selects the modelled genes (all when ``None``); the library of
    ``"library_all"`` is taken over every column of ``counts``.
    """
    check_target_norm(target_norm)
    counts = sp.csr_matrix(counts, dtype=np.float64)
    sub = counts if genes_idx is None else counts[:, genes_idx]
    if target_norm == "log1p_counts":
        out = sub.copy()
    else:
        base = counts if target_norm == "library_all" else sub
        totals = np.asarray(base.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        out = sp.diags(scale) @ sub
    out = sp.csr_matrix(out)
    out.data = np.log1p(out.data)
    out = out.astype(np.float32)
    return out.toarray() if dense else out


def target_expression(
    adata: AnnData,
    genes: Sequence[str] | None,
    *,
    target_norm: str = "library_all",
    target_sum: float = 1e4,
    counts_layer: str = "counts",
    dense: bool = True,
) -> np.ndarray | sp.csr_matrix:
    """The model targets of ``genes`` in ``adata``: float32 ``(n_spots, len(genes))``, dense or (``dense=False``)
    CSR with the same values.

    ``"library_all"`` reads a log-normalised ``X`` as it is (scanpy's ``uns["log1p"]`` marker),
    as :func:`hespotex.pp._normalize.log_expression` does; the other choices need raw counts
    (``layers[counts_layer]`` or an integer ``X``). Nothing in ``adata`` changes.
    """
    from hespotex.pp._normalize import log_expression

    check_target_norm(target_norm)
    if target_norm == "library_all":
        return log_expression(adata, genes, target_sum=target_sum, counts_layer=counts_layer, dense=dense)
    genes = list(adata.var_names) if genes is None else list(genes)
    idx = adata.var_names.get_indexer(genes)
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
        msg = f"{len(missing)} of {len(genes)} genes are missing from this table, e.g. {missing[:5]}."
        raise KeyError(msg)
    return normalize_counts(
        raw_counts(adata, counts_layer), idx, target_norm=target_norm, target_sum=target_sum, dense=dense
    )
