"""hx.pl.evaluation: the views hold the values of hx.tl.predict / evaluate / cross_validate outputs."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

import hespotex as hx
from hespotex.pp._normalize import log_expression
from hespotex.tl.evaluation._cross_validate import summarize_cv
from hespotex.tl.evaluation._metrics import gene_scores

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def predicted(trained_synthetic):
    """The test table (predictions in layers["hespotex"], raw counts in X), its truth and scores."""
    table = trained_synthetic["test"].tables["table"]
    target_sum = table.uns["hespotex"]["params"]["target_sum"]
    y = log_expression(table, list(table.var_names), target_sum=target_sum)
    pred = np.asarray(table.layers["hespotex"])
    return table, y, pred, gene_scores(y, pred, list(table.var_names))


@pytest.fixture(scope="module")
def cv_table(trained_synthetic):
    """A real leave-one-sample-out table over the three synthetic sections (fast baselines only)."""
    samples = {
        s.tables["table"].uns["hespotex_sample"]["sample_id"]: s.tables["table"]
        for s in [*trained_synthetic["train"], trained_synthetic["test"]]
    }
    genes = list(trained_synthetic["model"].genes)
    return hx.tl.cross_validate(samples, methods=("ridge", "retrieval"), genes=genes, k=10, device="cpu")


def elements(layout, cls):
    return [e for e in layout.traverse(lambda x: x, [cls])]


def test_distribution_and_scatter_from_predictions(predicted):
    import holoviews as hv

    table, y, pred, scores = predicted
    before = table.copy()
    view = hx.pl.evaluation(table)  # no layers["measured"]: the table's counts, normalised like the predictions
    (hist,) = elements(view, hv.Histogram)
    r = scores["pearson"].dropna()
    assert hist.dimension_values("genes").sum() == len(r)
    (mean,) = elements(view, hv.VLine)
    assert mean.data == pytest.approx(r.mean())
    scatters = elements(view, hv.Scatter)
    best = list(r.sort_values(ascending=False).index[:4])
    assert [s.label for s in scatters] == best  # default: the 4 best-predicted genes
    for s in scatters:
        j = list(table.var_names).index(s.label)
        np.testing.assert_allclose(s.dimension_values("measured"), y[:, j], rtol=1e-6)
        np.testing.assert_allclose(s.dimension_values("predicted"), pred[:, j], rtol=1e-6)
        assert list(s.dimension_values("spot")) == list(table.obs_names)
    overlays = [o for o in view if isinstance(o, hv.Overlay) and elements(o, hv.Scatter)]
    title = overlays[0].opts.get("plot", backend="bokeh").kwargs["title"]
    assert title == f"{best[0]}: r = {r[best[0]]:.3f}"
    assert len(elements(view, hv.Curve)) == 4  # identity lines
    assert set(table.uns) == set(before.uns) and set(table.layers) == set(before.layers)  # nothing written


def test_chosen_genes_measured_layer_and_subsampling(predicted):
    import holoviews as hv

    table, y, pred, _ = predicted
    t = table.copy()
    t.layers["measured"] = np.zeros_like(y)  # takes precedence over the counts
    g3, g5 = table.var_names[3], table.var_names[5]
    (s,) = elements(hx.pl.evaluation(t, kind="scatter", genes=[g3]), hv.Scatter)
    assert s.label == g3 and np.all(s.dimension_values("measured") == 0)
    (s,) = elements(hx.pl.evaluation(table, kind="scatter", genes=g5, max_points=50, seed=1), hv.Scatter)
    assert len(s) == 50
    j = list(table.var_names).index(g5)
    rows = pd.Index(table.obs_names).get_indexer(s.dimension_values("spot"))
    np.testing.assert_allclose(s.dimension_values("predicted"), pred[rows, j], rtol=1e-6)
    with pytest.raises(KeyError, match="not predicted"):
        hx.pl.evaluation(table, kind="scatter", genes=["nope"])


def test_distribution_from_evaluate_outputs(predicted):
    import holoviews as hv

    table, _, _, scores = predicted
    t = table.copy()
    t.obs["half"] = np.where(np.arange(t.n_obs) % 2, "left", "right")
    per_gene = hx.tl.evaluate(t, truth=t)
    (hist,) = elements(hx.pl.evaluation(per_gene), hv.Histogram)
    assert hist.dimension_values("genes").sum() == per_gene["pearson"].notna().sum()
    tidy = hx.tl.evaluate(t, truth=t, groups="half", key_added="by_half")
    (violin,) = elements(hx.pl.evaluation(tidy), hv.Violin)
    assert set(violin.dimension_values("sample")) == {"left", "right", "pooled"}
    assert len(violin) == tidy["pearson"].notna().sum()
    # a table holding a stored evaluation uses it for the distribution
    (mean,) = elements(hx.pl.evaluation(t, kind="distribution"), hv.VLine)
    assert mean.data == pytest.approx(t.uns["hespotex_evaluation"]["per_gene"]["pearson"].mean())
    assert mean.data == pytest.approx(scores["pearson"].mean(), abs=1e-5)


def test_folds_and_methods_from_cross_validation(cv_table, predicted, artifacts):
    import holoviews as hv

    view = hx.pl.evaluation(cv_table)
    (violin,) = elements(view, hv.Violin)
    assert list(dict.fromkeys(violin.dimension_values("method"))) == [
        "ridge",
        "ridge+smooth",
        "retrieval",
        "retrieval+smooth",
    ]
    (points,) = elements(view, hv.Scatter)
    summary = summarize_cv(cv_table)
    per_fold = summary[summary["fold"] != "mean"]
    assert len(points) == len(per_fold) == 3 * 4
    got = pd.DataFrame(
        {
            "fold": points.dimension_values("fold"),
            "method": points.dimension_values("method"),
            "pearson": points.dimension_values("pearson"),
        }
    )
    merged = got.merge(per_fold, on=["fold", "method"])
    np.testing.assert_allclose(merged["pearson"], merged["pearson_all"])
    methods = list(dict.fromkeys(points.dimension_values("method")))
    assert np.all(
        np.abs(points.dimension_values("method_index") - [methods.index(m) for m in got["method"]]) <= 0.2 + 1e-9
    )
    (bars,) = elements(view, hv.Segments)
    means = summary[summary["fold"] == "mean"].set_index("method")["pearson_all"]
    np.testing.assert_allclose(bars.dimension_values("pearson"), means[methods].to_numpy())
    # the summary table and flagged gene sets give the same points
    (hvg,) = elements(hx.pl.evaluation(summary, gene_set="hvg"), hv.Scatter)
    np.testing.assert_allclose(np.sort(hvg.dimension_values("pearson")), np.sort(per_fold["pearson_hvg"]))
    (hvg_tidy,) = elements(hx.pl.evaluation(cv_table, kind="folds", gene_set="hvg"), hv.Scatter)
    np.testing.assert_allclose(np.sort(hvg_tidy.dimension_values("pearson")), np.sort(hvg.dimension_values("pearson")))
    # every view together, written for people to look at
    table = predicted[0]
    full = hx.pl.evaluation(table, cv=cv_table, n_genes=3)
    assert len(elements(full, hv.Scatter)) == 3 + 1
    path = hx.pl.export(full, artifacts / "evaluation.png", title="hx.pl.evaluation: synthetic section", overwrite=True)
    from PIL import Image

    with Image.open(path) as im:
        assert im.width > 400 and np.asarray(im.convert("L")).std() > 10


def test_wrong_inputs_say_what_was_expected(predicted, cv_table):
    table = predicted[0]
    with pytest.raises(TypeError, match="Expected predictions"):
        hx.pl.evaluation([1, 2, 3])
    with pytest.raises(ValueError, match="cross_validate"):
        hx.pl.evaluation(pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="'scatter' view needs predictions"):
        hx.pl.evaluation(cv_table, kind="scatter")
    with pytest.raises(ValueError, match="'folds' view needs"):
        hx.pl.evaluation(table, kind="folds")
    with pytest.raises(ValueError, match="Unknown view"):
        hx.pl.evaluation(table, kind="hist")
    with pytest.raises(KeyError, match=r"layers\['other'\]"):
        hx.pl.evaluation(table, layer="other")
    with pytest.raises(ValueError, match="in_panel"):
        hx.pl.evaluation(cv_table, kind="folds", gene_set="panel")
    t = copy.copy(table)
    with pytest.raises(KeyError, match="absent from the truth"):
        hx.pl.evaluation(t, kind="scatter", truth=table[:10])
