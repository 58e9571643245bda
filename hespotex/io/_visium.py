"""Read 10x Genomics Visium (Space Ranger ``outs``) through spatialdata-io, completed to a hespotex sample.

Physical scale of Visium
------------------------
A Visium spot is 55 µm wide and spot centres are 100 µm apart. Space Ranger's
``scalefactors_json.json`` gives ``spot_diameter_fullres``, which 10x documents as "the number of
pixels that span the diameter of a theoretical 65 µm spot in the original, full-resolution image"
(Space Ranger 1.3 docs, *Spatial outputs*). Microns per pixel is therefore
``65 / spot_diameter_fullres``, not ``55 / spot_diameter_fullres`` (18 % off). The readers check the
derived scale against the 100 µm spot pitch measured on the spot centres, so a file following the
other convention (HEST-1k writes ``spot_diameter_fullres = 55 / pixel_size``) is recognised.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hespotex._sample import SAMPLE_KEY, TABLE_KEY, SampleInfo
from hespotex.io._build import check_expression, check_scale, check_spots_in_image
from hespotex.io._decode import read_image
from hespotex.io._image import as_rgb_hwc, rgb_image_element

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

#: Diameter of a Visium spot (µm).
VISIUM_SPOT_DIAMETER_UM = 55.0
#: Centre-to-centre distance of Visium spots (µm).
VISIUM_SPOT_PITCH_UM = 100.0
#: Space Ranger's ``spot_diameter_fullres`` spans a theoretical 65 µm spot (10x documentation).
SPACERANGER_SCALEFACTOR_SPOT_UM = 65.0
#: Relative tolerance when checking a derived scale against the 100 µm spot pitch.
PITCH_TOLERANCE = 0.12


def spot_pitch_px(centres_xy: np.ndarray) -> float | None:
    """Estimate the centre-to-centre distance of adjacent spots (pixels) from spot centres.

    The 5th percentile of nearest-neighbour distances: on a regular array the nearest neighbour of
    almost every spot under tissue is adjacent, and a low percentile stays at the grid pitch even
    when only a sparse subset of spots is present. ``None`` with fewer than two distinct spots.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(centres_xy, dtype=np.float64)[:, :2]
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2:
        return None
    dist, _ = cKDTree(xy).query(xy, k=2)
    nn = dist[:, 1]
    nn = nn[nn > 0]
    if len(nn) == 0:
        return None
    return float(np.percentile(nn, 5))


def visium_microns_per_pixel(
    spot_diameter_fullres: float,
    centres_xy: np.ndarray,
    *,
    reference_um: float = SPACERANGER_SCALEFACTOR_SPOT_UM,
) -> float:
    """Microns per pixel of a Visium sample from ``spot_diameter_fullres``, checked on the spot pitch.

    ``spot_diameter_fullres`` spans ``reference_um`` microns (65 in Space Ranger output, 55 in
    HEST-1k files). The result is checked against the 100 µm Visium spot pitch measured on
    ``centres_xy``: when the pitch fits the other convention instead, that one is used (logged);
    when it fits neither, a ``ValueError`` asks for an explicit ``microns_per_pixel``.
    """
    d = float(spot_diameter_fullres)
    if not np.isfinite(d) or d <= 0:
        msg = f"Expected a positive spot_diameter_fullres in the scale factors, found {spot_diameter_fullres}."
        raise ValueError(msg)
    mpp = reference_um / d
    pitch = spot_pitch_px(centres_xy)
    if pitch is None:
        return mpp
    candidates = [reference_um] + [
        u for u in (SPACERANGER_SCALEFACTOR_SPOT_UM, VISIUM_SPOT_DIAMETER_UM) if u != reference_um
    ]
    for ref in candidates:
        pitch_um = pitch * ref / d
        if abs(pitch_um / VISIUM_SPOT_PITCH_UM - 1.0) <= PITCH_TOLERANCE:
            if ref != reference_um:
                logger.warning(
                    "spot_diameter_fullres = %.2f px matches a %g µm spot here, not %g µm: the %.1f px spot pitch "
                    "is 100 µm only then. Using %.4f µm/px.",
                    d,
                    ref,
                    reference_um,
                    pitch,
                    ref / d,
                )
            return ref / d
    msg = (
        f"The spot centres are {pitch:.1f} px apart, which is not the 100 µm Visium spot pitch at "
        f"{mpp:.4f} µm/px (from spot_diameter_fullres = {d:.2f} px = {reference_um:g} µm): this does not look "
        "like Visium spots at this scale. Pass `microns_per_pixel=` (and the spot diameter) explicitly."
    )
    raise ValueError(msg)


