"""``hx.pl.diagnostic_patches``: a gallery of the top patches with their scores and saliency overlays."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from hespotex.pl._export import hv_backends

logger = logging.getLogger("hespotex")


def _check_result(result: Any) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None]:
    missing = [a for a in ("table", "images", "saliency") if not hasattr(result, a)]
    if missing:
        msg = (
            f"Expected the result of `hx.tl.diagnostic_patches` (attributes table, images, saliency), "
            f"found a {type(result).__name__} without {missing}."
        )
        raise TypeError(msg)
    table, images, sal = result.table, np.asarray(result.images), result.saliency
    if not isinstance(table, pd.DataFrame) or "score" not in table:
        msg = (
            f"Expected `result.table` to be a DataFrame with a 'score' column, found {type(table).__name__} with "
            f"columns {list(getattr(table, 'columns', []))}."
        )
        raise ValueError(msg)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(table):
        msg = f"Expected `result.images` of shape (n_patches={len(table)}, height, width, 3), found {images.shape}."
        raise ValueError(msg)
    if sal is not None:
        sal = np.asarray(sal)
        if sal.shape != images.shape[:3]:
            msg = (
                f"Expected `result.saliency` of shape {images.shape[:3]} (one map per patch) or None, found "
                f"{sal.shape}."
            )
            raise ValueError(msg)
    return table, images, sal


def tile_order(table: pd.DataFrame) -> list[int]:
    """Positions of the patches in gallery order: groups in order of first appearance, rank within each."""
    pos = pd.Series(np.arange(len(table)))
    rank = pd.to_numeric(table["rank"], errors="coerce").to_numpy() if "rank" in table else pos.to_numpy()
    groups = table["group"].astype(str).to_numpy() if "group" in table else np.zeros(len(table), dtype=str)
    first = {g: i for i, g in reversed(list(enumerate(groups)))}
    frame = pd.DataFrame({"g": [first[g] for g in groups], "rank": rank, "pos": pos})
    return frame.sort_values(["g", "rank", "pos"], kind="stable")["pos"].tolist()


def tile_title(row: pd.Series, spot: Any, *, with_group: bool) -> str:
    """``#rank spot · score`` (and ``· group``) of one patch."""
    rank = row.get("rank")
    head = f"#{int(rank)} " if rank is not None and pd.notna(rank) else ""
    title = f"{head}{spot} · score {float(row['score']):.3g}"
    if with_group and "group" in row and pd.notna(row["group"]):
        title += f" · {row['group']}"
    return title


def diagnostic_patches(
    result: Any,
    *,
    ncols: int = 4,
    saliency: bool = True,
    alpha: float = 0.5,
    cmap: str = "inferno",
    threshold: float = 0.1,
    width: int = 200,
    max_patches: int | None = None,
):
    """Gallery of the top patches of :func:`hespotex.tl.diagnostic_patches`, with saliency overlays.

    Parameters
    ----------
    result
        A :class:`hespotex.tl.DiagnosticPatches` (or any object with its attributes): ``table``
        (ranked spots; columns ``score`` and, when present, ``rank`` and ``group``), ``images``
        ``(n, h, w, 3)`` uint8 crops in the table's order and ``saliency`` ``(n, h, w)`` in [0, 1] or ``None``.
    ncols
        Tiles per row.
    saliency
        Overlay the saliency map of each patch when the result has them.
    alpha
        Opacity of the saliency overlay.
    cmap
        Colour map of the saliency overlay (values 0–1).
    threshold
        Saliency below this is drawn transparent, so that the tissue stays visible where the model
        does not look (0 draws the whole map).
    width
        Width of a tile in screen pixels (bokeh); the height follows the patch's aspect.
    max_patches
        Show at most this many patches (the best ranked of each group, in turn); default all.

    Returns
    -------
    A :class:`holoviews.Layout` of one tile per patch, ``ncols`` per row: an :class:`holoviews.RGB` of
    the crop (in patch pixels, y up) titled ``#rank spot id · score`` (``· group`` when there are several
    groups), overlaid with an :class:`holoviews.Image` of the saliency when shown (values below
    ``threshold`` as NaN). Tiles run in rank
    order; with several groups each group starts a new row (empty cells pad the previous one).
    Nothing is written and ``result`` is not changed.
    """
    hv = hv_backends()
    table, images, sal = _check_result(result)
    if ncols < 1:
        msg = f"Expected `ncols` >= 1, found {ncols}."
        raise ValueError(msg)
    if len(table) == 0:
        msg = (
            "The result holds no patches; nothing to show. Check the `by=` and `n_patches=` of "
            "`hx.tl.diagnostic_patches`."
        )
        raise ValueError(msg)
    show_saliency = saliency and sal is not None
    if saliency and sal is None:
        logger.info("The result has no saliency maps; showing the patches alone.")
    order = tile_order(table)
    groups = table["group"].astype(str).to_numpy() if "group" in table else np.zeros(len(table), dtype=str)
    several = len(set(groups)) > 1
    if max_patches is not None:
        order = _round_robin(order, groups, max_patches)
    tiles, previous = [], None
    for i in order:
        if several and previous is not None and groups[i] != previous:
            tiles.extend(hv.Empty() for _ in range(-len(tiles) % ncols))
        previous = groups[i]
        tiles.append(
            _tile(
                hv,
                images[i],
                sal[i] if show_saliency else None,
                tile_title(table.iloc[i], table.index[i], with_group=several),
                alpha=alpha,
                cmap=cmap,
                threshold=threshold,
                width=width,
            )
        )
    layout = hv.Layout(tiles).cols(ncols).opts(shared_axes=False, backend="bokeh")
    return layout.opts(sublabel_format="", vspace=0.25, hspace=0.1, backend="matplotlib")


def _round_robin(order: list[int], groups: np.ndarray, n: int) -> list[int]:
    """The first ``n`` of ``order`` taking the best remaining patch of each group in turn, kept in gallery order."""
    by_group: dict[str, list[int]] = {}
    for i in order:
        by_group.setdefault(groups[i], []).append(i)
    chosen: set[int] = set()
    depth = 0
    while len(chosen) < min(n, len(order)):
        for members in by_group.values():
            if depth < len(members) and len(chosen) < n:
                chosen.add(members[depth])
        depth += 1
    return [i for i in order if i in chosen]


def _tile(
    hv, image: np.ndarray, sal: np.ndarray | None, title: str, *, alpha: float, cmap: str, threshold: float, width: int
):
    h, w = image.shape[:2]
    bounds = (0, 0, w, h)
    rgb = hv.RGB(np.asarray(image), bounds=bounds, kdims=["x", "y"], group="Patch")
    axes = {"xaxis": None, "yaxis": None}
    rgb = rgb.opts(width=width, height=max(1, round(width * h / w)), toolbar=None, **axes, backend="bokeh")
    tile = rgb.opts(aspect=w / h, **axes, backend="matplotlib")
    if sal is not None:
        style = {"alpha": alpha, "cmap": cmap, "clim": (0.0, 1.0), "clipping_colors": {"NaN": "transparent"}}
        values = np.where(np.asarray(sal) >= threshold, sal, np.nan).astype(np.float32)
        heat = hv.Image(values, bounds=bounds, kdims=["x", "y"], vdims=["saliency"], group="Saliency")
        heat = heat.opts(**style, tools=["hover"], backend="bokeh").opts(**style, backend="matplotlib")
        tile = tile * heat
    tile = tile.opts(title=title, backend="bokeh")
    return tile.opts(title=title, fontsize={"title": 8}, backend="matplotlib")
