"""``hx.tl.cross_validate``: leave-one-sample (or group) out, everything fitted inside each training fold."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from hespotex._compat import renamed_arguments
from hespotex._sample import as_sample_dict, get_table
from hespotex.pp._genes import select_genes, shared_genes
from hespotex.tl.evaluation._evaluate import rank_genes
from hespotex.tl.evaluation._metrics import gene_scores, truth_constant_genes
from hespotex.tl.evaluation._peers import PEER_METHODS, peer_predictions
from hespotex.tl.model._data import EMBEDDING_KEY, GraphData, graph_data
from hespotex.tl.prediction._smoothing import DEFAULT_SMOOTH, check_smooth
from hespotex.tl.training._train import ensure_embeddings, train
from hespotex.tl.training._tune import DEFAULT_GRIDS, tune_baseline

logger = logging.getLogger("hespotex")

BASELINE_METHODS = ("ridge", "mlp", "retrieval")


def _method_specs(methods: Sequence[Any], config: Any) -> list[tuple[str, str, Any]]:
    """``(label, kind, config)``: kind is ``"hespotex"`` or a baseline name."""
    from hespotex.models import ModelConfig

    specs = []
    for m in methods:
        if isinstance(m, tuple):
            label, cfg = m
            specs.append((str(label), "hespotex", cfg))
        elif m == "hespotex":
            specs.append(("hespotex", "hespotex", config))
        elif isinstance(m, str) and m.startswith("hespotex:"):
            specs.append((m, "hespotex", ModelConfig.preset(m.split(":", 1)[1])))
        elif m in BASELINE_METHODS or m in PEER_METHODS:
            specs.append((m, m, None))
        else:
            msg = (
                f"Unknown method {m!r}; expected 'hespotex', 'hespotex:<preset>', a (label, ModelConfig) pair, or "
                f"one of {BASELINE_METHODS + PEER_METHODS}."
            )
            raise ValueError(msg)
    return specs


def fold_genes(
    train_tables: Sequence[Any], all_tables: Sequence[Any], *, genes, n_top_genes: int, flavor: str, include_genes
) -> list[str]:
    """The fold's gene panel: given ``genes``, else ``include_genes`` (those present everywhere) topped up
    with the training fold's best-ranked genes to ``n_top_genes``."""
    if genes is not None:
        return list(genes)
    present = set(shared_genes(all_tables))
    base = [g for g in (include_genes or []) if g in present]
    if len(base) >= n_top_genes:
        return base[:n_top_genes]
    ranked = select_genes(
        list(train_tables), n_top_genes=min(len(present), n_top_genes + len(base)), flavor=flavor, key_added=None
    )
    taken = set(base)
    extra = [g for g in ranked if g in present and g not in taken]
    return base + extra[: n_top_genes - len(base)]


