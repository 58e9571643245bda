"""``hx.pl.spatial``: predicted (and measured) expression over the H&E image, HoloViews on Bokeh."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hespotex._compat import renamed_arguments
from hespotex._constants import PREDICTION_KEY
from hespotex._sample import get_sample_info
from hespotex.pl._utils import (
    MAX_IMAGE_PX,
    DisplayImage,
    Predictions,
    check_genes,
    column_values,
    get_predictions,
    measured_values,
    overview_image,
    predicted_values,
    resolve_measured,
    robust_limits,
    with_truth,
)

if TYPE_CHECKING:
    import holoviews as hv
    import pandas as pd

logger = logging.getLogger("hespotex")

RASTERIZE_THRESHOLD = 20_000  # above this many spots, plain glyphs get slow in the browser


def import_holoviews():
    """HoloViews with its Bokeh backend registered (imported on first use: it is heavy)."""
    import holoviews as hv
    import holoviews.plotting.bokeh  # registers the Bokeh options

    return hv


def rgb_element(image: DisplayImage) -> hv.RGB:
    """An ``hv.RGB`` of a display image placed at its extent in the sample's coordinates.

    Views draw y downwards (``invert_yaxis``, image rows), so the array is flipped for HoloViews,
    which puts row 0 at the top of its bounds.
    """
    hv = import_holoviews()
    x0, y0, x1, y1 = image.bounds
    return hv.RGB(image.rgb[::-1], bounds=(x0, y0, x1, y1), kdims=["x", "y"], label="image").opts(
        backend="bokeh", tools=[]
    )


class SpatialView:
    """Everything the spatial views share, computed once: spot positions, ids, the background image and the
    rendering mode. Turns a gene into HoloViews elements; ``hx.pl.spatial`` and the explorer use it.

    Parameters mirror :func:`spatial`.
    """

    def __init__(
        self,
        data: Any,
        pred: Predictions,
        *,
        truth: bool | str | None = "auto",
        image: bool = True,
        rasterize: bool | Literal["auto"] = "auto",
        threshold: int = RASTERIZE_THRESHOLD,
        cmap: str = "viridis",
        size: float | None = None,
        alpha: float = 0.85,
        width: int = 420,
        max_image_px: int = MAX_IMAGE_PX,
        spread: bool | Literal["auto"] = "auto",
    ) -> None:
        from scipy.spatial import cKDTree

        pred = with_truth(pred, truth)
        self.pred = pred
        self.spread_layer = spread_layer(pred, spread)
        table = pred.table
        if "spatial" not in table.obsm:
            msg = (
                "Expected spot centres in obsm['spatial'] of the prediction table; found none. Build samples with "
                "an `hx.io` reader."
            )
            raise KeyError(msg)
        self.xy = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
        self.spots = np.asarray(table.obs_names.astype(str))
        self.n = len(self.spots)
        self.show_measured = resolve_measured(pred, truth)
        if rasterize == "auto":
            rasterize = self.n > threshold
        if not isinstance(rasterize, bool):
            msg = f"Expected `rasterize` to be True, False or 'auto'; found {rasterize!r}."
            raise ValueError(msg)
        self.rasterized = rasterize
        self.image = overview_image(data, max_px=max_image_px) if image else None
        if image and self.image is None:
            logger.info("No H&E image to draw under the spots (a table was given, or the sample has none).")
        try:
            info = get_sample_info(table)
            self.diameter = info.spot_diameter_px
            self.marker = "square" if info.spot_shape == "square" else "circle"  # Visium HD bins are squares
        except KeyError:
            self.diameter = float(np.median(cKDTree(self.xy).query(self.xy, k=2)[0][:, 1])) if self.n > 1 else 1.0
            self.marker = "circle"
        self.tree = cKDTree(self.xy)
        if self.image is not None:
            x0, y0, x1, y1 = self.image.bounds
        else:
            pad = self.diameter
            (x0, y0), (x1, y1) = self.xy.min(axis=0) - pad, self.xy.max(axis=0) + pad
        self.extent = (float(x0), float(y0), float(x1), float(y1))
        self.width = int(width)
        self.size = float(size) if size is not None else max(2.0, self.width * self.diameter / max(x1 - x0, 1e-9))
        self.cmap, self.alpha = cmap, float(alpha)
        self._cache: dict[str, pd.DataFrame] = {}

    # ------------------------------------------------------------------------------------ data

    @property
    def columns(self) -> list[str]:
        """Which panels are drawn: ``"predicted"``, then ``"measured"`` and ``"spread"`` when shown."""
        return [
            "predicted", *(["measured"] if self.show_measured else []), *(["spread"] if self.spread_layer else [])
        ]  # fmt: skip

    @property
    def expression_columns(self) -> list[str]:
        """The panels of expression values (one colour scale); the spread (a standard deviation) has its own."""
        return [c for c in self.columns if c != "spread"]

    def frame(self, gene: str) -> pd.DataFrame:
        """Spot table of one gene: ``x``, ``y``, ``spot``, ``predicted`` and (when shown) ``measured``."""
        import pandas as pd

        if gene not in self._cache:
            check_genes(self.pred, gene)
            df = pd.DataFrame({"x": self.xy[:, 0], "y": self.xy[:, 1], "spot": self.spots})
            df["predicted"] = predicted_values(self.pred, gene)
            if self.show_measured:
                df["measured"] = measured_values(self.pred, gene)
            if self.spread_layer:
                df["spread"] = column_values(self.pred, self.spread_layer, gene)
            self._cache = {gene: df}  # one gene at a time: a 100k-spot slide with thousands of genes stays small
        return self._cache[gene]

    def limits(
        self, gene: str, clim: tuple[float, float] | None = None, which: str = "predicted"
    ) -> tuple[float, float]:
        """Colour limits shared by the predicted and measured panels (1st-99th percentile of both unless given);
        the spread panel's own (0 to its 99th percentile; ``clim`` is for expression)."""
        df = self.frame(gene)
        if which == "spread":
            return 0.0, robust_limits(df["spread"].to_numpy())[1]
        if clim is not None:
            return float(clim[0]), float(clim[1])
        return robust_limits(*(df[c].to_numpy() for c in self.expression_columns))

    def nearest(self, x: float, y: float, *, max_distance: float | None = None) -> str | None:
        """Id of the spot nearest to ``(x, y)``, ``None`` when farther than ``max_distance`` (a spot diameter)."""
        dist, idx = self.tree.query([x, y])
        limit = self.diameter if max_distance is None else max_distance
        return None if not np.isfinite(dist) or dist > limit else str(self.spots[int(idx)])

    # ------------------------------------------------------------------------------------ elements

    def points(self, gene: str, which: str = "predicted", clim: tuple[float, float] | None = None) -> hv.Points:
        """Spots of one gene coloured by ``which`` (``"predicted"`` / ``"measured"``), hover with id and values."""
        hv = import_holoviews()
        if which not in self.columns:
            msg = f"Expected one of {self.columns}, found {which!r}."
            raise ValueError(msg)
        df = self.frame(gene)
        vdims = ["spot", *self.columns]
        pts = hv.Points(df, kdims=["x", "y"], vdims=vdims, label=f"{gene} {which}")
        tooltips = [("spot", "@spot"), *((c, f"@{c}{{0.000}}") for c in self.columns)]
        return pts.opts(
            backend="bokeh",
            color=which,
            cmap=self.cmap,
            clim=self.limits(gene, clim, which),
            size=self.size,
            marker=self.marker,
            alpha=self.alpha,
            line_alpha=0,
            colorbar=True,
            clabel=which,
            tools=["hover"],
            hover_tooltips=tooltips,
            nonselection_alpha=self.alpha,
        )

    def rasterize(self, element: Any, which: str, clim: tuple[float, float] | None = None, gene: str | None = None):
        """Datashade ``element`` (Points or a DynamicMap of them): mean of ``which`` per screen pixel, each pixel
        keeping the spot it shows for the hover, spread to a visible spot size."""
        import datashader as ds
        from holoviews.operation.datashader import dynspread, rasterize

        img = rasterize(element, aggregator=ds.mean(which), selector=ds.first(which))
        img = dynspread(img, max_px=max(1, round(self.size / 2)), threshold=0.8)
        opts = {
            "clabel": which,
            "cmap": self.cmap,
            "colorbar": True,
            "tools": ["hover"],
            "alpha": self.alpha,
            "clipping_colors": {"NaN": (0, 0, 0, 0)},
        }
        if gene is not None:
            opts["clim"] = self.limits(gene, clim, which)
        return img.opts(backend="bokeh", **opts)

    def background(self) -> hv.RGB | None:
        return rgb_element(self.image) if self.image is not None else None

    def decorate(self, element: Any, title: str | None = None) -> Any:
        """Frame options shared by every spatial panel: square pixels, y down, the sample's extent."""
        x0, y0, x1, y1 = self.extent
        if title is not None:
            element = element.opts(backend="bokeh", title=title)
        return element.opts(
            backend="bokeh",
            show_legend=False,
            frame_width=self.width,
            data_aspect=1,
            invert_yaxis=True,
            xlim=(x0, x1),
            ylim=(y0, y1),
            xaxis=None,
            yaxis=None,
            active_tools=["wheel_zoom"],
            toolbar="above",
        )

    def panel(self, gene: str, which: str = "predicted", clim: tuple[float, float] | None = None):
        """One panel: the H&E image and the spots of ``gene`` (rasterised above the threshold)."""
        hv = import_holoviews()
        pts = self.points(gene, which, clim)
        layer = self.rasterize(pts, which, clim, gene) if self.rasterized else pts
        bg = self.background()
        if bg is not None:
            layer = bg * layer if self.rasterized else hv.Overlay([bg, layer])
        return self.decorate(layer, f"{gene} — {which}")

    def layout(self, gene: str, clim: tuple[float, float] | None = None) -> hv.Layout:
        """Predicted and (when available) measured panels side by side (the spread below), pan and zoom linked."""
        hv = import_holoviews()
        return (
            hv.Layout([self.panel(gene, which, clim) for which in self.columns])
            .opts(backend="bokeh", shared_axes=True)
            .cols(2)
        )

    def dynamic_layout(self, state: Any) -> hv.Layout:
        """Panels following ``state.gene`` / ``state.clim`` (a ``param.Parameterized``), for widgets and apps."""
        hv = import_holoviews()
        panels = []
        bg = self.background()
        self.dynamic_panels = {}
        for which in self.columns:
            stream = hv.streams.Params(state, ["gene", "clim"])

            def callback(gene: str, clim: tuple[float, float] | None, which: str = which):
                return self.points(gene, which, clim).relabel(f"{which}")

            dmap = hv.DynamicMap(callback, streams=[stream])
            self.dynamic_panels[which] = dmap
            if self.rasterized:
                dmap = self.rasterize(dmap, which).apply.opts(clim=_bound_limits(self, state, which), backend="bokeh")
            composed = self.decorate(bg * dmap if bg is not None else dmap)
            panels.append(composed.apply.opts(title=_bound_title(state, which), backend="bokeh"))
        return hv.Layout(panels).opts(backend="bokeh", shared_axes=True).cols(2)


