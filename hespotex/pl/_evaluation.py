"""``hx.pl.evaluation``: per-gene correlations, predicted-vs-measured scatter and per-fold comparisons."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from hespotex._compat import renamed_arguments
from hespotex._constants import PREDICTION_KEY, evaluation_key
from hespotex.pl._export import hv_backends
from hespotex.tl.evaluation._truth import measured_expression

logger = logging.getLogger("hespotex")

KINDS = ("distribution", "scatter", "folds")
_CV_COLUMNS = {"fold", "method", "gene", "pearson"}
_SUMMARY_COLUMNS = {"fold", "method", "pearson_all"}


def _input_kind(data: Any) -> str:
    """``"table"`` (predictions), ``"scores"`` (hx.tl.evaluate), ``"cv"`` (hx.tl.cross_validate) or ``"cv_summary"``."""
    if isinstance(data, pd.DataFrame):
        cols = set(data.columns) | ({data.index.name} if data.index.name else set())
        if cols >= _CV_COLUMNS:
            return "cv"
        if cols >= _SUMMARY_COLUMNS:
            return "cv_summary"
        if "pearson" in cols:
            return "scores"
        msg = (
            "Expected a per-gene table of `hx.tl.evaluate` (column 'pearson'), a table of `hx.tl.cross_validate` "
            f"(columns {sorted(_CV_COLUMNS)}) or of `summarize_cv` (columns {sorted(_SUMMARY_COLUMNS)}); found "
            f"columns {list(data.columns)}."
        )
        raise ValueError(msg)
    if hasattr(data, "layers") or hasattr(data, "tables"):
        return "table"
    msg = (
        "Expected predictions (an AnnData or SpatialData holding `layers[layer]` from `hx.tl.predict`) or a DataFrame "
        f"returned by `hx.tl.evaluate` / `hx.tl.cross_validate` / `summarize_cv`; found {type(data).__name__}."
    )
    raise TypeError(msg)


def _prediction_table(data: Any, key: str, layer: str | None):
    """The table, layer and record of the prediction ``key`` (the one lookup of
    :mod:`hespotex.tl.prediction._tables`)."""
    from hespotex.tl.prediction._tables import resolve_prediction

    found = resolve_prediction(data, key, layer=layer)
    return found.table, found.layer, found.params


@renamed_arguments("pl.evaluation")
def evaluation(
    data: Any,
    *,
    kind: str | Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    key: str = PREDICTION_KEY,
    layer: str | None = None,
    truth: Any = None,
    cv: pd.DataFrame | None = None,
    gene_set: str = "all",
    n_genes: int = 4,
    max_points: int = 20_000,
    seed: int = 0,
    width: int = 320,
    height: int = 300,
):
    """Views of how well predictions match the measurement.

    Parameters
    ----------
    data
        One of

        - predictions: an AnnData (or SpatialData) with the prediction ``key`` (:func:`hespotex.tl.predict`)
          and the measured expression of the same spots (see ``truth``): all three views are possible
          (``folds`` with ``cv``);
        - the per-gene table of :func:`hespotex.tl.evaluate` (index or column ``gene``, column ``pearson``;
          with ``groups`` its tidy form with a ``sample`` column): ``distribution``;
        - the tidy table of :func:`hespotex.tl.cross_validate` (``fold``, ``method``, ``gene``,
          ``pearson``, ...): ``distribution`` (per method) and ``folds``;
        - the table of :func:`hespotex.tl.summarize_cv` (``fold``, ``method``, ``pearson_all``, ...): ``folds``.
    kind
        Views to draw, in order: ``"distribution"`` (per-gene Pearson r: histogram, or violins per
        method / sample), ``"scatter"`` (predicted vs measured per spot for ``genes``), ``"folds"``
        (mean Pearson r per fold and method: one point per fold, a bar at the mean over folds).
        Default: every view the inputs support. A view the inputs cannot support is an error.
    genes
        Genes of the scatter view; default the ``n_genes`` genes best predicted.
    key
        The prediction (predictions input): the ``key_added`` given to :func:`hespotex.tl.predict`, found in
        whichever table holds it (formerly ``table_key`` / ``layer``); the stored
        ``uns[f"{key}_evaluation"]["per_gene"]`` of :func:`hespotex.tl.evaluate` ``(key=key)`` is used for the
        distribution when present, else the scores are computed.
    layer
        Another layer of that prediction's table to score instead (``f"{key}_spread"``, a baseline).
    truth
        Measured expression: ``None`` for ``layers["measured"]`` when present, else the table's own counts
        normalised like the predictions (log1p of counts per ``target_sum`` of the prediction); a layer name;
        or a sample / AnnData with the measured counts of the same spots (matched by ``obs_names``).
    cv
        A table of :func:`hespotex.tl.cross_validate` or :func:`hespotex.tl.summarize_cv` for the ``folds``
        view beside views of predictions.
    gene_set
        Genes averaged in the ``folds`` view: ``"all"`` or a flagged panel (``"hvg"``, ``"heg"``, or any
        ``in_<name>`` column of the cross-validation table).
    n_genes
        Number of genes in the scatter view when ``genes`` is not given.
    max_points
        The most spots drawn per scatter (a seeded random subset above it).
    seed
        Seed of that subset.
    width, height
        Size of each view in screen pixels (bokeh).

    Returns
    -------
    A :class:`holoviews.Layout` of the views in the order of ``kind``: the distribution (a
    ``Histogram`` with a ``VLine`` at the mean, or a ``Violin`` per method / sample), one ``Scatter``
    (``measured`` vs ``predicted``, with the identity line) per gene, and the fold comparison
    (a ``Scatter`` of ``method_index`` vs ``pearson`` per fold and method with ``Segments`` at the means).
    Nothing is written; inputs are not changed.
    """
    hv = hv_backends()
    source = _input_kind(data)
    if cv is not None and _input_kind(cv) not in ("cv", "cv_summary"):
        msg = f"Expected `cv=` a table of `hx.tl.cross_validate` or `summarize_cv`, found columns {list(cv.columns)}."
        raise ValueError(msg)
    supported = {
        "table": ["distribution", "scatter"] + (["folds"] if cv is not None else []),
        "scores": ["distribution"] + (["folds"] if cv is not None else []),
        "cv": ["distribution", "folds"],
        "cv_summary": ["folds"],
    }[source]
    kinds = supported if kind is None else [kind] if isinstance(kind, str) else list(kind)
    for k in kinds:
        if k not in KINDS:
            msg = f"Unknown view {k!r}; expected some of {list(KINDS)}."
            raise ValueError(msg)
        if k not in supported:
            msg = (
                f"The {k!r} view needs {_NEEDS[k]}; the input (a {source.replace('_', ' ')} table) supports "
                f"{supported}."
            )
            raise ValueError(msg)
    table = pred = y = scores = computed = None
    if source == "table":
        from hespotex.tl.evaluation._metrics import gene_scores

        table, layer_read, params = _prediction_table(data, key, layer)
        pred = np.asarray(table.layers[layer_read], dtype=np.float32)
        stored = table.uns.get(evaluation_key(key if layer is None else layer))
        scores = stored.get("per_gene") if isinstance(stored, dict) else None
        if "scatter" in kinds or scores is None:
            y = measured_expression(table, params=params, truth=truth)
            computed = gene_scores(y, pred, list(table.var_names))
        if scores is None:
            scores = computed
    elif source == "scores":
        scores = data
    views = []
    for k in kinds:
        if k == "distribution":
            views.append(_distribution(hv, data if source == "cv" else scores, width=width, height=height))
        elif k == "scatter":
            views.extend(
                _scatters(
                    hv,
                    table,
                    pred,
                    y,
                    computed,
                    layer=layer_read,
                    genes=genes,
                    n_genes=n_genes,
                    max_points=max_points,
                    seed=seed,
                    width=width,
                    height=height,
                )
            )
        else:
            views.append(
                _folds(
                    hv, data if source in ("cv", "cv_summary") else cv, gene_set=gene_set, width=width, height=height
                )
            )
    layout = hv.Layout(views).cols(3).opts(shared_axes=False, backend="bokeh")
    return layout.opts(sublabel_format="", backend="matplotlib")


_NEEDS = {
    "distribution": "per-gene scores (predictions, `hx.tl.evaluate` or `hx.tl.cross_validate` output)",
    "scatter": "predictions with measured expression (an AnnData / SpatialData from `hx.tl.predict`)",
    "folds": "a `hx.tl.cross_validate` or `summarize_cv` table (pass it as data or `cv=`)",
}


def _distribution(hv, scores: pd.DataFrame, *, width: int, height: int):
    """Histogram of per-gene Pearson r, or violins per method (cross-validation) / sample (grouped evaluate)."""
    by = "method" if "method" in scores else "sample" if "sample" in scores else None
    frame = scores.reset_index() if "gene" not in scores and scores.index.name == "gene" else scores
    frame = frame[np.isfinite(frame["pearson"].to_numpy(dtype=float))]
    if len(frame) == 0:
        msg = "No gene has a finite Pearson correlation (constant truth or prediction); nothing to show."
        raise ValueError(msg)
    if by is None:
        r = frame["pearson"].to_numpy(dtype=float)
        title = f"Per-gene Pearson r: mean {r.mean():.3f}, {len(r)} genes"
        counts, edges = np.histogram(r, bins=min(30, max(5, len(r) // 3)))
        hist = hv.Histogram((edges, counts), kdims=["pearson"], vdims=["genes"], group="Distribution")
        hist = hist.opts(width=width, height=height, tools=["hover"], backend="bokeh")
        mean = hv.VLine(float(r.mean()), group="Mean").opts(color="black", line_dash="dashed", backend="bokeh")
        mean = mean.opts(color="black", linestyle="--", backend="matplotlib")
        view = hist * mean
    else:
        data = frame[[by, "pearson"]].assign(**{by: frame[by].astype(str)})
        means = data.groupby(by, sort=False)["pearson"].mean()
        title = f"Per-gene Pearson r by {by}"
        view = hv.Violin(data, kdims=[by], vdims=["pearson"], group="Distribution")
        view = view.opts(width=width + 40 * max(0, len(means) - 3), height=height, backend="bokeh")
    view = view.opts(title=title, fontsize={"title": "10pt"}, backend="bokeh")
    return view.opts(title=title, fontsize={"title": 9}, backend="matplotlib")


def _scatters(hv, table, pred, y, scores, *, layer, genes, n_genes, max_points, seed, width, height) -> list:
    """One predicted-vs-measured scatter per gene."""
    names = list(table.var_names)
    known = set(names)
    if genes is None:
        ranked = scores["pearson"].astype(float).sort_values(ascending=False, na_position="last")
        genes = [g for g in ranked.index if g in known][:n_genes]
    else:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in known]
        if missing:
            msg = f"Genes {missing} are not predicted in layers[{layer!r}]; the predicted genes include {names[:5]}."
            raise KeyError(msg)
    idx = pd.Index(names).get_indexer(genes)
    n = pred.shape[0]
    keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    spot_ids = np.asarray(table.obs_names)[keep]
    views = []
    for gene, j in zip(genes, idx, strict=True):
        measured, predicted = y[keep, j], pred[keep, j]
        r = float(scores.loc[gene, "pearson"])
        frame = pd.DataFrame({"measured": measured, "predicted": predicted, "spot": spot_ids})
        points = hv.Scatter(frame, "measured", ["predicted", "spot"], group="Scatter", label=gene)
        points = points.opts(width=width, height=height, size=3, alpha=0.5, tools=["hover"], backend="bokeh")
        points = points.opts(s=6, alpha=0.5, backend="matplotlib")
        lo = float(min(measured.min(), predicted.min())) if len(keep) else 0.0
        hi = float(max(measured.max(), predicted.max())) if len(keep) else 1.0
        diag = hv.Curve([(lo, lo), (hi, hi)], "measured", "predicted", group="Identity")
        diag = diag.opts(color="grey", line_dash="dashed", backend="bokeh").opts(
            color="grey", linestyle="--", backend="matplotlib"
        )
        title = f"{gene}: r = {r:.3f}" if np.isfinite(r) else gene
        view = (points * diag).opts(title=title, show_legend=False, fontsize={"title": "10pt"}, backend="bokeh")
        views.append(view.opts(title=title, show_legend=False, fontsize={"title": 9}, backend="matplotlib"))
    return views


def fold_means(cv: pd.DataFrame, *, gene_set: str = "all") -> pd.DataFrame:
    """Mean Pearson r per fold and method (``fold``, ``method``, ``pearson``) over ``gene_set`` genes."""
    if set(cv.columns) >= _SUMMARY_COLUMNS and "gene" not in cv:
        col = f"pearson_{gene_set}"
        if col not in cv:
            msg = (
                f"Expected a column {col!r} for gene_set={gene_set!r}; found "
                f"{[c for c in cv.columns if c.startswith('pearson_')]}."
            )
            raise ValueError(msg)
        out = cv.loc[cv["fold"].astype(str) != "mean", ["fold", "method", col]].rename(columns={col: "pearson"})
    else:
        part = cv
        if gene_set != "all":
            flag = f"in_{gene_set}"
            if flag not in cv:
                msg = (
                    f"Expected a column {flag!r} for gene_set={gene_set!r}; found "
                    f"{[c for c in cv.columns if c.startswith('in_')]}."
                )
                raise ValueError(msg)
            part = cv[cv[flag].astype(bool)]
        out = part.groupby(["fold", "method"], sort=False)["pearson"].mean().reset_index()
    return out.assign(fold=out["fold"].astype(str), method=out["method"].astype(str)).reset_index(drop=True)


def _folds(hv, cv: pd.DataFrame, *, gene_set: str, width: int, height: int):
    """Points per fold for each method (slightly spread), a bar at the mean over folds."""
    means = fold_means(cv, gene_set=gene_set)
    methods = list(dict.fromkeys(means["method"]))
    folds = list(dict.fromkeys(means["fold"]))
    spread = np.linspace(-0.2, 0.2, len(folds)) if len(folds) > 1 else np.zeros(1)
    offset = dict(zip(folds, spread, strict=True))
    frame = means.assign(
        method_index=[methods.index(m) + offset[f] for m, f in zip(means["method"], means["fold"], strict=True)]
    )
    points = hv.Scatter(frame, "method_index", ["pearson", "method", "fold"], group="Folds")
    ticks = [(i, m) for i, m in enumerate(methods)]
    avg = means.groupby("method", sort=False)["pearson"].mean()
    bars = hv.Segments(
        [(methods.index(m) - 0.3, v, methods.index(m) + 0.3, v) for m, v in avg.items()],
        ["method_index", "pearson", "x1", "y1"],
        group="Mean",
    )
    label = "all genes" if gene_set == "all" else f"{gene_set} genes"
    title = f"Mean Pearson r per fold ({label})"
    points = points.opts(
        color="fold",
        cmap="Category10",
        size=8,
        tools=["hover"],
        width=max(width, 90 * len(methods)),
        height=height,
        xticks=ticks,
        xlabel="method",
        show_legend=False,
        backend="bokeh",
    )
    points = points.opts(
        color="fold",
        cmap="tab10",
        s=30,
        xticks=ticks,
        xlabel="method",
        xrotation=30 if len(methods) > 2 else 0,
        backend="matplotlib",
    )
    bars = bars.opts(color="black", line_width=3, backend="bokeh").opts(
        color="black", linewidth=2, backend="matplotlib"
    )
    view = (points * bars).opts(title=title, fontsize={"title": "10pt"}, backend="bokeh")
    return view.opts(title=title, fontsize={"title": 9}, backend="matplotlib")