@renamed_arguments("tl.cross_validate")
def cross_validate(
    samples: Any,
    *,
    groups: Mapping[str, str] | None = None,
    folds: Sequence[str] | None = None,
    methods: Sequence[Any] = ("hespotex", "ridge", "mlp", "retrieval"),
    smoothed: bool = True,
    smooth: float | None = DEFAULT_SMOOTH,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 1000,
    flavor: str = "seurat_v3",
    include_genes: Sequence[str] | None = None,
    panels: Mapping[str, Sequence[str]] | None = None,
    k: int = 50,
    config: Any = "hespotex",
    validation: Any = "auto",
    smooth_neighbors: int = 6,
    seed: int = 0,
    device: str | None = "auto",
    use_rep: str = EMBEDDING_KEY,
    target_sum: float = 1e4,
    target_norm: str = "library_modelled",
    baseline_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    tune_baselines: bool = False,
    ensemble: Any = "auto",
) -> pd.DataFrame:
    """Leave-one-sample-out (or leave-one-group-out) evaluation of HESpotEx and baselines.

    In each fold the held-out samples are never looked at until scoring: gene selection, gene
    rankings (top-``k`` HVG/HEG), embedding standardisation, early stopping (an inner validation
    split of the training samples) and baseline fitting use the training samples only.

    Parameters
    ----------
    samples
        Embedded samples (``{name: SpatialData or AnnData}`` or a list); see :func:`hespotex.tl.train`.
    groups
        ``{sample name: group}`` for leave-one-group-out (e.g. patients); default one group per sample.
    folds
        Run only these held-out groups (to spread folds over processes or machines); default all.
    methods
        ``"hespotex"`` (with ``config``), ``"hespotex:<preset>"``, ``(label, ModelConfig)`` pairs
        (ablations), and the baselines ``"ridge"`` (HEST-Benchmark), ``"mlp"`` (ST-Net style head),
        ``"retrieval"`` (BLEEP-style nearest neighbours) on the same genes and embeddings, and the
        pretrained peers ``"stpath"`` (needs ``"gigapath"`` embeddings and STPath's weights) and
        ``"deepspotm"`` (DeepSpot-M on the samples' H&E tiles; package ``deepspotm`` and its weights);
        see :mod:`hespotex.tl.evaluation._peers`.
    smoothed
        Also score every baseline after spatial smoothing over ``smooth_neighbors`` nearest spots
        (method ``"<name>+smooth"``): each spot keeps weight ``smooth`` of its own prediction, as hespotex's
        (the plain mean of the spot and its neighbours when ``smooth`` is ``None``); a tuned baseline
        (``tune_baselines``) has its own weight chosen on the training sections.
    smooth
        hespotex's predictions are smoothed as :func:`hespotex.tl.predict` smooths them (default 0.5: each spot keeps
        that weight of its own prediction, its 6 nearest spots share the rest), so the scores are those of the
        prediction users get; ``None``: the model's output unsmoothed.
    genes, n_top_genes, flavor, include_genes
        The fold's gene panel: ``genes`` as given, else ``include_genes`` topped up to ``n_top_genes``
        with the genes ``flavor`` ranks best on the training fold.
    panels
        Named gene lists to flag in the result (column ``in_<name>``), e.g. a published 785-gene panel.
    k
        Size of the top-HVG/HEG sets ranked on the training fold (columns ``in_hvg``, ``in_heg``).
    config, validation, seed, device, use_rep, target_sum, target_norm, ensemble
        As in :func:`hespotex.tl.train` (``validation`` and ``ensemble`` apply inside each training fold:
        by default a fold with 3 or more training samples trains an ensemble, as ``train`` does). The
        baselines are fitted to the same targets as the model, and the truth of the scores is
        normalised the same way.
    baseline_kwargs
        Extra parameters per baseline, e.g. ``{"mlp": {"epochs": 100}}``, or per peer, e.g.
        ``{"stpath": {"model_path": "stfm.pth", "gene_voc_path": "symbol2ensembl.json"}}``.
    tune_baselines
        Choose ridge α and retrieval k by leave-one-training-section-out on the training samples of
        each fold (:func:`hespotex.tl.training._tune.tune_baseline`), separately for the raw and the smoothed
        variant; the chosen value is in column ``chosen``. Needs 2 or more training samples.

    Returns
    -------
    A tidy table, one row per fold, test sample, method and gene: ``fold``, ``test_sample``,
    ``method``, ``gene``, ``pearson``, ``pvalue``, ``mse``, ``mean_true``, ``var_true``,
    ``n_spots``, ``truth_constant``, ``prediction_constant``, ``in_hvg``, ``in_heg``, ``in_<panel>``,
    ``fit_seconds`` (see :func:`hespotex.tl.evaluation._metrics.gene_scores`). Summarise with :func:`summarize_cv`.

    Writes to the samples only what embedding writes when they lack ``obsm[use_rep]`` (that entry and
    its record ``uns["hespotex_embed"][use_rep]``, see :func:`hespotex.pp.embed`); nothing else.
    """
    from hespotex.pp._graph import knn_graph
    from hespotex.tl.evaluation._baselines import make_baseline
    from hespotex.tl.evaluation._baselines import smooth as smooth_predictions
    from hespotex.tl.training._train import split_validation

    smooth = check_smooth(smooth)
    named = as_sample_dict(samples)
    names = list(named)
    for s in named.values():
        ensure_embeddings(s, embedding_key=use_rep)
    tables = {n: get_table(s) for n, s in named.items()}
    groups = {n: str(groups[n]) if groups else n for n in names}
    specs = _method_specs(methods, config)
    _check_cv_samples(tables, specs, genes=genes, smooth_neighbors=smooth_neighbors if smoothed else 0)
    rows = []
    fold_ids = list(dict.fromkeys(groups[n] for n in names))
    if len(fold_ids) < 2:
        msg = f"Cross-validation needs at least 2 samples or groups, found {len(fold_ids)}."
        raise ValueError(msg)
    if folds is not None:
        unknown = [f for f in folds if f not in fold_ids]
        if unknown:
            msg = f"Unknown folds {unknown}; the groups are {fold_ids}."
            raise ValueError(msg)
        fold_ids = [f for f in fold_ids if f in set(folds)]
    for fold in fold_ids:
        test_names = [n for n in names if groups[n] == fold]
        train_names = [n for n in names if groups[n] != fold]
        fold_gene_list = fold_genes(
            [tables[n] for n in train_names],
            list(tables.values()),
            genes=genes,
            n_top_genes=n_top_genes,
            flavor=flavor,
            include_genes=include_genes,
        )
        ranks = rank_genes({n: tables[n] for n in train_names}, fold_gene_list, k=k, target_sum=target_sum)
        hvg, heg = set(ranks["hvg"]), set(ranks["heg"])
        norm = {"embedding_key": use_rep, "target_sum": target_sum, "target_norm": target_norm}
        train_data = {n: graph_data(tables[n], n, genes=fold_gene_list, **norm) for n in train_names}
        test_data = {n: graph_data(tables[n], n, genes=fold_gene_list, **norm) for n in test_names}
        held, _ = split_validation(train_names, validation, seed=seed)
        for label, kind, cfg in specs:
            t0 = time.perf_counter()
            if kind == "hespotex":
                model = train(
                    {n: tables[n] for n in train_names},
                    genes=fold_gene_list,
                    config=cfg,
                    validation=validation,
                    seed=seed,
                    device=device,
                    use_rep=use_rep,
                    target_sum=target_sum,
                    target_norm=target_norm,
                    ensemble=ensemble,
                )
                preds = {  # the prediction hx.tl.predict gives (smoothed as it smooths), from embeddings and centres
                    n: model.predict_graph(GraphData(n, d.emb, d.coords_um), device=device, smooth=smooth)["expression"]
                    for n, d in test_data.items()
                }
            elif kind in PEER_METHODS:
                kw = (baseline_kwargs or {}).get(kind, {})
                preds = peer_predictions(
                    kind,
                    {n: tables[n] for n in test_names},
                    test_data,
                    fold_gene_list,
                    embedding_key=use_rep,
                    kwargs=kw,
                    samples={n: named[n] for n in test_names},
                )
            elif tune_baselines and kind in DEFAULT_GRIDS:
                variants, chosen = _tuned_variants(
                    kind,
                    label,
                    train_data,
                    test_data,
                    smoothed=smoothed,
                    k=smooth_neighbors,
                    seed=seed,
                    kwargs=(baseline_kwargs or {}).get(kind, {}),
                )
            else:
                preds = _baseline_predictions(
                    kind,
                    train_data,
                    test_data,
                    held,
                    seed=seed,
                    kwargs=(baseline_kwargs or {}).get(kind, {}),
                    make_baseline=make_baseline,
                )
            seconds = time.perf_counter() - t0
            if not (tune_baselines and kind in DEFAULT_GRIDS):
                chosen = {}
                variants = [(label, preds)]
                if smoothed and kind != "hespotex":
                    smoothed_preds = {}
                    for n, p in preds.items():
                        conn, _ = knn_graph(test_data[n].coords_um, smooth_neighbors)
                        smoothed_preds[n] = smooth_predictions(p, conn, self_weight=smooth)
                    variants.append((f"{label}+smooth", smoothed_preds))
            for method, by_sample in variants:
                for n, p in by_sample.items():
                    scores = gene_scores(test_data[n].expr, p, fold_gene_list).reset_index()
                    scores.insert(0, "method", method)
                    scores.insert(0, "test_sample", n)
                    scores.insert(0, "fold", fold)
                    scores["fit_seconds"] = seconds
                    scores["in_hvg"] = scores["gene"].isin(hvg)
                    scores["in_heg"] = scores["gene"].isin(heg)
                    if chosen:
                        scores["chosen"] = chosen.get(method)
                    rows.append(scores)
            logger.info("fold %s: %s done in %.1f s", fold, label, seconds)
    table = pd.concat(rows, ignore_index=True)
    for name, panel in (panels or {}).items():
        table[f"in_{name}"] = table["gene"].isin(set(panel))
    return table


