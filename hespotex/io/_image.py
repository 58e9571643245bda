"""Loading and checking H&E images before they become SpatialData image elements."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("hespotex")

_TIFF_SUFFIXES = {".tif", ".tiff", ".btf"}

def read_image_file(path: str | Path) -> np.ndarray:
    """Read a JPEG/PNG/TIFF file into an ``(height, width, channels)`` array."""
    path = Path(path)
    if not path.is_file():
        msg = f"Expected an image file, found no file at {str(path)!r}."
        raise FileNotFoundError(msg)
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # H&E slides are routinely larger than PIL's bomb limit
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except OSError as err:
        msg = f"Could not read {str(path)!r} as an image ({err}). Expected a JPEG, PNG or TIFF file."
        raise ValueError(msg) from err


def open_image(image: Any) -> Any:
    """Open an H&E image without loading a large TIFF into memory.

    A TIFF path (``.tif``, ``.tiff``, ``.btf``) is opened lazily as a dask array of its
    full-resolution level (``tifffile`` zarr store, level 0); a JPEG/PNG path is read with PIL
    (these formats cannot be read in parts); arrays are returned unchanged. A TIFF stored channels
    first ``(c, y, x)`` is transposed lazily to ``(y, x, c)``.
    """
    if not isinstance(image, (str, Path)):
        return image
    path = Path(image)
    if not path.is_file():
        msg = f"Expected an image file, found no file at {str(path)!r}."
        raise FileNotFoundError(msg)
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        return read_image_file(path)
    import dask.array as da
    import tifffile
    import zarr

    try:
        store = tifffile.imread(path, aszarr=True, level=0)
    except (tifffile.TiffFileError, ValueError, IndexError) as err:
        msg = f"Could not read {str(path)!r} as a TIFF image ({err}). Expected a (pyramidal) RGB TIFF."
        raise ValueError(msg) from err
    arr = da.from_zarr(zarr.open(store, mode="r"))
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (1, 3, 4):
        logger.info("The TIFF %s is stored channels first; reading it as (y, x, c).", path.name)
        arr = arr.transpose(1, 2, 0)
    return arr


def as_rgb_hwc(image: Any, *, name: str = "image") -> Any:
    """Return ``image`` as an RGB ``uint8`` array of shape ``(height, width, 3)``.

    Accepts numpy or dask arrays of shape ``(h, w)``, ``(h, w, 1)``, ``(h, w, 3)`` or
    ``(h, w, 4)``, or a file path. Documented repairs, each logged as a warning: an alpha
    channel is dropped, a grayscale image is repeated into three channels, floats in ``[0, 1]``
    are scaled to ``0..255``. Anything else raises a ``ValueError`` saying what was found.
    """
    if isinstance(image, (str, Path)):
        image = open_image(image)
    if not hasattr(image, "ndim") or not hasattr(image, "dtype"):
        msg = f"Expected the {name} as an array (height, width, channels) or a file path, found {type(image).__name__}."
        raise TypeError(msg)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        msg = f"Expected the {name} as (height, width, channels), found an array of shape {tuple(image.shape)}."
        raise ValueError(msg)
    channels = image.shape[2]
    if channels not in (1, 3, 4) and image.shape[0] in (1, 3, 4):
        msg = (
            f"Expected the {name} channels last (height, width, channels), found shape "
            f"{tuple(image.shape)}, which looks channels-first: pass `image.transpose(1, 2, 0)`."
        )
        raise ValueError(msg)
    if channels == 1:
        logger.warning("The %s is grayscale; repeating it into 3 RGB channels.", name)
        image = _repeat(image, 3)
    elif channels == 4:
        logger.warning("The %s has an alpha channel; dropping it (RGBA -> RGB).", name)
        image = image[..., :3]
    elif channels != 3:
        msg = f"Expected an RGB {name} with 3 channels (or 1 / 4), found {channels} channels."
        raise ValueError(msg)
    if min(image.shape[:2]) == 0:
        msg = f"The {name} is empty: shape {tuple(image.shape)}."
        raise ValueError(msg)
    return _to_uint8(image, name)


def _repeat(image: Any, n: int) -> Any:
    if isinstance(image, np.ndarray):
        return np.repeat(image, n, axis=2)
    import dask.array as da

    return da.concatenate([image] * n, axis=2)


def _to_uint8(image: Any, name: str) -> Any:
    dtype = np.dtype(image.dtype)
    if dtype == np.uint8:
        return image
    if dtype.kind == "f":
        vmax = float(image.max())
        if vmax <= 1.0 + 1e-6:
            logger.warning("The %s holds floats in [0, 1]; scaling to uint8.", name)
            return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        if vmax <= 255.0 + 1e-6:
            return np.clip(image, 0, 255).round().astype(np.uint8)
    if dtype == np.uint16:
        logger.warning("The %s is 16-bit; scaling to 8-bit.", name)
        return (image // 257).astype(np.uint8)
    if dtype.kind in "iu" and int(image.max()) <= 255 and int(image.min()) >= 0:
        return image.astype(np.uint8)
    msg = f"Expected an 8-bit RGB {name} (or floats in [0, 1]), found dtype {dtype} with values outside that range."
    raise ValueError(msg)


def pyramid_scale_factors(height: int, width: int, *, min_side: int = 1024) -> list[int]:
    """Factors of 2 for a multiscale pyramid whose coarsest level has its shorter side near ``min_side``."""
    factors: list[int] = []
    side = min(height, width)
    while side // 2 >= min_side:
        factors.append(2)
        side //= 2
    return factors
