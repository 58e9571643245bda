"""Decode H&E image files and arrays into RGB ``uint8`` by their real bit depth and colour model.

Every reader that takes an image (``hx.io.from_anndata`` / ``build_sample``, ``read_st``,
``read_hest``, ``read_visium``'s full-resolution image, ``read_wsi``) goes through this module, so
one set of rules applies everywhere. Files say what they hold: Pillow's image mode for JPEG / PNG
(and other formats Pillow reads), the TIFF tags through ``tifffile`` (``Photometric``,
``BitsPerSample``, ``SampleFormat``, ``ExtraSamples``, ``ColorMap``, ``SMaxSampleValue``). A bare
array says only its dtype and values.

Colour model
    - RGB is kept. YCbCr (JPEG, JPEG-compressed TIFF tiles) is decoded to RGB by Pillow / tifffile.
    - CMYK (a JPEG or PNG Pillow reads as ``"CMYK"``, a TIFF with ``Photometric = Separated`` and
      4 inks) is converted to RGB with Pillow (``R = (255 - C)(255 - K) / 255``, no ICC colour
      management), never read as RGBA.
    - Palette images (PNG / GIF ``"P"`` mode, TIFF ``Photometric = Palette``) are mapped through
      their palette; the indices are never read as grey levels.
    - Grey (``MinIsBlack``; ``MinIsWhite`` is inverted first) is repeated into RGB, with a warning.
    - An alpha channel (a 4th channel of an array, ``RGBA`` / ``LA`` / ``PA`` modes, TIFF
      ``ExtraSamples`` = associated or unassociated alpha) is composited on white (the glass of a
      slide), with a warning; where it is opaque, this is the same as dropping it. A TIFF extra
      sample of unspecified meaning is dropped with a warning. A 4-channel *array* is taken as RGBA:
      pass a CMYK image as its file.
Bit depth of integer images, the white level ``W`` (``value * 255 / W``, rounded)
    1. the TIFF ``SMaxSampleValue`` tag; else ``MaxSampleValue`` when below the type's maximum;
    2. else ``2**BitsPerSample - 1`` when ``BitsPerSample`` is below the bits of the container
       type (a 12-bit TIFF unpacked into ``uint16``);
    3. else (a bare array, a 16-bit PNG, a TIFF whose ``BitsPerSample`` is its container's) the
       data decide: ``W = 2**b - 1`` for the smallest ``b`` of 8, 10, 12, 14, 16, 32 whose range
       holds the image's maximum, with a warning naming it. So a ``uint16`` image holding 0-255
       keeps its values, 12-bit data in ``uint16`` are scaled from 4095. ``uint8`` is taken as is.
       A lazy (dask) image is read once, chunk by chunk, for its maximum.
    Negative values in a signed integer image raise a ``ValueError``.
Floats
    NaN or infinite values raise a ``ValueError`` naming them. ``[0, 1]`` is scaled by 255,
    ``[0, 255]`` is rounded. Any other range (e.g. ``[-0.5, 0.5]`` or an ImageNet-normalised
    tensor) raises a ``ValueError``: no rescaling can guess the normalisation that produced it, and
    a wrong guess would give plausible-looking but wrong predictions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("hespotex")

__all__ = [
    "PixelFormat",
    "decode_array",
    "decode_levels",
    "decode_pil",
    "read_image",
    "tiff_file_format",
    "tiff_format",
]

TIFF_SUFFIXES = {".tif", ".tiff", ".btf"}
_INFERRED_BITS = (8, 10, 12, 14, 16, 32)


@dataclass(frozen=True)
class PixelFormat:
    """What a file says about its pixels.

    ``colour``: ``"auto"`` (from the number of channels: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA),
    ``"rgb"``, ``"grey"``, ``"grey_inverted"`` (``MinIsWhite``), ``"palette"`` or ``"cmyk"``.
    ``white``: the declared white level and ``white_source`` where it comes from (``None``: infer).
    ``palette``: ``(n, 3)`` uint8 colours of a palette image. ``extra``: the meaning of channels
    after the colour channels: ``"unassociated"`` / ``"associated"`` alpha or ``"unspecified"``.
    """

    colour: str = "auto"
    white: float | None = None
    white_source: str | None = None
    palette: np.ndarray | None = None
    extra: str = "unassociated"
    source: str = "array"


# ------------------------------------------------------------------------------------------- files
def tiff_format(page: Any) -> PixelFormat:
    """The :class:`PixelFormat` of a ``tifffile`` page (the key frame of a series level)."""
    from tifffile import EXTRASAMPLE, PHOTOMETRIC

    photometric = page.photometric
    tags = page.tags
    dtype = np.dtype(page.dtype) if page.dtype is not None else None
    colour = {
        PHOTOMETRIC.RGB: "rgb",
        PHOTOMETRIC.YCBCR: "rgb",  # tifffile decodes JPEG-compressed YCbCr to RGB
        PHOTOMETRIC.MINISBLACK: "grey",
        PHOTOMETRIC.MINISWHITE: "grey_inverted",
        PHOTOMETRIC.PALETTE: "palette",
    }.get(photometric)
    if photometric == PHOTOMETRIC.SEPARATED:
        inkset = tags.valueof("InkSet", 1)
        n_inks = page.samplesperpixel - len(page.extrasamples)
        if inkset != 1 or n_inks != 4:
            msg = (
                f"Expected a CMYK TIFF (InkSet 1, 4 inks), found InkSet {inkset} with {n_inks} inks; convert it to RGB."
            )
            raise ValueError(msg)
        colour = "cmyk"
    if colour is None:
        msg = (
            "Expected an RGB, grey, palette or CMYK TIFF, found Photometric "
            f"{getattr(photometric, 'name', photometric)}; convert it to RGB."
        )
        raise ValueError(msg)
    if photometric == PHOTOMETRIC.YCBCR and page.compression not in (6, 7, 33007, 34892):  # JPEG flavours
        msg = (
            f"The TIFF holds YCbCr pixels without JPEG compression ({page.compression!r}), which are not converted "
            "to RGB; convert it to RGB."
        )
        raise ValueError(msg)
    palette = None
    if colour == "palette":
        cmap = np.asarray(page.colormap, dtype=np.float64)  # (3, 2**bits), 16-bit by the TIFF spec
        scale = 255.0 / 65535.0 if cmap.max() > 255 else 1.0  # some writers store 8-bit colours
        palette = np.clip(np.round(cmap.T * scale), 0, 255).astype(np.uint8)
    white, source = None, None
    if dtype is not None and dtype.kind in "iu":
        type_max = np.iinfo(dtype).max
        for tag in ("SMaxSampleValue", "MaxSampleValue"):
            value = tags.valueof(tag)
            if value is None:
                continue
            value = float(np.max(value))
            if value > 0 and (tag == "SMaxSampleValue" or value < type_max):
                white, source = value, tag
                break
        bits = int(page.bitspersample)
        if white is None and bits < dtype.itemsize * 8:
            white, source = float(2**bits - 1), f"BitsPerSample = {bits}"
    extra = "unassociated"
    if page.extrasamples:
        kind = page.extrasamples[0]
        extra = {EXTRASAMPLE.ASSOCALPHA: "associated", EXTRASAMPLE.UNASSALPHA: "unassociated"}.get(kind, "unspecified")
    return PixelFormat(colour=colour, white=white, white_source=source, palette=palette, extra=extra, source="tiff")


def tiff_file_format(path: str | Path) -> PixelFormat:
    """The :class:`PixelFormat` of the full-resolution level of a TIFF file (series 0, level 0)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tiff_format(tif.series[0].levels[0].keyframe)


