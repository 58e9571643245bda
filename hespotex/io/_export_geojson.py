"""``hx.io.write_geojson``: predicted spots (or tiles) as QuPath detections with expression measurements.

QuPath (0.4 and later) imports a GeoJSON ``FeatureCollection`` through *File > Import objects from
file* (or drag and drop) when the coordinates are full-resolution pixels of the image, origin at its
top-left corner. Each feature's ``properties`` carry QuPath's own fields: ``objectType``
(``"detection"``), ``name``, ``measurements`` (a ``{name: number}`` dict, shown in the measurement
table and usable to colour the objects) and optionally ``classification`` (``{"name", "color"}``),
as QuPath itself writes them on export. Features have a stable UUID ``id`` made from the sample and
spot names, so exporting twice gives the same file.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hespotex import _ownership
from hespotex.io._export_common import DEFAULT_KEY, check_output, footprint_px, open_prediction

logger = logging.getLogger("hespotex")

_NAMESPACE = uuid.UUID("6f1c2d9e-6d8b-4d5e-9d59-3c1c6b7f4a10")  # hespotex spot ids -> QuPath object ids


def spot_polygons(centres: np.ndarray, size_px: float, *, shape: str = "circle", n_vertices: int = 32) -> np.ndarray:
    """Closed rings ``(n, k + 1, 2)`` of circles (``k = n_vertices``) or axis-aligned squares (``k = 4``)
    of diameter / side ``size_px`` around ``centres`` (x, y)."""
    if shape == "circle":
        if n_vertices < 8:
            msg = f"Expected at least 8 vertices per circle, found {n_vertices}."
            raise ValueError(msg)
        angle = np.linspace(0.0, 2.0 * np.pi, n_vertices, endpoint=False)
        ring = np.c_[np.cos(angle), np.sin(angle)] * (size_px / 2.0)
    else:
        h = size_px / 2.0
        ring = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    ring = np.vstack([ring, ring[:1]])  # GeoJSON rings end where they start
    return centres[:, None, :] + ring[None, :, :]


def write_geojson(
    data: Any,
    path: str | Path,
    *,
    genes: Sequence[str] | str | None = None,
    key: str = DEFAULT_KEY,
    layer: str | None = None,
    shape: Literal["circle", "square"] = "circle",
    size_um: float | None = None,
    n_vertices: int = 32,
    object_type: Literal["detection", "tile", "annotation"] = "detection",
    classification: str | None = None,
    decimals: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write predicted expression as a GeoJSON ``FeatureCollection`` of spot polygons that QuPath imports.

    Parameters
    ----------
    data
        A prediction: the zarr store that ``hespotex predict`` / ``hx.tl.predict(..., out=...)`` writes
        (read lazily, a block of spots at a time), a SpatialData holding the table ``key``, or the table.
    path
        Output file (``.geojson``).
    genes
        Genes written as measurements (default: every predicted gene).
    key
        The prediction table (and, by default, its layer).
    layer
        Layer of predicted values (default: ``key``).
    shape
        Each spot as a ``"circle"`` (a polygon of ``n_vertices``) or an axis-aligned ``"square"`` (tiles,
        bins) centred on the spot.
    size_um
        Circle diameter / square side in µm (default: the spot diameter the prediction records).
    n_vertices
        Vertices of each circle.
    object_type
        QuPath object type: ``"detection"`` (default), ``"tile"`` or ``"annotation"``.
    classification
        A QuPath class name given to every spot (e.g. ``"hespotex"``), or none.
    decimals
        Decimals of the pixel coordinates.
    overwrite
        Replace an existing file.

    Returns
    -------
    The path written. One feature per spot, in table order: ``id`` (a UUID derived from the sample and
    spot names), ``geometry`` (a ``Polygon`` in full-resolution pixels of the slide: x = column,
    y = row) and ``properties`` ``objectType``, ``name`` (the spot id), ``measurements``
    (``{gene: predicted value}``) and ``classification`` when given. The collection's ``properties``
    record the genes, the sample and the µm per pixel. Nothing else is written.
    """
    if object_type not in ("detection", "tile", "annotation"):
        msg = f"Expected object_type 'detection', 'tile' or 'annotation', found {object_type!r}."
        raise ValueError(msg)
    pred = open_prediction(data, key=key, layer=layer)
    names, columns = pred.gene_index(genes)
    size_px = footprint_px(pred, shape=shape, size_um=size_um)
    path = check_output(path, overwrite=overwrite)
    klass = {"name": str(classification)} if classification else None
    header = {
        "type": "FeatureCollection",
        "properties": {
            "generator": "hespotex",
            "sample_id": pred.sample_id,
            "genes": names,
            "microns_per_pixel": pred.microns_per_pixel,
            "shape": shape,
            "size_px": size_px,
        },
    }
    tmp = _ownership.temp_sibling(path)  # unique to the call: never a user's file, nor another run's
    n_written = 0
    with tmp.open("w") as fh:
        text = json.dumps(header)
        fh.write(text[:-1] + ', "features": [\n')  # the features stream in after the header
        for start, block in pred.row_blocks(columns):
            stop = start + len(block)
            rings = np.round(
                spot_polygons(pred.centres[start:stop], size_px, shape=shape, n_vertices=n_vertices), decimals
            )
            lines = []
            for i in range(len(block)):
                spot = str(pred.spot_ids[start + i])
                props: dict[str, Any] = {
                    "objectType": object_type,
                    "name": spot,
                    "measurements": {g: v for g, v in zip(names, block[i].tolist(), strict=True) if np.isfinite(v)},
                }
                if klass is not None:
                    props["classification"] = klass
                feature = {
                    "type": "Feature",
                    "id": str(uuid.uuid5(_NAMESPACE, f"{pred.sample_id}/{spot}")),
                    "geometry": {"type": "Polygon", "coordinates": [rings[i].tolist()]},
                    "properties": props,
                }
                lines.append(json.dumps(feature, allow_nan=False))
            if lines:
                fh.write((",\n" if n_written else "") + ",\n".join(lines))
                n_written += len(lines)
        fh.write("\n]}\n")
    tmp.replace(path)
    logger.info("Wrote %d spots x %d genes as QuPath %ss to %s.", n_written, len(names), object_type, path)
    return path
