"""Pseudo-spots over the tissue of an image-only slide, with the geometry a model was trained on."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from hespotex._compat import renamed_arguments
from hespotex._constants import TILE_KEY
from hespotex._sample import SAMPLE_KEY, TABLE_KEY

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

__all__ = ["tile"]

_MAX_RASTER_PIXELS = 40_000_000
_MPP_RATIO_WARN = 2.0  # warn when the slide's µm/px differs from the training data's by more than this factor


def _model_record(model: Any) -> tuple[dict[str, float], dict[str, Any], str]:
    """``spot_geometry`` and ``embedding`` of a HESpotEx or a saved model folder (its setup.json only: no torch)."""
    if isinstance(model, str) and model.startswith("hf-hub:"):
        from hespotex.tl.model._resolve import model_folder

        model = model_folder(model)  # the Hub snapshot in the local cache (downloaded when online)
    if isinstance(model, (str, Path)):
        setup_path = Path(model) / "setup.json"
        if not setup_path.is_file() and (Path(model) / "ensemble.json").is_file():  # an ensemble: its first member
            try:
                first = json.loads((Path(model) / "ensemble.json").read_text())["members"][0]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
                msg = f"The ensemble folder {str(model)!r} is corrupt ({err!r}); save the ensemble again."
                raise ValueError(msg) from err
            setup_path = Path(model) / str(first) / "setup.json"
        if not setup_path.is_file():
            msg = f"Expected a saved hespotex model folder at {str(model)!r} (with setup.json), found none."
            raise FileNotFoundError(msg)
        try:
            setup = json.loads(setup_path.read_text())
        except json.JSONDecodeError as err:
            msg = f"The model folder {str(model)!r} is corrupt ({err}); save the model again."
            raise ValueError(msg) from err
        return dict(setup.get("spot_geometry") or {}), dict(setup.get("embedding") or {}), str(model)
    geometry = getattr(model, "spot_geometry", None)
    if geometry is None:
        msg = f"Expected `model` as a HESpotEx or a saved model folder, found {type(model).__name__}."
        raise TypeError(msg)
    return dict(geometry), dict(getattr(model, "embedding", {}) or {}), repr(model)


def _geometry(
    spot_diameter_um: float | None, spacing_um: float | None, model: Any
) -> tuple[float, float, dict[str, Any]]:
    geometry: dict[str, Any] = {}
    embedding: dict[str, Any] = {}
    source = "arguments"
    if model is not None:
        geometry, embedding, name = _model_record(model)
        source = f"model {name}"
        for arg, key in ((spot_diameter_um, "spot_diameter_um"), (spacing_um, "spacing_um")):
            trained = geometry.get(key)
            if arg is not None and trained is not None and not math.isclose(float(arg), float(trained), rel_tol=0.05):
                logger.warning("tile: `%s=%g` overrides the model's training geometry (%g µm).", key, arg, trained)
    d = spot_diameter_um if spot_diameter_um is not None else geometry.get("spot_diameter_um")
    s = spacing_um if spacing_um is not None else geometry.get("spacing_um")
    if d is None or s is None or not (math.isfinite(float(d)) and math.isfinite(float(s))):
        found = "the model records none" if model is not None else "no model was given"
        msg = (
            f"The tile geometry is incomplete (spot diameter {d}, spacing {s} µm; {found}). Pass "
            "`spot_diameter_um=` and `spacing_um=` (Visium: 55 and 100; legacy ST: 100 and 200), or "
            "`model=` a trained HESpotEx that records them."
        )
        raise ValueError(msg)
    d, s = float(d), float(s)
    if d <= 0 or s <= 0:
        msg = f"Expected a positive spot diameter and spacing, found {d} and {s} µm."
        raise ValueError(msg)
    return d, s, {"source": source, "geometry": geometry, "embedding": embedding}


def _lattice(
    bounds: tuple[float, float, float, float], spacing: float, layout: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres ``(n, 2)`` (x, y) covering ``bounds`` and their ``array_row`` / ``array_col`` indices."""
    x0, y0, x1, y1 = bounds
    if layout == "hex":
        dy = spacing * math.sqrt(3.0) / 2.0
        rows = np.arange(math.floor((y1 - y0) / dy) + 2)
        cols = np.arange(math.floor((x1 - x0) / spacing) + 2)
        r, c = np.meshgrid(rows, cols, indexing="ij")
        x = x0 + c * spacing + (r % 2) * spacing / 2.0
        y = y0 + r * dy
        array_col = 2 * c + (r % 2)  # Visium convention: neighbours in a row are 2 columns apart
    elif layout == "grid":
        rows = np.arange(math.floor((y1 - y0) / spacing) + 2)
        cols = np.arange(math.floor((x1 - x0) / spacing) + 2)
        r, c = np.meshgrid(rows, cols, indexing="ij")
        x, y = x0 + c * spacing, y0 + r * spacing
        array_col = c
    else:
        msg = f"Expected layout 'hex' or 'grid', found {layout!r}."
        raise ValueError(msg)
    return np.c_[x.ravel(), y.ravel()], r.ravel(), array_col.ravel()


