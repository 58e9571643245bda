"""hx.pl.explorer: the app's state drives its views (no browser; tests/test_browser.py renders it in Chromium)."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest
import scipy.sparse as sp

import hespotex as hx

pytestmark = pytest.mark.usefixtures("single_threaded")

PORT = 5111  # this helper's range: 5100-5199


@pytest.fixture(scope="module")
def sample(trained_synthetic):
    return trained_synthetic["test"]


@pytest.fixture(scope="module")
def table(sample):
    return sample.tables["table"]


def _segments(ex):
    import holoviews as hv

    return ex.attention_view().traverse(lambda x: x, [hv.Segments])[0].dframe()


def test_title_and_layout_name_the_sample(sample):
    import panel as pn

    ex = hx.pl.explorer(sample)
    assert isinstance(ex, hx.pl.Explorer)
    assert "syn_t" in ex.title
    layout = ex.__panel__()
    assert isinstance(layout, pn.Column) and "syn_t" in layout[0].object
    assert ex.__panel__() is layout  # built once
    assert ex.gene == sample.tables["table"].var_names[0]


def test_setting_gene_changes_the_plotted_data(sample, table):
    from bokeh.models import ColumnDataSource, Title

    ex = hx.pl.explorer(sample)
    layout = ex.__panel__()
    root = layout.get_root()
    try:

        def plotted():
            return [
                np.asarray(m.data["predicted"])
                for m in root.select({"type": ColumnDataSource})
                if "predicted" in m.data
            ]

        np.testing.assert_allclose(plotted()[0], np.asarray(table.layers["hespotex"])[:, 0], rtol=1e-6)
        gene = table.var_names[5]
        ex.gene = gene
        assert ex.state.gene == gene
        np.testing.assert_allclose(plotted()[0], np.asarray(table.layers["hespotex"])[:, 5], rtol=1e-6)
        titles = {t.text for t in root.select({"type": Title})}
        assert f"{gene} — predicted" in titles and f"{gene} — measured" in titles
        with pytest.raises(KeyError, match="not predicted"):
            ex.gene = "NOT_A_GENE"
        assert ex.gene == gene
    finally:
        layout._cleanup(root)


def test_selecting_a_spot_changes_the_attention_view(sample, table):
    ex = hx.pl.explorer(sample)
    assert ex.attention_view() is None
    assert "none" in ex.spot_summary()
    a, b = table.obs_names[3], table.obs_names[40]
    ex.spot = a
    edges_a = _segments(ex)
    assert set(edges_a["target"]) == {a}
    assert f"`{a}`" in ex.spot_summary()
    ex.spot = 40  # a position works too
    assert ex.spot == b
    edges_b = _segments(ex)
    assert set(edges_b["target"]) == {b} and set(edges_b["source"]) != set(edges_a["source"])
    ex.state.direction = "out"
    assert set(_segments(ex)["source"]) == {b}
    with pytest.raises(KeyError):
        ex.spot = "no_such_spot"


def test_tapping_the_map_selects_the_nearest_spot(sample, table):
    ex = hx.pl.explorer(sample)
    ex.spatial_view()
    assert len(ex.tap_streams) == 2  # predicted and measured panels
    xy = np.asarray(table.obsm["spatial"])
    i = 77
    ex.tap_streams[1].event(x=float(xy[i, 0]) + 3.0, y=float(xy[i, 1]) - 2.0)
    assert ex.spot == table.obs_names[i]
    ex.tap_streams[0].event(x=-1e6, y=-1e6)  # far from every spot: selection unchanged
    assert ex.spot == table.obs_names[i]
    assert set(_segments(ex)["target"]) == {table.obs_names[i]}


def test_rasterizes_above_threshold(sample, table):
    import holoviews as hv

    small = hx.pl.explorer(sample)
    assert not small.view.rasterized
    big = hx.pl.explorer(sample, threshold=table.n_obs - 1)
    assert big.view.rasterized
    layout = big.spatial_view()
    (image,) = [x for x in layout.DynamicMap.I[()].traverse(lambda x: x) if type(x) is hv.Image]
    big.gene = table.var_names[2]
    (image2,) = [x for x in layout.DynamicMap.I[()].traverse(lambda x: x) if type(x) is hv.Image]
    assert not np.allclose(np.nan_to_num(image.dimension_values(2)), np.nan_to_num(image2.dimension_values(2)))


def test_without_attention_or_measurement(table):
    from anndata import AnnData

    no_att = AnnData(
        obs=table.obs[[]].copy(),
        var=table.var[[]].copy(),
        layers={"hespotex": np.asarray(table.layers["hespotex"]).copy()},
        obsm={"spatial": np.asarray(table.obsm["spatial"]).copy()},
        uns={
            "hespotex": {"params": {**table.uns["hespotex"]["params"], "attention_key": None}},
            "hespotex_sample": dict(table.uns["hespotex_sample"]),
        },
    )
    ex = hx.pl.explorer(no_att)
    assert not ex.has_attention
    assert ex.view.columns == ["predicted"]
    ex.spot = 5
    pane = ex._attention_pane(ex.spot, "in", ex.layer)
    assert "no attention weights" in pane.object
    with pytest.raises(ValueError, match="no attention weights"):
        ex.attention_view()


def test_bad_input(trained_synthetic, sample):
    with pytest.raises(KeyError, match=r"hx\.tl\.predict"):
        hx.pl.explorer(trained_synthetic["train"][0])
    with pytest.raises(KeyError, match="not predicted"):
        hx.pl.explorer(sample, gene="NOT_A_GENE")


def test_serve_binds_localhost(sample):
    ex = hx.pl.explorer(sample, genes=list(sample.tables["table"].var_names[:4]))
    server = ex.serve(PORT, threaded=True)
    try:
        html = ""
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/", timeout=20) as resp:
                    html = resp.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert "<title>hespotex explorer: syn_t</title>" in html
    finally:
        server.stop()
    assert sp.issparse(sample.tables["table"].obsp["hespotex_attention"])  # the sample is untouched
