"""Read whole-slide images (pyramidal TIFF / OME-TIFF / SVS, and JPEG / PNG) lazily into SpatialData.

Pyramidal TIFFs are opened through ``tifffile``'s zarr store: every level the file stores becomes a
level of a multiscale image element, a dask array whose chunks are the file's tiles, so pixels are read
only when a computation asks for them (a patch, a tissue mask from a coarse level). Nothing reads the
full-resolution level whole.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex.io._anndata import check_sample_id, sample_id_from_path
from hespotex.io._build import MPP_RANGE
from hespotex.io._decode import decode_array, decode_levels, decode_pil, tiff_file_format
from hespotex.io._image import as_rgb_hwc

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

__all__ = ["SLIDE_KEY", "read_wsi", "slide_info"]

#: ``sdata.attrs`` key of the slide record written by :func:`read_wsi`.
SLIDE_KEY = "hespotex_slide"
_TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")
_RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")
_UNIT_UM = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "Å": 1e-4,
    "A": 1e-4,
}
_MPP_TOLERANCE = 0.05  # relative disagreement between the argument and the metadata that earns a warning


def _sample_id(path: Path) -> str:
    name = path.name
    for suffix in (*_TIFF_SUFFIXES, *_RASTER_SUFFIXES):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return sample_id_from_path(name)


# ------------------------------------------------------------------------------------------- metadata
def _ome_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels" and el.get("PhysicalSizeX") is not None:
            unit = el.get("PhysicalSizeXUnit", "µm")
            factor = _UNIT_UM.get(unit)
            if factor is None:
                logger.warning("Unknown OME PhysicalSizeXUnit %r; ignoring the physical size.", unit)
                return None
            return float(el.get("PhysicalSizeX")) * factor
    return None


def _svs_mpp(description: str) -> float | None:
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    return float(match.group(1)) if match else None


def _tag_mpp(page: Any) -> float | None:
    """Microns per pixel from the TIFF XResolution and ResolutionUnit tags (inch or centimetre)."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value)
    per_unit_um = {2: 25_400.0, 3: 10_000.0}.get(unit)  # 1 = no absolute unit
    num, den = tags["XResolution"].value
    if per_unit_um is None or not num or not den:
        return None
    return per_unit_um / (num / den)


def _plausible(mpp: float | None, source: str) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        logger.debug("Ignoring %s = %g µm/px (outside %s; a placeholder, e.g. 72 dpi).", source, mpp, MPP_RANGE)
        return None
    return float(mpp)


def _tiff_mpp(tif: Any) -> tuple[float | None, str | None]:
    page = tif.pages.first
    if tif.is_ome and tif.ome_metadata:
        mpp = _plausible(_ome_mpp(tif.ome_metadata), "OME PhysicalSizeX")
        if mpp is not None:
            return mpp, "OME-XML PhysicalSizeX"
    if getattr(tif, "is_svs", False) or page.description.startswith("Aperio "):
        mpp = _plausible(_svs_mpp(page.description), "Aperio MPP")
        if mpp is not None:
            return mpp, "Aperio ImageDescription MPP"
    mpp = _plausible(_tag_mpp(page), "TIFF resolution tags")
    if mpp is not None:
        return mpp, "TIFF XResolution/ResolutionUnit"
    return None, None


def _pil_mpp(info: dict[str, Any]) -> tuple[float | None, str | None]:
    dpi = info.get("dpi")
    if dpi and dpi[0]:
        mpp = _plausible(25_400.0 / float(dpi[0]), "image dpi")
        if mpp is not None:
            return mpp, "image dpi"
    return None, None


def _resolve_mpp(given: float | None, found: float | None, source: str | None, path: Path) -> float:
    if given is not None:
        given = float(given)
        if not (MPP_RANGE[0] <= given <= MPP_RANGE[1]):
            msg = f"Expected microns per pixel within {MPP_RANGE}, found {given}. Check the unit (µm, not mm or nm)."
            raise ValueError(msg)
        if found is not None and abs(given - found) / found > _MPP_TOLERANCE:
            logger.warning(
                "%s: `microns_per_pixel=%g` disagrees with the file's %s (%g µm/px) by %.0f%%; using the argument.",
                path.name,
                given,
                source,
                found,
                100 * abs(given - found) / found,
            )
        return given
    if found is None:
        msg = (
            f"{path.name} records no microns per pixel (no OME PhysicalSizeX, Aperio MPP, or TIFF resolution tags "
            "in inches or centimetres). Pass `microns_per_pixel=` (about 0.25 for a 40x scan, 0.5 for 20x; "
            "the scanner's record or the slide's scale bar tells)."
        )
        raise ValueError(msg)
    return found


