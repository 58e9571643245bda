"""hx.pl.export: offline HTML that renders in Chromium with the network blocked; valid, non-blank PNG / PDF."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import hespotex as hx

EXTERNAL = [
    re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?https?://", re.IGNORECASE),
    re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?https?://", re.IGNORECASE),
    re.compile(r"\"url\"\s*:\s*\"https?://"),  # bokeh ImportedStyleSheet models
    re.compile(r"@import\s+(?:url\()?[\"']?https?://"),
]


@pytest.fixture(scope="module")
def gallery():
    rng = np.random.default_rng(0)
    n, h, w = 5, 32, 32
    yy, xx = np.mgrid[:h, :w]
    images = rng.integers(150, 230, (n, h, w, 3)).astype(np.uint8)
    images[:, 10:22, 10:22] = (120, 30, 110)
    sal = np.stack([np.exp(-((xx - 16) ** 2 + (yy - 16) ** 2) / (20.0 + 10 * i)) for i in range(n)]).astype(np.float32)
    table = pd.DataFrame(
        {
            "rank": np.arange(1, n + 1),
            "score": np.linspace(2, 1, n),
            "group": "tumour",
            "x": 0.0,
            "y": 0.0,
            "sample_id": "s",
        },
        index=[f"s_{i}" for i in range(n)],
    )
    return hx.pl.diagnostic_patches(SimpleNamespace(table=table, images=images, saliency=sal, params={}), ncols=5)


@pytest.fixture(scope="module")
def evaluation_view():
    """Evaluation views of a small prediction table and cross-validation table (values irrelevant here)."""
    import anndata as ad

    rng = np.random.default_rng(1)
    y = rng.normal(size=(200, 6)).astype(np.float32)
    table = ad.AnnData(
        np.zeros_like(y), layers={"measured": y, "hespotex": y + rng.normal(size=y.shape).astype(np.float32)}
    )
    table.var_names = [f"gene{i}" for i in range(6)]
    cv = pd.DataFrame(
        [
            {"fold": f, "method": m, "gene": g, "pearson": rng.uniform()}
            for f in "abc"
            for m in ("hespotex", "ridge")
            for g in table.var_names
        ]
    )
    return hx.pl.evaluation(table, cv=cv, n_genes=2)


@pytest.fixture(scope="module")
def app(evaluation_view, gallery):
    """A Panel layout of the kind the explorer builds: text, a widget and HoloViews panes."""
    import panel as pn

    return pn.Column(
        "# hespotex export", pn.widgets.Select(label="gene", options=["gene0", "gene1"]), evaluation_view, gallery
    )


def assert_offline(path):
    html = path.read_text(encoding="utf-8")
    assert "<html" in html.lower() and len(html) > 100_000  # BokehJS is inlined
    for pattern in EXTERNAL:
        assert not pattern.search(html), pattern.pattern


def open_offline(browser, path, screenshot):
    """Open ``path`` from file:// with every other request blocked; return (#canvases, blocked, errors)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    blocked, errors = [], []

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(path.resolve().as_uri())
        count = """() => { let n = 0; const walk = (root) => root.querySelectorAll('*').forEach((el) => {
            if (el.tagName === 'CANVAS' && el.width > 0) n++; if (el.shadowRoot) walk(el.shadowRoot); }); walk(document); return n; }"""  # noqa: E501
        page.wait_for_function(f"({count})() > 0", timeout=30_000)
        page.wait_for_timeout(500)
        n = page.evaluate(count)
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        page.close()
    return n, blocked, errors


def test_refuses_unknown_formats_and_overwriting(gallery, tmp_path):
    with pytest.raises(ValueError, match=r"'\.html'"):
        hx.pl.export(gallery, tmp_path / "g.svg")
    with pytest.raises(ValueError, match="expected a path ending"):
        hx.pl.export(gallery, tmp_path / "g")
    target = tmp_path / "g.png"
    target.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hx.pl.export(gallery, target)
    assert target.read_bytes() == b"keep"
    hx.pl.export(gallery, target, overwrite=True)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = hx.pl.export(gallery, tmp_path / "sub" / "gallery", fmt="pdf")  # fmt wins over a missing suffix
    assert out.read_bytes()[:4] == b"%PDF"


def test_static_png_and_pdf(gallery, app, tmp_path):
    from PIL import Image

    from hespotex.pl._export import static_figure

    for obj, name in ((gallery, "gallery"), (app, "app")):
        png = hx.pl.export(obj, tmp_path / f"{name}.png", title=name)
        with Image.open(png) as im:
            im.load()
            assert im.width > 200 and im.height > 100
            pixels = np.asarray(im.convert("L"))
            assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # drawn, not blank
    pdf = hx.pl.export(gallery, tmp_path / "gallery.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    # a Panel layout exports its HoloViews panes: 4 evaluation views (distribution, 2 genes, folds) + 5 gallery tiles
    assert len([ax for ax in static_figure(app).axes if ax.get_visible()]) == 4 + 5
    import holoviews as hv
    import panel as pn

    frames = hv.HoloMap({i: hv.Curve(np.c_[np.arange(5), np.arange(5) * i]) for i in range(1, 4)}, kdims="slope")
    assert hx.pl.export(frames, tmp_path / "frames.png").stat().st_size > 0  # one frame drawn
    with pytest.raises(ValueError, match="no HoloViews content"):
        hx.pl.export(pn.Column("# text only"), tmp_path / "text.png")


def test_static_figure_carries_bokeh_colour_mapping():
    from holoviews.core.options import Store

    from hespotex.pl._export import hv_backends, static_figure

    hv = hv_backends()  # what every hx.pl view does (hv.extension("bokeh") in a notebook)
    values = np.linspace(0, 1, 12)
    points = hv.Points((np.arange(12), np.arange(12) % 3, values), vdims="expr")
    points = points.opts(
        color="expr", cmap="viridis", size=10, colorbar=True, title="expr", tools=["hover"], backend="bokeh"
    )
    fig = static_figure(points)
    ax = fig.axes[0]
    (dots,) = ax.collections
    np.testing.assert_allclose(dots.get_array(), values)  # coloured by the value, as in bokeh
    from matplotlib import colormaps

    steps = np.linspace(0, 1, 5)
    np.testing.assert_allclose(dots.get_cmap()(steps), colormaps["viridis"](steps), atol=0.02)
    assert len(fig.axes) == 2  # plus the colour bar
    assert ax.get_title() == "expr" and dots.get_sizes()[0] == pytest.approx(49.0)
    assert not Store.lookup_options("matplotlib", points, "plot").kwargs.get("colorbar")  # the object is unchanged


@pytest.mark.browser
def test_html_renders_offline(gallery, app, evaluation_view, browser, artifacts, tmp_path):
    for obj, name in ((gallery, "gallery"), (evaluation_view, "evaluation"), (app, "app")):
        path = hx.pl.export(obj, tmp_path / f"{name}.html", title=f"hespotex {name}")
        assert_offline(path)
        assert f"<title>hespotex {name}</title>" in path.read_text(encoding="utf-8")
        n, blocked, errors = open_offline(browser, path, artifacts / f"{name}_html.png")
        assert n >= 1, f"{name}: no bokeh canvas rendered"
        assert errors == [], f"{name}: console errors {errors}"
        assert blocked == [], f"{name}: tried to load {blocked}"
