"""A 49-spot Visium mouse brain crop shipped inside the package (from squidpy's test data, BSD-3)."""

from __future__ import annotations

import logging
from importlib.resources import as_file, files
from typing import TYPE_CHECKING

import numpy as np

from hespotex.io._anndata import from_anndata, spatial_centres
from hespotex.io._visium import SPACERANGER_SCALEFACTOR_SPOT_UM, VISIUM_SPOT_DIAMETER_UM, visium_microns_per_pixel

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

H5AD = "test_data.h5ad"
IMAGE = "test_img.jpg"
SOURCE = (
    "10x Genomics Visium V1_Adult_Mouse_Brain, 49-spot crop from squidpy's test data "
    "(https://github.com/scverse/squidpy, BSD-3-Clause; see hespotex/datasets/data/NOTICE)"
)


def mouse_brain_crop() -> SpatialData:
    """The 49-spot Visium mouse brain crop embedded in hespotex, as a sample.

    Reads ``hespotex/datasets/data/test_data.h5ad`` (49 spots × 1,999 genes) and ``test_img.jpg``
    (950 × 1,717 px H&E); needs no download.

    ``X`` is **log-normalised**, not counts (``counts=False``; ``uns["log1p"]`` marks it for
    scanpy). ``obsm["spatial"]`` is (column, row) in ``test_img.jpg`` pixels. The file's
    ``spot_diameter_fullres`` (89.4 px) is Space Ranger's, which spans a theoretical 65 µm spot, so
    microns per pixel is ``65 / 89.4`` (checked against the 100 µm spot pitch: adjacent centres are
    138 px apart); spots are 55 µm wide.

    Returns
    -------
    A sample with image ``mouse_brain_image``, circles ``mouse_brain_spots`` and table ``"table"``
    (``X`` log-normalised, the original ``obs``/``var``/``obsm``/``obsp``/``uns``, and
    ``uns["hespotex_dataset"]`` naming the source and licence).

    Reads the crop shipped with the package; writes nothing.
    """
    import anndata as ad

    data = files("hespotex.datasets") / "data"
    with as_file(data / H5AD) as h5ad, as_file(data / IMAGE) as image:
        adata = ad.read_h5ad(h5ad)
        library, entry = next(iter(adata.uns["spatial"].items()))
        d = float(np.asarray(entry["scalefactors"]["spot_diameter_fullres"]))
        mpp = visium_microns_per_pixel(d, spatial_centres(adata), reference_um=SPACERANGER_SCALEFACTOR_SPOT_UM)
        sdata = from_anndata(
            adata,
            image,
            microns_per_pixel=mpp,
            spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
            sample_id="mouse_brain",
            counts=False,
        )
    table = sdata.tables["table"]
    table.uns.setdefault("log1p", {"base": None})
    table.uns["hespotex_dataset"] = {
        "name": "mouse_brain_crop",
        "library_id": str(library),
        "source": SOURCE,
        "licence": "BSD-3-Clause (squidpy)",
    }
    return sdata
