"""What :func:`hespotex.tl.diagnostic_patches` scores patches by: the expression of a gene programme (predicted
or measured) found in the sample's tables, a signature from genes, and labels scored from image features by a
cross-validated classifier (see :mod:`hespotex.tl.explanation._diagnostic`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hespotex._constants import EMBEDDING_KEY, PREDICTION_KEY
from hespotex.tl.prediction._tables import prediction_table, recorded_params, resolve_prediction, spot_tables

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("hespotex")

IMAGE_REP = EMBEDDING_KEY
MEASURED = "X"  # layer name meaning "log-normalised measured expression of the table"
MAX_FOLDS = 5
MAX_COMPONENTS = 16


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def programme_expression(
    data: Any, genes: list[str], layer: str | None, key: str = PREDICTION_KEY
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Expression ``(n_spots, n_present)`` of ``genes`` from ``layer`` (``None``: the prediction ``key`` when the
    sample holds it, else the measured expression), the genes found, and where it came from."""
    from hespotex.pp._normalize import log_expression

    tables = spot_tables(data)
    source: tuple[str, AnnData, str] | None = None
    if layer is None:
        try:
            found = resolve_prediction(data, key)
        except KeyError:
            found = None
        for name, t in tables:  # the prediction, if it is of the same spots
            if found is not None and t is found.target:  # found.table: a view when stored as an obsm DataFrame
                source = (name, found.table, found.layer)
                break
        if source is None:
            source = (tables[0][0], tables[0][1], MEASURED)
    elif layer == MEASURED:
        source = (tables[0][0], tables[0][1], MEASURED)
    else:
        for name, t in tables:
            found = prediction_table(t, layer) if (recorded_params(t, layer) or {}).get("obsm") is not None else None
            if found is not None:
                source = (name, found[0], found[1])
                break
            if layer in t.layers:
                source = (name, t, layer)
                break
        if source is None:
            found = sorted({k for _, t in tables for k in t.layers})
            msg = (
                f"Expected expression in layers[{layer!r}], found layers {found}. Pass `layer=None` (predictions "
                f"when present, else measured expression), {MEASURED!r} (log-normalised measured expression) "
                "or an existing layer."
            )
            raise KeyError(msg)
    name, table, lay = source
    present = [g for g in genes if g in table.var_names]
    missing = [g for g in genes if g not in table.var_names]
    if not present:
        msg = (
            f"None of the {len(genes)} signature genes (e.g. {genes[:5]}) is in table {name!r} "
            f"({'measured X' if lay == MEASURED else f'layers[{lay!r}]'}, {table.n_vars} genes). Check the gene "
            "symbols, or pass `layer=` a layer that holds them."
        )
        raise KeyError(msg)
    if missing:
        logger.warning(
            "%d of %d signature genes are not in table %r and are left out: %s.",
            len(missing),
            len(genes),
            name,
            missing[:10],
        )
    if lay == MEASURED:
        try:
            x = log_expression(table, present)
        except ValueError as err:
            msg = f"Cannot read log-normalised measured expression from table {name!r}: {err}"
            raise ValueError(msg) from err
    else:
        idx = table.var_names.get_indexer(present)
        x = _dense(table.layers[lay][:, idx])
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        msg = f"The expression of the signature genes in table {name!r} holds NaN or infinite values."
        raise ValueError(msg)
    return x, present, {"table": name, "layer": lay, "genes_missing": missing}


def zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0), 0.0)
    return z


def parse_signature(by: Any) -> dict[str, float]:
    """``{gene: weight}`` from a gene, a gene list or a weighted mapping."""
    if isinstance(by, str):
        return {by: 1.0}
    if isinstance(by, Mapping):
        sig = {str(g): float(w) for g, w in by.items()}
        bad = [g for g, w in sig.items() if not np.isfinite(w)]
        if bad or not any(sig.values()):
            msg = f"Expected finite, not all zero signature weights, found {dict(list(sig.items())[:5])}."
            raise ValueError(msg)
        return sig
    genes = [str(g) for g in by]
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if dup:
        msg = f"Expected each signature gene once, found duplicates {dup[:5]}."
        raise ValueError(msg)
    return dict.fromkeys(genes, 1.0)


def label_scores(features: np.ndarray, labels: pd.Series, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Out-of-fold probability of each labelled spot's own label (NaN for unlabelled spots)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    known = labels.notna().to_numpy()
    y = labels[known].astype(str).to_numpy()
    x = features[known]
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        msg = (
            "A classifier needs at least two labels with two or more spots each, found "
            f"{dict(zip(classes, counts, strict=True))}."
        )
        raise ValueError(msg)
    n_splits = int(min(MAX_FOLDS, counts.min()))
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    proba = np.full(len(y), np.nan)
    for train, test in folds.split(x, y):
        n_comp = int(min(MAX_COMPONENTS, len(train) - 1, x.shape[1]))
        clf = make_pipeline(
            PCA(n_components=n_comp, svd_solver="full"), StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)
        )
        clf.fit(x[train], y[train])
        p = clf.predict_proba(x[test])
        col = pd.Index(clf.classes_).get_indexer(y[test])
        proba[test] = p[np.arange(len(test)), col]
    scores = np.full(len(labels), np.nan)
    scores[known] = proba
    info = {
        "classifier": f"PCA(<= {MAX_COMPONENTS} components) -> StandardScaler -> LogisticRegression(C=1.0)",
        "cross_fitting": f"StratifiedKFold(n_splits={n_splits}, shuffle=True, random_state={seed})",
        "n_splits": n_splits,
    }
    return scores, info


def find_rep(data: Any, use_rep: str | None, key: str = PREDICTION_KEY) -> tuple[np.ndarray, str]:
    tables = spot_tables(data)
    wanted = [use_rep] if use_rep is not None else [IMAGE_REP, f"X_{key}"]  # embeddings, else the latent of `key`
    for key in wanted:
        for _, t in tables:
            if key in t.obsm:
                x = np.asarray(t.obsm[key], dtype=np.float64)
                if x.ndim != 2 or not np.isfinite(x).all():
                    msg = (
                        f"Expected finite spot features in obsm[{key!r}] (n_spots x n_features), found shape "
                        f"{x.shape} or non-finite values."
                    )
                    raise ValueError(msg)
                return x, key
    found = sorted({k for _, t in tables for k in t.obsm})
    msg = (
        f"Ranking by a label needs image features in obsm (looked for {wanted}, found {found}). Run "
        "`hx.pp.embed(sdata)` (image embeddings) or `hx.tl.predict` (latent) first, or pass `use_rep=`."
    )
    raise KeyError(msg)


def rank_patches(scores: np.ndarray, candidates: np.ndarray, n: int, *, descending: bool = True) -> np.ndarray:
    """Positions of the top ``n`` candidates by score; ties go to the earlier position."""
    pos = np.flatnonzero(candidates & np.isfinite(scores))
    key = -scores[pos] if descending else scores[pos]
    return pos[np.lexsort((pos, key))][:n]


def as_groups(groups: Any) -> list[str] | None:
    if groups is None:
        return None
    return [str(groups)] if isinstance(groups, str) else [str(g) for g in groups]
