"""Read whole-slide images (pyramidal TIFF / OME-TIFF / SVS, and JPEG / PNG) lazily into SpatialData.

Pyramidal TIFFs are opened through ``tifffile``'s zarr store: every level the file stores becomes a
level of a multiscale image element, a dask array whose chunks are the file's tiles, so pixels are read
only when a computation asks for them (a patch, a tissue mask from a coarse level). Nothing reads the
full-resolution level whole.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._constants import SLIDE_KEY
from hespotex.io._anndata import check_sample_id, sample_id_from_path
from hespotex.io._decode import decode_array, decode_levels, decode_pil, tiff_file_format
from hespotex.io._image import as_rgb_hwc
from hespotex.io._wsi_metadata import objective_mpp, pil_mpp, resolve_mpp, tiff_mpp
from hespotex.io._wsi_readers import (
    VENDOR_SUFFIXES,
    OpenedSlide,
    choose_reader,
    from_wsidata,
    is_wsidata,
    open_wsidata,
    tiff_magnification,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData
    from wsidata import WSIData

logger = logging.getLogger("hespotex")

__all__ = ["SLIDE_KEY", "read_wsi", "slide_info"]

#: ``sdata.attrs`` key of the slide record written by :func:`read_wsi`.
_TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")
_RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")


def _sample_id(path: Path) -> str:
    name = path.name
    for suffix in (*_TIFF_SUFFIXES, *VENDOR_SUFFIXES, *_RASTER_SUFFIXES):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return sample_id_from_path(name)


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


def _open_tiff(path: Path, chunks: Any) -> OpenedSlide:
    """Stored levels as ``(y, x, c)`` dask arrays (finest first), metadata mpp, magnification, associated images.

    Only the first series is the slide: the others (an SVS's thumbnail, label and macro images) are
    listed by name and never read."""
    import dask.array as da
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError, struct.error) as err:
        msg = (
            f"Could not read {path.name} as a TIFF ({type(err).__name__}: {err}). Expected a (pyramidal) TIFF, "
            "OME-TIFF or SVS slide."
        )
        raise ValueError(msg) from err
    try:
        if not tif.series:
            msg = f"{path.name} holds no image. Expected a (pyramidal) TIFF, OME-TIFF or SVS slide."
            raise ValueError(msg)
        series = tif.series[0]
        _check_complete(tif, path)
        mpp, source = tiff_mpp(tif)
        magnification = tiff_magnification(tif)
        associated = [str(s.name or f"series {i}").lower() for i, s in enumerate(tif.series) if i > 0]
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
    return OpenedSlide(keep, path, "tifffile", mpp, source, magnification, associated)


def _open_raster(path: Path) -> tuple[np.ndarray, float | None, str | None]:
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # slides are routinely larger than PIL's decompression-bomb limit
    try:
        with Image.open(path) as im:
            mpp, source = pil_mpp(im.info)
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
    path: str | Path | WSIData,
    *,
    microns_per_pixel: float | None = None,
    sample_id: str | None = None,
    chunks: int | tuple[int, ...] | None = None,
    reader: str = "auto",
) -> SpatialData:
    """Read a whole-slide H&E image lazily into a SpatialData (image only, no spots).

    Formats, readers and memory:

    - **Pyramidal TIFF, OME-TIFF, SVS** (``reader="tifffile"``, the default for them): every level
      the file stores (``TiffFile.series[0].levels``) becomes one level of the image, a dask array
      over ``tifffile``'s zarr store whose chunks are the file's tiles. Only the metadata and tile
      offsets are read here; pixels are decoded when asked for. On real SVS files it is as fast as
      OpenSlide or tiffslide, and it finds OME-TIFF SubIFD pyramids that OpenSlide does not
      (``benchmarks/results/wsi_readers.md``).
    - **Vendor formats** (NDPI, MRXS, VMS/VMU, SCN, BIF, SVSLIDE, DICOM, CZI, iSyntax; default
      ``reader="openslide"``): read through ``wsidata`` (the I/O layer of LazySlide) over OpenSlide
      from ``openslide-bin``, by blocks of whole tiles (about 512 px), lazily. These need the extra
      ``pip install 'hespotex[wsi]'``; without it a clear ``ImportError`` names it. Any ``wsidata``
      reader can be asked for by name (``"openslide"``, ``"tiffslide"``, ``"bioformats"``...), for
      any format it reads; ``reader="tifffile"`` forces our reader on any TIFF flavour.
    - **A** :class:`wsidata.WSIData` a LazySlide user already holds (``path=wsi``): its reader gives
      the levels, its properties the scale (``wsi.set_mpp`` is honoured); nothing is copied.
    - **A short pyramid** (its coarsest stored level still 1,024 px or more on its shorter side, e.g.
      an SVS of two levels): levels of 2 x 2, 4 x 4... means of that coarsest level are added lazily
      (down to about 512 px), so that tissue detection reads a smaller image.
    - **A slide without pyramid**: read lazily the same way; a warning says so, and coarser levels
      (2 x 2 means, down to a shorter side of about 256 px) are computed lazily with dask from the
      full resolution: each read of a coarse level decodes the full-resolution tiles under it (slow,
      but in bounded memory). Convert such slides to pyramidal OME-TIFFs for speed.
    - **JPEG / PNG**: these formats cannot be read in parts, so the file is decoded once into memory
      (``height x width x 3`` bytes, e.g. 280 MB for 9,300 x 9,900 px) and coarser levels (2 x 2
      means) are computed lazily from that array.

    Pixels are decoded by their real bit depth and colour model (:mod:`hespotex.io._decode`: grey
    repeated into RGB, alpha composited on white, CMYK and palette images converted, 16/12-bit
    scaled by their declared or inferred white level; the same mapping for every level).

    Associated images (an SVS's or OpenSlide's thumbnail, label and macro images) are never read as
    tissue: only the slide's main pyramid becomes the image; their names are recorded.

    Parameters
    ----------
    path
        The slide file, or a :class:`wsidata.WSIData`.
    microns_per_pixel
        Resolution of the full-resolution level. Read from the file when not given: OME-XML
        ``PhysicalSizeX`` (with its unit), the Aperio ``MPP`` of an SVS description, or the TIFF
        ``XResolution`` / ``ResolutionUnit`` tags (inch or centimetre; placeholder values outside
        0.05-50 µm/px, such as 72 dpi, are ignored), a JPEG/PNG's dpi, or the ``mpp`` of the
        ``wsidata`` reader's properties (OpenSlide's ``openslide.mpp-x``). The argument wins over the
        metadata, with a warning when they differ by more than 5 %. When the file records no
        resolution but the **objective magnification** (Aperio ``AppMag``, OME
        ``NominalMagnification``, NDPI or OpenSlide ``objective-power``), ``10 / magnification`` µm/px
        is assumed (20x -> 0.5, 40x -> 0.25; scanners differ by up to ~10 %) with a warning. Neither:
        a ``ValueError`` asking for the argument.
    sample_id
        Names the image element ``{sample_id}_image`` and the coordinate system; default: the file
        name without its image suffix.
    chunks
        Dask chunks of the stored levels (``None``: the file's tiles; through ``wsidata``: whole tiles
        near 512 px).
    reader
        ``"auto"`` (``tifffile`` for TIFF / OME-TIFF / SVS, ``openslide`` for vendor suffixes, PIL for
        JPEG / PNG), ``"tifffile"``, or a ``wsidata`` reader name (``"openslide"``, ``"tiffslide"``,
        ``"bioformats"``, ``"cucim"``, ...). Ignored for a ``WSIData``.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with

    - ``images[f"{sample_id}_image"]``: a multiscale image (``scale0`` = full resolution), ``uint8``
      RGB, dims ``(c, y, x)``, each level mapped to the coordinate system ``sample_id`` (full-
      resolution pixels) by its scale;
    - ``attrs["hespotex_slide"]``: ``sample_id``, ``image_key``, ``coordinate_system``,
      ``microns_per_pixel``, ``microns_per_pixel_source``, ``path`` (absolute), ``level_shapes``
      (``[height, width]`` per level), ``stored_pyramid`` (whether the file stores several levels),
      ``stored_levels`` (how many of the levels are the file's, finest first; the others are averaged),
      ``reader`` (``tifffile``, ``openslide``, ``tiffslide``, ``pillow``...), ``associated_images``
      (names of the images skipped), and ``objective_magnification`` where the file records it.

    No table: :func:`hespotex.pp.detect_tissue` and :func:`hespotex.pp.tile` lay out pseudo-spots.
    Raises ``FileNotFoundError`` for a missing file, ``ImportError`` naming the extra to install when
    a format needs a missing reader, and ``ValueError`` for a truncated, damaged or non-image file, an
    unsupported layout, or unknown microns per pixel.

    Reads the file lazily; writes nothing.
    """
    from spatialdata import SpatialData

    if is_wsidata(path):
        opened = from_wsidata(path, chunks=chunks)
        path = opened.path
    else:
        path = Path(path)
        if not path.is_file():
            msg = f"Expected a slide file, found no file at {str(path)!r}."
            raise FileNotFoundError(msg)
        opened = None
    sid = check_sample_id(sample_id if sample_id is not None else _sample_id(path))
    image_key = f"{sid}_image"
    if opened is None:
        with path.open("rb") as fh:
            head = fh.read(4)
        is_tiff = head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")
        name = choose_reader(path, reader, is_tiff=is_tiff)
        wants_tiff = name == "tifffile" or (name == "raster" and path.name.lower().endswith(_TIFF_SUFFIXES))
        if wants_tiff and not is_tiff:
            msg = (
                f"{path.name} is not a TIFF file (its first bytes are {head!r}); the file is damaged or has the "
                "wrong suffix."
            )
            raise ValueError(msg)
        if name == "tifffile":
            opened = _open_tiff(path, chunks)
        elif name != "raster":
            opened = open_wsidata(path, name, chunks=chunks)
    if opened is not None:
        levels, found, source, magnification = opened.levels, opened.mpp, opened.mpp_source, opened.magnification
        pyramid = len(levels) > 1
        if microns_per_pixel is None and found is None and magnification:
            found, source = objective_mpp(magnification, path)
        mpp = resolve_mpp(microns_per_pixel, found, source, path)
        fmt = tiff_file_format(path) if opened.reader == "tifffile" else None
        levels = decode_levels(levels, fmt=fmt, name=f"slide {path.name}")
        if pyramid:  # a short pyramid (e.g. an SVS of two levels) gets lazily averaged levels below its coarsest
            image = _datatree([*levels, *_coarsened_levels(levels[-1], min_side=512)[1:]], sid)
        else:
            logger.warning(
                "%s has no pyramid (one level of %d x %d px); coarser levels are computed lazily from the full "
                "resolution, which is slow on large slides. Convert it to a pyramidal OME-TIFF for speed.",
                path.name,
                levels[0].shape[1],
                levels[0].shape[0],
            )
            image = _datatree(_coarsened_levels(levels[0]), sid)
        if opened.associated:
            logger.info("%s: skipped its associated images (%s).", path.name, ", ".join(opened.associated))
    else:
        data, found, source = _open_raster(path)
        mpp = resolve_mpp(microns_per_pixel, found, source, path)
        rgb = as_rgb_hwc(data, name=f"slide {path.name}")
        image = _datatree(_coarsened_levels(rgb), sid)
        pyramid, magnification = False, None
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
        "path": str(path.resolve()) if path.exists() else str(path),  # a WSIData over an in-memory image: its key
        "level_shapes": level_shapes,
        "stored_pyramid": bool(opened is not None and pyramid),
        "stored_levels": len(opened.levels) if opened is not None else 0,
        "reader": opened.reader if opened is not None else "pillow",
        "associated_images": list(opened.associated) if opened is not None else [],
    }
    if magnification:
        attrs["objective_magnification"] = float(magnification)
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
            msg = (
                f"attrs[{SLIDE_KEY!r}] names the image {out.get('image_key')!r}, which this SpatialData lacks "
                f"(images: {list(sdata.images)})."
            )
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
