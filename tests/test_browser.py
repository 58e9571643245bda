"""The explorer and the views rendered in a real browser: Panel serves them on 127.0.0.1, Playwright drives
Debian's Chromium. Screenshots go to test-artifacts/ (explorer.png, spatial.png, attention.png, ...)."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

import hespotex as hx

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("single_threaded")]

PORT = 5120  # this helper's range: 5100-5199
URL = f"http://127.0.0.1:{PORT}"
TIMEOUT_MS = 30_000

# Every Bokeh plot on the page: title, glyph types and sizes, whether it has finished drawing, and the page
# position of its frame (so a data point can be mapped to the pixel to click).
PLOTS_JS = """() => {
  if (!window.Bokeh || !Bokeh.index) return [];
  const views = [...Bokeh.index.query(v => v.model && v.model.renderers !== undefined && v.frame !== undefined)];
  return views.map(v => {
    const rect = v.canvas.el.getBoundingClientRect();
    return {
      id: v.model.id,
      title: v.model.title ? v.model.title.text : null,
      glyphs: v.model.renderers.filter(r => r.glyph).map(r => [r.glyph.type, r.data_source.get_length()]),
      finished: v.has_finished(),
      left: rect.left, top: rect.top, width: rect.width, height: rect.height,
      frame: [v.frame.bbox.left, v.frame.bbox.top, v.frame.bbox.width, v.frame.bbox.height],
    };
  });
}"""

# page position of the data point (x, y) in the plot titled `title`
POINT_JS = """([title, x, y]) => {
  const v = [...Bokeh.index.query(v => v.model && v.model.title && v.model.title.text === title && v.frame !== undefined)][0];
  const rect = v.canvas.el.getBoundingClientRect();
  return [rect.left + v.frame.x_scale.compute(x), rect.top + v.frame.y_scale.compute(y)];
}"""  # noqa: E501


def _wait_port(port: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"the Panel server did not open port {port} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def sample(trained_synthetic):
    return trained_synthetic["test"]


@pytest.fixture(scope="module")
def ensemble_sample(trained_ensemble):
    """A section predicted by an ensemble: its table has the spread layer."""
    import copy

    sdata = copy.deepcopy(trained_ensemble["test"])
    hx.tl.predict(sdata, trained_ensemble["model"], device="cpu")
    return sdata


@pytest.fixture(scope="module")
def server(sample, ensemble_sample):
    """The explorer, hx.pl.spatial and hx.pl.attention served by Panel in a thread (a fresh app per page load);
    ``/ensemble``: the explorer of an ensemble's prediction (spread map)."""
    import panel as pn

    table = sample.tables["table"]
    genes = list(table.var_names[:4])
    routes = {
        "/": lambda: hx.pl.explorer(sample, genes=genes).__panel__(),
        "/spatial": lambda: hx.pl.spatial(sample, genes),
        "/attention": lambda: pn.pane.HoloViews(hx.pl.attention(sample, table.obs_names[50]), backend="bokeh"),
        "/ensemble": lambda: hx.pl.explorer(ensemble_sample).__panel__(),
    }
    titles = {"/": "hespotex explorer: syn_t", "/spatial": "hx.pl.spatial", "/attention": "hx.pl.attention",
              "/ensemble": "hespotex explorer: ens_t"}  # fmt: skip
    thread = pn.serve(
        routes,
        port=PORT,
        address="127.0.0.1",
        websocket_origin=[f"127.0.0.1:{PORT}"],
        show=False,
        threaded=True,
        title=titles,
        verbose=False,
    )
    try:
        _wait_port(PORT)
        yield {"genes": genes, "table": table, "ensemble_table": ensemble_sample.tables["table"]}
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    pg.errors = errors
    yield pg
    context.close()


def _plots(page):
    return page.evaluate(PLOTS_JS)


def _wait_plots(page, predicate: str, arg=None) -> None:
    """Wait until ``predicate(plots, arg)`` (JS) holds for the plots on the page."""
    page.wait_for_function(
        f"(arg) => {{ const plots = ({PLOTS_JS})(); return ({predicate})(plots, arg); }}", arg=arg, timeout=TIMEOUT_MS
    )


def test_explorer_renders_spots_and_title(page, server, artifacts):
    n = server["table"].n_obs
    page.goto(URL + "/")
    _wait_plots(
        page,
        "(plots, n) => plots.filter(p => p.finished && p.glyphs.some(g => g[0] === 'Scatter' && g[1] === "
        "n)).length === 2",
        n,
    )
    assert page.title() == "hespotex explorer: syn_t"
    assert page.get_by_text("hespotex explorer: syn_t").first.is_visible()
    titles = sorted(p["title"] for p in _plots(page))
    gene = server["genes"][0]
    assert titles == [f"{gene} — measured", f"{gene} — predicted"]
    page.screenshot(path=artifacts / "explorer.png", full_page=True)
    assert not page.errors


