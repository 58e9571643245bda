"""The ensemble's spread in the views (issue 9, item 6): a third linked map in ``hx.pl.spatial`` and the explorer,
state driven without a browser (tests/test_browser.py renders it in Chromium)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import hespotex as hx

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def predicted(trained_ensemble):
    sdata = copy.deepcopy(trained_ensemble["test"])
    hx.tl.predict(sdata, trained_ensemble["model"], device="cpu")
    return sdata


def _sources(root, column):
    from bokeh.models import ColumnDataSource

    return [np.asarray(m.data[column]) for m in root.select({"type": ColumnDataSource}) if column in m.data]


def test_explorer_shows_the_spread_as_a_third_linked_map(predicted):
    from bokeh.models import Title

    table = predicted.tables["table"]
    spread = np.asarray(table.layers["hespotex_spread"])
    ex = hx.pl.explorer(predicted)
    assert ex.view.columns == ["predicted", "measured", "spread"]
    layout = ex.__panel__()
    root = layout.get_root()
    try:
        np.testing.assert_allclose(_sources(root, "spread")[0], spread[:, 0], rtol=1e-6)
        gene = table.var_names[3]
        ex.gene = gene  # every map follows the gene, the spread too
        np.testing.assert_allclose(_sources(root, "spread")[0], spread[:, 3], rtol=1e-6)
        titles = {t.text for t in root.select({"type": Title})}
        assert {f"{gene} — predicted", f"{gene} — measured", f"{gene} — spread"} <= titles
        ex.spot = table.obs_names[7]
        assert f"spread {gene}: {spread[7, 3]:.3f}" in ex.spot_summary()
        # and the members' agreement on the gene shown (var['hespotex_agreement'], written by predict)
        agreement = table.var.loc[gene, "hespotex_agreement"]
        assert f"Members' agreement on {gene}: r = {agreement:.2f}" in ex.spot_summary()
    finally:
        layout._cleanup(root)
    # the spread has its own colour scale from 0; expression limits do not include it
    lo, hi = ex.view.limits(gene, which="spread")
    assert lo == 0.0 and hi == pytest.approx(np.quantile(spread[:, 3], 0.99), rel=1e-6)
    pred_lo, pred_hi = ex.view.limits(gene)
    assert (pred_lo, pred_hi) != (lo, hi)
    assert hx.pl.explorer(predicted, spread=False).view.columns == ["predicted", "measured"]


def test_spatial_shows_the_spread_and_refuses_it_where_there_is_none(predicted, trained_synthetic):
    import holoviews as hv

    table = predicted.tables["table"]
    gene = table.var_names[0]
    layout = hx.pl.spatial(predicted, gene, truth=False)
    titles = [el.opts.get().kwargs.get("title") for el in layout]
    assert titles == [f"{gene} — predicted", f"{gene} — spread"]
    pts = layout[1].traverse(lambda x: x, [hv.Points])[0]
    np.testing.assert_allclose(pts.dframe()["spread"], np.asarray(table.layers["hespotex_spread"])[:, 0], rtol=1e-6)
    # a single model has no spread: shown nowhere by default, an error when required
    single = trained_synthetic["test"]
    assert len(hx.pl.spatial(single, single.tables["table"].var_names[0], truth=False)) == 1
    with pytest.raises(ValueError, match="no spread layer"):
        hx.pl.spatial(single, single.tables["table"].var_names[0], spread=True)
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        hx.pl.spatial(predicted, gene, spread="yes")
