"""``hx.pl.attention``: which neighbours a spot's prediction attends to, drawn over the H&E image."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp

from hespotex._compat import renamed_arguments
from hespotex._constants import PREDICTION_KEY
from hespotex._sample import get_sample_info
from hespotex.pl._utils import Predictions, crop_image, get_predictions

if TYPE_CHECKING:
    import holoviews as hv
    import pandas as pd

logger = logging.getLogger("hespotex")


def attention_matrix(pred: Predictions, key: str | None = None) -> sp.csr_matrix:
    """The stored attention weights (CSR, rows = target spot), with a clear error when there are none."""
    table = pred.table
    key = key or pred.attention_key
    if key is None:
        config = pred.params.get("config")
        conv = config.get("decoder_conv") if isinstance(config, dict) else None
        which = f" (decoder_conv={conv!r})" if conv else ""
        msg = (
            f"These predictions{which} have no attention weights: "
            f"uns[{pred.layer!r}]['params']['attention_key'] is None, "
            "which is the case for models whose graph decoder has no attention (the 'paper' preset, SAGE "
            "convolutions). "
            "Train with the 'hespotex' preset (GATv2 decoder) and predict again to see attention."
        )
        raise ValueError(msg)
    if key not in table.obsp:
        msg = (
            f"Expected attention weights in obsp[{key!r}]; found obsp keys {list(table.obsp)}. Run `hx.tl.predict` "
            "with a model that has attention."
        )
        raise KeyError(msg)
    return sp.csr_matrix(table.obsp[key])


def spot_index(pred: Predictions, spot: str | int) -> int:
    """Row of ``spot`` (an obs name, or an integer position)."""
    names = pred.table.obs_names
    if isinstance(spot, (int, np.integer)) and not isinstance(spot, bool):
        if not 0 <= int(spot) < len(names):
            msg = f"Spot position {spot} is out of range: the table has {len(names)} spots."
            raise IndexError(msg)
        return int(spot)
    if str(spot) not in names:
        msg = f"Spot {spot!r} is not in the table (spots look like {list(names[:3])}); pass an obs name or a position."
        raise KeyError(msg)
    return int(names.get_loc(str(spot)))


def attention_edges(
    pred: Predictions, spot: str | int, *, key: str | None = None, direction: Literal["in", "out"] = "in"
) -> pd.DataFrame:
    """The attention edges of one spot as a table.

    ``direction="in"``: the neighbours the spot's prediction attends to (its row: weights sum to 1);
    ``"out"``: the spots whose predictions attend to it (its column). Columns: ``source``, ``target``
    (spot ids; the message flows source -> target), ``weight``, ``x0``, ``y0`` (source centre), ``x1``,
    ``y1`` (target centre), ``self`` (the self loop). Sorted by decreasing weight.
    """
    import pandas as pd

    if direction not in ("in", "out"):
        msg = f"Expected direction 'in' or 'out', found {direction!r}."
        raise ValueError(msg)
    att = attention_matrix(pred, key)
    i = spot_index(pred, spot)
    line = att.getrow(i) if direction == "in" else att.getcol(i).T.tocsr()
    others, weights = line.indices, line.data.astype(np.float64)
    xy = np.asarray(pred.table.obsm["spatial"], dtype=np.float64)[:, :2]
    names = np.asarray(pred.table.obs_names.astype(str))
    src, dst = (others, np.full_like(others, i)) if direction == "in" else (np.full_like(others, i), others)
    df = pd.DataFrame(
        {
            "source": names[src],
            "target": names[dst],
            "weight": weights,
            "x0": xy[src, 0],
            "y0": xy[src, 1],
            "x1": xy[dst, 0],
            "y1": xy[dst, 1],
            "self": others == i,
        }
    )
    return df.sort_values("weight", ascending=False, kind="stable").reset_index(drop=True)


@renamed_arguments("pl.attention")
def attention(
    data: Any,
    spot: str | int,
    *,
    key: str = PREDICTION_KEY,
    layer: str | None = None,
    direction: Literal["in", "out"] = "in",
    image: bool = True,
    cmap: str = "magma",
    max_line_width: float = 10.0,
    padding: float = 1.5,
    width: int = 380,
    max_image_px: int = 600,
) -> hv.Overlay:
    """A spot and its neighbours over the H&E image, each edge as wide as its attention weight.

    Parameters
    ----------
    data
        A sample (SpatialData) after ``hx.tl.predict`` with a model that has attention (the default
        ``"hespotex"`` preset), or its prediction table (AnnData; no image then).
    spot
        The selected spot: an obs name or an integer position.
    key
        The prediction whose attention is shown: the ``key_added`` given to :func:`hespotex.tl.predict`
        (its ``obsp[f"{key}_attention"]``, as its record names it; formerly ``table_key``). An ``obsp`` key
        naming the matrix itself is still read (what ``key`` meant before 0.2).
    layer
        Another layer of that prediction's table (see :func:`hespotex.pl.spatial`).
    direction
        ``"in"``: the neighbours the spot attends to (weights of its row, summing to 1 with the self
        loop); ``"out"``: the spots that attend to it.
    image
        Draw the image around the neighbourhood (read from the coarsest pyramid level giving
        ``max_image_px`` pixels across the window).
    cmap
        Colour map of the neighbours' weights.
    max_line_width
        Line width (screen pixels) of the strongest edge; widths are proportional to the weights.
    padding
        Margin around the neighbourhood, in spot diameters.
    width
        Frame width in pixels.
    max_image_px
        Pixels across the background crop.

    Returns
    -------
    An ``hv.Overlay``: image crop, ``hv.Segments`` from each neighbour to the target (width ∝ weight;
    hover shows source, target and weight), the neighbours as ``hv.Points`` coloured by weight and the
    selected spot marked. Reads the prediction table; writes nothing.
    """
    from hespotex.pl._spatial import import_holoviews, rgb_element

    hv = import_holoviews()
    try:
        pred, obsp_key = get_predictions(data, key=key, layer=layer), None
    except KeyError:  # before 0.2 `key` named the obsp matrix: read it from the default prediction's table
        pred, obsp_key = get_predictions(data, layer=layer), key
        if key not in pred.table.obsp:
            raise
    edges = attention_edges(pred, spot, key=obsp_key, direction=direction)
    name = str(pred.table.obs_names[spot_index(pred, spot)])
    try:
        diameter = get_sample_info(pred.table).spot_diameter_px
    except KeyError:
        diameter = 1.0
    self_w = float(edges.loc[edges["self"], "weight"].sum())
    others = edges.loc[~edges["self"]].copy()
    wmax = float(edges["weight"].max()) if len(edges) else 1.0
    others["width"] = max_line_width * others["weight"] / max(wmax, 1e-12)
    others["spot"] = others["source"] if direction == "in" else others["target"]
    others["x"] = others["x0"] if direction == "in" else others["x1"]
    others["y"] = others["y0"] if direction == "in" else others["y1"]
    i = spot_index(pred, spot)
    cx, cy = (float(v) for v in np.asarray(pred.table.obsm["spatial"], dtype=np.float64)[i, :2])
    xs = np.r_[others["x"].to_numpy(), cx]
    ys = np.r_[others["y"].to_numpy(), cy]
    pad = padding * diameter
    window = (xs.min() - pad, ys.min() - pad, xs.max() + pad, ys.max() + pad)
    # square window, so the frame keeps the tissue's aspect
    half = max(window[2] - window[0], window[3] - window[1]) / 2
    mx, my = (window[0] + window[2]) / 2, (window[1] + window[3]) / 2
    window = (mx - half, my - half, mx + half, my + half)

    clim = (0.0, max(wmax, 1e-12))
    segments = hv.Segments(
        others, kdims=["x0", "y0", "x1", "y1"], vdims=["weight", "source", "target", "width"], label="attention"
    ).opts(
        backend="bokeh",
        color="weight",
        cmap=cmap,
        clim=clim,
        line_width="width",
        line_alpha=0.9,
        tools=["hover"],
        hover_tooltips=[("source", "@source"), ("target", "@target"), ("weight", "@weight{0.000}")],
    )
    size = max(6.0, width * diameter / max(2 * half, 1e-9))  # a spot's diameter on screen
    neighbours = hv.Points(others, kdims=["x", "y"], vdims=["spot", "weight"], label="neighbours").opts(
        backend="bokeh",
        color="weight",
        cmap=cmap,
        clim=clim,
        size=0.6 * size,
        line_color="white",
        line_width=1,
        alpha=0.85,
        colorbar=True,
        tools=["hover"],
        hover_tooltips=[("spot", "@spot"), ("weight", "@weight{0.000}")],
    )
    selected = hv.Points(
        {"x": [cx], "y": [cy], "spot": [name], "self_weight": [self_w]},
        kdims=["x", "y"],
        vdims=["spot", "self_weight"],
        label="selected",
    ).opts(
        backend="bokeh",
        color="cyan",
        marker="circle",
        size=size,
        fill_alpha=0.0,
        line_color="cyan",
        line_width=3,
        tools=["hover"],
        hover_tooltips=[("selected spot", "@spot"), ("self weight", "@self_weight{0.000}")],
    )
    layers: list[Any] = []
    if image:
        crop = crop_image(data, window, max_px=max_image_px)
        if crop is not None:
            layers.append(rgb_element(crop))
    layers += [segments, neighbours, selected]
    verb = "attends to" if direction == "in" else "is attended by"
    title = f"{name} {verb} {len(others)} neighbours (self {self_w:.2f})"
    return hv.Overlay(layers).opts(
        backend="bokeh",
        title=title,
        frame_width=width,
        data_aspect=1,
        invert_yaxis=True,
        xlim=(window[0], window[2]),
        ylim=(window[1], window[3]),
        xaxis=None,
        yaxis=None,
        toolbar="above",
        show_legend=False,
    )
