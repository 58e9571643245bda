"""``hx.io.write_csv`` and ``hx.io.write_png``: predicted expression as a table, and an overview figure over the
tissue."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hespotex import _ownership
from hespotex._pixels import read_local
from hespotex.io._export_common import DEFAULT_KEY, Prediction, check_output, open_prediction

logger = logging.getLogger("hespotex")

MAX_PNG_GENES = 16


def write_csv(
    data: Any,
    path: str | Path,
    *,
    genes: Sequence[str] | str | None = None,
    key: str = DEFAULT_KEY,
    layer: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write predicted expression as a CSV table, one row per spot.

    Parameters
    ----------
    data
        A prediction: the zarr store that ``hespotex predict`` / ``hx.tl.predict(..., out=...)`` writes
        (read a block of spots at a time), a SpatialData holding the table ``key``, or the table.
    path
        Output file (``.csv``; ``.csv.gz`` is compressed).
    genes
        Gene columns (default: every predicted gene).
    key, layer
        The prediction table and its layer (default: ``key``).
    overwrite
        Replace an existing file.

    Returns
    -------
    The path written: columns ``spot_id``, ``x``, ``y`` (spot centre in full-resolution pixels of the
    slide: column, row), ``x_um``, ``y_um`` (the same in µm), then one column per gene, in table order.
    """
    import pandas as pd

    pred = open_prediction(data, key=key, layer=layer)
    names, columns = pred.gene_index(genes)
    path = check_output(path, overwrite=overwrite)
    tmp = _ownership.temp_sibling(path, suffix=f".partial{''.join(path.suffixes)}")  # unique to the call
    mpp = pred.microns_per_pixel
    for start, block in pred.row_blocks(columns):
        stop = start + len(block)
        xy = pred.centres[start:stop]
        frame = pd.DataFrame(block, columns=names)
        frame.insert(0, "y_um", xy[:, 1] * mpp)
        frame.insert(0, "x_um", xy[:, 0] * mpp)
        frame.insert(0, "y", xy[:, 1])
        frame.insert(0, "x", xy[:, 0])
        frame.insert(0, "spot_id", pred.spot_ids[start:stop])
        frame.to_csv(tmp, mode="w" if start == 0 else "a", header=start == 0, index=False, float_format="%.6g")
    if pred.n_spots == 0:
        pd.DataFrame(columns=["spot_id", "x", "y", "x_um", "y_um", *names]).to_csv(tmp, index=False)
    tmp.replace(path)
    logger.info("Wrote %d spots x %d genes to %s.", pred.n_spots, len(names), path)
    return path


def _thumbnail(pred: Prediction, slide: str | Path | None, max_side: int) -> tuple[np.ndarray | None, float]:
    """The coarsest level of the slide with at least ``max_side`` px on its longer side (or the finest one
    below), and its full-resolution pixels per thumbnail pixel; ``(None, 1)`` when no slide is at hand."""
    path = slide or pred.slide.get("path") or pred.source.get("path")
    if not path or not Path(path).exists():
        logger.warning("The slide image (%r) is not at hand; the overview shows the spots without the tissue.", path)
        return None, 1.0
    from hespotex.io._wsi import read_wsi

    path = Path(path)
    if path.is_dir():  # a SpatialData store holding the image
        import spatialdata

        sdata = spatialdata.read_zarr(path, selection=("images",))
        if not sdata.images:
            logger.warning("%s holds no image; the overview shows the spots without the tissue.", path)
            return None, 1.0
        element = next(iter(sdata.images.values()))
    else:
        sdata = read_wsi(path, microns_per_pixel=pred.microns_per_pixel)
        element = next(iter(sdata.images.values()))
    if hasattr(element, "children") and len(element.children):
        arrays = [element[n]["image"] for n in sorted(element.children, key=lambda n: int(n.removeprefix("scale")))]
    else:
        arrays = [element]
    full_w = int(arrays[0].sizes["x"])
    pick = arrays[0]
    for arr in arrays:  # finest first
        if max(int(arr.sizes["x"]), int(arr.sizes["y"])) >= max_side:
            pick = arr
    img = read_local(pick.data[:3]).transpose(1, 2, 0)
    step = max(1, int(np.ceil(max(img.shape[:2]) / max_side)))
    img = img[::step, ::step]
    return img, full_w / int(pick.sizes["x"]) * step