def decode_pil(im: Any, *, name: str = "image") -> tuple[np.ndarray, PixelFormat]:
    """Pixels of an open Pillow image and their :class:`PixelFormat`, colour modes resolved by Pillow.

    Palette images become RGB(A) through their palette, CMYK / YCbCr / LAB become RGB, 1-bit
    becomes 8-bit grey; 16-bit grey (``I;16``) is returned as ``uint16`` for :func:`decode_array`.
    """
    mode = im.mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        logger.info("The %s is a palette image (%s); mapping its indices through the palette.", name, mode)
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode == "CMYK":
        logger.warning("The %s is CMYK; converting it to RGB with Pillow (no ICC colour management).", name)
        im = im.convert("RGB")
    elif mode in ("YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode in ("I", "F") or mode.startswith("I;16"):
        pass  # 16/32-bit grey or float: the bit depth rules of decode_array apply
    elif mode not in ("L", "LA", "RGB", "RGBA", "RGBX"):
        msg = f"Expected an RGB, grey, palette or CMYK {name}, found Pillow mode {mode!r}; convert it to RGB."
        raise ValueError(msg)
    data = np.asarray(im)
    if im.mode == "RGBX":
        data = data[..., :3]
    if data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))
    return data, PixelFormat(source=f"Pillow {mode}")


