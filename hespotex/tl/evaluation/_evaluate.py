"""``hx.tl.evaluate``: per-gene scores of stored predictions against measured expression."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from hespotex._compat import renamed_arguments
from hespotex._constants import MEASURED_LAYER, PREDICTION_KEY, evaluation_key
from hespotex._sample import as_sample_dict, get_table
from hespotex.pp._normalize import log_expression
from hespotex.tl.evaluation._metrics import gene_scores, summarize, top_genes
from hespotex.tl.evaluation._truth import measured_expression
from hespotex.tl.prediction._tables import resolve_prediction

logger = logging.getLogger("hespotex")


def rank_genes(reference: Any, genes: Sequence[str], *, k: int = 50, target_sum: float = 1e4) -> dict[str, list[str]]:
    """Top-``k`` highly variable and highly expressed ``genes`` ranked on ``reference`` samples (training data)."""
    tables = [get_table(s) for s in as_sample_dict(reference).values()]
    y = np.concatenate([log_expression(t, genes, target_sum=target_sum) for t in tables])
    k = min(k, len(genes))
    return {
        "hvg": list(top_genes(y, k, by="hvg", gene_names=list(genes))),
        "heg": list(top_genes(y, k, by="mean", gene_names=list(genes))),
    }


@renamed_arguments("tl.evaluate")
def evaluate(
    adata: Any,
    *,
    key: str = PREDICTION_KEY,
    truth: Any = MEASURED_LAYER,
    reference: Any = None,
    k: int = 50,
    groups: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Score predictions gene by gene against the measured expression of the same spots.

    Parameters
    ----------
    adata
        The predicted sample (SpatialData) or the table holding the predictions (what
        :func:`hespotex.tl.predict` returns).
    key
        The prediction to score: the ``key_added`` given to :func:`hespotex.tl.predict` (its recorded layer,
        in whichever table holds it), or the name of another layer (a baseline's, ``f"{key}_spread"``).
        Formerly ``layer``.
    truth
        A layer of ``adata`` with log-normalised measured expression (``"measured"``, written by
        :func:`~hespotex.tl.predict`), or a sample/AnnData with the measured counts of the same
        spots (matched by ``obs_names``; normalised like the model's targets).
    reference
        Training samples on which the top-``k`` highly variable / highly expressed genes are ranked.
        Without it they are ranked on the truth itself (logged): fine for exploring, not for
        benchmarks.
    k
        Size of the top-gene sets (50 as in HEST-Benchmark).
    groups
        ``obs`` column splitting spots into samples: scores per sample plus ``"pooled"``.
    key_added
        ``uns`` key of the results (default ``f"{key}_evaluation"``).
    overwrite
        Replace results already stored under ``key_added`` (refused otherwise).

    Returns
    -------
    Per-gene scores (``pearson``, ``pvalue``, ``mse``, ``mean_true``, ``var_true``, ``n_spots``,
    ``truth_constant``, ``prediction_constant``, and for an ensemble's prediction ``agreement``, the
    members' agreement of ``var[params["agreement_key"]]``; with ``groups`` a tidy table with a ``sample``
    column). Reads the prediction ``key`` and ``layers[truth]`` (or the ``truth`` sample). Writes
    ``uns[key_added]`` of the prediction table with ``per_gene`` (that table), ``summary`` (mean Pearson over
    all / top-``k`` HVG / top-``k`` HEG genes, MSE, number of genes with significantly positive
    correlation, see :func:`hespotex.tl.evaluation._metrics.summarize`) and ``params``.

    A gene predicted as a constant scores 0 in every mean (it is not dropped); a gene whose measured
    expression is constant on these spots has no defined correlation and is counted apart
    (``n_truth_constant``), not averaged. Non-finite predictions are refused.
    """
    found = resolve_prediction(adata, key)
    table, layer = found.table, found.layer
    source = found.target  # where the results are written (``table`` may be a view of an obsm DataFrame)
    key_added = key_added or evaluation_key(key)
    if key_added in source.uns and not overwrite:
        msg = (
            f"uns[{key_added!r}] already holds evaluation results; pass `overwrite=True` to replace them, "
            "or another `key_added`."
        )
        raise ValueError(msg)
    genes = list(table.var_names)
    pred = np.asarray(table.layers[layer], dtype=np.float32)
    if not np.isfinite(pred).all():
        bad = ~np.isfinite(pred)
        msg = (
            f"layers[{layer!r}] holds NaN or infinite predictions at {int(bad.any(axis=1).sum())} spots in "
            f"{int(bad.any(axis=0).sum())} genes; they cannot be scored. Predict again with "
            "`hx.tl.predict(..., overwrite=True)`."
        )
        raise ValueError(msg)
    params = found.params
    target_sum = float(params.get("target_sum", 1e4))
    y = measured_expression(table, params=params, truth=truth)
    if reference is None:
        logger.info(
            "Ranking top-%d genes on the evaluated spots themselves (pass `reference=` training samples for "
            "benchmarks).",
            k,
        )
        yk = min(k, len(genes))
        ranks = {
            "hvg": list(top_genes(y, yk, by="hvg", gene_names=genes)),
            "heg": list(top_genes(y, yk, by="mean", gene_names=genes)),
        }
    else:
        ranks = rank_genes(reference, genes, k=k, target_sum=target_sum)
    group_values = None if groups is None else table.obs[groups].astype(str).to_numpy()
    scores = gene_scores(y, pred, genes, groups=group_values)
    agreement_key = params.get("agreement_key")
    if agreement_key and agreement_key in table.var.columns:  # an ensemble: its members' agreement beside the score
        agreement = table.var[agreement_key].astype(float)
        scores["agreement"] = agreement.reindex(scores.index if groups is None else scores["gene"]).to_numpy()
    if groups is None:
        summary = summarize(scores, hvg=ranks["hvg"], heg=ranks["heg"])
    else:
        summary = {
            name: summarize(part.set_index("gene").drop(columns="sample"), hvg=ranks["hvg"], heg=ranks["heg"])
            for name, part in scores.groupby("sample", sort=False)
        }
    source.uns[key_added] = {
        "per_gene": scores.reset_index() if groups is None else scores,
        "summary": summary,
        "params": {
            "key": key,
            "layer": layer,
            "truth": truth if isinstance(truth, str) else "table",
            "k": k,
            "ranked_on": "reference" if reference is not None else "truth",
            "hvg": ranks["hvg"],
            "heg": ranks["heg"],
        },
    }
    scores.attrs["summary"] = summary
    return scores
