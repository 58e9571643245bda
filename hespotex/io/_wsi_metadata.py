"""The resolution (microns per pixel) a slide file records: OME-XML, Aperio description, TIFF tags, image dpi,
or the objective magnification; and the check of a user-given value against it (:func:`resolve_mpp`)."""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from hespotex.io._build import MPP_RANGE
from hespotex.io._wsi_readers import magnification_mpp

if TYPE_CHECKING:
    from pathlib import Path

logger = logging.getLogger("hespotex")

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


def tiff_mpp(tif: Any) -> tuple[float | None, str | None]:
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


def pil_mpp(info: dict[str, Any]) -> tuple[float | None, str | None]:
    dpi = info.get("dpi")
    if dpi and dpi[0]:
        mpp = _plausible(25_400.0 / float(dpi[0]), "image dpi")
        if mpp is not None:
            return mpp, "image dpi"
    return None, None


def resolve_mpp(given: float | None, found: float | None, source: str | None, path: Path) -> float:
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
            f"{path.name} records no microns per pixel (no OME PhysicalSizeX, Aperio MPP, TIFF resolution tags "
            "in inches or centimetres, or objective magnification). Pass `microns_per_pixel=` (about 0.25 for "
            "a 40x scan, 0.5 for 20x; "
            "the scanner's record or the slide's scale bar tells)."
        )
        raise ValueError(msg)
    return found


def objective_mpp(magnification: float, path: Path) -> tuple[float | None, str | None]:
    """Microns per pixel from the objective magnification, with a warning (the file records no resolution)."""
    mpp = _plausible(magnification_mpp(magnification), f"{magnification:g}x objective")
    if mpp is None:
        return None, None
    logger.warning(
        "%s records no microns per pixel, only a %gx objective: assuming %.4g µm/px (10 / magnification: 20x -> 0.5, "
        "40x -> 0.25). Pass `microns_per_pixel=` (--mpp) if the scanner's record says otherwise.",
        path.name,
        magnification,
        mpp,
    )
    return mpp, f"objective magnification {magnification:g}x (assumed 10 / magnification)"