def _check_cv_samples(tables: Mapping[str, Any], specs, *, genes, smooth_neighbors: int) -> None:
    """Refuse, by name and before any fold runs, samples too small for the graphs or without counts."""
    from hespotex.models._net import resolve_config
    from hespotex.pp._genes import check_samples

    need = smooth_neighbors
    for _, kind, cfg in specs:
        if kind == "hespotex":
            c = resolve_config(cfg)
            need = max(need, c.ae_neighbors, c.decoder_neighbors)
    shared = list(shared_genes(list(tables.values())))
    shared_set = set(shared)
    present = shared if genes is None else [g for g in genes if g in shared_set]
    check_samples(
        list(tables.values()), list(tables), present, min_spots=need + 1,
        purpose=f"cross-validation (the {need}-neighbour spatial graphs)",
    )  # fmt: skip


def _tuned_variants(kind, label, train_data, test_data, *, smoothed, k, seed, kwargs):
    """Raw (and smoothed) predictions of a baseline tuned by leave-one-training-section-out, each variant tuned for
    itself."""
    from hespotex.pp._graph import knn_graph
    from hespotex.tl.evaluation._baselines import smooth

    sections = {n: (d.emb, d.expr, d.coords_um) for n, d in train_data.items()}
    variants, chosen = [], {}
    for smoothing in (False, True) if smoothed else (False,):
        model = tune_baseline(kind, sections, smoothed=smoothing, smooth_neighbors=k, seed=seed, **kwargs)
        name = f"{label}+smooth" if smoothing else label
        preds = {n: model.predict(d.emb) for n, d in test_data.items()}
        chosen[name] = f"{model.tuning_['param']}={model.tuning_['value']:g}"
        if smoothing:
            weight = model.tuning_["smooth_weight"]
            preds = {
                n: smooth(p, knn_graph(test_data[n].coords_um, k)[0], self_weight=weight) for n, p in preds.items()
            }
            chosen[name] += f", smooth={'mean' if weight is None else f'{weight:g}'}"
        variants.append((name, preds))
    return variants, chosen