def _clip(page, title: str) -> dict:
    plot = next(p for p in _plots(page) if p["title"] == title)
    x0, y0, w, h = plot["frame"]
    return {"x": plot["left"] + x0, "y": plot["top"] + y0, "width": w, "height": h}


def test_gene_selector_redraws_the_maps(page, server):
    genes = server["genes"]
    before = page.screenshot(clip=_clip(page, f"{genes[0]} — predicted"))
    page.locator("select").first.select_option(genes[2])
    _wait_plots(page, "(plots, g) => plots.some(p => p.title === g + ' — predicted' && p.finished)", genes[2])
    page.wait_for_timeout(300)  # let the canvas repaint with the new colours
    after = page.screenshot(clip=_clip(page, f"{genes[2]} — predicted"))
    assert before != after


def test_tapping_a_spot_shows_its_attention(page, server, artifacts):
    table = server["table"]
    gene = server["genes"][2]
    i = 120
    spot = table.obs_names[i]
    x, y = (float(v) for v in np.asarray(table.obsm["spatial"])[i, :2])
    px, py = page.evaluate(POINT_JS, [f"{gene} — predicted", x, y])
    page.mouse.click(px, py)
    summary = page.locator("p", has_text="Selected spot:").filter(has_text=spot)
    summary.first.wait_for(timeout=TIMEOUT_MS)  # the text pane names the tapped spot
    att = table.obsp["hespotex_attention"]
    n_neighbours = int(sum(j != i for j in att[i].indices))
    _wait_plots(
        page,
        "(plots, a) => plots.some(p => p.title && p.title.startsWith(a[0] + ' attends to') && p.finished"
        " && p.glyphs.some(g => g[0] === 'Segment' && g[1] === a[1]))",
        [spot, n_neighbours],
    )
    assert f"predicted {gene}" in summary.first.inner_text()
    page.screenshot(path=artifacts / "explorer_selected.png", full_page=True)
    att_title = next(p["title"] for p in _plots(page) if p["title"] and p["title"].startswith(spot))
    plot = next(p for p in _plots(page) if p["title"] == att_title)
    page.screenshot(
        path=artifacts / "attention.png",
        clip={k: plot[k2] for k, k2 in (("x", "left"), ("y", "top"), ("width", "width"), ("height", "height"))},
    )
    assert not page.errors


def test_spatial_and_attention_pages(browser, server, artifacts):
    table = server["table"]
    context = browser.new_context(viewport={"width": 1100, "height": 700}, device_scale_factor=1)
    try:
        pg = context.new_page()
        pg.goto(URL + "/spatial")
        _wait_plots(
            pg,
            "(plots, n) => plots.filter(p => p.finished && p.glyphs.some(g => g[0] === 'Scatter' && g[1] === "
            "n)).length === 2",
            table.n_obs,
        )
        assert pg.locator("select").count() == 1
        pg.screenshot(path=artifacts / "spatial.png", full_page=True)
        pg.goto(URL + "/attention")
        spot = table.obs_names[50]
        _wait_plots(pg, "(plots, s) => plots.some(p => p.finished && p.title && p.title.startsWith(s))", spot)
        glyphs = {g[0] for p in _plots(pg) for g in p["glyphs"]}
        assert {"ImageRGBA", "Segment", "Scatter"} <= glyphs
        pg.screenshot(path=artifacts / "attention_view.png", full_page=True)
    finally:
        context.close()


def test_explorer_renders_the_ensemble_spread(browser, server, artifacts):
    table = server["ensemble_table"]
    gene = table.var_names[0]
    context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
    try:
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda err: errors.append(str(err)))
        pg.goto(URL + "/ensemble")
        _wait_plots(
            pg,
            "(plots, n) => plots.filter(p => p.finished && p.glyphs.some(g => g[0] === 'Scatter' && g[1] === "
            "n)).length === 3",
            table.n_obs,
        )
        titles = sorted(p["title"] for p in _plots(pg))
        assert titles == [f"{gene} — measured", f"{gene} — predicted", f"{gene} — spread"]
        # the spread map is drawn (not blank): its frame holds more than one colour
        shot = pg.screenshot(clip=_clip(pg, f"{gene} — spread"))
        from io import BytesIO

        from PIL import Image

        pixels = np.asarray(Image.open(BytesIO(shot)).convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 20
        # tapping a spot on the spread map selects it, and the summary gives its spread
        i = 30
        x, y = (float(v) for v in np.asarray(table.obsm["spatial"])[i, :2])
        px, py = pg.evaluate(POINT_JS, [f"{gene} — spread", x, y])
        pg.mouse.click(px, py)
        spread = float(np.asarray(table.layers["hespotex_spread"])[i, 0])
        summary = pg.locator("p", has_text="Selected spot:").filter(has_text=f"spread {gene}: {spread:.3f}")
        summary.first.wait_for(timeout=TIMEOUT_MS)
        pg.screenshot(path=artifacts / "explorer_spread.png", full_page=True)
        assert not errors
    finally:
        context.close()