def spread_layer(pred: Any, spread: bool | str) -> str | None:
    """The layer of the ensemble spread shown beside ``pred`` (``params["spread_layer"]``, written by
    :func:`hespotex.tl.predict` for an ensemble), or ``None``: ``spread="auto"`` shows it when there is one,
    ``True`` requires it, ``False`` never shows it."""
    if spread not in (True, False, "auto"):
        msg = f"Expected `spread` to be True, False or 'auto'; found {spread!r}."
        raise ValueError(msg)
    name = pred.params.get("spread_layer")
    found = bool(name) and name != pred.layer and name in pred.table.layers
    if spread is True and not found:
        msg = (
            f"spread=True, but the prediction {pred.key!r} has no spread layer (layers[{f'{pred.key}_spread'!r}]): "
            "only an ensemble (hx.tl.train(..., ensemble=True)) predicts one. Pass spread='auto' or False."
        )
        raise ValueError(msg)
    return str(name) if found and spread else None


def _bound_limits(view: SpatialView, state: Any, which: str = "predicted"):
    import param

    @param.depends(state.param.gene, state.param.clim)
    def clim(*_: Any) -> tuple[float, float]:
        return view.limits(state.gene, state.clim, which)

    return clim


def _bound_title(state: Any, which: str):
    import param

    @param.depends(state.param.gene)
    def title(*_: Any) -> str:
        return f"{state.gene} — {which}"

    return title