def _rasterize(polygons: list[Any], bounds: tuple[float, float, float, float], res: float) -> np.ndarray:
    """Boolean raster of ``polygons`` (with holes) on a grid of ``res`` units per cell starting at ``bounds[:2]``.

    Filled with Pillow's scan-line polygon fill (linear in pixels plus edges; cells the outline passes
    through count as inside): tissue outlines have thousands of vertices, where per-pixel
    point-in-polygon tests took seconds per ring on a 100k-spot slide.
    """
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = bounds
    shape = (math.ceil((y1 - y0) / res) + 1, math.ceil((x1 - x0) / res) + 1)
    image = Image.new("1", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(image)

    def ring(coords: Any, value: int) -> None:
        xy = (np.asarray(coords)[:, :2] - (x0, y0)) / res - 0.5  # cell centres at integer coordinates
        draw.polygon([tuple(p) for p in xy.tolist()], fill=value)

    for poly in sorted(polygons, key=lambda p: -p.area):  # islands inside holes are drawn after the holes
        ring(poly.exterior.coords, 1)
        for hole in poly.interiors:
            ring(hole.coords, 0)
    return np.asarray(image, dtype=bool)


def _disc_offsets(radius: float, n_rings: int = 3) -> np.ndarray:
    """Sample points of a disc (hexagonal rings; 37 points for 3 rings), relative to its centre."""
    pts = [(0.0, 0.0)]
    for k in range(1, n_rings + 1):
        rho = radius * k / (n_rings + 0.5)
        n = 6 * k
        angles = np.arange(n) * 2 * math.pi / n
        pts.extend(zip(rho * np.cos(angles), rho * np.sin(angles), strict=True))
    return np.asarray(pts)


def _tissue_fraction(
    centres: np.ndarray, polygons: list[Any], radius: float, bounds: tuple[float, float, float, float]
) -> np.ndarray:
    """Fraction of each spot disc (sampled at 37 points) that lies on tissue."""
    x0, y0, x1, y1 = bounds
    res = max(radius / 4.0, math.sqrt((x1 - x0 + 1) * (y1 - y0 + 1) / _MAX_RASTER_PIXELS))
    raster = _rasterize(polygons, bounds, res)
    out = np.zeros(len(centres), dtype=np.float32)
    offsets = _disc_offsets(radius)
    for start in range(0, len(centres), 100_000):
        c = centres[start : start + 100_000]
        px = ((c[:, None, 0] + offsets[None, :, 0] - x0) / res).astype(np.int64)
        py = ((c[:, None, 1] + offsets[None, :, 1] - y0) / res).astype(np.int64)
        ok = (px >= 0) & (py >= 0) & (px < raster.shape[1]) & (py < raster.shape[0])
        hit = np.zeros(px.shape, dtype=bool)
        hit[ok] = raster[py[ok], px[ok]]
        out[start : start + len(c)] = hit.mean(axis=1)
    return out


def _check_scale(mpp: float, diameter_um: float, record: dict[str, Any], sid: str) -> None:
    """Warn when the slide's resolution is far from the training data's, or too coarse for the encoder input."""
    trained = record["geometry"].get("microns_per_pixel") or record["embedding"].get("microns_per_pixel")
    if trained:
        ratio = mpp / float(trained)
        if ratio > _MPP_RATIO_WARN or ratio < 1 / _MPP_RATIO_WARN:
            logger.warning(
                "tile %s: the slide has %.3g µm/px, the model's training slides %.3g µm/px (%.1fx). Patches "
                "are still cut "
                "at the trained size in µm and resampled to the encoder input, but predictions may suffer from the "
                "change in resolution.",
                sid,
                mpp,
                float(trained),
                ratio,
            )
    patch_um, input_size = record["embedding"].get("patch_um"), record["embedding"].get("input_size")
    if patch_um and input_size and mpp > 1.5 * float(patch_um) / float(input_size):
        logger.warning(
            "tile %s: the slide has %.3g µm/px, coarser than the %.3g µm/px the model's encoder input sees (%g µm "
            "patches at %d px); patches will be upsampled.",
            sid,
            mpp,
            float(patch_um) / float(input_size),
            float(patch_um),
            int(input_size),
        )
    if diameter_um / mpp < 4:
        logger.warning(
            "tile %s: a %g µm spot is only %.1f px wide at %.3g µm/px.", sid, diameter_um, diameter_um / mpp, mpp
        )


@renamed_arguments("pp.tile")
def tile(
    sdata: SpatialData,
    *,
    spot_diameter_um: float | None = None,
    spacing_um: float | None = None,
    model: Any = None,
    layout: Literal["hex", "grid"] = "hex",
    tissue_key: str | None = None,
    min_tissue_fraction: float = 0.5,
    key_added: str = TABLE_KEY,
    overwrite: bool = False,
) -> AnnData:
    """Lay pseudo-spots over the tissue of a slide, with a table ready for :func:`hespotex.tl.predict`.

    Spots of ``spot_diameter_um`` are laid ``spacing_um`` apart (centre to centre) on a hexagonal
    (Visium-like) or square lattice anchored at the top-left corner of the tissue's bounding box; a spot
    is kept when at least ``min_tissue_fraction`` of its disc lies on the tissue polygons (sampled at
    37 points on a raster of the polygons) and its centre lies inside the image.

    Parameters
    ----------
    sdata
        A slide from :func:`hespotex.io.read_wsi` (or any hespotex sample with an image).
    spot_diameter_um, spacing_um
        Spot geometry in µm; default: the model's training geometry (``model.spot_geometry``).
        Arguments override the model (with a warning when they differ by more than 5 %).
    model
        A trained :class:`hespotex.tl.HESpotEx` or the folder of a saved one: supplies the geometry,
        and its recorded resolution is compared with the slide's (a warning when more than 2x apart, or
        when the slide is coarser than the encoder input; :func:`hespotex.pp.embed` still cuts patches at
        the trained size in µm and resamples them).
    layout
        ``"hex"`` (rows ``spacing * sqrt(3) / 2`` apart, odd rows shifted by half a spacing; ``array_col``
        counts half-spacings as Visium does) or ``"grid"`` (square).
    tissue_key
        Shapes element of tissue polygons; default ``f"{sample_id}_tissue"``, computed by
        :func:`hespotex.pp.detect_tissue` with its defaults when absent (and stored there).
    min_tissue_fraction
        Smallest fraction of a spot's disc on tissue for the spot to be kept, in ``[0, 1]``.
    key_added
        Key of the new table (:func:`hespotex.tl.predict` reads ``"table"``; formerly ``table_key``).
    overwrite
        Replace existing spots ``{sample_id}_spots`` and table ``key_added``; tables annotating the
        old spots (e.g. earlier predictions) are removed with them (a warning names them).

    Returns
    -------
    The new table, also stored in the SpatialData. Written:

    - ``sdata.shapes[f"{sample_id}_spots"]``: circles (radius = half the spot diameter, full-resolution px)
      in the coordinate system ``sample_id``;
    - ``sdata.tables[key_added]``: zero genes; ``obs_names`` ``f"{sample_id}_{i}"``; ``obs["array_row"]``,
      ``obs["array_col"]`` (lattice indices), ``obs["tissue_fraction"]``; ``obs["region"]`` /
      ``obs["spot_id"]`` linking to the circles (spatialdata region / instance keys);
      ``obsm["spatial"]`` (x = column, y = row, full-resolution px); ``uns["hespotex_sample"]`` (sample
      info: microns per pixel, spot diameter, element keys); ``uns["hespotex_tile"]`` (the parameters,
      the geometry's source, the number of tiles);
    - ``sdata.shapes[tissue_key]`` when tissue had to be detected first.
    """
    import scipy.sparse as sp

    from hespotex.io._build import build_sample, check_spots_in_image
    from hespotex.pp._tissue import detect_tissue, tissue_levels

    if not 0.0 <= float(min_tissue_fraction) <= 1.0:
        msg = f"Expected min_tissue_fraction in [0, 1], found {min_tissue_fraction}."
        raise ValueError(msg)
    if layout not in ("hex", "grid"):
        msg = f"Expected layout 'hex' or 'grid', found {layout!r}."
        raise ValueError(msg)
    diameter_um, spacing, record = _geometry(spot_diameter_um, spacing_um, model)
    slide, levels = tissue_levels(sdata)
    sid, cs, mpp = slide["sample_id"], slide["coordinate_system"], float(slide["microns_per_pixel"])
    shapes_key = f"{sid}_spots"
    taken = [f"shapes {shapes_key!r}"] * (shapes_key in sdata.shapes) + [f"table {key_added!r}"] * (
        key_added in sdata.tables
    )
    if taken and not overwrite:
        msg = (
            f"The SpatialData already has {' and '.join(taken)}; pass `overwrite=True` to replace them (and tables "
            "annotating the old spots)."
        )
        raise ValueError(msg)
    _check_scale(mpp, diameter_um, record, sid)
    tissue_key = tissue_key or f"{sid}_tissue"
    if tissue_key not in sdata.shapes:
        logger.info("tile %s: no tissue shapes %r; detecting tissue with the defaults.", sid, tissue_key)
        detect_tissue(sdata, key_added=tissue_key)
    tissue = sdata.shapes[tissue_key]
    polygons = [
        g for geom in tissue.geometry for g in getattr(geom, "geoms", [geom]) if g.geom_type == "Polygon" and g.area > 0
    ]
    if not polygons:
        msg = (
            f"The tissue shapes {tissue_key!r} hold no polygons; run hx.pp.detect_tissue(sdata, overwrite=True) or "
            "pass another `tissue_key`."
        )
        raise ValueError(msg)
    _check_tissue_transform(tissue, cs, tissue_key)
    diameter_px, spacing_px = diameter_um / mpp, spacing / mpp
    bounds = tuple(float(b) for b in tissue.total_bounds)
    centres, array_row, array_col = _lattice(bounds, spacing_px, layout)
    h, w = levels[0].shape
    h_cs, w_cs = h / levels[0].scale[1], w / levels[0].scale[0]
    inside = (centres[:, 0] >= 0) & (centres[:, 1] >= 0) & (centres[:, 0] < w_cs) & (centres[:, 1] < h_cs)
    centres, array_row, array_col = centres[inside], array_row[inside], array_col[inside]
    fraction = _tissue_fraction(centres, polygons, diameter_px / 2.0, bounds)
    keep = fraction >= float(min_tissue_fraction) if min_tissue_fraction > 0 else fraction > 0
    if not keep.any():
        msg = (
            f"No {diameter_um:g} µm spot {spacing:g} µm apart has {min_tissue_fraction:.0%} of its area on the tissue "
            f"{tissue_key!r} of {sid!r}. Lower `min_tissue_fraction=`, or check the tissue mask and the slide's "
            f"{mpp:g} µm/px."
        )
        raise ValueError(msg)
    centres, array_row, array_col, fraction = centres[keep], array_row[keep], array_col[keep], fraction[keep]
    n = len(centres)
    obs_names = pd.Index([f"{sid}_{i}" for i in range(n)])
    check_spots_in_image(centres, (math.floor(h_cs), math.floor(w_cs)), spot_ids=obs_names)
    obs = pd.DataFrame(
        {"array_row": array_row.astype(np.int64), "array_col": array_col.astype(np.int64), "tissue_fraction": fraction},
        index=obs_names,
    )
    built = build_sample(
        None,
        centres,
        sp.csr_matrix((n, 0), dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index([], dtype=str)),
        sample_id=sid,
        microns_per_pixel=mpp,
        spot_diameter_um=diameter_um,
    )
    table = built.tables[TABLE_KEY]
    table.uns[SAMPLE_KEY]["image_key"] = slide["image_key"]
    table.uns[SAMPLE_KEY]["coordinate_system"] = cs
    if key_added != TABLE_KEY:
        table.uns[SAMPLE_KEY]["table_key"] = key_added
    table.uns[TILE_KEY] = {
        "spot_diameter_um": diameter_um,
        "spacing_um": spacing,
        "layout": layout,
        "tissue_key": tissue_key,
        "min_tissue_fraction": float(min_tissue_fraction),
        "geometry_source": record["source"],
        "n_tiles": n,
    }
    if overwrite:
        _drop_old(sdata, shapes_key, key_added)
    sdata.shapes[shapes_key] = built.shapes[shapes_key]
    sdata.tables[key_added] = table
    logger.info(
        "tile %s: %d pseudo-spots of %g µm, %g µm apart (%s), on tissue %r.",
        sid,
        n,
        diameter_um,
        spacing,
        layout,
        tissue_key,
    )
    return table


def _check_tissue_transform(tissue: Any, cs: str, key: str) -> None:
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(tissue, get_all=True)
    if cs not in transforms:
        msg = f"The tissue shapes {key!r} are not in the slide's coordinate system {cs!r} (found {list(transforms)})."
        raise ValueError(msg)
    matrix = np.asarray(transforms[cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))
    if not np.allclose(matrix, np.eye(3)):
        msg = (
            f"The tissue shapes {key!r} must be in full-resolution pixels of {cs!r} (identity transformation); "
            f"found {matrix.tolist()}."
        )
        raise ValueError(msg)


def _drop_old(sdata: SpatialData, shapes_key: str, table_key: str) -> None:
    stale = [
        k
        for k, t in sdata.tables.items()
        if k != table_key and shapes_key in np.atleast_1d(t.uns.get("spatialdata_attrs", {}).get("region", [])).tolist()
    ]
    if stale:
        logger.warning("tile: removing tables %s, which annotate the replaced spots %r.", stale, shapes_key)
    for key in [*stale, table_key]:
        if key in sdata.tables:
            del sdata.tables[key]
    if shapes_key in sdata.shapes:
        del sdata.shapes[shapes_key]
