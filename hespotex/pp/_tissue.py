"""Tissue detection on a low-resolution level of an H&E slide: Otsu threshold, morphological clean-up, polygons."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hespotex._constants import TISSUE_ATTRS_KEY
from hespotex._pixels import read_local
from hespotex._sample import SampleInfo
from hespotex.io._wsi import slide_info
from hespotex.pp._patches import ImageLevel, image_levels

if TYPE_CHECKING:
    from geopandas import GeoDataFrame
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

__all__ = ["detect_tissue", "tissue_levels"]

#: Microns per pixel the mask is computed at by default: the level nearest this range.
TARGET_MPP = (8.0, 16.0)
#: Lowest threshold accepted, per channel: glass with JPEG noise stays below it, stained tissue above.
MIN_THRESHOLD = {"saturation": 0.05, "hematoxylin": 0.01}
MAX_MASK_PIXELS = 64_000_000
#: Pixels above this fraction of the threshold count as tissue when connected to pixels above it (faint edges).
HYSTERESIS = 0.5


def tissue_levels(sdata: SpatialData) -> tuple[dict[str, Any], list[ImageLevel]]:
    """The slide record (:func:`hespotex.io._wsi.slide_info`) and the image's pyramid levels, finest first."""
    slide = slide_info(sdata)
    info = SampleInfo(
        sample_id=slide["sample_id"],
        shapes_key="",
        coordinate_system=slide["coordinate_system"],
        microns_per_pixel=float(slide["microns_per_pixel"]),
        spot_diameter_um=1.0,
        image_key=slide["image_key"],
    )
    return slide, image_levels(sdata, info)


def _level_mpp(level: ImageLevel, mpp: float) -> float:
    return mpp / min(level.scale)


def _pick_level(levels: list[ImageLevel], mpp: float) -> ImageLevel:
    def distance(lv: ImageLevel) -> float:
        m = _level_mpp(lv, mpp)
        return max(0.0, math.log(TARGET_MPP[0] / m), math.log(m / TARGET_MPP[1]))

    small = [lv for lv in levels if lv.shape[0] * lv.shape[1] <= MAX_MASK_PIXELS] or [levels[-1]]
    return min(small, key=lambda lv: (round(distance(lv), 6), -min(lv.scale)))


def _channel(rgb: np.ndarray, channel: str) -> np.ndarray:
    """Per-pixel stain signal from an ``(h, w, 3)`` uint8 image, float32, higher on tissue."""
    if channel == "saturation":
        rgb = rgb.astype(np.float32)
        vmax, vmin = rgb.max(axis=2), rgb.min(axis=2)
        return np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1.0), 0.0).astype(np.float32)
    from skimage.color import rgb2hed

    return rgb2hed(rgb)[..., 0].astype(np.float32)


