"""Build a sample from an AnnData with spot centres and an H&E image (array or file)."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from hespotex.io._build import build_sample
from hespotex.io._image import open_image

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")


def check_sample_id(sample_id: Any) -> str:
    """Return ``sample_id`` as a string, raising when SpatialData cannot name elements after it."""
    name = str(sample_id)
    if not _NAME_RE.fullmatch(name) or name in {".", ".."} or name.startswith("__"):
        msg = (
            f"Expected a sample id made of letters, digits, '_', '-' or '.', found {name!r}. "
            "It names the SpatialData elements and coordinate system; pass `sample_id=` with such a name."
        )
        raise ValueError(msg)
    return name


def sample_id_from_path(path: str | Path) -> str:
    """A valid sample id from a file name: its stem without compression/format suffixes."""
    name = Path(path).name
    for suffix in (".gz", ".bz2", ".zip", ".xz", ".tsv", ".csv", ".txt", ".h5ad", ".h5"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name).strip(".") or "sample"
    return name.lstrip("_") or "sample"


def is_integer_valued(x: Any) -> bool:
    """Whether a (sparse or dense) matrix holds only finite, non-negative whole numbers."""
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size == 0:
        return True
    if np.dtype(data.dtype).kind in "iu":
        return bool((data >= 0).all())
    if np.dtype(data.dtype).kind != "f":
        return False
    return bool(np.isfinite(data).all() and (data >= 0).all() and np.array_equal(data, np.round(data)))


def from_anndata(
    adata: AnnData,
    image: Any,
    *,
    microns_per_pixel: float,
    spot_diameter_um: float | None = None,
    spot_diameter_px: float | None = None,
    spatial_key: str = "spatial",
    sample_id: str = "sample",
    counts: bool | None = None,
) -> SpatialData:
    """Build a sample from an AnnData whose ``obsm[spatial_key]`` holds spot centres in image pixels.

    Reads ``adata`` (never modifies it: everything is copied) and the image; returns a new sample.

    Parameters
    ----------
    adata
        Spots × genes. ``obsm[spatial_key]`` holds ``(x = column, y = row)`` spot centres in
        full-resolution pixels of ``image``.
    image
        The H&E image: an ``(height, width, channels)`` numpy/dask array, a file path (a TIFF is read
        lazily, level 0; JPEG/PNG with PIL), or ``None`` for a sample without pixels. RGBA images
        lose their alpha channel and grayscale ones are repeated to RGB (logged).
    microns_per_pixel
        Microns per pixel of ``image``.
    spot_diameter_um, spot_diameter_px
        The spot diameter, in microns or in pixels of ``image``: give exactly one.
    spatial_key
        Key of the spot centres in ``adata.obsm``.
    sample_id
        Names the elements (``{sample_id}_image``, ``{sample_id}_spots``) and the coordinate system.
    counts
        Whether ``X`` holds raw counts; ``None`` detects integer-valued ``X``.

    Returns
    -------
    A sample (:class:`spatialdata.SpatialData`) whose table ``"table"`` holds copies of ``X``
    (CSR ``float32``), ``obs``, ``var``, ``obsm``, ``obsp``, ``varm``, ``layers`` and ``uns`` of
    ``adata``, plus ``obsm["spatial"]`` (the centres), ``obs["region"]`` / ``obs["spot_id"]``
    and ``uns["hespotex_sample"]``.

    Reads ``adata`` and ``image``; writes nothing to them (the sample holds copies).
    """
    sample_id = check_sample_id(sample_id)
    if (spot_diameter_um is None) == (spot_diameter_px is None):
        msg = (
            f"Expected exactly one of `spot_diameter_um` and `spot_diameter_px`, found "
            f"spot_diameter_um={spot_diameter_um}, spot_diameter_px={spot_diameter_px}. Give the spot "
            "diameter once, in microns (55 for Visium, 100 for legacy ST) or in image pixels."
        )
        raise ValueError(msg)
    if microns_per_pixel is None or not np.isfinite(float(microns_per_pixel)) or float(microns_per_pixel) <= 0:
        msg = f"Expected a positive `microns_per_pixel`, found {microns_per_pixel}. Pass the image's µm per pixel."
        raise ValueError(msg)
    if spot_diameter_px is not None:
        spot_diameter_um = float(spot_diameter_px) * float(microns_per_pixel)
    if adata.X is None:
        msg = "Expected an expression matrix in adata.X, found None. Set adata.X (e.g. from a layer) first."
        raise ValueError(msg)
    centres = spatial_centres(adata, spatial_key)
    if counts is None:
        counts = is_integer_valued(adata.X)
        logger.info("from_anndata: X %s integer-valued; counts=%s.", "is" if counts else "is not", counts)
    obsm = {k: _copy(v) for k, v in adata.obsm.items() if k != "spatial"}
    sdata = build_sample(
        open_image(image) if image is not None else None,
        centres,
        adata.X,
        obs=adata.obs,
        var=adata.var,
        sample_id=sample_id,
        microns_per_pixel=float(microns_per_pixel),
        spot_diameter_um=float(spot_diameter_um),
        counts=bool(counts),
        uns=copy.deepcopy(dict(adata.uns)),
        obsm=obsm,
    )
    table = sdata.tables["table"]
    for key, value in adata.layers.items():
        table.layers[key] = _copy(value)
    for key, value in adata.obsp.items():
        table.obsp[key] = _copy(value)
    for key, value in adata.varm.items():
        table.varm[key] = _copy(value)
    return sdata


def spatial_centres(adata: AnnData, spatial_key: str = "spatial") -> np.ndarray:
    """Spot centres ``(n, 2)`` from ``adata.obsm[spatial_key]`` as float64 ``(x, y)``."""
    if spatial_key not in adata.obsm:
        msg = (
            f"Expected spot centres in adata.obsm[{spatial_key!r}], found obsm keys {list(adata.obsm)}. "
            "Pass `spatial_key=` naming the (x = column, y = row) pixel coordinates."
        )
        raise KeyError(msg)
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        msg = f"Expected adata.obsm[{spatial_key!r}] of shape (n_spots, 2), found {xy.shape}."
        raise ValueError(msg)
    return xy[:, :2].copy()


def _copy(value: Any) -> Any:
    return value.copy() if hasattr(value, "copy") else copy.deepcopy(value)