# ------------------------------------------------------------------------------------------- pixels
def _check_complete(tif: Any, path: Path) -> None:
    """Raise when tiles or strips of the file point past its end (a truncated download or copy)."""
    size = path.stat().st_size
    pages = list(tif.series[0].pages) + [p for level in tif.series[0].levels[1:] for p in level.pages]
    for page in pages:
        if page is None:
            continue
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
        if ends and max(ends) > size:
            msg = (
                f"{path.name} is truncated: its image data reach byte {max(ends):,} but the file has {size:,} bytes. "
                "Copy or download the file again."
            )
            raise ValueError(msg)


def _to_yxc(arr: Any, axes: str, path: Path) -> Any:
    """A dask array with tifffile ``axes`` as ``(y, x, channels)``; length-1 extra axes are dropped."""
    axes = axes.upper()
    index = []
    for ax, n in zip(axes, arr.shape, strict=True):
        if ax in "YXSC":
            index.append(slice(None))
        elif n == 1:
            index.append(0)
        else:
            msg = f"{path.name} holds a {axes} stack with {n} planes along {ax!r}; expected one 2-D RGB image."
            raise ValueError(msg)
    arr = arr[tuple(index)]
    kept = [ax for ax in axes if ax in "YXSC"]
    channel = [ax for ax in kept if ax in "SC"]
    if len(channel) > 1:
        msg = f"{path.name} has both channel and sample axes ({axes}); expected one RGB image."
        raise ValueError(msg)
    if not channel:
        return arr[..., None] if kept == ["Y", "X"] else arr.T[..., None]
    order = [kept.index("Y"), kept.index("X"), kept.index(channel[0])]
    return arr.transpose(order)


def _open_tiff(path: Path, chunks: Any) -> tuple[list[Any], float | None, str | None, bool]:
    """Stored levels as ``(y, x, c)`` dask arrays (finest first), metadata mpp and its source, pyramid flag."""
    import dask.array as da
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError, struct.error) as err:
        msg = f"Could not read {path.name} as a TIFF ({type(err).__name__}: {err}). Expected a (pyramidal) TIFF, OME-TIFF or SVS slide."
        raise ValueError(msg) from err
    try:
        if not tif.series:
            msg = f"{path.name} holds no image. Expected a (pyramidal) TIFF, OME-TIFF or SVS slide."
            raise ValueError(msg)
        series = tif.series[0]
        _check_complete(tif, path)
        mpp, source = _tiff_mpp(tif)
        arrays = []
        for i, level in enumerate(series.levels):
            store = series.aszarr(level=i)
            z = zarr.open(store, mode="r")
            arr = da.from_zarr(z, chunks=chunks if chunks is not None else z.chunks)
            arrays.append(_to_yxc(arr, level.axes, path))
    except (tifffile.TiffFileError, KeyError, IndexError) as err:
        tif.close()
        msg = f"Could not read the image data of {path.name} ({type(err).__name__}: {err}). The file may be damaged."
        raise ValueError(msg) from err
    except ValueError:
        tif.close()
        raise
    base = arrays[0].shape
    keep = [arrays[0]]
    for arr in arrays[1:]:  # a series level of another aspect ratio (a label, a macro image) is no pyramid level
        fy, fx = base[0] / arr.shape[0], base[1] / arr.shape[1]
        if abs(fy - fx) / max(fy, fx) < 0.02 and arr.shape[0] < keep[-1].shape[0]:
            keep.append(arr)
    return keep, mpp, source, len(keep) > 1


def _open_raster(path: Path) -> tuple[np.ndarray, float | None, str | None]:
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # slides are routinely larger than PIL's decompression-bomb limit
    try:
        with Image.open(path) as im:
            mpp, source = _pil_mpp(im.info)
            pixels, fmt = decode_pil(im, name=f"slide {path.name}")
            data = decode_array(pixels, fmt=fmt, name=f"slide {path.name}")
    except (OSError, SyntaxError, ValueError) as err:
        msg = f"Could not read {path.name} as an image ({err}). Expected a JPEG, PNG or (pyramidal) TIFF file."
        raise ValueError(msg) from err
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return data, mpp, source


def _datatree(levels: list[Any], cs: str):
    """A spatialdata multiscale image from ``(y, x, c)`` uint8 arrays, finest first, each level scaled to ``cs``."""
    from spatialdata.models import Image2DModel
    from spatialdata.models.pyramids_utils import dask_arrays_to_datatree
    from spatialdata.transformations import Identity, set_transformation
    from spatialdata.transformations._utils import compute_coordinates

    tree = dask_arrays_to_datatree(
        [lv.transpose(2, 0, 1) for lv in levels], dims=("c", "y", "x"), channels=["r", "g", "b"]
    )
    set_transformation(tree, {cs: Identity()}, set_all=True)
    tree = compute_coordinates(tree)
    Image2DModel().validate(tree)
    return tree