def read_image(path: str | Path, *, name: str | None = None) -> Any:
    """Read an image file as RGB ``uint8`` ``(height, width, 3)`` by the rules of this module.

    A TIFF (``.tif``, ``.tiff``, ``.btf``) is opened lazily as a dask array of its full-resolution
    level (series 0, level 0) through ``tifffile``'s zarr store, converted chunk by chunk; a
    TIFF stored channels first ``(c, y, x)`` is transposed lazily. Anything else is decoded
    whole with Pillow.
    """
    path = Path(path)
    name = name or f"image {path.name}"
    if not path.is_file():
        msg = f"Expected an image file, found no file at {str(path)!r}."
        raise FileNotFoundError(msg)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _read_tiff(path, name)
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # H&E slides are routinely larger than Pillow's decompression-bomb limit
    try:
        with Image.open(path) as im:
            data, fmt = decode_pil(im, name=name)
    except (OSError, SyntaxError) as err:
        msg = f"Could not read {str(path)!r} as an image ({err}). Expected a JPEG, PNG or TIFF file."
        raise ValueError(msg) from err
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return decode_array(data, fmt=fmt, name=name)


def _read_tiff(path: Path, name: str) -> Any:
    import dask.array as da
    import tifffile
    import zarr

    try:
        fmt = tiff_file_format(path)
        store = tifffile.imread(path, aszarr=True, level=0)
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError) as err:
        msg = f"Could not read {str(path)!r} as a TIFF image ({err}). Expected a (pyramidal) RGB TIFF."
        raise ValueError(msg) from err
    arr = da.from_zarr(zarr.open(store, mode="r"))
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (1, 3, 4):
        logger.info("The TIFF %s is stored channels first; reading it as (y, x, c).", path.name)
        arr = arr.transpose(1, 2, 0)
    return decode_array(arr, fmt=fmt, name=name)


# ------------------------------------------------------------------------------------------- arrays
def decode_array(image: Any, *, fmt: PixelFormat | None = None, name: str = "image") -> Any:
    """Convert ``image`` (numpy or dask, ``(h, w)`` or ``(h, w, c)``) to RGB ``uint8`` ``(h, w, 3)``.

    ``fmt`` is what the file said (:func:`tiff_format`, :func:`decode_pil`); without it the array's
    channels and values decide (see the module notes). Dask arrays stay lazy, except for one pass
    computing their range when the bit depth or float range is not declared.
    """
    return decode_levels([image], fmt=fmt, name=name)[0]


def decode_levels(levels: list[Any], *, fmt: PixelFormat | None = None, name: str = "image") -> list[Any]:
    """:func:`decode_array` for the levels of one pyramid (finest first): the white level and the
    float range are decided on the finest level and applied to every level alike."""
    fmt = fmt or PixelFormat()
    levels = [_as_hwc(level, name) for level in levels]
    base = levels[0]
    colour = _colour(fmt, base.shape[2], name)
    white = _white_level(base, fmt, colour, name)
    out = [_convert(level, fmt, colour, white) for level in levels]
    _log_colour(fmt, colour, levels[-1], white, name)
    return out


def _as_hwc(image: Any, name: str) -> Any:
    if not hasattr(image, "ndim") or not hasattr(image, "dtype"):
        msg = f"Expected the {name} as an array (height, width, channels) or a file path, found {type(image).__name__}."
        raise TypeError(msg)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        msg = f"Expected the {name} as (height, width, channels), found an array of shape {tuple(image.shape)}."
        raise ValueError(msg)
    channels = image.shape[2]
    if channels not in (1, 2, 3, 4) and image.shape[0] in (1, 3, 4):
        msg = (
            f"Expected the {name} channels last (height, width, channels), found shape "
            f"{tuple(image.shape)}, which looks channels-first: pass `image.transpose(1, 2, 0)`."
        )
        raise ValueError(msg)
    if min(image.shape[:2]) == 0:
        msg = f"The {name} is empty: shape {tuple(image.shape)}."
        raise ValueError(msg)
    return image