def read_visium(
    path: str | Path,
    *,
    dataset_id: str | None = None,
    fullres_image: str | Path | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    in_tissue_only: bool = True,
    microns_per_pixel: float | None = None,
    **kwargs: Any,
) -> SpatialData:
    """Read a Space Ranger ``outs`` folder as a hespotex sample (via :func:`spatialdata_io.visium`).

    Reads the count matrix, ``spatial/tissue_positions*.csv``, ``spatial/scalefactors_json.json``,
    the hires/lowres PNGs and, when given, the full-resolution image. Nothing is written.

    Parameters
    ----------
    path
        The ``outs`` folder (holding ``filtered_feature_bc_matrix.h5`` and ``spatial/``).
    dataset_id
        Names the elements and the coordinate system. Default: inferred by spatialdata-io from a
        ``{id}_filtered_feature_bc_matrix.h5`` file name, else the folder name (its parent's when
        the folder is called ``outs``), which spatialdata-io needs for the standard file name.
    fullres_image
        Path to the full-resolution H&E image given to Space Ranger, decoded by hespotex's rules (a
        TIFF lazily; bit depth and colour model as in :mod:`hespotex.io._decode`; ``imread_kwargs``
        do not apply to it). Without it the hires PNG is the sample's image (its transformation to
        the dataset coordinate system is a scale).
    counts_file
        Name of the count matrix in ``path``.
    in_tissue_only
        Keep only spots with ``in_tissue == 1`` (matters with ``raw_feature_bc_matrix.h5``).
    microns_per_pixel
        Override the scale; default ``65 / spot_diameter_fullres`` from the scale factors (see the
        module notes), checked against the 100 µm spot pitch.
    **kwargs
        Passed to :func:`spatialdata_io.visium` (``tissue_positions_file``, ``scalefactors_file``,
        ``imread_kwargs``, ...).

    Returns
    -------
    The :class:`spatialdata.SpatialData` of spatialdata-io, completed: coordinate system
    ``dataset_id`` = full-resolution pixels; shapes ``dataset_id`` (spot circles); the image
    element ``{dataset_id}_full_image`` (with ``fullres_image``) or ``{dataset_id}_hires_image``
    re-parsed as RGB ``uint8`` (an alpha channel is dropped), transformations kept; table
    ``"table"`` with ``X`` (counts, CSR ``float32``), ``obsm["spatial"]`` (x = column, y = row,
    full-res px), ``uns["spatial"][dataset_id]["scalefactors"]`` and ``uns["hespotex_sample"]``
    (spot diameter 55 µm).
    """
    import spatialdata_io

    path = Path(path)
    if not path.is_dir():
        msg = f"Expected a Space Ranger `outs` folder, found no folder at {str(path)!r}."
        raise FileNotFoundError(msg)
    if not any(p.name.endswith(counts_file) for p in path.iterdir()):
        msg = (
            f"Expected the count matrix {counts_file!r} (or '<id>_{counts_file}') in {str(path)!r}, found none. "
            "Pass `counts_file=` naming it (e.g. 'raw_feature_bc_matrix.h5')."
        )
        raise FileNotFoundError(msg)
    if dataset_id is None and (path / counts_file).is_file():
        folder = path.resolve()
        name = folder.parent.name if folder.name == "outs" else folder.name
        dataset_id = re.sub(r"[^A-Za-z0-9_.\-]", "_", name).strip("._") or "visium"
        logger.info("read_visium: dataset_id=%r (from the folder name).", dataset_id)
    if fullres_image is not None:
        fullres_image = Path(fullres_image).resolve()
        if not fullres_image.is_file():
            msg = f"Expected the full-resolution image at {str(fullres_image)!r}, found no file there."
            raise FileNotFoundError(msg)
    sdata = spatialdata_io.visium(
        path,
        dataset_id=dataset_id,
        counts_file=counts_file,
        fullres_image_file=None,  # decoded below by hespotex's rules (bit depth, colour model)
        **kwargs,
    )
    table = sdata.tables[TABLE_KEY]
    region = table.uns["spatialdata_attrs"]["region"]
    cs = str(region if isinstance(region, str) else region[0])
    shapes_key = cs

    if in_tissue_only and "in_tissue" in table.obs:
        keep = (table.obs["in_tissue"] == 1).to_numpy()
        if not keep.all():
            logger.info(
                "read_visium: keeping %d of %d spots under tissue (in_tissue == 1).", int(keep.sum()), len(keep)
            )
            table = table[keep].copy()
            shapes = sdata.shapes[shapes_key]
            sdata.shapes[shapes_key] = shapes.loc[table.obs["spot_id"].to_numpy()]

    table.X = check_expression(table.X, pd.Index(table.obs_names), pd.Index(table.var_names), counts=True)
    centres = table.obsm["spatial"] = spot_centres(table, "the tissue positions file (check `tissue_positions_file`)")

    radius = np.asarray(sdata.shapes[shapes_key]["radius"], dtype=np.float64)
    spot_diameter_fullres = float(2.0 * radius[0]) if len(radius) else float("nan")
    if microns_per_pixel is None:
        microns_per_pixel = visium_microns_per_pixel(spot_diameter_fullres, centres)
    logger.info(
        "read_visium: spot_diameter_fullres = %.2f px -> %.4f µm/px; spot diameter %g µm.",
        spot_diameter_fullres,
        microns_per_pixel,
        VISIUM_SPOT_DIAMETER_UM,
    )

    image_key = None
    if fullres_image is not None:
        image_key = f"{cs}_full_image"
        sdata.images[image_key] = _fullres_element(fullres_image, cs)
    elif f"{cs}_hires_image" in sdata.images:
        image_key = f"{cs}_hires_image"
        sdata.images[image_key] = as_rgb_image_element(sdata.images[image_key], name=image_key)
    extent = None
    if image_key is not None:
        extent = image_extent(sdata.images[image_key], cs)
        radius = VISIUM_SPOT_DIAMETER_UM / float(microns_per_pixel) / 2.0 if microns_per_pixel else None
        check_spots_in_image(centres, extent, spot_ids=pd.Index(table.obs_names), radius_px=radius)
    check_scale(microns_per_pixel, VISIUM_SPOT_DIAMETER_UM, image_shape=extent)

    scalefactors = _read_scalefactors(path, kwargs.get("scalefactors_file"))
    spatial = dict(table.uns.get("spatial", {}))
    spatial[cs] = {**dict(spatial.get(cs, {})), "scalefactors": scalefactors}
    table.uns["spatial"] = spatial
    info = SampleInfo(
        sample_id=cs,
        image_key=image_key,
        shapes_key=shapes_key,
        coordinate_system=cs,
        microns_per_pixel=float(microns_per_pixel),
        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
    )
    table.uns[SAMPLE_KEY] = info.to_dict()
    table.uns["hespotex_io"] = {"reader": "read_visium", "path": str(path.resolve()), "counts_file": counts_file}
    sdata.tables[TABLE_KEY] = table
    return sdata