def _gene_state(genes: Sequence[str]):
    import param

    class GeneState(param.Parameterized):
        gene = param.Selector(objects=list(genes), default=genes[0], doc="Gene shown.")
        clim = param.Range(default=None, allow_None=True, doc="Colour limits; None: 1st-99th percentile.")

    return GeneState()


@renamed_arguments("pl.spatial")
def spatial(
    data: Any,
    genes: str | Sequence[str] | None = None,
    *,
    key: str = PREDICTION_KEY,
    layer: str | None = None,
    truth: bool | str | None = "auto",
    image: bool = True,
    rasterize: bool | Literal["auto"] = "auto",
    threshold: int = RASTERIZE_THRESHOLD,
    cmap: str = "viridis",
    clim: tuple[float, float] | None = None,
    size: float | None = None,
    alpha: float = 0.85,
    width: int = 420,
    max_image_px: int = MAX_IMAGE_PX,
    spread: bool | Literal["auto"] = "auto",
):
    """Predicted expression over the H&E image, beside the measured expression when there is one
    and the ensemble's spread when the prediction has one.

    Builds a view and returns it; nothing is displayed or computed beyond the data the view needs.
    Display it in Jupyter (after ``hv.extension("bokeh")`` or ``pn.extension()``), serve it with
    ``panel serve`` (``.servable()``) or save it with ``hx.pl.export``.

    Parameters
    ----------
    data
        A sample (SpatialData) after ``hx.tl.predict``, or its prediction table (AnnData; no image then).
    genes
        One gene or several (a gene selector appears); ``None``: every predicted gene.
    key
        The prediction shown: the ``key_added`` given to :func:`hespotex.tl.predict` (found in whichever
        table holds it; formerly ``table_key``, which a table name still works as).
    layer
        Another layer of that prediction's table to show instead (``f"{key}_spread"``, a baseline);
        default: the layer ``hx.tl.predict`` recorded for ``key``.
    truth
        Measured expression shown beside the prediction: ``"auto"`` when available
        (``layers["measured"]``, or counts in ``X`` normalised with the predictions' ``target_sum``),
        ``True`` (required), ``False`` / ``None`` (never) or a layer name. Formerly ``measured``.
    image
        Draw the H&E image (a pyramid level of at most ``max_image_px`` pixels on its longest side).
    rasterize
        Aggregate spots to screen pixels with datashader (re-aggregated on zoom when served);
        ``"auto"``: above ``threshold`` spots.
    threshold
        Spot count above which ``rasterize="auto"`` rasterises.
    cmap, clim
        Colour map and colour limits (default: 1st-99th percentile of predicted and measured together,
        one scale for both panels).
    size
        Spot size in screen pixels; default: the spot diameter at the initial zoom. Square bins
        (``uns["hespotex_sample"]["spot_shape"] == "square"``, Visium HD) are drawn as squares of
        that side; above ``threshold`` spots every spot is a screen pixel of the rasterised image.
    alpha
        Spot opacity.
    width
        Width of each panel's frame in pixels (height follows the tissue's aspect).
    max_image_px
        Longest side of the background image.
    spread
        A third linked panel "spread": the ensemble members' standard deviation per spot (the layer
        ``uns[key]["params"]["spread_layer"]``, ``layers[f"{key}_spread"]``, written by :func:`hespotex.tl.predict`
        for a :class:`~hespotex.tl.HESpotExEnsemble`), on its own colour scale from 0. ``"auto"``: when the
        prediction has one; ``True``: required; ``False``: never.

    Returns
    -------
    One gene: an ``hv.Layout`` of the predicted, measured and spread panels that apply (shared axes, so pan
    and zoom are linked; hover shows the spot id and every value). Several genes: a ``pn.Column`` of a gene
    selector (``pn.widgets.Select``) above a ``pn.pane.HoloViews`` of those panels.
    Reads the prediction table; writes nothing.
    """
    pred = get_predictions(data, key=key, layer=layer)
    genes = check_genes(pred, genes)
    view = SpatialView(
        data,
        pred,
        truth=truth,
        image=image,
        rasterize=rasterize,
        threshold=threshold,
        cmap=cmap,
        size=size,
        alpha=alpha,
        width=width,
        max_image_px=max_image_px,
        spread=spread,
    )
    if len(genes) == 1:
        return view.layout(genes[0], clim)
    import panel as pn

    state = _gene_state(genes)
    state.clim = clim
    select = pn.widgets.Select.from_param(state.param.gene, name="gene")
    layout = view.dynamic_layout(state)
    column = pn.Column(select, pn.pane.HoloViews(layout, backend="bokeh"))
    column.state, column.view = state, view  # for code that drives the view (tests, apps)
    return column