def _colour(fmt: PixelFormat, channels: int, name: str) -> str:
    """The colour model and its alpha: ``"<model>"`` or ``"<model>+alpha"`` / ``"<model>+extra"``."""
    n_colour = {"rgb": 3, "cmyk": 4, "grey": 1, "grey_inverted": 1, "palette": 1}
    if fmt.colour == "auto":
        model = {1: "grey", 2: "grey", 3: "rgb", 4: "rgb"}.get(channels)
        if model is None:
            msg = (
                f"Expected an RGB {name} with 3 channels (or 1 grey, 2 grey + alpha, 4 RGBA), found {channels} "
                "channels."
            )
            raise ValueError(msg)
        n = n_colour[model]
    else:
        model, n = fmt.colour, n_colour[fmt.colour]
        if channels < n:
            msg = f"The {name} is {model} but has {channels} channels; expected at least {n}."
            raise ValueError(msg)
    if channels == n:
        return model
    if channels > n + 1:
        msg = f"Expected a {model} {name} with {n} channels (or {n + 1} with alpha), found {channels} channels."
        raise ValueError(msg)
    return f"{model}+{'extra' if fmt.extra == 'unspecified' else 'alpha'}"


def _range(image: Any) -> tuple[float, float, int, int]:
    """``(min, max, n_nan, n_inf)`` of ``image`` (one pass over a dask array)."""
    if isinstance(image, np.ndarray):
        if image.dtype.kind == "f":
            nan, inf = int(np.isnan(image).sum()), int(np.isinf(image).sum())
            finite = image[np.isfinite(image)] if nan or inf else image
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
            return lo, hi, nan, inf
        return float(image.min()), float(image.max()), 0, 0
    import dask.array as da

    if image.dtype.kind == "f":
        finite = da.isfinite(image)
        lo, hi, nan, inf = da.compute(
            da.where(finite, image, np.inf).min(),
            da.where(finite, image, -np.inf).max(),
            da.isnan(image).sum(),
            da.isinf(image).sum(),
        )
        return float(lo), float(hi), int(nan), int(inf)
    lo, hi = da.compute(image.min(), image.max())
    return float(lo), float(hi), 0, 0


