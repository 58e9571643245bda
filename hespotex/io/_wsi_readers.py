"""Whole-slide formats through the scverse WSI stack, reader choice, and scale from the objective magnification.

``hx.io.read_wsi`` reads TIFF, OME-TIFF and Aperio SVS with ``tifffile`` (as fast as the others
and the one that finds OME-TIFF pyramids, see ``benchmarks/results/wsi_readers.md``). Vendor formats (Hamamatsu NDPI /
VMS / VMU, 3DHISTECH MRXS,
Leica SCN, Ventana BIF, Philips TIFF, DICOM, Zeiss CZI, ...) are read through ``wsidata`` (the I/O
layer of LazySlide) over OpenSlide (``openslide-bin``) or tiffslide: this module turns a
:class:`wsidata.WSIData`, or a file it opens, into the stored pyramid levels ``read_wsi`` builds its
image from. ``wsidata`` and OpenSlide are an optional extra (``pip install 'hespotex[wsi]'``),
imported only here and only when needed.
"""

from __future__ import annotations

import logging
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("hespotex")

#: The install command named by errors when a format needs the optional WSI readers.
WSI_EXTRA = "pip install 'hespotex[wsi]'"
#: Readers ``read_wsi(reader=...)`` accepts: ``tifffile`` (ours), or a ``wsidata`` reader name.
READER_NAMES = ("auto", "tifffile", "openslide", "tiffslide", "bioformats", "cucim", "fastslide", "isyntax", "pylibczi")
#: Suffixes that ``reader="auto"`` sends to OpenSlide through wsidata (vendor layouts: multi-file,
#: vendor tags, overlapping tiles, several regions), rather than to tifffile.
VENDOR_SUFFIXES = (".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".dcm", ".dicom", ".czi", ".isyntax")
#: Convention when only the objective magnification is recorded: ``mpp = MPP_TIMES_MAGNIFICATION / magnification``,
#: i.e. 20x -> 0.5 µm/px and 40x -> 0.25 µm/px (Aperio, Hamamatsu and Leica scanners record about
#: 0.50 / 0.25 at 20x / 40x; others differ by up to ~10 %, so a warning always says it was assumed).
MPP_TIMES_MAGNIFICATION = 10.0
_CHUNK_TARGET = 512  # dask chunk side of levels read through wsidata: a multiple of the file's tile near this


@dataclass
class OpenedSlide:
    """Stored levels of a slide, finest first, as ``(y, x, c)`` dask arrays, and what the file says of its scale."""

    levels: list[Any]
    path: Path
    reader: str
    mpp: float | None = None
    mpp_source: str | None = None
    magnification: float | None = None
    associated: list[str] = field(default_factory=list)


def magnification_mpp(magnification: float) -> float:
    """Microns per pixel assumed for an objective ``magnification``: :data:`MPP_TIMES_MAGNIFICATION` / magnification."""
    return MPP_TIMES_MAGNIFICATION / float(magnification)


def is_wsidata(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`wsidata.WSIData` (without importing wsidata: an object of it means it is loaded)."""
    mod = sys.modules.get("wsidata")
    return mod is not None and isinstance(obj, getattr(mod, "WSIData", ()))


def choose_reader(path: Path, reader: str, *, is_tiff: bool) -> str:
    """The reader for ``path``: ``tifffile`` for TIFF / OME-TIFF / SVS, ``openslide`` for vendor suffixes."""
    if reader not in READER_NAMES:
        msg = f"Expected `reader` to be one of {list(READER_NAMES)}, found {reader!r}."
        raise ValueError(msg)
    if reader != "auto":
        return reader
    if path.name.lower().endswith(VENDOR_SUFFIXES):
        return "openslide"
    return "tifffile" if is_tiff else "raster"


def _import_wsidata(what: str) -> Any:
    try:
        import wsidata
    except ImportError as err:
        msg = (
            f"{what} needs the optional whole-slide readers (wsidata over OpenSlide), which are not installed. "
            f"Install them with `{WSI_EXTRA}` (openslide-bin, openslide-python, tiffslide, wsidata)."
        )
        raise ImportError(msg) from err
    return wsidata


def open_wsidata(path: Path, reader: str, *, chunks: Any = None) -> OpenedSlide:
    """Open ``path`` with the ``wsidata`` reader ``reader`` (``openslide``, ``tiffslide``...), lazily."""
    kind = "a vendor format" if path.name.lower().endswith(VENDOR_SUFFIXES) else "this format"
    wsidata = _import_wsidata(f"Reading {path.name} ({kind}) with {reader!r}")
    try:
        cls = wsidata.READERS[reader]
    except KeyError as err:
        msg = f"wsidata has no reader {reader!r}; its readers: {[r.name for r in wsidata.READERS]}."
        raise ValueError(msg) from err
    if not cls.is_available():
        pkgs = cls.pkgs if isinstance(cls.pkgs, str) else " ".join(cls.pkgs or [reader])
        extra = f"`{WSI_EXTRA}`" if reader in ("openslide", "tiffslide") else f"`pip install {pkgs}`"
        msg = f"Reading {path.name} with {reader!r} needs {pkgs}, which is not installed. Install it with {extra}."
        raise ImportError(msg)
    try:
        wsi = wsidata.open_wsi(path, store=None, reader=reader)
    except Exception as err:  # each reader raises its own types (OpenSlideUnsupportedFormatError, TiffFileError...)
        msg = (
            f"Could not read {path.name} with {reader!r} ({type(err).__name__}: {err}). The file may be damaged, "
            "incomplete (MRXS and VMS slides are a file plus a folder of the same name), or in a format this "
            "reader does not know."
        )
        raise ValueError(msg) from err
    return from_wsidata(wsi, chunks=chunks)


def from_wsidata(wsi: Any, *, chunks: Any = None) -> OpenedSlide:
    """The stored levels of a :class:`wsidata.WSIData` (read by blocks through its reader) and its scale records."""
    from wsidata.reader import to_datatree

    reader = wsi.reader
    props = reader.properties
    if chunks is None:
        chunks = _tile_chunks(reader)
    elif isinstance(chunks, int):
        chunks = (chunks, chunks)
    else:
        chunks = tuple(chunks)[-2:]
    tree = to_datatree(reader, chunks=chunks)
    names = sorted(tree.children, key=lambda n: int(n.removeprefix("scale")))
    levels = [tree[n]["image"].data.transpose(1, 2, 0) for n in names]
    mag = float(props.magnification) if props.magnification else None
    try:
        associated = [str(k) for k in reader.reader.associated_images]  # names only: nothing is decoded
    except Exception:
        associated = []
    return OpenedSlide(
        levels=levels,
        path=Path(reader.file),
        reader=str(reader.name),
        mpp=float(props.mpp) if props.mpp else None,
        mpp_source=f"{reader.name} slide properties (mpp)" if props.mpp else None,
        magnification=mag,
        associated=associated,
    )


def _tile_chunks(reader: Any) -> tuple[int, int]:
    """Chunks that are whole tiles of the file (a multiple of its tile near 512 px), or 512 px."""
    try:
        raw = reader.raw_properties
    except Exception:
        raw = {}
    out = []
    for axis in ("height", "width"):
        tile = None
        for key, value in raw.items():
            if re.fullmatch(rf"[a-z]+\.level\[0\]\.tile-{axis}", str(key)) and value:
                tile = int(float(value))
                break
        out.append(tile * max(1, round(_CHUNK_TARGET / tile)) if tile else _CHUNK_TARGET)
    return out[0], out[1]


def tiff_magnification(tif: Any) -> float | None:
    """Objective magnification a TIFF records: Aperio ``AppMag``, OME ``NominalMagnification``, NDPI
    ``Magnification``."""
    page = tif.pages.first
    description = page.description or ""
    match = re.search(r"\|\s*AppMag\s*=\s*([0-9.]+)", description)
    if match:
        return _positive(match.group(1))
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            root = None
        for el in root.iter() if root is not None else ():
            if el.tag.rsplit("}", 1)[-1] == "Objective" and el.get("NominalMagnification"):
                return _positive(el.get("NominalMagnification"))
    ndpi = getattr(tif, "ndpi_tags", None) if getattr(tif, "is_ndpi", False) else None
    if ndpi and ndpi.get("Magnification"):
        return _positive(ndpi["Magnification"])
    return None


def _positive(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out > 0 else None
