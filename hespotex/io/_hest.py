"""Read HEST-1k style samples: an h5ad with spot centres in full-resolution pixels plus a WSI."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex.io._anndata import check_sample_id, from_anndata, sample_id_from_path, spatial_centres
from hespotex.io._visium import VISIUM_SPOT_DIAMETER_UM, visium_microns_per_pixel

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")


def read_hest(
    h5ad: str | Path,
    image: Any,
    *,
    microns_per_pixel: float | None = None,
    spot_diameter_um: float | None = None,
    sample_id: str | None = None,
    spatial_key: str = "spatial",
    counts: bool | None = None,
) -> SpatialData:
    """Read a HEST-1k style sample (``st/{id}.h5ad`` + ``wsis/{id}.tif``) as a hespotex sample.

    Reads the h5ad fully and the image lazily (a TIFF through ``tifffile``'s zarr store as a dask
    array, level 0; JPEG/PNG with PIL). Writes nothing.

    Parameters
    ----------
    h5ad
        AnnData file; ``obsm[spatial_key]`` holds ``(x = column, y = row)`` spot centres in
        full-resolution pixels of ``image``.
    image
        The whole-slide image: a file path or an ``(h, w, c)`` array.
    microns_per_pixel, spot_diameter_um
        Physical scale. Where not given, taken from
        ``uns["spatial"][library]["scalefactors"]["spot_diameter_fullres"]`` assuming Visium
        (55 µm spots; the HEST-1k convention ``spot_diameter_fullres = 55 / pixel_size``, or
        Space Ranger's 65 µm reference, whichever fits the 100 µm spot pitch of the centres).
        Without either, a ``ValueError`` asks for them.
    sample_id
        Names the elements and the coordinate system; default: the h5ad file name.
    spatial_key
        Key of the spot centres in ``obsm``.
    counts
        Whether ``X`` holds raw counts; ``None`` detects integer values.

    Returns
    -------
    A sample as :func:`hespotex.io.from_anndata` builds it; the table keeps everything the file had,
    including the downscaled copies of the image and the scale factors HEST stores in
    ``uns["spatial"][library]`` (the image element holds ``image`` itself).
    """
    import anndata as ad

    h5ad = Path(h5ad)
    if not h5ad.is_file():
        msg = f"Expected an .h5ad file at {str(h5ad)!r}, found no file."
        raise FileNotFoundError(msg)
    sample_id = check_sample_id(sample_id if sample_id is not None else sample_id_from_path(h5ad))
    adata = ad.read_h5ad(h5ad)
    scalefactors = _scalefactors(adata)
    if microns_per_pixel is None or spot_diameter_um is None:
        d = scalefactors.get("spot_diameter_fullres")
        if d is None:
            msg = (
                f"{h5ad.name} records no physical scale: no uns['spatial'][library]['scalefactors']"
                "['spot_diameter_fullres']. Pass `microns_per_pixel=` (HEST-1k's metadata column "
                "'pixel_size_um_estimated') and `spot_diameter_um=` (55 for Visium, 100 for legacy ST)."
            )
            raise ValueError(msg)
        if microns_per_pixel is None:
            microns_per_pixel = visium_microns_per_pixel(
                float(d), spatial_centres(adata, spatial_key), reference_um=VISIUM_SPOT_DIAMETER_UM
            )
            logger.info(
                "read_hest %s: %.4f µm/px from spot_diameter_fullres = %.2f px (Visium).",
                sample_id,
                microns_per_pixel,
                d,
            )
        if spot_diameter_um is None:
            spot_diameter_um = VISIUM_SPOT_DIAMETER_UM
            logger.info("read_hest %s: assuming Visium spots of %g µm.", sample_id, spot_diameter_um)
    sdata = from_anndata(
        adata,
        image,
        microns_per_pixel=float(microns_per_pixel),
        spot_diameter_um=float(spot_diameter_um),
        spatial_key=spatial_key,
        sample_id=sample_id,
        counts=counts,
    )
    sdata.tables["table"].uns["hespotex_io"] = {
        "reader": "read_hest",
        "h5ad": str(h5ad.resolve()),
        "image": str(Path(image).resolve()) if isinstance(image, (str, Path)) else type(image).__name__,
    }
    return sdata


def _scalefactors(adata: Any) -> dict[str, float]:
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict):
        return {}
    for lib in spatial.values():
        if isinstance(lib, dict) and isinstance(lib.get("scalefactors"), dict):
            out = {}
            for k, v in lib["scalefactors"].items():
                value = np.asarray(v)
                if value.size == 1 and value.dtype.kind in "iuf":
                    out[k] = float(value)
            return out
    return {}
