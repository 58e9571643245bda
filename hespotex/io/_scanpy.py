"""Turn an AnnData in the scanpy / squidpy Visium convention (or HEST's) into a hespotex sample.

The convention (``scanpy.read_visium``, ``squidpy.read.visium``, HEST-1k h5ad files):

- ``obsm["spatial"]``: spot centres ``(x = column, y = row)`` in pixels of the *full-resolution* image;
- ``uns["spatial"][library_id]["images"][name]``: downscaled copies of that image (``"hires"``,
  ``"lowres"``; HEST: ``"downscaled_fullres"``), as ``(h, w, c)`` arrays (scanpy: float in [0, 1]);
- ``uns["spatial"][library_id]["scalefactors"]``: ``tissue_{name}_scalef`` (image pixels per
  full-resolution pixel) and ``spot_diameter_fullres``.

:func:`from_scanpy` keeps the full-resolution pixel frame as the sample's coordinate system (as
:func:`hespotex.io.read_visium` does): the spots are circles in that frame and the chosen image element
maps into it by a scale of ``1 / tissue_{name}_scalef``. ``spatialdata_io.experimental.from_legacy_anndata``
reads the same convention, but gives every image its own coordinate system with the spots scaled into it
and a 10 px spot when the diameter is missing; the sample contract wants one frame with a physical scale,
so the table and spots are built by :func:`hespotex.io.from_anndata` and only the image element is added here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._sample import SAMPLE_KEY, TABLE_KEY, get_sample_info
from hespotex.io._anndata import check_sample_id, from_anndata, spatial_centres
from hespotex.io._visium import PITCH_TOLERANCE, VISIUM_SPOT_DIAMETER_UM, VISIUM_SPOT_PITCH_UM, spot_pitch_px

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

#: Relative tolerance when checking a full-resolution image against the size a downscaled copy implies.
FRAME_TOLERANCE = 0.02

NO_IMAGE_HELP = (
    "Supply the H&E image in one of three ways: (1) pass the full-resolution image as `image=` (a file path or an "
    "(h, w, 3) array whose pixels obsm['spatial'] refers to, with `microns_per_pixel=` when it cannot be derived); "
    "(2) keep the images of `sc.read_visium` / `squidpy.read.visium` in uns['spatial'][library_id]['images'] "
    "with their scale factors; (3) compute the embeddings beforehand with `hx.pp.embed` on a SpatialData of the "
    "section (e.g. `hx.io.read_visium`) and copy obsm['X_hespotex_image'] and uns['hespotex_embed'] into this AnnData."
)


def spatial_library(adata: AnnData, library_id: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """``(library_id, uns["spatial"][library_id])`` of a scanpy-style AnnData; ``(None, {})`` without
    ``uns["spatial"]``.

    With several libraries, ``library_id`` must name one, and the AnnData must hold only its spots
    (checked on ``obs["library_id"]`` when present).
    """
    spatial = adata.uns.get("spatial")
    libraries = [str(k) for k, v in spatial.items() if isinstance(v, Mapping)] if isinstance(spatial, Mapping) else []
    if library_id is None:
        if len(libraries) > 1:
            msg = (
                f"Expected one library in uns['spatial'], found {libraries}. Pass `library_id=` naming the section, "
                "on an AnnData holding only its spots (e.g. adata[adata.obs['library_id'] == lib].copy())."
            )
            raise ValueError(msg)
        if not libraries:
            return None, {}
        library_id = libraries[0]
    elif libraries and str(library_id) not in libraries:
        msg = f"Expected library_id among uns['spatial'] libraries {libraries}, found {library_id!r}."
        raise KeyError(msg)
    if "library_id" in adata.obs and adata.obs["library_id"].nunique() > 1:
        found = sorted(map(str, adata.obs["library_id"].unique()))
        msg = (
            f"This AnnData holds spots of several sections (obs['library_id'] has {found}); a sample is one section. "
            f"Subset it first: adata[adata.obs['library_id'] == {library_id!r}].copy()."
        )
        raise ValueError(msg)
    return str(library_id), dict(spatial[library_id]) if libraries else {}


def _scalefactors(entry: Mapping) -> dict[str, float]:
    raw = entry.get("scalefactors")
    out = {}
    for k, v in raw.items() if isinstance(raw, Mapping) else ():
        value = np.asarray(v)
        if value.size == 1 and value.dtype.kind in "iuf" and np.isfinite(value):
            out[str(k)] = float(value)
    return out


def downscaled_images(entry: Mapping) -> list[tuple[str, Any, float]]:
    """``[(name, array, scale factor)]`` of the images in a library entry, highest resolution first.

    The scale factor of image ``name`` is ``scalefactors[f"tissue_{name}_scalef"]`` (``name`` itself as a
    fallback, as ``spatialdata_io`` reads it); images without one cannot be placed and are skipped (logged).
    """
    images = entry.get("images")
    factors = _scalefactors(entry)
    out = []
    for name, array in images.items() if isinstance(images, Mapping) else ():
        scalef = factors.get(f"tissue_{name}_scalef", factors.get(str(name)))
        if scalef is None or scalef <= 0:
            logger.warning("uns['spatial'] image %r has no scale factor 'tissue_%s_scalef'; not used.", name, name)
            continue
        if not hasattr(array, "shape") or len(array.shape) not in (2, 3):
            logger.warning("uns['spatial'] image %r is not an (h, w, c) array; not used.", name)
            continue
        out.append((str(name), array, float(scalef)))
    return sorted(out, key=lambda t: -t[2])


def has_image(adata: AnnData, library_id: str | None = None) -> bool:
    """Whether ``uns["spatial"]`` holds an image that :func:`from_scanpy` can place."""
    try:
        _, entry = spatial_library(adata, library_id)
    except (KeyError, ValueError):
        return False
    return bool(downscaled_images(entry))


def square_grid(centres: np.ndarray) -> bool:
    """Whether the spots lie on a square grid (legacy ST) rather than Visium's hexagonal array.

    The directions between adjacent spots (within 1.3 spot pitches) repeat every 90° on a square grid and
    every 60° on a hexagonal one, whatever the image's rotation: the mean of ``exp(4iθ)`` is near 1 and that
    of ``exp(6iθ)`` near 0 on a square grid, the reverse on Visium (her2st: 0.98-0.99 / 0.05-0.14; Visium:
    0.03-0.15 / 1.0). Undecided (``False``) with fewer than 10 adjacent pairs.
    """
    from scipy.spatial import cKDTree

    pitch = spot_pitch_px(centres)
    if pitch is None:
        return False
    pairs = cKDTree(centres).query_pairs(1.3 * pitch, output_type="ndarray")
    if len(pairs) < 10:
        return False
    d = centres[pairs[:, 1]] - centres[pairs[:, 0]]
    theta = np.arctan2(d[:, 1], d[:, 0])
    return bool(abs(np.exp(4j * theta).mean()) > 0.8 and abs(np.exp(6j * theta).mean()) < 0.5)


def _scale(
    adata: AnnData, factors: dict[str, float], centres: np.ndarray, microns_per_pixel: float | None,
    spot_diameter_um: float | None,
) -> tuple[float, float]:  # fmt: skip
    """µm per full-resolution pixel and spot diameter in µm, given or derived from ``spot_diameter_fullres``."""
    from hespotex.io._visium import visium_microns_per_pixel

    d = factors.get("spot_diameter_fullres")
    if microns_per_pixel is None:
        if d is None:
            msg = (
                "Cannot derive microns per pixel: uns['spatial'][library_id]['scalefactors'] has no "
                "'spot_diameter_fullres'. Pass `microns_per_pixel=` (µm per pixel of the full-resolution image)."
            )
            raise ValueError(msg)
        if square_grid(centres):
            msg = (
                "The spots lie on a square grid (legacy Spatial Transcriptomics?), not Visium's hexagonal array, so "
                "spot_diameter_fullres cannot give the scale. Pass `microns_per_pixel=` (µm per pixel of the "
                "full-resolution image; the spot diameter then follows from spot_diameter_fullres)."
            )
            raise ValueError(msg)
        microns_per_pixel = visium_microns_per_pixel(d, centres)
        logger.info("from_scanpy: %.4f µm/px from spot_diameter_fullres = %.2f px (Visium).", microns_per_pixel, d)
        return float(microns_per_pixel), float(spot_diameter_um or VISIUM_SPOT_DIAMETER_UM)
    if spot_diameter_um is None:
        pitch = spot_pitch_px(centres)
        visium = pitch is not None and abs(pitch * microns_per_pixel / VISIUM_SPOT_PITCH_UM - 1) <= PITCH_TOLERANCE
        visium = visium and not square_grid(centres)
        if visium or d is None:
            spot_diameter_um = VISIUM_SPOT_DIAMETER_UM
            logger.info("from_scanpy: assuming Visium spots of %g µm.", spot_diameter_um)
        else:
            spot_diameter_um = d * float(microns_per_pixel)
            logger.info(
                "from_scanpy: spot diameter %.1f µm (spot_diameter_fullres = %.1f px; the spot pitch is not Visium's).",
                spot_diameter_um, d,
            )  # fmt: skip
    return float(microns_per_pixel), float(spot_diameter_um)


def _check_frame(image: Any, downscaled: list[tuple[str, Any, float]]) -> None:
    """Refuse a full-resolution image whose size does not match what the downscaled copies imply."""
    from hespotex.io._image import open_image

    if not downscaled:
        return
    shape = tuple(int(s) for s in open_image(image).shape[:2])
    name, array, scalef = downscaled[0]
    expected = (array.shape[0] / scalef, array.shape[1] / scalef)
    tol = [max(FRAME_TOLERANCE * e, 2.0 / scalef) for e in expected]
    # Space Ranger pads the downscaled copy of a non-square image to a square: only a side that is not padded
    # (the longer one) must match; the other may be shorter than implied
    longer = int(np.argmax(shape))
    if abs(shape[longer] - expected[longer]) > tol[longer] or any(
        s > e + t for s, e, t in zip(shape, expected, tol, strict=True)
    ):
        msg = (
            f"The `image` is {shape[1]} x {shape[0]} px, but uns['spatial'] image {name!r} "
            f"({array.shape[1]} x {array.shape[0]} px at tissue_{name}_scalef = {scalef:g}) implies a full-resolution "
            f"image of about {expected[1]:.0f} x {expected[0]:.0f} px. obsm['spatial'] is in pixels of the image "
            "Space Ranger (or HEST) was given: pass that image, not a resized or cropped one."
        )
        raise ValueError(msg)


def from_scanpy(
    adata: AnnData,
    *,
    image: Any = None,
    microns_per_pixel: float | None = None,
    spot_diameter_um: float | None = None,
    library_id: str | None = None,
    spatial_key: str = "spatial",
    counts: bool | None = None,
    keep_uns_images: bool = True,
) -> SpatialData:
    """Build a hespotex sample from an AnnData in the scanpy / squidpy Visium (or HEST) convention.

    Reads ``obsm[spatial_key]`` (full-resolution pixels), ``uns["spatial"][library_id]`` (images and
    scale factors) and ``X``; never modifies ``adata`` (everything is copied). The image used is the
    highest resolution available: ``image`` > ``uns`` ``"hires"`` > ``"lowres"`` (any image with a
    ``tissue_{name}_scalef`` counts, e.g. HEST's ``"downscaled_fullres"``). A downscaled image gives
    blurrier patches than the scan: a warning says so and how to pass the full-resolution image.

    Parameters
    ----------
    adata
        Spots × genes as :func:`scanpy.read_visium`, :func:`squidpy.read.visium` or HEST-1k write it.
    image
        The full-resolution H&E image (a file path, TIFF read lazily, or an ``(h, w, c)`` array) in
        whose pixels ``obsm[spatial_key]`` is given. Its size is checked against the downscaled copies.
    microns_per_pixel
        µm per full-resolution pixel. Default: from ``spot_diameter_fullres`` assuming Visium (checked
        on the 100 µm spot pitch; Space Ranger's 65 µm reference or HEST's 55 µm, whichever fits). Spots on a
        square grid (legacy ST) are not Visium: then a ``ValueError`` asks for it.
    spot_diameter_um
        Spot diameter. Default: 55 µm (Visium) when the spot pitch is Visium's at that scale, else
        ``spot_diameter_fullres`` × ``microns_per_pixel``.
    library_id
        The key of ``uns["spatial"]`` to read; needed when there are several. Also names the sample
        (elements and coordinate system); default ``"sample"`` without ``uns["spatial"]``.
    spatial_key
        Key of the spot centres in ``obsm``.
    counts
        Whether ``X`` holds raw counts; ``None`` detects integer values.
    keep_uns_images
        Keep the downscaled images in the table's ``uns["spatial"]`` (the image element holds the one used).

    Returns
    -------
    A sample as :func:`hespotex.io.from_anndata` builds it (table ``"table"`` with copies of everything in
    ``adata``, spots ``{id}_spots`` in full-resolution pixels, ``uns["hespotex_sample"]``), with the image
    element ``{id}_image`` (full resolution, identity) or ``{id}_{name}_image`` (a downscaled copy, scaled
    by ``1 / tissue_{name}_scalef`` into the full-resolution frame).
    """
    import anndata as ad

    from hespotex.io._build import check_scale, check_spots_in_image

    library_id, entry = spatial_library(adata, library_id)
    sample_id = check_sample_id(library_id if library_id is not None else "sample")
    centres = spatial_centres(adata, spatial_key)
    factors = _scalefactors(entry)
    downscaled = downscaled_images(entry)
    if image is None and not downscaled:
        found = f"uns['spatial'][{library_id!r}] keys {list(entry)}" if library_id else "no uns['spatial']"
        msg = f"This AnnData has no H&E image to cut patches from ({found}). {NO_IMAGE_HELP}"
        raise ValueError(msg)
    mpp, d_um = _scale(adata, factors, centres, microns_per_pixel, spot_diameter_um)
    uns = dict(adata.uns)
    if not keep_uns_images and library_id is not None:
        uns["spatial"] = {**dict(uns["spatial"]), library_id: {k: v for k, v in entry.items() if k != "images"}}
    light = ad.AnnData(
        X=adata.X, obs=adata.obs, var=adata.var, obsm=dict(adata.obsm), varm=dict(adata.varm),
        obsp=dict(adata.obsp), layers=dict(adata.layers), uns=uns,
    )  # fmt: skip
    if image is not None:
        _check_frame(image, downscaled)
        logger.info("from_scanpy %s: using the full-resolution image given as `image`.", sample_id)
        sdata = from_anndata(
            light, image, microns_per_pixel=mpp, spot_diameter_um=d_um, spatial_key=spatial_key,
            sample_id=sample_id, counts=counts,
        )  # fmt: skip
    else:
        sdata = from_anndata(
            light, None, microns_per_pixel=mpp, spot_diameter_um=d_um, spatial_key=spatial_key,
            sample_id=sample_id, counts=counts,
        )  # fmt: skip
        name, array, scalef = downscaled[0]
        image_key = f"{sample_id}_{name}_image"
        sdata.images[image_key] = _scaled_element(array, scalef, sample_id, name=f"uns['spatial'] image {name!r}")
        h, w = (int(s) for s in array.shape[:2])
        extent = (int(np.floor(h / scalef)), int(np.floor(w / scalef)))
        check_spots_in_image(centres, extent, spot_ids=adata.obs_names, radius_px=d_um / mpp / 2.0)
        check_scale(mpp, d_um, image_shape=extent)
        table = sdata.tables[TABLE_KEY]
        table.uns[SAMPLE_KEY] = {**dict(table.uns[SAMPLE_KEY]), "image_key": image_key}
        logger.warning(
            "Patches of %s are cut from the downscaled %r image (%.3g of full resolution: %.2f µm/px instead of "
            "%.2f): blurrier than the scan. Pass the full-resolution image as `image=` (a path or an array in the "
            "pixels of obsm['spatial']) to hx.io.from_scanpy, hx.pp.embed or hx.tl.predict when you have it.",
            sample_id, name, scalef, mpp / scalef, mpp,
        )  # fmt: skip
    get_sample_info(sdata)  # the record is complete
    sdata.tables[TABLE_KEY].uns["hespotex_io"] = {
        "reader": "from_scanpy",
        "library_id": library_id,
        "image": "argument" if image is not None else f"uns['spatial'][{library_id!r}]['images'][{downscaled[0][0]!r}]",
    }
    return sdata


def _scaled_element(array: Any, scalef: float, cs: str, *, name: str) -> Any:
    """A downscaled image as an RGB ``uint8`` element mapped to the full-resolution frame ``cs`` by ``1 / scalef``."""
    from spatialdata.transformations import Scale

    from hespotex.io._image import as_rgb_hwc, rgb_image_element

    rgb = as_rgb_hwc(np.asarray(array), name=name)
    return rgb_image_element(rgb, {cs: Scale([1.0 / scalef, 1.0 / scalef], axes=("x", "y"))})
