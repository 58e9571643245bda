"""Read 10x Genomics Visium HD (Space Ranger ``binned_outputs``) through spatialdata-io, as a hespotex sample.

Visium HD measures expression in 2 µm squares; Space Ranger sums them into square bins of 8 and
16 µm (``binned_outputs/square_008um``, ``square_016um``). A bin is hespotex's spot, drawn as a
square: ``uns["hespotex_sample"]`` records ``spot_shape="square"`` and the bin side in µm as the
spot diameter, so everything sized in µm (patches, graph radii, view glyphs) follows the bin size.
Unlike Visium, the scale factors of Visium HD state ``microns_per_pixel`` and ``bin_size_um``
outright; the reader checks them against the spacing of the bin centres.

The full-resolution H&E image (``fullres_image=``, or ``microscope_image/*`` in the folder as
spatialdata-io looks for it) is opened lazily when it is a TIFF: every level of its pyramid comes
from :func:`hespotex.io.read_wsi`, a dask array over the file's tiles, never decoded whole (spatialdata-io
would decode a ``.btf`` into memory and read other TIFFs as one chunk per page). Other formats are
read by spatialdata-io. Without a full-resolution image the hires PNG is the sample's image.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hespotex._compat import old_positionals
from hespotex._sample import SAMPLE_KEY, TABLE_KEY, SampleInfo
from hespotex.io._build import check_expression, check_scale, check_spots_in_image
from hespotex.io._visium import spot_centres

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

#: Bin sizes Space Ranger writes (µm); 2 µm bins are too small to carry an H&E patch each.
VISIUM_HD_BIN_SIZES = (2, 8, 16)
#: Relative tolerance when checking the bin pitch against ``bin_size_um / microns_per_pixel``.
PITCH_TOLERANCE = 0.05
_TIFF_SUFFIXES = (".tif", ".tiff", ".btf")
_NO_FULLRES = "__hespotex_fullres_opened_lazily__"


def _bin_folders(path: Path) -> dict[int, Path]:
    """``{bin size in µm: folder}`` of ``binned_outputs/square_XXXum`` folders under ``path``."""
    roots = [path / "binned_outputs"] if (path / "binned_outputs").is_dir() else list(path.rglob("binned_outputs"))
    out: dict[int, Path] = {}
    for root in roots:
        for folder in sorted(root.glob("square_*um")):
            m = re.fullmatch(r"square_(\d{3})um", folder.name)
            if m and folder.is_dir():
                out.setdefault(int(m.group(1)), folder)
    return out


def _find_fullres(path: Path, given: str | Path | None) -> Path | None:
    """The full-resolution image: ``given``, else the one file of ``microscope_image/`` (as spatialdata-io looks)."""
    if given is not None:
        file = Path(given).resolve()
        if not file.is_file():
            msg = f"Expected the full-resolution image at {str(file)!r}, found no file there."
            raise FileNotFoundError(msg)
        return file
    folder = path / "microscope_image"
    files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
    files = files or sorted(path.glob("tissue_image.*"))
    if len(files) > 1:
        logger.warning("Several images in %s; using %s. Pass `fullres_image=` to choose.", folder, files[0].name)
    return files[0] if files else None


@old_positionals("io.read_visium_hd")
def read_visium_hd(
    path: str | Path,
    *,
    bin_size: int = 8,
    dataset_id: str | None = None,
    fullres_image: str | Path | None = None,
    filtered_counts: bool = True,
    in_tissue_only: bool = True,
    **kwargs: Any,
) -> SpatialData:
    """Read one bin size of a Visium HD Space Ranger output as a hespotex sample (via :func:`spatialdata_io.visium_hd`).

    Reads ``binned_outputs/square_{bin_size:03d}um/`` (the count matrix, ``spatial/tissue_positions.parquet``,
    ``spatial/scalefactors_json.json``), ``feature_slice.h5`` (its metadata), the hires and lowres PNGs
    and the full-resolution image. Nothing is written.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (holding ``binned_outputs/`` and ``feature_slice.h5``).
    bin_size
        Bin side in µm: 8 or 16 (2 is read too, but a 2 µm bin is smaller than a nucleus).
    dataset_id
        Names the elements and the coordinate system; default: the folder name (its parent's when the
        folder is called ``outs``), or the prefix of a ``{id}_feature_slice.h5`` file.
    fullres_image
        The full-resolution H&E image given to Space Ranger; default: the file in ``microscope_image/``.
        A TIFF (``.tif``, ``.tiff``, ``.btf``; pyramidal or not) is opened lazily with
        :func:`hespotex.io.read_wsi`. Without one, the hires PNG is the sample's image.
    filtered_counts
        Read ``filtered_feature_bc_matrix.h5`` (bins under tissue), else ``raw_feature_bc_matrix.h5``.
    in_tissue_only
        Keep only bins with ``in_tissue == 1`` (matters with the raw matrix).
    **kwargs
        Passed to :func:`spatialdata_io.visium_hd` (``var_names_make_unique``, ``gex_only``,
        ``imread_kwargs``, ...).

    Returns
    -------
    The :class:`spatialdata.SpatialData` of spatialdata-io for that bin size, completed: coordinate system
    ``dataset_id`` = full-resolution pixels; shapes ``{dataset_id}_square_{bin:03d}um`` (the bins as
    squares, ``bin_size / microns_per_pixel`` px wide); the image element ``{dataset_id}_full_image``
    (multiscale ``uint8`` RGB) or ``{dataset_id}_hires_image`` (scaled to the coordinate system), plus
    ``{dataset_id}_lowres_image``; table ``"table"`` with ``X`` (counts, CSR ``float32``),
    ``obs["array_row"]``, ``obs["array_col"]``, ``obs["in_tissue"]``, ``obs["region"]`` / ``obs["spot_id"]``
    linking to the squares, ``obsm["spatial"]`` (bin centres, x = column, y = row, full-res px),
    ``uns["spatial"][dataset_id]["scalefactors"]``, ``uns["hespotex_sample"]`` (µm per px from the scale
    factors, ``spot_diameter_um = bin_size``, ``spot_shape = "square"``) and ``uns["hespotex_io"]``.
    """
    import spatialdata_io
    from spatialdata.models import TableModel

    from hespotex.io._visium import as_rgb_image_element, image_extent, spot_pitch_px

    path = Path(path)
    if not path.is_dir():
        msg = f"Expected a Space Ranger Visium HD `outs` folder, found no folder at {str(path)!r}."
        raise FileNotFoundError(msg)
    folders = _bin_folders(path)
    if isinstance(bin_size, bool) or not isinstance(bin_size, (int, np.integer)) or int(bin_size) not in folders:
        found = sorted(folders)
        msg = (
            f"Expected `bin_size` to be one of the bin sizes in {str(path / 'binned_outputs')!r} "
            f"({found or 'none: no square_XXXum folders'}), found {bin_size!r}. Visium HD bins are 2, 8 or 16 µm."
        )
        raise ValueError(msg)
    bin_size = int(bin_size)
    counts_file = "filtered_feature_bc_matrix.h5" if filtered_counts else "raw_feature_bc_matrix.h5"
    spatial = folders[bin_size] / "spatial"
    for needed in (
        folders[bin_size] / counts_file,
        spatial / "tissue_positions.parquet",
        spatial / "scalefactors_json.json",
    ):
        if not needed.is_file():
            msg = f"Expected {str(needed)!r} in the Visium HD output (Space Ranger >= 3.0 layout), found no such file."
            raise FileNotFoundError(msg)
    if dataset_id is None:
        prefixed = [f.name[: -len("_feature_slice.h5")] for f in path.glob("*_feature_slice.h5")]
        if len(prefixed) == 1 and not (path / "feature_slice.h5").exists():
            dataset_id = prefixed[0]
        else:
            folder = path.resolve()
            name = folder.parent.name if folder.name == "outs" else folder.name
            dataset_id = re.sub(r"[^A-Za-z0-9_.\-]", "_", name).strip("._") or "visium_hd"
        logger.info("read_visium_hd: dataset_id=%r.", dataset_id)
    cs = str(dataset_id)
    fullres = _find_fullres(path, fullres_image)
    lazy_tiff = fullres is not None and fullres.name.lower().endswith(_TIFF_SUFFIXES)
    with warnings.catch_warnings():
        if lazy_tiff:  # spatialdata-io skips a missing file with a warning; the TIFF is opened below
            warnings.filterwarnings("ignore", message=f".*{_NO_FULLRES}.*")
        sdata = spatialdata_io.visium_hd(
            path,
            dataset_id=cs,
            filtered_counts_file=filtered_counts,
            load_segmentations_only=False,
            bin_size=bin_size,
            bins_as_squares=True,
            fullres_image_file=(path / _NO_FULLRES) if lazy_tiff else fullres,
            **kwargs,
        )
    name = f"square_{bin_size:03d}um"
    shapes_key = f"{cs}_{name}"
    table = sdata.tables[name]
    del sdata.tables[name]

    if in_tissue_only and "in_tissue" in table.obs:
        keep = (table.obs["in_tissue"] == 1).to_numpy()
        if not keep.all():
            logger.info("read_visium_hd: keeping %d of %d bins under tissue.", int(keep.sum()), len(keep))
            table = table[keep].copy()
            sdata.shapes[shapes_key] = sdata.shapes[shapes_key].loc[table.obs["location_id"].to_numpy()]
    table.X = check_expression(table.X, pd.Index(table.obs_names), pd.Index(table.var_names), counts=True)
    centres = table.obsm["spatial"] = spot_centres(table, repr(str(spatial / "tissue_positions.parquet")))

    raw = json.loads((spatial / "scalefactors_json.json").read_text())
    scalefactors = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))}
    mpp = float(scalefactors.get("microns_per_pixel", float("nan")))
    if not np.isfinite(mpp) or mpp <= 0:
        mpp = bin_size / float(scalefactors.get("spot_diameter_fullres", float("nan")))
    pitch = spot_pitch_px(centres)
    if pitch is not None and abs(pitch * mpp / bin_size - 1.0) > PITCH_TOLERANCE:
        msg = (
            f"The {bin_size} µm bins are {pitch:.2f} px apart, which is {pitch * mpp:.2f} µm at the {mpp:.4f} µm/px of "
            f"{str(spatial / 'scalefactors_json.json')!r}; expected {bin_size} µm. The positions and scale factors "
            "disagree: check that they come from the same Space Ranger run."
        )
        raise ValueError(msg)

    image_key = None
    if lazy_tiff:
        from hespotex.io._wsi import read_wsi

        slide = read_wsi(fullres, microns_per_pixel=mpp, sample_id=cs)
        image_key = f"{cs}_full_image"
        sdata.images[image_key] = slide.images[f"{cs}_image"]
    elif fullres is not None and f"{cs}_full_image" in sdata.images:
        image_key = f"{cs}_full_image"
    elif f"{cs}_hires_image" in sdata.images:
        image_key = f"{cs}_hires_image"
    extent = None
    if image_key is not None:
        if not lazy_tiff:
            sdata.images[image_key] = as_rgb_image_element(sdata.images[image_key], name=image_key)
        extent = image_extent(sdata.images[image_key], cs)
        check_spots_in_image(centres, extent, spot_ids=pd.Index(table.obs_names))
    else:
        logger.warning("read_visium_hd: no H&E image found in %s; the sample has bins and counts only.", path)
    check_scale(mpp, float(bin_size), image_shape=extent)

    # hespotex links tables to shapes by obs["spot_id"] (as spatialdata-io's Visium reader does)
    table.obs["spot_id"] = table.obs["location_id"].to_numpy()
    table.uns.pop("spatialdata_attrs", None)
    spatial_uns = dict(table.uns.get("spatial", {}))
    spatial_uns[cs] = {**dict(spatial_uns.get(cs, {})), "scalefactors": scalefactors}
    table.uns["spatial"] = spatial_uns
    info = SampleInfo(
        sample_id=cs,
        image_key=image_key,
        shapes_key=shapes_key,
        coordinate_system=cs,
        microns_per_pixel=mpp,
        spot_diameter_um=float(bin_size),
        spot_shape="square",
    )
    table.uns[SAMPLE_KEY] = info.to_dict()
    table.uns["hespotex_io"] = {
        "reader": "read_visium_hd",
        "path": str(path.resolve()),
        "bin_size_um": bin_size,
        "counts_file": counts_file,
        "fullres_image": str(fullres) if fullres is not None else None,
    }
    table.uns["hespotex_io"] = {k: v for k, v in table.uns["hespotex_io"].items() if v is not None}
    sdata.tables[TABLE_KEY] = TableModel.parse(table, region=shapes_key, region_key="region", instance_key="spot_id")
    logger.info(
        "read_visium_hd %s: %d bins of %d µm, %d genes, %.4f µm/px (%.2f px per bin), image %s.",
        cs, table.n_obs, bin_size, table.n_vars, mpp, bin_size / mpp, image_key,
    )  # fmt: skip
    return sdata
