"""Scores that cannot be gamed: constant predictions score 0, constant truths are counted apart,
and a cross-validation summary says when a fold is missing or NaN."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import hespotex as hx
from hespotex.tl.evaluation._metrics import gene_scores, pearson_per_gene, summarize


def _pair(n_spots: int = 200, n_genes: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Truth and a prediction positively correlated with it, better for some genes than others."""
    rng = np.random.default_rng(seed)
    truth = rng.gamma(2.0, 1.0, size=(n_spots, n_genes))
    noise = rng.normal(size=truth.shape) * np.linspace(0.3, 6.0, n_genes)
    return truth, truth + noise


def _table(truth: np.ndarray, pred: np.ndarray) -> ad.AnnData:
    table = ad.AnnData(
        obs=pd.DataFrame(index=[f"s{i}" for i in range(len(truth))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(truth.shape[1])]),
    )
    table.layers["measured"] = truth.astype(np.float32)
    table.layers["hespotex"] = pred.astype(np.float32)
    return table


def test_flattening_the_worst_genes_cannot_raise_the_mean():
    truth, pred = _pair()
    table = _table(truth, pred)
    r = hx.tl.evaluate(table, k=10)["pearson"].to_numpy()
    honest = table.uns["hespotex_evaluation"]["summary"]
    worst = np.argsort(r)[:20]
    flat = pred.copy()
    flat[:, worst] = pred[:, worst].mean(axis=0)  # predict the 20 worst genes as constants
    gamed_table = _table(truth, flat)
    scores = hx.tl.evaluate(gamed_table, k=10)
    gamed = gamed_table.uns["hespotex_evaluation"]["summary"]
    assert (scores["pearson"].to_numpy()[worst] == 0.0).all()
    assert scores["prediction_constant"].to_numpy()[worst].all() and scores["prediction_constant"].sum() == 20
    expected = r.copy()
    expected[worst] = 0.0
    assert gamed["pearson_mean"] == pytest.approx(expected.mean(), rel=1e-6)
    assert gamed["pearson_mean"] < honest["pearson_mean"]  # the worst genes had small positive r
    assert gamed["n_prediction_constant"] == 20 and gamed["n_truth_constant"] == 0 and gamed["n_nan"] == 0


def test_constant_prediction_scores_zero_in_every_mean():
    truth, pred = _pair(n_genes=40)
    pred[:, [1, 2, 3]] = 7.0
    pred[:, 4] = np.nan  # not finite: no information either
    r = pearson_per_gene(truth, pred)
    assert (r[1:5] == 0.0).all() and np.isfinite(r).all()
    df = gene_scores(truth, pred, [f"g{j}" for j in range(40)])
    out = summarize(df, hvg=["g1", "g2", "g10"], heg=["g3", "g4"])
    assert out["pearson_mean"] == pytest.approx(r.mean())
    assert out["pearson_median"] == pytest.approx(np.median(r))
    assert out["pearson_mean_hvg"] == pytest.approx(r[10] / 3)
    assert out["pearson_mean_heg"] == 0.0
    assert out["n_prediction_constant"] == 4 and out["n_nan"] == 0
    assert df.loc["g1", "pvalue"] == pytest.approx(0.5)  # r = 0 is not significant


def test_constant_truth_is_counted_apart_not_averaged(caplog):
    truth, pred = _pair(n_genes=40)
    truth[:, [0, 5, 9]] = 0.0  # e.g. genes never detected on the test slide
    pred[:, 9] = 1.0  # constant in both: still a constant truth
    df = gene_scores(truth, pred, [f"g{j}" for j in range(40)])
    assert list(np.flatnonzero(df["truth_constant"])) == [0, 5, 9]
    assert df["pearson"].isna().sum() == 3
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        out = summarize(df, hvg=["g0", "g1", "g2"])
    assert out["n_truth_constant"] == 3 and out["n_truth_constant_hvg"] == 1 and out["n_genes"] == 40
    keep = df["pearson"].drop(index=["g0", "g5", "g9"])
    assert out["pearson_mean"] == pytest.approx(keep.mean())
    assert out["pearson_mean_hvg"] == pytest.approx(df.loc[["g1", "g2"], "pearson"].mean())
    assert "3 of 40 genes are constant in the truth" in caplog.text and "n_truth_constant" in caplog.text
    # evaluate reports the count in its summary too
    table = _table(truth, pred)
    hx.tl.evaluate(table, k=5)
    assert table.uns["hespotex_evaluation"]["summary"]["n_truth_constant"] == 3