def write_png(
    data: Any,
    path: str | Path,
    *,
    genes: Sequence[str] | str,
    key: str = DEFAULT_KEY,
    layer: str | None = None,
    slide: str | Path | None = None,
    max_side: int = 1600,
    ncols: int | None = None,
    cmap: str = "viridis",
    alpha: float = 0.8,
    dpi: int = 120,
    overwrite: bool = False,
) -> Path:
    """Write a PNG overview of predicted genes over the tissue: one panel per gene, spots coloured by value.

    Parameters
    ----------
    data
        A prediction (store path, SpatialData or table; see :func:`write_csv`).
    path
        Output file (``.png``).
    genes
        The genes shown (at most 16), one panel each.
    key, layer
        The prediction table and its layer (default: ``key``).
    slide
        The slide image (file or SpatialData store); default: the one the prediction records. Read
        from a coarse pyramid level only; without it the spots are drawn on white.
    max_side
        Longer side of the tissue image in pixels (the coarsest level at least this large is read).
    ncols
        Panels per row (default: up to 4).
    cmap, alpha
        Colour map and opacity of the spots.
    dpi
        Resolution of the figure.
    overwrite
        Replace an existing file.

    Returns
    -------
    The path written (an RGBA PNG made with matplotlib). Nothing else is written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection

    pred = open_prediction(data, key=key, layer=layer)
    names, columns = pred.gene_index(genes)
    if len(names) > MAX_PNG_GENES:
        msg = f"An overview shows at most {MAX_PNG_GENES} genes, found {len(names)}. Pick fewer genes."
        raise ValueError(msg)
    path = check_output(path, overwrite=overwrite)
    values = pred.read(columns)
    thumb, factor = _thumbnail(pred, slide, max_side)
    xy = pred.centres
    diameter = pred.spot_diameter_um / pred.microns_per_pixel
    if thumb is not None:
        extent_w, extent_h = thumb.shape[1] * factor, thumb.shape[0] * factor
    else:
        extent_w, extent_h = (
            (float(xy[:, 0].max() + diameter), float(xy[:, 1].max() + diameter)) if len(xy) else (1.0, 1.0)
        )
    ncols = ncols or min(4, len(names))
    nrows = -(-len(names) // ncols)
    aspect = extent_h / max(extent_w, 1e-9)
    panel_w = 4.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols, panel_w * aspect * nrows + 0.6), squeeze=False)
    for ax in axes.ravel()[len(names) :]:
        ax.set_axis_off()
    for c, (gene, ax) in enumerate(zip(names, axes.ravel(), strict=False)):
        if thumb is not None:
            ax.imshow(thumb, extent=(0, extent_w, extent_h, 0), interpolation="bilinear")
        coll = EllipseCollection(
            diameter, diameter, 0.0, units="xy", offsets=xy, offset_transform=ax.transData, cmap=cmap, alpha=alpha
        )
        coll.set_array(values[:, c])
        ax.add_collection(coll)
        ax.set_xlim(0, extent_w)
        ax.set_ylim(extent_h, 0)
        ax.set_aspect("equal")
        ax.set_title(gene)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(coll, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"{pred.sample_id}: predicted expression (hespotex)")
    fig.tight_layout()
    tmp = _ownership.temp_sibling(path, suffix=".partial.png")  # unique to the call
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    tmp.replace(path)
    logger.info("Wrote an overview of %d genes over %d spots to %s.", len(names), pred.n_spots, path)
    return path
