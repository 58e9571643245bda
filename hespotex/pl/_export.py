"""``hx.pl.export``: standalone HTML (inline resources, no network) and static PNG / PDF figures."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger("hespotex")

FORMATS = ("html", "png", "pdf")
_EXTERNAL = re.compile(
    r"""<(?:script|link)\b[^>]*(?:src|href)\s*=\s*["']?(https?://[^"'\s>]+)|"url"\s*:\s*"(https?://[^"]+)\""""
)


def hv_backends():
    """Import HoloViews with its bokeh and matplotlib backends registered (options can then be set for both).

    Imports the plotting modules directly rather than calling ``hv.extension`` (which would display
    notebook resources as a side effect); the current backend becomes bokeh only when none is loaded.
    """
    import holoviews as hv
    import holoviews.plotting.bokeh
    import holoviews.plotting.mpl

    if hv.Store.current_backend not in hv.Store.renderers:
        hv.Store.set_current_backend("bokeh")
    return hv


def export(
    obj: Any,
    path: str | Path,
    *,
    fmt: str | None = None,
    title: str | None = None,
    overwrite: bool = False,
    embed: bool = True,
    max_states: int = 1000,
    dpi: int = 150,
) -> Path:
    """Write a view to a standalone HTML page or a static PNG / PDF figure.

    Parameters
    ----------
    obj
        A HoloViews object (element, overlay, layout, HoloMap, DynamicMap), a Panel object (pane,
        layout, template-free app) or anything with ``__panel__`` (a :class:`panel.viewable.Viewer`).
    path
        Output file. Its parent folder is created when missing.
    fmt
        ``"html"``, ``"png"`` or ``"pdf"``; default taken from the suffix of ``path``.
    title
        Page title (HTML) or figure title (PNG / PDF).
    overwrite
        Replace an existing file at ``path``; without it an existing file is an error.
    embed
        HTML: embed the states of the widgets (``panel.io.embed``) so that they keep working
        without a Python server; only widgets with a finite set of values can be embedded.
    max_states
        HTML with ``embed``: the most widget states embedded.
    dpi
        PNG: resolution of the figure.

    Returns
    -------
    The path written. Nothing else is written and ``obj`` is not changed.

    Notes
    -----
    **HTML.** The object is rendered through Panel into one file whose BokehJS and Panel scripts are
    inlined (``bokeh.resources.INLINE``); Panel's component stylesheets, which it otherwise imports
    from its CDN, are inlined as ``data:`` URLs read from the installed ``panel/dist`` folder, and the
    CDN favicon links are dropped. The page therefore renders opened from a ``file://`` URL with no
    network. Third-party extensions that fetch their own assets are not rewritten; a warning names
    any external URL left in the file.

    **PNG / PDF.** The figure is drawn by HoloViews' matplotlib backend (``hv.render(...,
    backend="matplotlib")``) and saved by matplotlib. Options set for the matplotlib backend apply; options
    set only for bokeh are carried over where they mean the same in matplotlib (colour mapping and limits,
    colour bars, axes, titles, ticks, line styles, marker sizes) and dropped otherwise (sizes in
    screen pixels, tools, hover). The object itself is not changed. A HoloMap or DynamicMap is drawn at
    its current (last cached, else default) key. For a Panel object the HoloViews content is exported:
    every :class:`panel.pane.HoloViews` pane found in the layout (in layout order) becomes one panel of
    a HoloViews layout; widgets, text and other panes are left out. An object without HoloViews
    content cannot be exported statically (export it to HTML instead).
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        msg = (
            f"Cannot export to {path.name!r} (format {fmt!r}); expected a path ending in one of "
            f"{[f'.{f}' for f in FORMATS]} or `fmt=` one of {list(FORMATS)}."
        )
        raise ValueError(msg)
    if path.exists() and not overwrite:
        msg = f"{path} already exists; pass `overwrite=True` to replace it, or choose another path."
        raise FileExistsError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "html":
        _save_html(obj, path, title=title, embed=embed, max_states=max_states)
    else:
        fig = static_figure(obj)
        if title:
            fig.suptitle(title)
        fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight")
    logger.info("Exported %s to %s.", type(obj).__name__, path)
    return path


def _save_html(obj: Any, path: Path, *, title: str | None, embed: bool, max_states: int) -> None:
    hv_backends()
    import panel as pn
    from bokeh.document import Document
    from bokeh.models import ImportedStyleSheet
    from bokeh.resources import INLINE
    from panel.io.embed import embed_state
    from panel.io.model import add_to_doc
    from panel.io.save import save
    from pyviz_comms import Comm

    viewable = pn.panel(obj)
    doc = Document()
    with pn.config.set(embed=embed):
        model = viewable.get_root(doc, Comm())
        if embed:
            embed_state(viewable, model, doc, max_states=max_states, progress=False)
        else:
            add_to_doc(model, doc, True)
    for sheet in doc.select({"type": ImportedStyleSheet}):
        inlined = _local_stylesheet(sheet.url)
        if inlined is not None:
            sheet.url = inlined
    # Panel's page template links a favicon from its CDN unless these are defined (empty: no link).
    save(
        doc,
        str(path),
        title=title or "hespotex",
        resources=INLINE,
        template_variables={"app_favicon": "", "apple_icon": ""},
    )
    left = external_urls(path.read_text(encoding="utf-8"))
    if left:
        logger.warning(
            "%s still loads %d external resources (e.g. %s); it needs the network for those.", path, len(left), left[:3]
        )


def _local_stylesheet(url: str) -> str | None:
    """A ``data:`` URL holding the CSS behind a Panel CDN URL, read from the installed package."""
    import panel
    from panel.io.resources import CDN_DIST

    if not url.startswith(CDN_DIST):
        return None
    local = Path(panel.__file__).parent / "dist" / url[len(CDN_DIST) :].split("?")[0]
    if not local.is_file():
        logger.debug("No local copy of %s; left as is.", url)
        return None
    return "data:text/css;base64," + base64.b64encode(local.read_bytes()).decode("ascii")


def external_urls(html: str) -> list[str]:
    """External (http/https) scripts, links and imported stylesheets that an HTML page would load."""
    return sorted({a or b for a, b in _EXTERNAL.findall(html)})


def holoviews_content(obj: Any):
    """The HoloViews object to draw statically: ``obj`` itself, or a layout of a Panel object's HoloViews panes."""
    hv_backends()
    from holoviews.core.dimension import Dimensioned

    if isinstance(obj, Dimensioned):
        return obj
    import panel as pn

    viewable = obj if isinstance(obj, pn.viewable.Viewable) else pn.panel(obj)
    parts = [pane.object for pane in viewable.select(pn.pane.HoloViews) if pane.object is not None]
    if not parts:
        msg = (
            f"Found no HoloViews content in the {type(obj).__name__} to draw as a static figure; export it to "
            "'.html' instead."
        )
        raise ValueError(msg)
    if len(parts) == 1:
        return parts[0]
    layout = parts[0]
    for part in parts[1:]:
        layout = layout + part  # layouts flatten: the panes' panels in layout order
    return layout.cols(2)


