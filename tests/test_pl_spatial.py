"""hx.pl.spatial and hx.pl.attention: what the views plot, checked on the elements and the rendered Bokeh models."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import hespotex as hx

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def sample(trained_synthetic):
    return trained_synthetic["test"]


@pytest.fixture(scope="module")
def table(sample):
    return sample.tables["table"]


def _bokeh_figures(obj):
    import holoviews as hv

    root = hv.render(obj, backend="bokeh")
    children = getattr(root, "children", None)
    if children is None:
        return [root]
    return [c[0] if isinstance(c, tuple) else c for c in children]


def _glyph_types(fig):
    return [type(r.glyph).__name__ for r in fig.renderers]


def _no_counts(table):
    """The prediction table of a slide without ST: predictions, no counts."""
    from anndata import AnnData

    return AnnData(
        obs=table.obs[[]].copy(),
        var=table.var[[]].copy(),
        layers={"hespotex": np.asarray(table.layers["hespotex"]).copy()},
        obsm={"spatial": np.asarray(table.obsm["spatial"]).copy()},
        uns={
            "hespotex": {"params": dict(table.uns["hespotex"]["params"])},
            "hespotex_sample": dict(table.uns["hespotex_sample"]),
        },
    )


def test_panels_show_predicted_and_measured_values(table, sample):
    from hespotex.pp._normalize import log_expression

    gene = table.var_names[3]
    layout = hx.pl.spatial(sample, gene)
    points = [el for el in layout.traverse(lambda x: x, [hx.pl._spatial.import_holoviews().Points])]
    assert len(points) == 2  # predicted and measured
    df = points[0].dframe()
    assert list(df["spot"]) == list(table.obs_names)
    np.testing.assert_allclose(df["predicted"], np.asarray(table.layers["hespotex"])[:, 3], rtol=1e-6)
    target_sum = table.uns["hespotex"]["params"]["target_sum"]
    np.testing.assert_allclose(df["measured"], log_expression(table, [gene], target_sum=target_sum).ravel(), rtol=1e-6)
    figs = _bokeh_figures(layout)
    assert len(figs) == 2
    # linked pan and zoom: both panels share their ranges
    assert figs[0].x_range is figs[1].x_range and figs[0].y_range is figs[1].y_range
    assert figs[0].y_range.start > figs[0].y_range.end  # y down, like the image
    titles = [f.title.text for f in figs]
    assert titles == [f"{gene} — predicted", f"{gene} — measured"]


def test_image_extent_is_full_resolution_bounds(sample):
    import holoviews as hv

    from hespotex.pl._utils import MAX_IMAGE_PX, overview_image
    from hespotex.pp._patches import image_levels

    layout = hx.pl.spatial(sample, sample.tables["table"].var_names[0])
    rgbs = layout.traverse(lambda x: x, [hv.RGB])
    full = image_levels(sample)[0]
    h, w = full.shape
    for rgb in rgbs:
        assert rgb.bounds.lbrt() == pytest.approx((0.0, 0.0, float(w), float(h)))
    # the image's first row is drawn at the top (y = 0, y pointing down): HoloViews puts array row 0 at the
    # top of its bounds, so the array given to it is the display image flipped
    disp = overview_image(sample)
    level = image_levels(sample)[disp.level]
    stride = int(np.ceil(max(level.shape) / MAX_IMAGE_PX))
    first_row = np.asarray(level.array[:, 0, ::stride].transpose("x", "c").values)
    np.testing.assert_array_equal(np.asarray(rgbs[0].data)[-1], first_row)
    assert max(disp.rgb.shape[:2]) <= MAX_IMAGE_PX
    assert overview_image(sample) is disp  # read once per image


def test_hover_names_the_spot(sample):
    from bokeh.models import HoverTool

    layout = hx.pl.spatial(sample, sample.tables["table"].var_names[0])
    fig = _bokeh_figures(layout)[0]
    tooltips = [t.tooltips for t in fig.tools if isinstance(t, HoverTool)]
    assert any(("spot", "@{spot}") in tt for tt in tooltips if isinstance(tt, list))
    scatter = next(r for r in fig.renderers if type(r.glyph).__name__ == "Scatter")
    assert list(scatter.data_source.data["spot"]) == list(sample.tables["table"].obs_names)


def test_rasterizes_above_threshold(sample):
    table = sample.tables["table"]
    gene = table.var_names[0]
    plain = _bokeh_figures(hx.pl.spatial(sample, gene))[0]
    assert "Scatter" in _glyph_types(plain) and "Image" not in _glyph_types(plain)
    raster = _bokeh_figures(hx.pl.spatial(sample, gene, threshold=table.n_obs - 1))[0]
    assert "Image" in _glyph_types(raster) and "Scatter" not in _glyph_types(raster)
    from bokeh.models import HoverTool

    assert any(isinstance(t, HoverTool) for t in raster.tools)
    # each pixel keeps the spot it shows (datashader selector), which the hover reports
    import holoviews as hv

    layout = hx.pl.spatial(sample, gene, threshold=table.n_obs - 1)
    overlay = layout.DynamicMap.I[()]
    (image,) = [x for x in overlay.traverse(lambda x: x) if type(x) is hv.Image]
    assert "spot" in image.data.data_vars
    shown = {
        s for s in np.asarray(image.data["spot"].values).ravel() if isinstance(s, str) and s != "-"
    }  # "-": no spot
    assert shown and shown <= set(table.obs_names)
    forced = _bokeh_figures(hx.pl.spatial(sample, gene, rasterize=False, threshold=1))[0]
    assert "Scatter" in _glyph_types(forced)


def test_measured_only_when_available(table):
    no_counts = _no_counts(table)
    layout = hx.pl.spatial(no_counts, table.var_names[0])
    assert len(_bokeh_figures(layout)) == 1
    with pytest.raises(ValueError, match="no measured expression"):
        hx.pl.spatial(no_counts, table.var_names[0], truth=True)
    assert len(_bokeh_figures(hx.pl.spatial(table, table.var_names[0], truth=False))) == 1
    # a stored measured layer is used as is
    with_layer = no_counts.copy()
    with_layer.layers["measured"] = np.full(with_layer.shape, 2.0, dtype=np.float32)
    pts = hx.pl.spatial(with_layer, table.var_names[0]).traverse(
        lambda x: x, [hx.pl._spatial.import_holoviews().Points]
    )
    assert np.all(pts[1].dframe()["measured"] == 2.0)


def test_gene_selector_changes_the_plotted_data(sample):
    import panel as pn
    from bokeh.models import ColumnDataSource

    table = sample.tables["table"]
    genes = list(table.var_names[:3])
    column = hx.pl.spatial(sample, genes)
    assert isinstance(column, pn.Column)
    select = column[0]
    assert isinstance(select, pn.widgets.Select) and list(select.options) == genes
    root = column.get_root()
    try:

        def predicted_columns():
            return [
                np.asarray(m.data["predicted"])
                for m in root.select({"type": ColumnDataSource})
                if "predicted" in m.data
            ]

        before = predicted_columns()
        np.testing.assert_allclose(before[0], np.asarray(table.layers["hespotex"])[:, 0], rtol=1e-6)
        select.value = genes[2]
        after = predicted_columns()
        np.testing.assert_allclose(after[0], np.asarray(table.layers["hespotex"])[:, 2], rtol=1e-6)
    finally:
        column._cleanup(root)


def test_truth_names_a_layer(sample, table):
    genes = list(table.var_names[:2])
    col = hx.pl.spatial(sample, genes, truth="expected", image=False)  # any layer of the prediction's table
    assert col.view.columns == ["predicted", "measured"]
    np.testing.assert_allclose(col.view.frame(genes[1])["measured"], np.asarray(table.layers["expected"])[:, 1])
    assert hx.pl.spatial(sample, genes, truth=None, image=False).view.columns == ["predicted"]


def test_bad_input(trained_synthetic, sample, table):
    with pytest.raises(KeyError, match="not predicted"):
        hx.pl.spatial(sample, "NOT_A_GENE")
    with pytest.raises(KeyError, match=r"hx\.tl\.predict"):
        hx.pl.spatial(trained_synthetic["train"][0], "g0")
    with pytest.raises(KeyError, match="nope"):
        hx.pl.spatial(sample, table.var_names[0], key="nope")
    with pytest.raises(KeyError, match=r"measured expression in layers\['yes'\]"):  # truth may name a layer
        hx.pl.spatial(sample, table.var_names[0], truth="yes")
    with pytest.raises(ValueError, match="truth"):
        hx.pl.spatial(sample, table.var_names[0], truth=3)
    with pytest.raises(ValueError, match="rasterize"):
        hx.pl.spatial(sample, table.var_names[0], rasterize="sometimes")


# --------------------------------------------------------------------------------------- attention


def test_attention_edges_follow_the_stored_weights(sample, table):
    import holoviews as hv

    att = sp.csr_matrix(table.obsp[table.uns["hespotex"]["params"]["attention_key"]])
    i = 17
    spot = table.obs_names[i]
    view = hx.pl.attention(sample, spot)
    (segments,) = view.traverse(lambda x: x, [hv.Segments])
    df = segments.dframe()
    row = att.getrow(i)
    expected = {table.obs_names[j]: w for j, w in zip(row.indices, row.data, strict=True) if j != i}
    assert set(df["target"]) == {spot}
    assert dict(zip(df["source"], df["weight"], strict=True)) == pytest.approx(expected)
    assert np.ptp(df["width"] / df["weight"]) < 1e-9  # width ∝ weight
    xy = np.asarray(table.obsm["spatial"])
    assert np.allclose(df[["x1", "y1"]].to_numpy(), xy[i])
    selected = view.traverse(lambda x: x, [hv.Points])[-1].dframe()
    assert selected["spot"].tolist() == [spot]
    assert selected["self_weight"].iloc[0] + sum(expected.values()) == pytest.approx(1.0, abs=1e-5)
    assert spot in view.opts.get().kwargs["title"]
    # the same spot by position; another spot gives other edges
    same = hx.pl.attention(sample, i).traverse(lambda x: x, [hv.Segments])[0].dframe()
    assert same.equals(df)
    other = hx.pl.attention(sample, i + 1).traverse(lambda x: x, [hv.Segments])[0].dframe()
    assert set(other["target"]) == {table.obs_names[i + 1]}
    # outgoing: the spots that attend to it
    out = hx.pl.attention(sample, spot, direction="out").traverse(lambda x: x, [hv.Segments])[0].dframe()
    assert set(out["source"]) == {spot}
    assert set(out["target"]) == {table.obs_names[j] for j in att[:, i].nonzero()[0] if j != i}
    # the image crop lies around the neighbourhood and is rendered with hover on the edges
    fig = _bokeh_figures(view)[0]
    assert {"ImageRGBA", "Segment", "Scatter"} <= set(_glyph_types(fig))


def test_attention_bad_input(sample, table):
    with pytest.raises(KeyError, match="not in the table"):
        hx.pl.attention(sample, "no_such_spot")
    with pytest.raises(IndexError):
        hx.pl.attention(sample, table.n_obs + 5)
    no_att = _no_counts(table)
    no_att.uns["hespotex"]["params"]["attention_key"] = None  # what a "paper"-preset model records
    with pytest.raises(ValueError, match="no attention weights"):
        hx.pl.attention(no_att, 0)