def test_evaluate_refuses_non_finite_predictions():
    truth, pred = _pair(n_genes=10)
    pred[3, 2] = np.inf
    table = _table(truth, pred)
    with pytest.raises(
        ValueError, match=r"layers\['hespotex'\] holds NaN or infinite predictions at 1 spots in 1 genes"
    ):
        hx.tl.evaluate(table)
    assert "hespotex_evaluation" not in table.uns


# ---------------------------------------------------------------------------------------------- cross-validation
def _cv_table() -> pd.DataFrame:
    """A table shaped like ``hx.tl.cross_validate``'s: 3 folds x 2 methods x 30 genes."""
    rows = []
    for i, fold in enumerate(["f1", "f2", "f3"]):
        truth, pred = _pair(n_spots=80, n_genes=30, seed=i)
        for method, p in (("hespotex", pred), ("ridge", truth + 2 * (pred - truth))):
            s = gene_scores(truth, p, [f"g{j}" for j in range(30)]).reset_index()
            s.insert(0, "method", method)
            s.insert(0, "test_sample", fold)
            s.insert(0, "fold", fold)
            s["fit_seconds"] = 1.0 + i
            s["in_hvg"] = s["gene"].isin(["g0", "g1", "g2"])
            rows.append(s)
    return pd.concat(rows, ignore_index=True)


def test_summarize_cv_complete_table():
    table = _cv_table()
    summary = hx.tl.summarize_cv(table, panels=("hvg",))
    mean = summary[summary["fold"] == "mean"].set_index("method")
    per_fold = summary[summary["fold"] != "mean"]
    for method in ("hespotex", "ridge"):
        folds = per_fold[per_fold["method"] == method]
        assert mean.loc[method, "pearson_all"] == pytest.approx(folds["pearson_all"].mean())
        assert mean.loc[method, "n_folds"] == 3 and mean.loc[method, "missing_folds"] == ""
    assert (per_fold["n_genes"] == 30).all() and (per_fold["n_truth_constant"] == 0).all()


def test_summarize_cv_says_when_a_fold_is_missing(caplog):
    table = _cv_table()
    table = table[~((table["method"] == "ridge") & (table["fold"] == "f2"))]  # ridge failed on f2
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        summary = hx.tl.summarize_cv(table, panels=("hvg",))
    mean = summary[summary["fold"] == "mean"].set_index("method")
    assert np.isnan(mean.loc["ridge", "pearson_all"]) and np.isnan(mean.loc["ridge", "pearson_hvg"])
    assert mean.loc["ridge", "n_folds"] == 2 and mean.loc["ridge", "missing_folds"] == "f2"
    assert np.isfinite(mean.loc["hespotex", "pearson_all"]) and mean.loc["hespotex", "n_folds"] == 3
    assert "pearson_all of method 'ridge' is missing or NaN in fold(s) ['f2']" in caplog.text
    # averaging the folds that exist is an explicit choice
    lenient = hx.tl.summarize_cv(table, panels=("hvg",), skipna=True)
    lmean = lenient[lenient["fold"] == "mean"].set_index("method")
    ridge = summary[(summary["method"] == "ridge") & (summary["fold"] != "mean")]
    assert lmean.loc["ridge", "pearson_all"] == pytest.approx(ridge["pearson_all"].mean())
    assert lmean.loc["ridge", "n_folds"] == 2 and lmean.loc["ridge", "missing_folds"] == "f2"


def test_summarize_cv_says_when_a_fold_is_nan():
    table = _cv_table()
    # in fold f3 the three panel genes are constant in the truth: the panel score of f3 is undefined
    sel = (table["fold"] == "f3") & table["in_hvg"]
    table.loc[sel, "pearson"] = np.nan
    table.loc[sel, "truth_constant"] = True
    summary = hx.tl.summarize_cv(table, panels=("hvg",))
    f3 = summary[summary["fold"] == "f3"].set_index("method")
    assert np.isnan(f3.loc["hespotex", "pearson_hvg"]) and f3.loc["hespotex", "n_truth_constant"] == 3
    mean = summary[summary["fold"] == "mean"].set_index("method")
    assert np.isnan(mean.loc["hespotex", "pearson_hvg"]) and mean.loc["hespotex", "missing_folds"] == "f3"
    assert np.isfinite(mean.loc["hespotex", "pearson_all"]) and mean.loc["hespotex", "n_folds"] == 3
