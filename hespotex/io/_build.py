"""Assemble a checked sample (SpatialData) from an image, spot centres and a count table."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hespotex._sample import SAMPLE_KEY, TABLE_KEY, SampleInfo
from hespotex.io._image import as_rgb_hwc, rgb_image_element

logger = logging.getLogger("hespotex")

#: Plausible physical ranges; anything outside is almost surely a unit mistake.
MPP_RANGE = (0.05, 50.0)  # microns per pixel
SPOT_DIAMETER_UM_RANGE = (0.5, 1000.0)


def check_scale(
    microns_per_pixel: float | None, spot_diameter_um: float | None, *, image_shape: tuple[int, int] | None = None
) -> None:
    """Raise a ``ValueError`` when microns per pixel or the spot diameter is missing or absurd."""
    if microns_per_pixel is None:
        msg = (
            "Microns per pixel is unknown for this sample. Pass `microns_per_pixel=` "
            "(0.2-1.0 for most H&E scans) or a spot diameter in pixels with its size in µm."
        )
        raise ValueError(msg)
    if spot_diameter_um is None:
        msg = "The spot diameter is unknown. Pass `spot_diameter_um=` (55 for Visium, 100 for legacy ST)."
        raise ValueError(msg)
    mpp, d_um = float(microns_per_pixel), float(spot_diameter_um)
    if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        msg = f"Expected microns per pixel within {MPP_RANGE}, found {mpp}. Check the unit (µm, not mm or nm)."
        raise ValueError(msg)
    if not (SPOT_DIAMETER_UM_RANGE[0] <= d_um <= SPOT_DIAMETER_UM_RANGE[1]):
        msg = f"Expected a spot diameter within {SPOT_DIAMETER_UM_RANGE} µm, found {d_um}. Check the unit."
        raise ValueError(msg)
    if image_shape is not None:
        d_px = d_um / mpp
        if d_px < 2 or d_px > max(image_shape):
            msg = (
                f"A spot of {d_um} µm at {mpp} µm/px is {d_px:.1f} px wide, absurd for an image of "
                f"{image_shape[1]} x {image_shape[0]} px. Check `microns_per_pixel` and `spot_diameter_um`."
            )
            raise ValueError(msg)


def check_expression(x: Any, obs_names: pd.Index, var_names: pd.Index, *, counts: bool) -> sp.csr_matrix:
    """Check an expression matrix and return it as CSR ``float32``.

    Raises on an empty table, duplicated barcodes or genes, NaN, negative values, and (with
    ``counts=True``) non-integer values.
    """
    if len(obs_names) == 0:
        msg = "The section is empty: no spots in the count table (after matching to the spot table)."
        raise ValueError(msg)
    for what, names, fix in (
        ("barcodes/spot ids", obs_names, "obs_names_make_unique()"),
        ("genes", var_names, "var_names_make_unique()"),
    ):
        dup = names[names.duplicated()]
        if len(dup):
            msg = (
                f"Expected unique {what}, found {len(dup)} duplicated, e.g. {list(dup[:5])}. Deduplicate them "
                f"(AnnData.{fix}) first."
            )
            raise ValueError(msg)
    mat = sp.csr_matrix(x, dtype=np.float32) if not sp.issparse(x) else sp.csr_matrix(x).astype(np.float32)
    data = mat.data
    if not np.isfinite(data).all():
        msg = (
            f"The expression table holds {int((~np.isfinite(data)).sum())} NaN or infinite values; expected finite "
            "numbers. Fill or drop them first."
        )
        raise ValueError(msg)
    if (data < 0).any():
        msg = f"The expression table holds {int((data < 0).sum())} negative values; expected counts (>= 0)."
        raise ValueError(msg)
    if counts and not np.allclose(data, np.round(data)):
        msg = (
            "Expected raw integer counts, found non-integer values. If the table is already normalised, pass "
            "`counts=False`."
        )
        raise ValueError(msg)
    return mat


def check_spots_in_image(
    centres_xy: np.ndarray,
    image_shape: tuple[int, int],
    *,
    spot_ids: pd.Index | None = None,
    radius_px: float | None = None,
) -> None:
    """Raise when a spot centre lies outside the image (``image_shape`` is ``(height, width)``).

    With ``radius_px``, spots whose centre is inside but whose circle crosses the image edge get a
    warning with their count (their patches are padded with white).
    """
    h, w = image_shape
    x, y = centres_xy[:, 0], centres_xy[:, 1]
    bad = (x < 0) | (y < 0) | (x >= w) | (y >= h) | ~np.isfinite(x) | ~np.isfinite(y)
    if bad.any():
        ids = list(spot_ids[bad][:5]) if spot_ids is not None else list(np.flatnonzero(bad)[:5])
        msg = (
            f"{int(bad.sum())} of {len(bad)} spot centres lie outside the image ({w} x {h} px), e.g. {ids}. "
            "Expected centres as (x = column, y = row) in full-resolution pixels of this image; check the "
            "coordinate columns, or the scale factor if the image is a downscaled copy."
        )
        raise ValueError(msg)
    if radius_px is not None and radius_px > 0:
        r = float(radius_px)
        edge = (x - r < 0) | (y - r < 0) | (x + r > w) | (y + r > h)
        if edge.any():
            ids = list(spot_ids[edge][:5]) if spot_ids is not None else list(np.flatnonzero(edge)[:5])
            logger.warning(
                "%d of %d spots lie partly outside the image (%d x %d px; spot radius %.1f px), e.g. %s; "
                "their patches are padded with white.",
                int(edge.sum()),
                len(edge),
                w,
                h,
                r,
                ids,
            )


def build_sample(
    image: Any,
    centres_xy: np.ndarray,
    expression: Any,
    *,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    sample_id: str,
    microns_per_pixel: float,
    spot_diameter_um: float,
    counts: bool = True,
    uns: dict[str, Any] | None = None,
    obsm: dict[str, np.ndarray] | None = None,
):
    """Build a checked sample: image ``{sample_id}_image``, spot circles ``{sample_id}_spots``, table ``"table"``.

    Parameters
    ----------
    image
        H&E image ``(height, width, channels)`` (numpy/dask array or file path), or ``None`` for a
        sample without pixels (then only graph and expression work).
    centres_xy
        ``(n_spots, 2)`` spot centres, ``x`` = column and ``y`` = row, in full-resolution pixels.
    expression
        ``(n_spots, n_genes)`` counts (or normalised values with ``counts=False``).
    obs, var
        Spot and gene annotations; their indexes are the barcodes and the gene symbols.

    Returns
    -------
    A :class:`spatialdata.SpatialData` whose table holds ``X`` (CSR ``float32``),
    ``obsm["spatial"]``, ``obs["region"]`` / ``obs["spot_id"]`` linking to the shapes, and
    ``uns["hespotex_sample"]`` (:class:`~hespotex._sample.SampleInfo`).

    Reads only its arguments; writes nothing else (no file).
    """
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    centres_xy = np.asarray(centres_xy, dtype=np.float64)
    if centres_xy.ndim != 2 or centres_xy.shape[1] != 2 or len(centres_xy) != len(obs):
        msg = f"Expected spot centres of shape ({len(obs)}, 2), found {centres_xy.shape}."
        raise ValueError(msg)
    if not np.isfinite(centres_xy).all():
        msg = (
            f"{int((~np.isfinite(centres_xy)).any(axis=1).sum())} spot centres are NaN or infinite; drop those "
            "spots first."
        )
        raise ValueError(msg)
    taken = [c for c in ("region", "spot_id") if c in obs.columns]
    if taken:
        msg = (
            f"obs already has column(s) {taken}, which hespotex uses to link the table to its spots; rename them first."
        )
        raise ValueError(msg)
    x = check_expression(expression, pd.Index(obs.index.astype(str)), pd.Index(var.index.astype(str)), counts=counts)
    cs = str(sample_id)
    shapes_key, image_key = f"{cs}_spots", f"{cs}_image"
    images = {}
    image_shape = None
    if image is not None:
        rgb = as_rgb_hwc(image)
        image_shape = tuple(int(s) for s in rgb.shape[:2])
        radius = (
            float(spot_diameter_um) / float(microns_per_pixel) / 2.0 if microns_per_pixel and spot_diameter_um else None
        )
        check_spots_in_image(centres_xy, image_shape, spot_ids=pd.Index(obs.index), radius_px=radius)
        images[image_key] = rgb_image_element(rgb, {cs: Identity()})
    check_scale(microns_per_pixel, spot_diameter_um, image_shape=image_shape)
    info = SampleInfo(
        sample_id=cs,
        image_key=image_key if images else None,
        shapes_key=shapes_key,
        coordinate_system=cs,
        microns_per_pixel=float(microns_per_pixel),
        spot_diameter_um=float(spot_diameter_um),
    )
    n = len(obs)
    obs = obs.copy()
    obs.index = obs.index.astype(str)
    obs["region"] = pd.Categorical([shapes_key] * n)
    obs["spot_id"] = np.arange(n)
    var = var.copy()
    var.index = var.index.astype(str)
    table = AnnData(X=x, obs=obs, var=var)
    table.obsm["spatial"] = centres_xy
    for key, value in (obsm or {}).items():
        table.obsm[key] = value
    table.uns.update(uns or {})
    table.uns[SAMPLE_KEY] = info.to_dict()
    table = TableModel.parse(table, region=shapes_key, region_key="region", instance_key="spot_id")
    radius = np.full(n, info.spot_diameter_px / 2.0)
    shapes = ShapesModel.parse(
        centres_xy, geometry=0, radius=radius, index=np.arange(n), transformations={cs: Identity()}
    )
    return SpatialData(images=images, shapes={shapes_key: shapes}, tables={TABLE_KEY: table})
