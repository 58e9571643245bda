"""Synthetic whole-slide images: pyramidal OME-TIFFs of H&E-like tissue, written tile by tile.

The slide is a procedural model in microns, so each pyramid level is rendered directly at its own
resolution, tile by tile, from a generator: memory stays at a few tiles (plus one coarse field grid
of at most about 1,000 x 1,000 cells) whatever the slide size, and 100k x 100k px slides can be written.

The model reuses the stain physics and nucleus model of :func:`hespotex.datasets.synthetic`:
smooth random fields set the tissue composition (tumour nests, immune infiltrate, stroma) and stain
strength; ``n_blobs`` tissue pieces with wobbly outlines lie on near-white glass; nuclei are drawn
per 8 x 8 field cells with their own seed, so they are the same physical objects on every tile and
every level, and are stamped as soft ellipses on levels finer than 2 µm/px (coarser levels show their
expected haematoxylin density). Pixels are composed by Beer-Lambert mixing of haematoxylin and eosin.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hespotex import _ownership
from hespotex.datasets._synthetic_tissue import (
    DENSITY,
    EOSIN,
    GLASS_OD,
    HAEM,
    HAEMATOXYLIN,
    SEMI_MAJOR,
    SEMI_MINOR,
    Fields,
    draw_nuclei,
    grf,
    interp_index,
    sigmoid,
    smooth_noise,
    stamp_nuclei,
)

logger = logging.getLogger("hespotex")

__all__ = ["synthetic_wsi", "write_ome_tiff"]

_BLOCK = 8  # field cells per nucleus block (each block of nuclei has its own seed)
_MAX_FIELD_CELLS = 1024  # longest side of the field grid
_NUCLEI_MAX_MPP = 2.0  # levels coarser than this show the expected haematoxylin density instead of nuclei
_GLASS_VALUE = round(255.0 * math.exp(-GLASS_OD))  # background (glass) grey value, 245


def _n_levels(height: int, width: int, tile: int, levels: int | None) -> int:
    if levels is not None:
        if int(levels) < 1:
            msg = f"Expected `levels` >= 1 (the full resolution counts as one), found {levels}."
            raise ValueError(msg)
        return int(levels)
    n, h, w = 1, height, width
    while max(h, w) > tile:
        h, w = (h + 1) // 2, (w + 1) // 2
        n += 1
    return n


def _level_shapes(height: int, width: int, n_levels: int) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    for _ in range(n_levels - 1):
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def write_ome_tiff(
    path: str | Path,
    tiles: Callable[[int, int, int], np.ndarray],
    shape: tuple[int, int],
    *,
    microns_per_pixel: float | None,
    tile: int = 512,
    levels: int | None = None,
    compression: Literal["jpeg", "zlib", "none"] = "jpeg",
    quality: int = 90,
    overwrite: bool = False,
) -> Path:
    """Write a tiled pyramidal OME-TIFF (pyramid in SubIFDs, each level half the previous one).

    Parameters
    ----------
    path
        Output file (``.ome.tif``).
    tiles
        ``tiles(level, row, col)`` returns the RGB ``uint8`` tile ``(tile, tile, 3)`` (or smaller at
        the right and bottom edges) at tile grid position ``(row, col)`` of ``level``. Called once per
        tile, level by level, in row-major order; only the tile being compressed is held in memory.
    shape
        ``(height, width)`` of the full-resolution level.
    microns_per_pixel
        Written as OME ``PhysicalSizeX``/``PhysicalSizeY`` (µm) and as TIFF resolution tags
        (centimetres) on every level; ``None`` writes no physical size.
    tile, levels, compression, quality
        Tile side (a multiple of 16), number of levels (default: halve until the longer side fits
        in one tile), codec and JPEG quality.
    overwrite
        Replace an existing file.

    Returns
    -------
    The path written.
    """
    import tifffile

    path = Path(path)
    if path.exists() and not overwrite:
        msg = f"{str(path)!r} already exists. Pass `overwrite=True` to replace it, or choose another path."
        raise FileExistsError(msg)
    height, width = (int(s) for s in shape)
    if height < 1 or width < 1:
        msg = f"Expected a positive image shape (height, width), found {shape}."
        raise ValueError(msg)
    if tile < 16 or tile % 16:
        msg = f"Expected a tile side that is a multiple of 16 (TIFF requires it), found {tile}."
        raise ValueError(msg)
    codecs = {"jpeg": ("jpeg", quality), "zlib": ("zlib", 6), "none": (None, None)}
    if compression not in codecs:
        msg = f"Expected compression 'jpeg', 'zlib' or 'none', found {compression!r}."
        raise ValueError(msg)
    codec, level_arg = codecs[compression]
    shapes = _level_shapes(height, width, _n_levels(height, width, tile, levels))

    def level_tiles(level: int) -> Iterator[np.ndarray]:
        h, w = shapes[level]
        for row in range(-(-h // tile)):
            for col in range(-(-w // tile)):
                yield np.ascontiguousarray(tiles(level, row, col), dtype=np.uint8)

    metadata: dict[str, Any] = {"axes": "YXS", "Name": path.name.split(".")[0]}
    if microns_per_pixel is not None:
        metadata |= {"PhysicalSizeX": float(microns_per_pixel), "PhysicalSizeXUnit": "µm"}
        metadata |= {"PhysicalSizeY": float(microns_per_pixel), "PhysicalSizeYUnit": "µm"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _ownership.temp_sibling(path)  # unique to this call: concurrent writers of one path never share it
    try:
        with open(tmp, "xb") as fh, tifffile.TiffWriter(fh, bigtiff=True, ome=True) as writer:
            for level, (h, w) in enumerate(shapes):
                kwargs: dict[str, Any] = {
                    "shape": (h, w, 3),
                    "dtype": np.uint8,
                    "tile": (tile, tile),
                    "photometric": "rgb",
                    "compression": codec,
                    "compressionargs": {"level": level_arg} if codec else None,
                }
                if microns_per_pixel is not None:
                    px_per_cm = 1e4 / (float(microns_per_pixel) * 2**level)
                    kwargs |= {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
                if level == 0:
                    kwargs |= {"subifds": len(shapes) - 1, "metadata": metadata}
                else:
                    kwargs |= {"subfiletype": 1, "metadata": None}
                writer.write(level_tiles(level), **kwargs)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("Wrote %s: %d x %d px, %d levels.", path, width, height, len(shapes))
    return path


class _SlideModel:
    """The procedural slide: field grid (µm), tissue outline, nucleus blocks and tile rendering."""

    def __init__(self, height: int, width: int, mpp: float, *, seed: int, n_blobs: int) -> None:
        self.mpp = mpp
        extent = np.array([width * mpp, height * mpp])  # (x, y) µm
        cell = max(10.0, float(extent.max()) / _MAX_FIELD_CELLS)
        self.fields = Fields(extent)
        self.fields.cell = cell
        self.fields.shape = (math.ceil(extent[1] / cell) + 1, math.ceil(extent[0] / cell) + 1)
        self.seed = int(seed)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x3517]))
        shape, m = self.fields.shape, self.fields.maps
        big = 400.0 / 3.0 / cell
        small = 30.0 / cell
        tumour = sigmoid(4.0 * (grf(rng, shape, big) + 0.35 * grf(rng, shape, small) - 0.2))
        immune = sigmoid(3.5 * (grf(rng, shape, 0.7 * big) + 0.3 * grf(rng, shape, small) - 0.9)) * (1.0 - tumour)
        stroma = 1.0 - tumour - immune
        m["w_tumour"], m["w_immune"], m["w_stroma"] = tumour, immune, stroma
        m["density_mod"] = np.exp(0.2 * grf(rng, shape, big))
        m["size_mod"] = np.exp(0.18 * grf(rng, shape, big))
        m["haem_mod"] = np.exp(0.18 * grf(rng, shape, big))
        m["eosin"] = 0.5 * np.exp(0.25 * grf(rng, shape, big)) * (1.0 - 0.35 * immune) * (1.0 - 0.45 * stroma)
        theta = 0.5 * np.arctan2(grf(rng, shape, 0.6 * big), grf(rng, shape, 0.6 * big))
        m["cos2"], m["sin2"] = np.cos(2 * theta), np.sin(2 * theta)
        m["tissue"] = self._tissue(rng, extent, n_blobs)  # signed distance to the outline, in cells
        # expected haematoxylin optical density (nuclear area fraction x stain) for coarse levels
        area = np.pi * SEMI_MAJOR * SEMI_MINOR / 1000.0 * DENSITY * HAEM  # per type, at unit modulations
        m["haem_mean"] = (
            (tumour * area[0] + immune * area[1] + stroma * area[2])
            * m["density_mod"]
            * m["size_mod"] ** 2
            * m["haem_mod"]
        )
        self._blocks: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self._max_blocks = 4 * (shape[1] // _BLOCK + 2) + 16

    def _tissue(self, rng: np.random.Generator, extent: np.ndarray, n_blobs: int) -> np.ndarray:
        cell, shape = self.fields.cell, self.fields.shape
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        x, y = (xx + 0.5) * cell, (yy + 0.5) * cell
        best = np.full(shape, -1e9)
        side = float(extent.min())
        wobble = grf(rng, shape, max(1.0, 0.02 * side / cell))
        for _ in range(int(n_blobs)):
            cx, cy = rng.uniform(0.2, 0.8) * extent[0], rng.uniform(0.2, 0.8) * extent[1]
            radius = rng.uniform(0.1, 0.22) * side
            k = rng.integers(2, 6, size=3)
            amp, phase = rng.uniform(0.03, 0.12, size=3), rng.uniform(0, 2 * np.pi, size=3)
            angle = np.arctan2(y - cy, x - cx)
            r = radius * (1.0 + sum(a * np.sin(kk * angle + p) for a, kk, p in zip(amp, k, phase, strict=True)))
            best = np.maximum(best, r - np.hypot(x - cx, y - cy))
        if n_blobs:
            best += 0.04 * side * wobble
        return best / cell

    # --------------------------------------------------------------------------- rendering
    def _sample(self, name: str, xs_um: np.ndarray, ys_um: np.ndarray) -> np.ndarray:
        """Bilinear (separable) values of a field on the grid ``ys_um`` x ``xs_um``, float32."""
        grid = self.fields.maps[name]
        cell = self.fields.cell
        y0, wy = interp_index(ys_um / cell - 0.5, grid.shape[0])
        x0, wx = interp_index(xs_um / cell - 0.5, grid.shape[1])
        rows = (grid[y0] * (1 - wy)[:, None] + grid[y0 + 1] * wy[:, None]).astype(np.float32)
        return rows[:, x0] * (1 - wx) + rows[:, x0 + 1] * wx

    def has_tissue(self, x0: float, x1: float, y0: float, y1: float) -> bool:
        """Whether tissue may reach into the window ``[x0, x1) x [y0, y1)`` (µm)."""
        cell = self.fields.cell
        i0, i1 = max(int(y0 / cell) - 2, 0), int(y1 / cell) + 3
        j0, j1 = max(int(x0 / cell) - 2, 0), int(x1 / cell) + 3
        return bool(self.fields.maps["tissue"][i0:i1, j0:j1].max(initial=-1e9) > -3.0)

    def _block(self, bi: int, bj: int) -> dict[str, np.ndarray]:
        """The nuclei of one block of ``_BLOCK`` x ``_BLOCK`` field cells (µm, slide coordinates)."""
        key = (bi, bj)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        cell = self.fields.cell
        local = Fields(np.array([1.0, 1.0]))
        local.cell = cell
        rows = slice(bi * _BLOCK, (bi + 1) * _BLOCK)
        cols = slice(bj * _BLOCK, (bj + 1) * _BLOCK)
        local.maps = {k: v[rows, cols] for k, v in self.fields.maps.items()}
        local.shape = local.maps["tissue"].shape
        nuclei = draw_nuclei(local, np.random.default_rng([self.seed, 0x4E, bi, bj]))
        nuclei["x"] = nuclei["x"] + bj * _BLOCK * cell
        nuclei["y"] = nuclei["y"] + bi * _BLOCK * cell
        self._blocks[key] = nuclei
        if len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)
        return nuclei

    def _nuclei_in(self, x0: float, x1: float, y0: float, y1: float) -> dict[str, np.ndarray]:
        span = _BLOCK * self.fields.cell
        margin = 2.0 * float(SEMI_MAJOR.max())
        n_i, n_j = (-(-s // _BLOCK) for s in self.fields.shape)
        parts = [
            self._block(bi, bj)
            for bi in range(max(int((y0 - margin) // span), 0), min(int((y1 + margin) // span) + 1, n_i))
            for bj in range(max(int((x0 - margin) // span), 0), min(int((x1 + margin) // span) + 1, n_j))
        ]
        parts = [p for p in parts if len(p["x"])]
        if not parts:
            return {k: np.zeros(0) for k in ("x", "y", "kind", "a", "b", "angle", "haem", "vesicular")}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def tile(self, level: int, row: int, col: int, tile: int, shape: tuple[int, int]) -> np.ndarray:
        """RGB tile ``(row, col)`` of ``level`` (``shape`` is the level's (height, width))."""
        mpp = self.mpp * 2**level
        h, w = min(tile, shape[0] - row * tile), min(tile, shape[1] - col * tile)
        x0_um, y0_um = col * tile * mpp, row * tile * mpp
        x1_um, y1_um = x0_um + w * mpp, y0_um + h * mpp
        if not self.has_tissue(x0_um, x1_um, y0_um, y1_um):
            return np.full((h, w, 3), _GLASS_VALUE, dtype=np.uint8)
        xs = x0_um + (np.arange(w) + 0.5) * mpp
        ys = y0_um + (np.arange(h) + 0.5) * mpp
        rng = np.random.default_rng([self.seed, 0x7153, level, row, col])
        inside = self._sample("tissue", xs, ys)
        inside *= self.fields.cell / mpp / 1.5  # soft edge about 1.5 px wide
        inside += 0.5
        np.clip(inside, 0.0, 1.0, out=inside)
        grain = smooth_noise(rng, (h, w), max(0.5, 0.6 / mpp))
        c_e = self._sample("eosin", xs, ys) * (1.0 + 0.12 * grain)
        c_e *= inside
        if mpp <= _NUCLEI_MAX_MPP:
            nuclei = self._nuclei_in(x0_um, x1_um, y0_um, y1_um)
            nuclei = {**nuclei, "x": nuclei["x"] - x0_um, "y": nuclei["y"] - y0_um}
            c_h = stamp_nuclei(nuclei, h, w, mpp)
            c_h *= 1.0 + 0.25 * np.roll(grain, 3, axis=1)
        else:
            c_h = self._sample("haem_mean", xs, ys)
        c_h += 0.1 * self._sample("w_tumour", xs, ys)
        c_h *= inside
        glass = (1.0 - inside) * np.float32(GLASS_OD)
        out = np.empty((h, w, 3), dtype=np.uint8)
        for ch in range(3):
            od = c_h * np.float32(HAEMATOXYLIN[ch]) + c_e * np.float32(EOSIN[ch]) + glass
            value = np.exp(-od) * 255.0 + 2.0 * rng.standard_normal((h, w), dtype=np.float32) + 0.5
            out[..., ch] = np.clip(value, 0.0, 255.0)
        return out


def synthetic_wsi(
    path: str | Path,
    *,
    width: int,
    height: int,
    microns_per_pixel: float = 0.5,
    tile: int = 512,
    levels: int | None = None,
    seed: int = 0,
    n_blobs: int = 3,
    compression: Literal["jpeg", "zlib"] = "jpeg",
    overwrite: bool = False,
) -> Path:
    """Write a synthetic H&E whole-slide image as a pyramidal OME-TIFF.

    Tissue pieces with H&E-like texture (nuclei, eosin cytoplasm, tumour / immune / stroma domains)
    lie on near-white glass (grey value about 245). Each level is rendered directly at its own
    resolution, tile by tile from a generator (see the module docstring), so memory stays small for
    slides of 100k px per side. Same arguments, same file content.

    Parameters
    ----------
    path
        Output file; ``.ome.tif`` by convention.
    width, height
        Full-resolution size in pixels.
    microns_per_pixel
        Resolution of the full-resolution level, written as OME ``PhysicalSizeX``/``PhysicalSizeY``.
    tile
        Tile side in pixels (multiple of 16).
    levels
        Number of pyramid levels including the full resolution, each half the size of the previous
        one (rounded up); default: until the longer side fits in one tile.
    seed
        Seed of the tissue layout, fields, nuclei and pixel noise.
    n_blobs
        Number of tissue pieces (radius 10-22 % of the shorter side each, placed at random in the
        central 60 % of the slide; they may overlap). ``0`` gives an empty slide (glass only).
    compression
        ``"jpeg"`` (quality 90, small files) or ``"zlib"`` (lossless).
    overwrite
        Replace an existing file.

    Returns
    -------
    The path of the written file. Reads nothing; writes ``path`` (through a temporary file next to it).
    """
    height, width = int(height), int(width)
    if height < 16 or width < 16:
        msg = f"Expected a slide of at least 16 x 16 px, found {width} x {height}."
        raise ValueError(msg)
    if not (0.05 <= float(microns_per_pixel) <= 50.0):
        msg = f"Expected microns per pixel within (0.05, 50), found {microns_per_pixel}."
        raise ValueError(msg)
    if int(n_blobs) < 0:
        msg = f"Expected n_blobs >= 0, found {n_blobs}."
        raise ValueError(msg)
    if compression not in ("jpeg", "zlib"):
        msg = f"Expected compression 'jpeg' or 'zlib', found {compression!r}."
        raise ValueError(msg)
    model = _SlideModel(height, width, float(microns_per_pixel), seed=seed, n_blobs=int(n_blobs))
    shapes = _level_shapes(height, width, _n_levels(height, width, tile, levels))

    def tiles(level: int, row: int, col: int) -> np.ndarray:
        return model.tile(level, row, col, tile, shapes[level])

    return write_ome_tiff(
        path,
        tiles,
        (height, width),
        microns_per_pixel=float(microns_per_pixel),
        tile=tile,
        levels=len(shapes),
        compression=compression,
        overwrite=overwrite,
    )