def static_figure(obj: Any):
    """A matplotlib Figure of ``obj`` drawn by HoloViews' matplotlib backend (see :func:`export`)."""
    hv = hv_backends()
    content = holoviews_content(obj)
    content = content.map(_with_matplotlib_options, [hv.Element, hv.Overlay])
    plot = hv.renderer("matplotlib").get_plot(content)
    return plot.state


# Options set for bokeh that mean the same for matplotlib (bokeh name -> matplotlib name).
_STYLE_ALIASES = {"line_width": "linewidth", "line_dash": "linestyle", "size": "s"}
_PLOT_OPTIONS = {
    "aspect", "data_aspect", "colorbar", "clim", "cnorm", "logx", "logy", "logz", "symmetric", "clipping_colors",
    "xaxis", "yaxis", "xlim", "ylim", "invert_axes", "invert_xaxis", "invert_yaxis", "title", "xlabel", "ylabel",
    "xticks", "yticks", "xrotation", "yrotation", "show_legend", "show_grid",
}  # fmt: skip
_DASHES = {"solid": "-", "dashed": "--", "dotted": ":", "dashdot": "-."}
_MARKERS = {"circle": "o", "square": "s", "triangle": "^", "diamond": "D", "cross": "+", "x": "x", "dash": "_"}


def _with_matplotlib_options(element):
    """A copy of ``element`` with the bokeh options it was given carried over to matplotlib where they
    mean the same (colour mapping, colour limits, axes, titles, line styles, marker sizes), unless it
    has matplotlib options of its own for them."""
    from holoviews.core.options import Store

    plot_class = Store.registry.get("matplotlib", {}).get(type(element))
    if plot_class is None:
        return element
    extra = {}
    for group in ("style", "plot"):
        given = _custom(element, group, "bokeh")
        own = _custom(element, group, "matplotlib")
        for key, value in given.items():
            name = _STYLE_ALIASES.get(key, key) if group == "style" else key
            allowed = (
                name in plot_class.style_opts
                if group == "style"
                else name in _PLOT_OPTIONS and name in plot_class.param
            )
            if not allowed or name in own or key in own:
                continue
            if name == "linestyle":
                value = _DASHES.get(value, value)
            elif name == "marker":
                value = _MARKERS.get(value, value)
            elif name == "s" and isinstance(value, int | float):
                value = (0.7 * value) ** 2  # bokeh: diameter in screen pixels; matplotlib: area in points² (about)
            extra[name] = value
    return element.opts(backend="matplotlib", clone=True, **extra) if extra else element


def _custom(element, group: str, backend: str) -> dict:
    """The options of ``group`` set on ``element`` for ``backend`` beyond that backend's defaults."""
    from holoviews.core.options import Store

    if backend not in Store.renderers:
        return {}
    current = Store.lookup_options(backend, element, group).kwargs
    default = Store.options(backend=backend).closest(element, group).kwargs
    return {k: v for k, v in current.items() if k not in default or default[k] is not v}