def _baseline_predictions(kind, train_data, test_data, held, *, seed, kwargs, make_baseline) -> dict[str, np.ndarray]:
    """Fit one baseline on the training fold and predict the test samples.

    The MLP stops early on the held-out training samples (the same ones HESpotEx validates on);
    ridge and retrieval have nothing to stop, so they fit on every training sample.
    """

    def stack(names):
        return np.concatenate([train_data[n].emb for n in names]), np.concatenate([train_data[n].expr for n in names])

    model = make_baseline(kind, **({"seed": seed} if kind in ("ridge", "mlp") else {}), **kwargs)
    if kind == "mlp" and held:
        model.fit(*stack([n for n in train_data if n not in held]), validation=stack(held))
    else:
        model.fit(*stack(list(train_data)))
    return {n: model.predict(d.emb) for n, d in test_data.items()}


def summarize_cv(table: pd.DataFrame, *, panels: Sequence[str] = ("hvg", "heg"), skipna: bool = False) -> pd.DataFrame:
    """Mean Pearson per fold and method over all genes and each flagged panel (``in_<panel>`` columns),
    plus a ``"mean"`` fold averaging the folds.

    Genes whose truth is constant on the test sample have no correlation (``NaN``): they are left out
    of a fold's means and counted in ``n_truth_constant``; genes predicted as a constant score 0
    (see :mod:`hespotex.tl.evaluation._metrics`).

    The mean over folds is taken over every fold of the table (any method's). A method that lacks a
    fold, or whose score for a fold is ``NaN`` (e.g. every gene of a panel constant in that test
    sample), gets a ``NaN`` mean for that score, with a warning naming the folds: an average over the
    folds that happened to work is another, easier benchmark. ``skipna=True`` averages the folds
    available instead (still warned); ``n_folds`` always says how many folds the mean covers and
    ``missing_folds`` which are missing or ``NaN``.

    Returns
    -------
    One row per fold and method, then one ``fold="mean"`` row per method: ``fold``, ``method``,
    ``pearson_all``, ``fit_seconds``, ``pearson_<panel>``, ``n_genes``, ``n_truth_constant``, and in
    the mean rows ``n_folds`` (folds with a finite ``pearson_all``) and ``missing_folds``
    (comma-separated; ``""`` when none).

    Writes nothing; ``table`` is not changed.
    """
    out = []
    for (fold, method), part in table.groupby(["fold", "method"], sort=False):
        constant = truth_constant_genes(part)
        scored = part.loc[~constant.to_numpy()]
        row = {
            "fold": fold,
            "method": method,
            "pearson_all": scored["pearson"].mean(),
            "fit_seconds": part["fit_seconds"].iat[0],
        }
        for p in panels:
            col = f"in_{p}"
            if col in part:
                row[f"pearson_{p}"] = scored.loc[scored[col].astype(bool), "pearson"].mean()
        row["n_genes"] = len(part)
        row["n_truth_constant"] = int(constant.sum())
        out.append(row)
    per_fold = pd.DataFrame(out)
    folds = list(dict.fromkeys(per_fold["fold"]))
    scores = [c for c in per_fold.columns if c.startswith("pearson_")]
    means = []
    for method, part in per_fold.groupby("method", sort=False):
        part = part.set_index("fold").reindex(folds)
        row = {"fold": "mean", "method": method}
        missing_any = set()
        for c in scores:
            bad = [str(f) for f in folds if not np.isfinite(part.at[f, c])]
            missing_any.update(bad)
            row[c] = part[c].mean() if (skipna or not bad) else float("nan")
            if bad:
                logger.warning(
                    "summarize_cv: %s of method %r is missing or NaN in fold(s) %s; its mean over folds is %s.",
                    c, method, bad,
                    f"taken over the other {len(folds) - len(bad)} folds"
                    if skipna else "NaN (pass skipna=True to average the others)",
                )  # fmt: skip
        row["fit_seconds"] = part["fit_seconds"].mean()
        row["n_genes"] = part["n_genes"].mean()
        row["n_truth_constant"] = part["n_truth_constant"].sum()
        row["n_folds"] = int(np.isfinite(part["pearson_all"].to_numpy(dtype=float)).sum())
        row["missing_folds"] = ",".join(f for f in map(str, folds) if f in missing_any)
        means.append(row)
    return pd.concat([per_fold, pd.DataFrame(means)], ignore_index=True)
