"""Loading and checking H&E images before they become SpatialData image elements."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hespotex.io._decode import decode_array, read_image

logger = logging.getLogger("hespotex")


def read_image_file(path: str | Path) -> Any:
    """Read an image file as RGB ``uint8`` ``(height, width, 3)`` (:func:`hespotex.io._decode.read_image`)."""
    return read_image(path)


def open_image(image: Any) -> Any:
    """Open an H&E image without loading a large TIFF into memory, decoded to RGB ``uint8``.

    A TIFF path (``.tif``, ``.tiff``, ``.btf``) is opened lazily as a dask array of its
    full-resolution level (``tifffile`` zarr store, level 0); a JPEG/PNG path is read with Pillow
    (these formats cannot be read in parts). Both are decoded by their real bit depth and colour
    model (:mod:`hespotex.io._decode`). Arrays are returned unchanged (decoded later by
    :func:`as_rgb_hwc`).
    """
    if not isinstance(image, (str, Path)):
        return image
    return read_image(image)


def as_rgb_hwc(image: Any, *, name: str = "image") -> Any:
    """Return ``image`` as an RGB ``uint8`` array of shape ``(height, width, 3)``.

    Accepts numpy or dask arrays of shape ``(h, w)`` or ``(h, w, c)``, or a file path. The bit
    depth and colour model are decoded by the rules of :mod:`hespotex.io._decode` (grey repeated,
    alpha composited on white, 16/12-bit and float ranges scaled, NaN/inf refused); anything else
    raises a ``ValueError`` saying what was found.
    """
    if isinstance(image, (str, Path)):
        return open_image(image)
    return decode_array(image, name=name)


def pyramid_scale_factors(height: int, width: int, *, min_side: int = 1024) -> list[int]:
    """Factors of 2 for a multiscale pyramid whose coarsest level has its shorter side near ``min_side``."""
    factors: list[int] = []
    side = min(height, width)
    while side // 2 >= min_side:
        factors.append(2)
        side //= 2
    return factors


def rgb_image_element(rgb: Any, transformations: dict[str, Any]) -> Any:
    """An RGB ``uint8`` ``(y, x, c)`` array as a SpatialData image element: a multiscale pyramid (factors of 2
    down to ~1024 px, :func:`pyramid_scale_factors`) chunked by 2048 px, with ``transformations``."""
    from spatialdata.models import Image2DModel

    h, w = (int(s) for s in rgb.shape[:2])
    return Image2DModel.parse(
        rgb,
        dims=("y", "x", "c"),
        c_coords=["r", "g", "b"],
        scale_factors=pyramid_scale_factors(h, w) or None,
        chunks=(3, 2048, 2048),
        transformations=transformations,
    )
