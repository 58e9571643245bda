"""Reading H&E patches of a physical size around spot centres, from the right pyramid level.

Patches are cut from the coarsest pyramid level that still has at least the resolution the
encoder input needs, reading one bounding box per batch of nearby spots, so a whole
full-resolution slide is never loaded. Edges are padded with white (background of H&E).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._pixels import read_local
from hespotex._sample import SampleInfo, get_sample_info, get_table, spot_centres

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

PAD_VALUE = 255  # white glass
CHUNK_CACHE_BYTES = 192 * 2**20  # decoded image chunks kept by a patch plan (about two rows of 512 px
# tiles across a 50,000 px wide level)


@dataclass(frozen=True)
class ImageLevel:
    """One pyramid level and the map from coordinate-system units to its pixels: ``px = cs * scale + offset``."""

    image_key: str
    level: int
    array: Any  # xarray.DataArray (c, y, x), lazily backed by dask
    scale: tuple[float, float]  # (x, y) level pixels per coordinate unit
    offset: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.sizes["y"]), int(self.array.sizes["x"])


def default_patch_um(info: SampleInfo) -> float:
    """Default patch side in µm: the spot diameter (the tissue the spot measured).

    On the shift benchmark (``benchmarks/results/shift.md``, one seed) patches of the spot diameter
    and of twice it are level (about +0.008 on the top-50 HVG, -0.007 on all genes); on a section of
    another her2st patient (issue 9) the spot diameter scored higher, and the benchmark's defaults
    (three seeds, ensembles) were measured with it.
    """
    return info.spot_diameter_um


def image_levels(sdata: SpatialData, info: SampleInfo | None = None) -> list[ImageLevel]:
    """All pyramid levels of the sample's H&E image, finest first, with their maps from the sample's coordinates."""
    from spatialdata.transformations import get_transformation

    info = info or get_sample_info(sdata)
    key = info.image_key
    if key is None or key not in getattr(sdata, "images", {}):
        msg = (
            f"This sample has no H&E image element (expected {key!r}; found images "
            f"{list(getattr(sdata, 'images', {}))}). Embeddings need the image: read the sample with its image."
        )
        raise KeyError(msg)
    element = sdata.images[key]
    transform = get_transformation(element, to_coordinate_system=info.coordinate_system)
    matrix = np.asarray(transform.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)
    if abs(matrix[0, 1]) > 1e-9 or abs(matrix[1, 0]) > 1e-9:
        msg = (
            f"The image {key!r} is rotated or sheared relative to {info.coordinate_system!r}; only scale and "
            "translation are supported."
        )
        raise ValueError(msg)
    # element pixel -> cs:  cs = m00 * px + m02;  inverse: px = (cs - m02) / m00
    sx, sy = 1.0 / matrix[0, 0], 1.0 / matrix[1, 1]
    ox, oy = -matrix[0, 2] * sx, -matrix[1, 2] * sy
    if hasattr(element, "children") and len(element.children):  # multiscale DataTree
        arrays = [
            element[name]["image"] for name in sorted(element.children, key=lambda n: int(n.removeprefix("scale")))
        ]
    else:
        arrays = [element]
    base_h, base_w = int(arrays[0].sizes["y"]), int(arrays[0].sizes["x"])
    levels = []
    for i, arr in enumerate(arrays):
        fx, fy = arr.sizes["x"] / base_w, arr.sizes["y"] / base_h
        levels.append(ImageLevel(key, i, arr, (sx * fx, sy * fy), (ox * fx, oy * fy)))
    return levels


UPSAMPLE_WARNING = 2.0  # patches enlarged more than this to the encoder's input: the image is too coarse for it


def choose_level(levels: list[ImageLevel], px_per_unit: float) -> ImageLevel:
    """Coarsest level with at least ``px_per_unit`` pixels per coordinate unit (the finest if none has).

    Warns when even the finest level needs its patches enlarged more than :data:`UPSAMPLE_WARNING` times (a
    low-resolution image: the encoder sees interpolated detail); milder enlargement, such as 100 µm spot patches of a
    0.5-0.7 µm/px scan brought to a 224 px input, is the usual case and silent."""
    ok = [lv for lv in levels if min(lv.scale) >= px_per_unit * 0.999]
    if ok:
        return ok[-1]
    finest = levels[0]
    factor = px_per_unit / min(finest.scale)
    if factor > UPSAMPLE_WARNING:
        logger.warning(
            "The image %r has %.3g px per coordinate unit at its finest level; the encoder's input needs %.3g, so "
            "patches are enlarged %.1f times and the encoder sees interpolated detail. Use a finer image "
            "(the original scan rather than a downsampled copy) for reliable features.",
            finest.image_key,
            min(finest.scale),
            px_per_unit,
            factor,
        )
    return finest


def spatial_order(xy: np.ndarray, band: float) -> np.ndarray:
    """Order points in serpentine bands so consecutive points are close (compact crop boxes)."""
    rows = np.floor((xy[:, 1] - xy[:, 1].min()) / max(band, 1e-9)).astype(np.int64)
    x = np.where(rows % 2 == 0, xy[:, 0], -xy[:, 0])
    return np.lexsort((x, rows))


class ChunkCache:
    """Decoded chunks of one lazily read (dask) image level, least recently used first out.

    A batch of neighbouring spots reads a crop box that covers parts of a few stored tiles (the
    dask chunks of a pyramidal TIFF level); the next batches, and the next band of the reading
    order, read the same tiles again. Without a cache every read decodes (e.g. JPEG) every tile
    it touches, several times over; with it each tile is decoded about once. Holds at most
    ``max_bytes`` of decoded pixels. In-memory (numpy) levels, and levels whose chunks are large
    (more than 1/16 of ``max_bytes``, e.g. coarse levels computed from a whole image), are sliced directly.
    """

    def __init__(self, level: ImageLevel, max_bytes: int = CHUNK_CACHE_BYTES) -> None:
        data = level.array.data
        self.data = data
        chunks = getattr(data, "chunks", None)
        self.lazy = chunks is not None and hasattr(data, "dask")
        if self.lazy:
            chunk_bytes = 3 * max(chunks[1]) * max(chunks[2]) * np.dtype(data.dtype).itemsize
            self.lazy = chunk_bytes <= max_bytes // 16
        if self.lazy:
            self.y_edges = np.cumsum((0, *chunks[1]))
            self.x_edges = np.cumsum((0, *chunks[2]))
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.misses = 0  # chunks decoded
        self.chunks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def _chunk(self, i: int, j: int) -> np.ndarray:
        with self.lock:
            hit = self.chunks.get((i, j))
            if hit is not None:
                self.chunks.move_to_end((i, j))
                return hit
        y0, y1, x0, x1 = self.y_edges[i], self.y_edges[i + 1], self.x_edges[j], self.x_edges[j + 1]
        arr = read_local(self.data[:3, y0:y1, x0:x1])
        with self.lock:
            self.misses += 1
            self.chunks[(i, j)] = arr
            self.nbytes += arr.nbytes
            while self.nbytes > self.max_bytes and len(self.chunks) > 1:
                _, old = self.chunks.popitem(last=False)
                self.nbytes -= old.nbytes
        return arr

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[:3, y0:y1, x0:x1]`` (inside the level) as a uint8 numpy array."""
        if not self.lazy:
            return read_local(self.data[:3, y0:y1, x0:x1])
        out = np.empty((min(3, self.data.shape[0]), y1 - y0, x1 - x0), dtype=self.data.dtype)
        i0, i1 = np.searchsorted(self.y_edges, y0, "right") - 1, np.searchsorted(self.y_edges, y1, "left")
        j0, j1 = np.searchsorted(self.x_edges, x0, "right") - 1, np.searchsorted(self.x_edges, x1, "left")
        for i in range(i0, i1):
            cy0, cy1 = max(y0, self.y_edges[i]), min(y1, self.y_edges[i + 1])
            for j in range(j0, j1):
                cx0, cx1 = max(x0, self.x_edges[j]), min(x1, self.x_edges[j + 1])
                chunk = self._chunk(i, j)
                out[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = chunk[
                    :, cy0 - self.y_edges[i] : cy1 - self.y_edges[i], cx0 - self.x_edges[j] : cx1 - self.x_edges[j]
                ]
        return out


def read_crops(
    level: ImageLevel, x0: np.ndarray, y0: np.ndarray, size: int, *, cache: ChunkCache | None = None
) -> np.ndarray:
    """Crops ``(n, 3, size, size)`` uint8 with top-left corners ``(x0, y0)`` in level pixels, white-padded.

    Reads one bounding box for all crops when it is compact, one read per crop otherwise; through
    ``cache`` (decoded chunks kept between calls) when given.
    """
    h, w = level.shape
    n = len(x0)
    out = np.full((n, 3, size, size), PAD_VALUE, dtype=np.uint8)
    bx0, by0 = max(int(x0.min()), 0), max(int(y0.min()), 0)
    bx1, by1 = min(int(x0.max()) + size, w), min(int(y0.max()) + size, h)
    if bx1 <= bx0 or by1 <= by0:
        return out
    data = level.array.data

    def box(ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
        return cache.read(ya, yb, xa, xb) if cache is not None else read_local(data[:3, ya:yb, xa:xb])

    compact = (bx1 - bx0) * (by1 - by0) <= 16 * n * size * size
    block = box(by0, by1, bx0, bx1) if compact else None
    for i in range(n):
        cx0, cy0 = int(x0[i]), int(y0[i])
        sx0, sy0, sx1, sy1 = max(cx0, 0), max(cy0, 0), min(cx0 + size, w), min(cy0 + size, h)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        src = block[:, sy0 - by0 : sy1 - by0, sx0 - bx0 : sx1 - bx0] if block is not None else box(sy0, sy1, sx0, sx1)
        out[i, :, sy0 - cy0 : sy1 - cy0, sx0 - cx0 : sx1 - cx0] = src
    return out


@dataclass(frozen=True)
class PatchPlan:
    """Where to cut each spot's patch: level, crop size in level pixels, top-left corners, reading order."""

    level: ImageLevel
    size: int
    x0: np.ndarray
    y0: np.ndarray
    order: np.ndarray
    patch_um: float
    out_px: int
    base: ImageLevel  # the full-resolution level (identifies the image)
    cache: ChunkCache | None = field(default=None, compare=False, repr=False)  # shared by copies (dataclasses.replace)
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # e.g. the image fingerprint, computed once

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Spot indices per batch, in spatial reading order."""
        for start in range(0, len(self.order), batch_size):
            yield self.order[start : start + batch_size]

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Crops ``(len(idx), 3, size, size)`` uint8 at level resolution for spots ``idx``."""
        return read_crops(self.level, self.x0[idx], self.y0[idx], self.size, cache=self.cache)

    def read_around(self, idx: np.ndarray, size: int) -> np.ndarray:
        """Crops ``(len(idx), 3, size, size)`` uint8 about the same centres as :meth:`read`'s, ``size`` level pixels
        wide (``size >= self.size``; white-padded beyond the image)."""
        pad = (int(size) - self.size) // 2
        return read_crops(self.level, self.x0[idx] - pad, self.y0[idx] - pad, int(size), cache=self.cache)

    def fingerprint(self) -> str:
        """Hash of the geometry (level, crop corners, size, output size) for cache keys."""
        h = hashlib.sha256()
        for part in (self.level.image_key, self.level.level, self.size, self.out_px, round(self.patch_um, 6)):
            h.update(repr(part).encode())
        h.update(np.ascontiguousarray(self.x0, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.y0, dtype=np.int64).tobytes())
        return h.hexdigest()


def plan_patches(sdata: SpatialData, *, patch_um: float | None = None, out_px: int = 224) -> PatchPlan:
    """Plan the crops of every spot of ``sdata``'s table: ``patch_um`` wide, resized later to ``out_px``."""
    info = get_sample_info(sdata)
    patch_um = float(patch_um) if patch_um is not None else default_patch_um(info)
    if patch_um <= 0:
        msg = f"Expected a positive patch size in µm, found {patch_um}."
        raise ValueError(msg)
    patch_units = patch_um / info.microns_per_pixel
    levels = image_levels(sdata, info)
    level = choose_level(levels, out_px / patch_units)
    scale = min(level.scale)
    size = max(round(patch_units * scale), 1)
    xy = spot_centres(sdata)
    px = xy[:, 0] * level.scale[0] + level.offset[0]
    py = xy[:, 1] * level.scale[1] + level.offset[1]
    x0 = np.round(px - size / 2).astype(np.int64)
    y0 = np.round(py - size / 2).astype(np.int64)
    check_patches_in_image(level, x0, y0, size, info=info, obs_names=get_table(sdata).obs_names, patch_um=patch_um)
    order = spatial_order(np.c_[px, py], band=4 * size)
    return PatchPlan(level, size, x0, y0, order, patch_um, out_px, levels[0], cache=ChunkCache(level))


def check_patches_in_image(
    level: ImageLevel,
    x0: np.ndarray,
    y0: np.ndarray,
    size: int,
    *,
    info: SampleInfo,
    obs_names: Any = None,
    patch_um: float | None = None,
) -> None:
    """Raise when a spot's patch lies entirely outside the image; warn with the count of those partly outside.

    A patch wholly outside would be blank white (a constant, meaningless prediction); one partly
    outside is padded with white, as documented in the module notes.
    """
    h, w = level.shape
    x1, y1 = x0 + size, y0 + size
    outside = (x1 <= 0) | (y1 <= 0) | (x0 >= w) | (y0 >= h)
    partly = ~outside & ((x0 < 0) | (y0 < 0) | (x1 > w) | (y1 > h))
    if not outside.any() and not partly.any():
        return
    # the image's extent in the sample's coordinates: cs = (px - offset) / scale
    ex0, ey0 = -level.offset[0] / level.scale[0], -level.offset[1] / level.scale[1]
    ex1, ey1 = (w - level.offset[0]) / level.scale[0], (h - level.offset[1]) / level.scale[1]
    extent = f"x {ex0:.0f} to {ex1:.0f}, y {ey0:.0f} to {ey1:.0f} in {info.coordinate_system!r}"
    patch = f"{patch_um:g} µm patches" if patch_um is not None else "patches"

    def examples(mask: np.ndarray) -> list:
        return list(obs_names[mask][:5]) if obs_names is not None else list(np.flatnonzero(mask)[:5])

    if outside.any():
        msg = (
            f"{int(outside.sum())} of {len(outside)} spots of {info.sample_id!r} have their {patch} entirely outside "
            f"the image {level.image_key!r} ({extent}), e.g. {examples(outside)}; they would get blank patches and "
            "meaningless predictions. Expected spot centres (obsm['spatial']) in the image's coordinate system: "
            "check the coordinates, the image's transformation, or drop those spots."
        )
        raise ValueError(msg)
    logger.warning(
        "%d of %d spots of %r have their %s partly outside the image %r (%s), e.g. %s; the missing part is padded "
        "with white.",
        int(partly.sum()),
        len(partly),
        info.sample_id,
        patch,
        level.image_key,
        extent,
        examples(partly),
    )


def resize_batch(crops: np.ndarray, out_px: int):
    """Resize uint8 crops ``(n, 3, s, s)`` to float32 ``(n, 3, out_px, out_px)`` in [0, 1] (antialiased bilinear)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(crops).float().div_(255.0)
    if x.shape[-1] != out_px:
        x = F.interpolate(x, size=(out_px, out_px), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
    return x


def extract_patches(
    data: SpatialData,
    *,
    patch_um: float | None = None,
    size: int = 224,
    spots: np.ndarray | list | None = None,
) -> np.ndarray:
    """Cut the H&E patch under each spot at a physical size and return them as images.

    Parameters
    ----------
    data
        A sample with its H&E image.
    patch_um
        Patch side in µm (default: the spot diameter).
    size
        Output side in pixels.
    spots
        Positions (integers) or ``obs_names`` of the spots to cut; all by default.

    Returns
    -------
    ``(n_spots, size, size, 3)`` uint8 array in the order of ``spots``. Writes nothing.
    """
    plan = plan_patches(data, patch_um=patch_um, out_px=size)
    table = get_table(data)
    if spots is None:
        idx = np.arange(table.n_obs)
    else:
        spots = np.asarray(spots)
        idx = table.obs_names.get_indexer(spots.astype(str)) if spots.dtype.kind in "OUS" else spots.astype(np.int64)
        if (idx < 0).any() or (idx >= table.n_obs).any():
            msg = f"Some requested spots are not in the table (expected obs_names or positions below {table.n_obs})."
            raise KeyError(msg)
    x = resize_batch(plan.read(idx), size)
    return x.mul(255).round().byte().permute(0, 2, 3, 1).numpy().copy()