def _coarsened_levels(level0: Any, *, min_side: int = 256) -> list[Any]:
    """``level0`` (``(y, x, 3)`` uint8, numpy or dask) and lazily averaged coarser levels (factors 2, 4, 8, ...).

    Each level is computed straight from ``level0`` (one pass over it, chunk by chunk), not from the
    level above, so reading a coarse level never materialises the finer ones.
    """
    import dask.array as da

    base = level0 if isinstance(level0, da.Array) else da.from_array(level0, chunks=(2048, 2048, 3))
    levels = [base]
    factor = 2
    while min(base.shape[:2]) // factor >= min_side:
        h, w = (s // factor * factor for s in base.shape[:2])
        chunk = max(factor, 2048 // factor * factor)
        even = base[:h, :w].rechunk((chunk, chunk, 3))
        mean = da.coarsen(np.mean, even, {0: factor, 1: factor}, dtype=np.float32)
        levels.append((mean + 0.5).astype(np.uint8))
        factor *= 2
    return levels


def read_wsi(
    path: str | Path,
    *,
    microns_per_pixel: float | None = None,
    sample_id: str | None = None,
    chunks: int | tuple[int, ...] | None = None,
) -> SpatialData:
    """Read a whole-slide H&E image lazily into a SpatialData (image only, no spots).

    Formats and memory:

    - **Pyramidal TIFF, OME-TIFF, SVS** (and other tiled TIFF flavours ``tifffile`` reads: NDPI,
      SCN, BIF...): every level the file stores (``TiffFile.series[0].levels``) becomes one level of
      the image, a dask array over ``tifffile``'s zarr store whose chunks are the file's tiles. Only
      the metadata and tile offsets are read here; pixels are decoded when asked for.
    - **A TIFF without pyramid**: read lazily the same way; a warning says so, and coarser levels
      (2 x 2 means, down to a shorter side of about 256 px) are computed lazily with dask from the
      full resolution: each read of a coarse level decodes the full-resolution tiles under it (slow,
      but in bounded memory). Convert such slides to pyramidal OME-TIFFs for speed.
    - **JPEG / PNG**: these formats cannot be read in parts, so the file is decoded once into memory
      (``height x width x 3`` bytes, e.g. 280 MB for 9,300 x 9,900 px) and coarser levels (2 x 2
      means) are computed lazily from that array.

    Pixels are decoded by their real bit depth and colour model (:mod:`hespotex.io._decode`: grey
    repeated into RGB, alpha composited on white, CMYK and palette images converted, 16/12-bit
    scaled by their declared or inferred white level; the same mapping for every level).

    Parameters
    ----------
    path
        The slide file.
    microns_per_pixel
        Resolution of the full-resolution level. Read from the file when not given: OME-XML
        ``PhysicalSizeX`` (with its unit), the Aperio ``MPP`` of an SVS description, or the TIFF
        ``XResolution`` / ``ResolutionUnit`` tags (inch or centimetre; placeholder values outside
        0.05-50 µm/px, such as 72 dpi, are ignored), or a JPEG/PNG's dpi. The argument wins over the
        metadata, with a warning when they differ by more than 5 %. Neither: a ``ValueError``.
    sample_id
        Names the image element ``{sample_id}_image`` and the coordinate system; default: the file
        name without its image suffix.
    chunks
        Dask chunks of the stored levels (``None``: the file's tiles).

    Returns
    -------
    A :class:`spatialdata.SpatialData` with

    - ``images[f"{sample_id}_image"]``: a multiscale image (``scale0`` = full resolution), ``uint8``
      RGB, dims ``(c, y, x)``, each level mapped to the coordinate system ``sample_id`` (full-
      resolution pixels) by its scale;
    - ``attrs["hespotex_slide"]``: ``sample_id``, ``image_key``, ``coordinate_system``,
      ``microns_per_pixel``, ``microns_per_pixel_source``, ``path`` (absolute), ``level_shapes``
      (``[height, width]`` per level), ``stored_pyramid`` (whether the levels come from the file).

    No table: :func:`hespotex.pp.detect_tissue` and :func:`hespotex.pp.tile` lay out pseudo-spots.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a truncated, damaged or
    non-image file, an unsupported layout, or unknown microns per pixel.
    """
    from spatialdata import SpatialData

    path = Path(path)
    if not path.is_file():
        msg = f"Expected a slide file, found no file at {str(path)!r}."
        raise FileNotFoundError(msg)
    sid = check_sample_id(sample_id if sample_id is not None else _sample_id(path))
    image_key = f"{sid}_image"
    with path.open("rb") as fh:
        head = fh.read(4)
    is_tiff = head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")
    suffix_tiff = path.name.lower().endswith(_TIFF_SUFFIXES)
    if is_tiff:
        levels, found, source, pyramid = _open_tiff(path, chunks)
        mpp = _resolve_mpp(microns_per_pixel, found, source, path)
        levels = decode_levels(levels, fmt=tiff_file_format(path), name=f"slide {path.name}")
        if pyramid:
            image = _datatree(levels, sid)
        else:
            logger.warning(
                "%s has no pyramid (one level of %d x %d px); coarser levels are computed lazily from the full "
                "resolution, which is slow on large slides. Convert it to a pyramidal OME-TIFF for speed.",
                path.name,
                levels[0].shape[1],
                levels[0].shape[0],
            )
            image = _datatree(_coarsened_levels(levels[0]), sid)
    elif suffix_tiff:
        msg = f"{path.name} is not a TIFF file (its first bytes are {head!r}); the file is damaged or has the wrong suffix."
        raise ValueError(msg)
    else:
        data, found, source = _open_raster(path)
        mpp = _resolve_mpp(microns_per_pixel, found, source, path)
        rgb = as_rgb_hwc(data, name=f"slide {path.name}")
        image = _datatree(_coarsened_levels(rgb), sid)
        logger.info("%s decoded into memory (%.0f MB): JPEG/PNG cannot be read in parts.", path.name, rgb.nbytes / 1e6)
    if microns_per_pixel is not None:
        source = "argument"
    level_shapes = _level_shapes(image)
    attrs = {
        "sample_id": sid,
        "image_key": image_key,
        "coordinate_system": sid,
        "microns_per_pixel": float(mpp),
        "microns_per_pixel_source": source,
        "path": str(path.resolve()),
        "level_shapes": level_shapes,
        "stored_pyramid": bool(is_tiff and pyramid),
    }
    sdata = SpatialData(images={image_key: image}, attrs={SLIDE_KEY: attrs})
    logger.info(
        "read_wsi %s: %d x %d px, %d levels, %.4g µm/px (%s).",
        path.name,
        level_shapes[0][1],
        level_shapes[0][0],
        len(level_shapes),
        mpp,
        source,
    )
    return sdata


def _quietly(func: Any, items: list[Any]) -> list[Any]:
    """``func`` over ``items`` with the package logger silenced (its warnings were given for level 0)."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return [func(item) for item in items]
    finally:
        logger.setLevel(level)


def _level_shapes(image: Any) -> list[list[int]]:
    if hasattr(image, "children") and len(image.children):
        names = sorted(image.children, key=lambda n: int(n.removeprefix("scale")))
        arrays = [image[n]["image"] for n in names]
    else:
        arrays = [image]
    return [[int(a.sizes["y"]), int(a.sizes["x"])] for a in arrays]


def slide_info(sdata: SpatialData) -> dict[str, Any]:
    """The slide record of ``sdata``: ``attrs["hespotex_slide"]`` (from :func:`read_wsi`), or one made from
    the sample table's ``uns["hespotex_sample"]`` (any hespotex sample with an image)."""
    record = getattr(sdata, "attrs", {}).get(SLIDE_KEY)
    if record:
        out = dict(record)
        if out.get("image_key") not in sdata.images:
            msg = f"attrs[{SLIDE_KEY!r}] names the image {out.get('image_key')!r}, which this SpatialData lacks (images: {list(sdata.images)})."
            raise KeyError(msg)
        return out
    from hespotex._sample import get_sample_info

    try:
        info = get_sample_info(sdata)
    except KeyError as err:
        msg = (
            f"This SpatialData is neither a slide read by `hx.io.read_wsi` (no attrs[{SLIDE_KEY!r}]) nor a hespotex "
            "sample (no table with uns['hespotex_sample']). Read the slide with `hx.io.read_wsi`."
        )
        raise KeyError(msg) from err
    if info.image_key is None or info.image_key not in sdata.images:
        msg = f"The sample {info.sample_id!r} has no H&E image element (expected {info.image_key!r})."
        raise KeyError(msg)
    return {
        "sample_id": info.sample_id,
        "image_key": info.image_key,
        "coordinate_system": info.coordinate_system,
        "microns_per_pixel": info.microns_per_pixel,
    }
