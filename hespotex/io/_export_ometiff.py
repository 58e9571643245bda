"""``hx.io.write_ome_tiff``: pyramidal OME-TIFF heatmaps of predicted expression, aligned to the slide.

The heatmap's full-resolution level has the slide's full-resolution size (``downsample=1``; or that
size divided by ``downsample``) and its physical pixel size (``PhysicalSizeX/Y`` in µm), so QuPath and
napari place it over the slide. Each spot paints its footprint (a disc of the spot diameter, or a
square) with its predicted value; the pixel under each spot centre is always painted, so no spot
disappears at coarse levels. Sub-resolutions halve the size down to one tile and go to SubIFDs, as
in tifffile's pyramid example (``TiffWriter.write(..., subifds=n)`` then ``subfiletype=1`` levels).
Every level is rasterised from the spots themselves (not resampled), tile by tile from a generator,
so memory stays at a few tiles whatever the slide size.

Values are float32 with NaN where there is no spot, or uint16 scaled per gene
(``value = offset + (stored - 1) * scale``; 0 = no spot) with ``offset`` and ``scale`` recorded in
an OME ``MapAnnotation`` (namespace :data:`SCALE_NAMESPACE`).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hespotex import _ownership
from hespotex.io._export_common import DEFAULT_KEY, Prediction, check_output, footprint_px, open_prediction

logger = logging.getLogger("hespotex")

SCALE_NAMESPACE = "hespotex/expression-scale"
_U16_MAX = 65535


class SpotRaster:
    """Rasterise spot footprints into label tiles (spot index per pixel, -1 where no spot).

    ``centres`` and ``size_px`` are in full-resolution pixels; a tile is asked for at a ``scale``
    (full-resolution pixels per output pixel). A pixel belongs to a spot when its centre lies in the
    spot's disc (or square); the pixel holding a spot's centre always does.
    """

    def __init__(self, centres: np.ndarray, size_px: float, *, shape: str = "circle") -> None:
        from scipy.spatial import cKDTree

        self.centres = np.asarray(centres, dtype=np.float64)
        self.half = size_px / 2.0
        self.shape = shape
        self.tree = cKDTree(self.centres) if len(self.centres) else None

    def labels(self, scale: float, y0: int, x0: int, tile: int) -> np.ndarray:
        """Labels ``(tile, tile)`` int32 of output pixels ``[y0, y0 + tile) x [x0, x0 + tile)`` at ``scale``."""
        out = np.full((tile, tile), -1, dtype=np.int32)
        if self.tree is None:
            return out
        half_tile = tile * scale / 2.0
        centre = ((x0 * scale) + half_tile, (y0 * scale) + half_tile)
        reach = half_tile * math.sqrt(2.0) + self.half * math.sqrt(2.0) + scale * 1.5
        cand = self.tree.query_ball_point(centre, reach)
        if not cand:
            return out
        cand = np.sort(np.asarray(cand, dtype=np.int64))
        cx = self.centres[cand, 0] / scale - x0  # spot centres in tile pixels
        cy = self.centres[cand, 1] / scale - y0
        r = self.half / scale
        xa = np.clip(np.floor(cx - r).astype(np.int64), 0, tile)
        xb = np.clip(np.ceil(cx + r).astype(np.int64) + 1, 0, tile)
        ya = np.clip(np.floor(cy - r).astype(np.int64), 0, tile)
        yb = np.clip(np.ceil(cy + r).astype(np.int64) + 1, 0, tile)
        grid = np.arange(tile) + 0.5
        for k in range(len(cand)):
            if xa[k] >= xb[k] or ya[k] >= yb[k]:
                continue
            dx = grid[xa[k] : xb[k]] - cx[k]
            dy = grid[ya[k] : yb[k]] - cy[k]
            if self.shape == "circle":
                mask = (dy[:, None] ** 2 + dx[None, :] ** 2) <= r * r
            else:
                mask = (np.abs(dy)[:, None] <= r) & (np.abs(dx)[None, :] <= r)
            out[ya[k] : yb[k], xa[k] : xb[k]][mask] = cand[k]
        # the pixel under each centre, so spots smaller than a pixel still show
        px, py = np.floor(cx).astype(np.int64), np.floor(cy).astype(np.int64)
        inside = (px >= 0) & (px < tile) & (py >= 0) & (py < tile)
        out[py[inside], px[inside]] = cand[inside]
        return out


def pyramid_shapes(
    height: int, width: int, *, downsample: int, tile: int, levels: int | None
) -> list[tuple[int, int, int]]:
    """``(height, width, scale)`` of every level: the full-resolution size divided by ``downsample``, then
    halved until the level fits in one tile (or ``levels`` levels)."""
    out = []
    scale = int(downsample)
    while True:
        h, w = -(-height // scale), -(-width // scale)
        out.append((h, w, scale))
        if (levels is not None and len(out) >= levels) or (levels is None and max(h, w) <= tile):
            return out
        scale *= 2


def _encode_values(values: np.ndarray, dtype: str) -> tuple[np.ndarray, dict[str, float], dict[str, float]]:
    """Per-gene lookup tables (spots + 1 rows: the last is the background) and the uint16 scaling."""
    n, g = values.shape
    if dtype == "float32":
        table = np.vstack([values.astype(np.float32), np.full((1, g), np.nan, dtype=np.float32)])
        return table, {}, {}
    lo = np.nanmin(values, axis=0) if n else np.zeros(g)
    hi = np.nanmax(values, axis=0) if n else np.ones(g)
    span = np.where(hi > lo, hi - lo, 1.0)
    scale = span / (_U16_MAX - 1)
    stored = np.rint((values - lo) / scale) + 1
    table = np.vstack(
        [np.clip(np.nan_to_num(stored, nan=0), 0, _U16_MAX).astype(np.uint16), np.zeros((1, g), np.uint16)]
    )
    return table, {i: float(v) for i, v in enumerate(lo)}, {i: float(v) for i, v in enumerate(scale)}


def write_ome_tiff(
    data: Any,
    path: str | Path,
    *,
    genes: Sequence[str] | str | None = None,
    key: str = DEFAULT_KEY,
    layer: str | None = None,
    dtype: Literal["float32", "uint16"] = "float32",
    shape: Literal["circle", "square"] = "circle",
    size_um: float | None = None,
    downsample: int = 1,
    tile: int = 512,
    levels: int | None = None,
    image_shape: tuple[int, int] | None = None,
    compression: str = "zlib",
    overwrite: bool = False,
) -> Path:
    """Write a pyramidal, tiled OME-TIFF heatmap of predicted expression (one channel per gene) over the slide.

    Parameters
    ----------
    data
        A prediction: the zarr store that ``hespotex predict`` / ``hx.tl.predict(..., out=...)`` writes,
        a SpatialData holding the table ``key``, or the table.
    path
        Output file (``.ome.tif``).
    genes
        Genes, one channel each (default: every predicted gene). For one file per gene, call once per gene.
    key
        The prediction table (and, by default, its layer).
    layer
        Layer of predicted values (default: ``key``).
    dtype
        ``"float32"`` (the values; NaN where there is no spot) or ``"uint16"`` (per-gene linear scaling
        of each gene's range onto 1-65535, 0 where there is no spot; recorded in the file).
    shape
        Spot footprint: a ``"circle"`` or a ``"square"`` (tiles, bins) centred on the spot.
    size_um
        Circle diameter / square side in µm (default: the spot diameter the prediction records).
    downsample
        Full-resolution pixels per heatmap pixel at the heatmap's first level (1: the slide's own
        pixel grid). Larger values give smaller files; the physical pixel size follows.
    tile
        Side of the TIFF tiles (a multiple of 16).
    levels
        Pyramid levels (default: halve down to one tile).
    image_shape
        ``(height, width)`` of the slide's full-resolution level, when the prediction does not record it.
    compression
        TIFF compression of the tiles (``"zlib"``, ``"zstd"``, ``"lzw"``... as tifffile names them; ``None``: none).
    overwrite
        Replace an existing file.

    Returns
    -------
    The path written: one image series, axes ``CYX`` (a channel per gene, named after it), levels in
    SubIFDs, ``PhysicalSizeX/Y`` = µm per full-resolution pixel x ``downsample`` (per level: x 2 each),
    and for ``uint16`` a ``MapAnnotation`` (namespace ``"hespotex/expression-scale"``) with
    ``{gene} offset`` and ``{gene} scale``. Nothing else is written.
    """
    import tifffile
    from tqdm.auto import tqdm

    from hespotex._settings import settings

    if dtype not in ("float32", "uint16"):
        msg = f"Expected dtype 'float32' or 'uint16', found {dtype!r}."
        raise ValueError(msg)
    if int(downsample) != downsample or downsample < 1:
        msg = f"Expected a whole `downsample` >= 1 (full-resolution pixels per heatmap pixel), found {downsample}."
        raise ValueError(msg)
    if tile < 16 or tile % 16:
        msg = f"Expected a TIFF tile side that is a positive multiple of 16, found {tile}."
        raise ValueError(msg)
    if levels is not None and levels < 1:
        msg = f"Expected at least one pyramid level, found levels={levels}."
        raise ValueError(msg)
    pred: Prediction = open_prediction(data, key=key, layer=layer)
    names, columns = pred.gene_index(genes)
    size_px = footprint_px(pred, shape=shape, size_um=size_um)
    height, width = pred.extent(image_shape)
    outside = (
        (pred.centres[:, 0] < 0)
        | (pred.centres[:, 1] < 0)
        | (pred.centres[:, 0] >= width)
        | (pred.centres[:, 1] >= height)
    )
    if outside.any():
        msg = (
            f"{int(outside.sum())} spot centres lie outside the slide's {width} x {height} px; the prediction does "
            "not belong to a slide of this size. Pass the right `image_shape`."
        )
        raise ValueError(msg)
    path = check_output(path, overwrite=overwrite)
    values = pred.read(columns)  # n_spots x genes: the one array of the size of the export
    lookup, offsets, scales = _encode_values(values, dtype)
    background = len(values)  # label -1 -> last row of the lookup table
    del values
    shapes = pyramid_shapes(height, width, downsample=int(downsample), tile=tile, levels=levels)
    raster = SpotRaster(pred.centres, size_px, shape=shape)
    mpp = pred.microns_per_pixel
    n_tiles = sum(len(names) * (-(-h // tile)) * (-(-w // tile)) for h, w, _ in shapes)
    bar = tqdm(total=n_tiles, desc="heatmap tiles", unit="tile", disable=not settings.progress)

    def tiles(h: int, w: int, scale: int) -> Iterator[np.ndarray]:
        cache: list[bytes] = []  # the level's label tiles, compressed, for channels after the first
        for c in range(len(names)):
            i = 0
            for y0 in range(0, h, tile):
                for x0 in range(0, w, tile):
                    if c == 0:
                        lab = raster.labels(scale, y0, x0, tile)
                        if len(names) > 1:
                            cache.append(zlib.compress(lab.tobytes(), 1))
                    else:
                        lab = np.frombuffer(zlib.decompress(cache[i]), dtype=np.int32).reshape(tile, tile)
                    i += 1
                    lab = np.where(lab < 0, background, lab)
                    bar.update()
                    yield lookup[lab, c]

    meta: dict[str, Any] = {
        "axes": "CYX",
        "Name": f"{pred.sample_id} predicted expression (hespotex)",
        "PhysicalSizeX": mpp * shapes[0][2],
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp * shapes[0][2],
        "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": names},
    }
    if dtype == "uint16":
        scale_map = {
            "Namespace": SCALE_NAMESPACE,
            "formula": "value = offset + (stored - 1) * scale; stored 0 = no spot",
        }
        for c, g in enumerate(names):
            scale_map[f"{g} offset"] = repr(offsets[c])
            scale_map[f"{g} scale"] = repr(scales[c])
        meta["MapAnnotation"] = scale_map
    np_dtype = np.float32 if dtype == "float32" else np.uint16
    options = {
        "tile": (tile, tile),
        "dtype": np_dtype,
        "photometric": "minisblack",
        "compression": compression,
        "resolutionunit": "CENTIMETER",
    }
    tmp = _ownership.temp_sibling(path)  # unique to the call: never a user's file, nor another run's
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for i, (h, w, scale) in enumerate(shapes):
                px_um = mpp * scale
                extra = (
                    {"subifds": len(shapes) - 1, "metadata": meta} if i == 0 else {"subfiletype": 1, "metadata": None}
                )
                tif.write(
                    tiles(h, w, scale),
                    shape=(len(names), h, w),
                    resolution=(1e4 / px_um, 1e4 / px_um),
                    **options,
                    **extra,
                )
        tmp.replace(path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    logger.info(
        "Wrote a %d-level OME-TIFF heatmap of %d genes (%d x %d px at %.4g µm/px) to %s.",
        len(shapes), len(names), shapes[0][1], shapes[0][0], mpp * shapes[0][2], path,
    )  # fmt: skip
    return path