def _white_level(image: Any, fmt: PixelFormat, colour: str, name: str) -> float:
    """The value that maps to 255 (1.0 means floats in [0, 1]); raises on NaN/inf, negatives, odd floats."""
    dtype = np.dtype(image.dtype)
    if colour.startswith("palette"):
        if dtype.kind not in "iu":
            msg = f"Expected palette indices as integers for the {name}, found {dtype}."
            raise ValueError(msg)
        return 1.0
    if dtype == np.uint8 and fmt.white is None:
        return 255.0
    if dtype == np.bool_:
        return 1.0
    if dtype.kind in "iu" and fmt.white is not None:
        if dtype.kind == "i" and _range(image)[0] < 0:
            msg = f"Expected non-negative pixel values in the {name}, found negative ones ({dtype})."
            raise ValueError(msg)
        logger.info("The %s has a white level of %g (%s); scaling to 8 bits.", name, fmt.white, fmt.white_source)
        return float(fmt.white)
    if dtype.kind not in "iuf":
        msg = f"Expected an integer or float {name}, found dtype {dtype}."
        raise ValueError(msg)
    if not isinstance(image, np.ndarray):
        logger.info("Reading the %s once to find its value range (%s, no bit depth declared).", name, dtype)
    lo, hi, nan, inf = _range(image)
    if nan or inf:
        found = ", ".join(f"{n:,} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
        msg = (
            f"The {name} holds {found} pixel values ({dtype}); expected finite values. "
            "Fill them (e.g. `np.nan_to_num(image, nan=1.0)` for white in a [0, 1] image) or crop them away."
        )
        raise ValueError(msg)
    if dtype.kind == "f":
        tol = 1e-6
        if lo >= -tol and hi <= 1.0 + tol:
            logger.warning("The %s holds floats in [0, 1] (found %.3g to %.3g); scaling them by 255.", name, lo, hi)
            return 1.0
        if lo >= -tol * 255 and hi <= 255.0 + tol * 255:
            logger.warning(
                "The %s holds floats in [0, 255] (found %.3g to %.3g); rounding them to 8 bits.", name, lo, hi
            )
            return 255.0
        msg = (
            f"Expected the {name} as floats in [0, 1] or [0, 255], found values from {lo:.4g} to {hi:.4g}. "
            "hespotex does not guess other ranges (a normalised tensor cannot be undone by rescaling): "
            "undo the normalisation, or rescale it to [0, 1] yourself if a min-max stretch is right for it."
        )
        raise ValueError(msg)
    if lo < 0:
        msg = f"Expected non-negative pixel values in the {name}, found a minimum of {lo:g} ({dtype})."
        raise ValueError(msg)
    bits = next((b for b in _INFERRED_BITS if hi <= 2**b - 1), 64)
    if bits > 8 or dtype != np.uint8:
        logger.warning(
            "The %s is %s and declares no bit depth; its maximum %g fits %d bits, so %d maps to white (255).",
            name,
            dtype,
            hi,
            bits,
            2**bits - 1,
        )
    return float(2**bits - 1)


def _convert(image: Any, fmt: PixelFormat, colour: str, white: float) -> Any:
    model, _, extra = colour.partition("+")
    if model == "palette":
        palette = fmt.palette if fmt.palette is not None else np.zeros((0, 3), np.uint8)
        return _blockwise(image[..., :1], lambda b: _lookup(b, palette), 3)
    image = _to_uint8(image, white)
    n = {"rgb": 3, "cmyk": 4}.get(model, 1)
    colours, alpha = image[..., :n], image[..., n : n + 1] if extra == "alpha" else None
    if model == "grey_inverted":
        colours = 255 - colours
    if model == "cmyk":
        colours = _blockwise(colours, _cmyk_to_rgb, 3)
    if alpha is not None:
        colours = _composite(colours, alpha, associated=fmt.extra == "associated")
    if colours.shape[2] == 1:
        colours = _repeat(colours, 3)
    return colours


def _to_uint8(image: Any, white: float) -> Any:
    if image.dtype == np.uint8 and white == 255.0:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    scaled = image.astype(np.float32) * np.float32(255.0 / white) if white != 255.0 else image.astype(np.float32)
    return (scaled.clip(0, 255) + 0.5).astype(np.uint8)


def _lookup(block: np.ndarray, palette: np.ndarray) -> np.ndarray:
    idx = block[..., 0]
    if idx.size and int(idx.max()) >= len(palette):
        msg = f"Palette index {int(idx.max())} is beyond the palette's {len(palette)} colours; the file is damaged."
        raise ValueError(msg)
    return palette[idx]


def _cmyk_to_rgb(block: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = block.shape[:2]
    im = Image.frombytes("CMYK", (w, h), np.ascontiguousarray(block, dtype=np.uint8).tobytes())
    return np.asarray(im.convert("RGB"))


def _composite(rgb: Any, alpha: Any, *, associated: bool) -> Any:
    """Composite 8-bit colours on white: ``(c * a + 255 * (255 - a)) / 255`` rounded (``c + 255 - a`` for
    premultiplied colours), in ``uint16`` integer arithmetic (twice the image's memory, not four times)."""
    a = alpha.astype(np.uint16)
    c = rgb.astype(np.uint16)
    if associated:
        return (c + (255 - a)).clip(0, 255).astype(np.uint8)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _blockwise(image: Any, func: Any, channels: int) -> Any:
    if isinstance(image, np.ndarray):
        return func(image)
    image = image.rechunk({2: -1})
    return image.map_blocks(func, dtype=np.uint8, chunks=(*image.chunks[:2], (channels,)))


def _repeat(image: Any, n: int) -> Any:
    if isinstance(image, np.ndarray):
        return np.repeat(image, n, axis=2)
    import dask.array as da

    return da.concatenate([image] * n, axis=2)


def _log_colour(fmt: PixelFormat, colour: str, smallest: Any, white: float, name: str) -> None:
    model, _, extra = colour.partition("+")
    if model in ("grey", "grey_inverted"):
        inverted = " (MinIsWhite, inverted)" if model == "grey_inverted" else ""
        logger.warning("The %s is grayscale%s; repeating it into 3 RGB channels.", name, inverted)
    elif model == "palette":
        logger.info("The %s is a palette image; mapped its indices through its %d colours.", name, len(fmt.palette))
    elif model == "cmyk" and fmt.source == "tiff":
        logger.warning("The %s is CMYK; converting it to RGB with Pillow (no ICC colour management).", name)
    if extra == "extra":
        logger.warning("The %s has an extra channel of unspecified meaning; dropping it.", name)
    elif extra == "alpha":
        n = {"rgb": 3, "cmyk": 4}.get(model, 1)
        # the coarsest level (transparent pixels survive its averaging); a reduction, never materialised whole
        if not isinstance(smallest, np.ndarray) and smallest.shape[0] * smallest.shape[1] > 2**24:
            logger.warning("The %s has an alpha channel; compositing it on white where it is not opaque.", name)
            return
        if float(smallest[..., n].min()) >= white:
            logger.warning("The %s has an alpha channel, fully opaque; dropping it (RGBA -> RGB).", name)
        else:
            logger.warning(
                "The %s has an alpha channel with transparent pixels; compositing it on white (RGBA -> RGB).", name
            )