def _hysteresis(signal: np.ndarray, low: float, high: float) -> np.ndarray:
    """Pixels above ``high``, and those above ``low`` connected (8-connectivity) to them."""
    from scipy import ndimage

    labels, n = ndimage.label(signal > low, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(signal.shape, bool)
    strong = np.zeros(n + 1, bool)
    strong[np.unique(labels[signal > high])] = True
    strong[0] = False
    return strong[labels]


def _remove_small(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    """``mask`` without connected components (8-connectivity) of at most ``max_pixels`` pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes > max_pixels
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    """``mask`` with enclosed background regions of at most ``max_pixels`` pixels filled."""
    from scipy import ndimage

    labels, n = ndimage.label(~mask)  # 4-connectivity for the background
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes <= max_pixels
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def _polygons(mask: np.ndarray) -> list[Any]:
    """Shapely polygons (with holes) of the 8-connected components of ``mask``, in edge coordinates of its pixels."""
    import shapely
    from scipy import ndimage
    from skimage.measure import find_contours

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    polygons = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        region = np.pad(labels[box] == i, 1)
        rings = [
            c[:, ::-1] + [box[1].start - 0.5, box[0].start - 0.5] for c in find_contours(region.astype(np.float32), 0.5)
        ]
        rings = [r for r in rings if len(r) >= 4]
        if not rings:
            continue
        areas = [abs(shapely.Polygon(r).area) for r in rings]
        outer = int(np.argmax(areas))
        poly = shapely.Polygon(rings[outer], [r for j, r in enumerate(rings) if j != outer])
        poly = shapely.make_valid(poly.simplify(0.5))
        polygons.extend(g for g in getattr(poly, "geoms", [poly]) if isinstance(g, shapely.Polygon) and g.area > 0)
    return polygons


def detect_tissue(
    sdata: SpatialData,
    *,
    level: int | None = None,
    method: Literal["otsu"] = "otsu",
    channel: Literal["saturation", "hematoxylin"] = "saturation",
    threshold: float | None = None,
    min_area_um2: float = 20_000.0,
    close_um: float = 30.0,
    key_added: str | None = None,
    overwrite: bool = False,
) -> GeoDataFrame:
    """Detect the tissue on a slide and store it as polygons.

    Reads one low-resolution level of the H&E image whole (default: the level nearest 8-16 µm/px, at
    most 64 M pixels), computes a stain signal per pixel (HSV saturation, or the haematoxylin optical
    density of :func:`skimage.color.rgb2hed`), smooths it (Gaussian, 1 px), thresholds it by Otsu's
    method (never below 0.05 for saturation, 0.01 for haematoxylin, so the noise of empty glass is
    not called tissue), closes gaps narrower than ``close_um``, drops pieces smaller than
    ``min_area_um2`` and fills holes smaller than ``min_area_um2``, and traces the pieces as polygons.

    Parameters
    ----------
    sdata
        A slide from :func:`hespotex.io.read_wsi`, or any hespotex sample with an image.
    level
        Pyramid level to read (0 = full resolution); default as above.
    method
        ``"otsu"`` (the only method for now).
    channel
        ``"saturation"`` (robust to stain strength) or ``"hematoxylin"`` (nuclei-rich tissue only).
    threshold
        A fixed threshold on the channel instead of Otsu's.
    min_area_um2
        Smallest tissue piece kept, and largest hole filled, in µm².
    close_um
        Radius (µm) of the morphological closing that joins nearby tissue; ``0`` skips it.
    key_added
        Shapes key; default ``f"{sample_id}_tissue"``.
    overwrite
        Replace an existing shapes element of that key.

    Returns
    -------
    The tissue polygons, a GeoDataFrame (spatialdata ``ShapesModel``) in the slide's coordinate system
    (full-resolution pixels), one row per tissue piece with column ``area_um2``, largest first. Written:

    - ``sdata.shapes[key_added]``: that GeoDataFrame;
    - ``sdata.attrs["hespotex_tissue"][key_added]``: the parameters, the level read, its µm per pixel,
      the threshold used and the tissue area (µm² and fraction of the level).

    Raises a ``ValueError`` when no tissue is found (an empty slide): the message gives the threshold
    and what to change.
    """
    import geopandas as gpd
    from scipy import ndimage
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    if method != "otsu":
        msg = f"Expected method='otsu', found {method!r}."
        raise ValueError(msg)
    if channel not in MIN_THRESHOLD:
        msg = f"Expected channel 'saturation' or 'hematoxylin', found {channel!r}."
        raise ValueError(msg)
    if min_area_um2 < 0 or close_um < 0:
        msg = f"Expected min_area_um2 >= 0 and close_um >= 0, found {min_area_um2} and {close_um}."
        raise ValueError(msg)
    slide, levels = tissue_levels(sdata)
    sid, cs, mpp = slide["sample_id"], slide["coordinate_system"], float(slide["microns_per_pixel"])
    key = key_added or f"{sid}_tissue"
    if key in sdata.shapes and not overwrite:
        msg = (
            f"The SpatialData already has shapes {key!r}; pass `overwrite=True` to replace them, or another "
            "`key_added`."
        )
        raise ValueError(msg)
    if level is None:
        chosen = _pick_level(levels, mpp)
    elif not 0 <= int(level) < len(levels):
        msg = f"Expected a level in 0..{len(levels) - 1}, found {level}."
        raise ValueError(msg)
    else:
        chosen = levels[int(level)]
    level_mpp = _level_mpp(chosen, mpp)
    rgb = read_local(chosen.array.data[:3]).transpose(1, 2, 0)
    signal = ndimage.gaussian_filter(_channel(rgb, channel), sigma=1.0)
    if threshold is None:
        from skimage.filters import threshold_otsu

        otsu = float(threshold_otsu(signal)) if np.ptp(signal) > 0 else float(signal.max())
        used = max(otsu, MIN_THRESHOLD[channel])
    else:
        otsu, used = None, float(threshold)
    low = max(used * HYSTERESIS, MIN_THRESHOLD[channel])
    mask = _hysteresis(signal, low, used)
    radius = close_um / level_mpp
    if radius >= 0.5 and mask.any():
        from skimage.morphology import disk

        r = max(1, round(radius))
        padded = np.pad(mask, r)
        mask = ndimage.binary_closing(padded, structure=disk(r))[r:-r, r:-r]
    min_px = min_area_um2 / level_mpp**2
    mask = _remove_small(mask, min_px)
    mask = _fill_small_holes(mask, min_px)
    if not mask.any():
        msg = (
            f"No tissue found on {sid!r}: no piece of at least {min_area_um2:g} µm² has {channel} above "
            f"{used:.3f} (level {chosen.level}, {level_mpp:.1f} µm/px). If the slide does hold tissue, pass a "
            "lower `threshold=`, a smaller `min_area_um2=`, or `channel='hematoxylin'`."
        )
        raise ValueError(msg)
    polygons = _polygons(mask)
    # level pixel edges -> coordinate system: cs = (px - offset) / scale
    sx, sy = chosen.scale
    ox, oy = chosen.offset
    import shapely

    polygons = [shapely.affinity.affine_transform(p, [1 / sx, 0, 0, 1 / sy, -ox / sx, -oy / sy]) for p in polygons]
    areas = np.array([p.area for p in polygons]) * mpp**2
    order = np.argsort(-areas, kind="stable")
    gdf = gpd.GeoDataFrame({"area_um2": areas[order]}, geometry=[polygons[i] for i in order])
    gdf.index = np.arange(len(gdf))
    shapes = ShapesModel.parse(gdf, transformations={cs: Identity()})
    if key in sdata.shapes:
        del sdata.shapes[key]
    sdata.shapes[key] = shapes
    record = {
        "method": method,
        "channel": channel,
        "level": int(chosen.level),
        "level_microns_per_pixel": float(level_mpp),
        "otsu_threshold": otsu,
        "threshold": float(used),
        "min_area_um2": float(min_area_um2),
        "close_um": float(close_um),
        "n_pieces": len(gdf),
        "area_um2": float(areas.sum()),
        "fraction": float(mask.mean()),
    }
    sdata.attrs.setdefault(TISSUE_ATTRS_KEY, {})[key] = record
    logger.info(
        "detect_tissue %s: %d pieces, %.2f mm² (%.0f%% of the slide), threshold %.3f on level %d (%.1f µm/px).",
        sid,
        len(gdf),
        areas.sum() / 1e6,
        100 * mask.mean(),
        used,
        chosen.level,
        level_mpp,
    )
    return shapes