def as_rgb_image_element(element: Any, *, name: str = "image") -> Any:
    """Re-parse an image element as RGB ``uint8`` (alpha dropped, grayscale repeated), keeping its transformations."""
    from spatialdata import get_pyramid_levels
    from spatialdata.transformations import get_transformation
    from xarray import DataArray

    transformations = get_transformation(element, get_all=True)
    level0 = element if isinstance(element, DataArray) else get_pyramid_levels(element, n=0)
    dims = tuple(level0.dims)
    if dims != ("c", "y", "x"):
        msg = f"Expected a 2D image element with dims ('c', 'y', 'x'), found {dims} for {name!r}."
        raise ValueError(msg)
    rgb = as_rgb_hwc(level0.data.transpose(1, 2, 0), name=name)
    return rgb_image_element(rgb, transformations)


def _fullres_element(path: Path, cs: str) -> Any:
    """The full-resolution image as an RGB ``uint8`` multiscale element mapped to ``cs`` by the identity."""
    from spatialdata.transformations import Identity

    rgb = read_image(path, name=f"full-resolution image {path.name}")
    return rgb_image_element(rgb, {cs: Identity()})


def image_extent(element: Any, coordinate_system: str) -> tuple[int, int]:
    """``(height, width)`` of an image element mapped into ``coordinate_system`` (origin at 0)."""
    from spatialdata import get_pyramid_levels
    from spatialdata.transformations import get_transformation
    from xarray import DataArray

    level0 = element if isinstance(element, DataArray) else get_pyramid_levels(element, n=0)
    h, w = int(level0.sizes["y"]), int(level0.sizes["x"])
    affine = get_transformation(element, to_coordinate_system=coordinate_system).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    corner = affine @ np.array([w, h, 1.0])
    return int(np.floor(corner[1])), int(np.floor(corner[0]))


def _read_scalefactors(path: Path, scalefactors_file: str | Path | None) -> dict[str, float]:
    file = path / scalefactors_file if scalefactors_file is not None else path / "spatial" / "scalefactors_json.json"
    if not file.is_file():
        return {}
    return {k: float(v) for k, v in json.loads(file.read_text()).items() if isinstance(v, (int, float))}


def spot_centres(table: Any, source: str) -> np.ndarray:
    """The ``(x, y)`` spot centres of a table read by spatialdata-io (``obsm["spatial"]``, first two columns);
    a clear error naming ``source`` when barcodes of the count matrix have no position there."""
    centres = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
    if not np.isfinite(centres).all():
        bad = ~np.isfinite(centres).all(axis=1)
        msg = (
            f"{int(bad.sum())} barcodes of the count matrix have no position in {source}, "
            f"e.g. {list(table.obs_names[bad][:5])}. Expected every barcode to be listed."
        )
        raise ValueError(msg)
    return centres
