"""The sample contract: where a sample's table, spots, image and physical scale live.

A *sample* is a :class:`spatialdata.SpatialData` with one H&E image element, one shapes element of
spot circles and a table annotating those shapes (see ``DESIGN.md``). The table alone is enough for
everything that does not read pixels: it carries

- ``obsm["spatial"]``: spot centres ``(x = column, y = row)`` in the sample's coordinate system
  (full-resolution pixels of the H&E image);
- ``uns["hespotex_sample"]``: :class:`SampleInfo` as a dict (sample id, element keys, coordinate
  system, microns per coordinate unit, spot diameter in µm).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._constants import SAMPLE_KEY, TABLE_KEY

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


@dataclass(frozen=True)
class SampleInfo:
    """Physical scale and element keys of one sample.

    ``microns_per_pixel`` is microns per unit of ``coordinate_system``; readers put samples in
    the full-resolution pixel space of their H&E image, so it is the image's µm per pixel.
    ``spot_shape`` is ``"square"`` for square bins (Visium HD), whose side is ``spot_diameter_um``;
    ``None`` means circles.
    """

    sample_id: str
    shapes_key: str
    coordinate_system: str
    microns_per_pixel: float
    spot_diameter_um: float
    image_key: str | None = None
    table_key: str = TABLE_KEY
    spot_shape: str | None = None

    @property
    def spot_diameter_px(self) -> float:
        """Spot diameter in coordinate units (full-resolution pixels)."""
        return self.spot_diameter_um / self.microns_per_pixel

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, safe to store in ``uns`` and to write to zarr/h5ad."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def get_table(data: SpatialData | AnnData, table_key: str | None = None) -> AnnData:
    """Return the spot table of a sample (the AnnData itself when given one)."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data
    tables = getattr(data, "tables", None)
    if tables is None:
        msg = f"Expected a SpatialData or AnnData sample, found {type(data).__name__}."
        raise TypeError(msg)
    if table_key is None:
        table_key = TABLE_KEY if TABLE_KEY in tables else None
        if table_key is None and len(tables) == 1:
            table_key = next(iter(tables))
    if table_key is None or table_key not in tables:
        msg = (
            f"Expected a table {table_key or TABLE_KEY!r} in the SpatialData, found tables "
            f"{list(tables)}. Pass `table_key=` naming the spot table."
        )
        raise KeyError(msg)
    return tables[table_key]


def get_sample_info(data: SpatialData | AnnData) -> SampleInfo:
    """Read the :class:`SampleInfo` of a sample from ``table.uns["hespotex_sample"]``."""
    table = get_table(data)
    raw = table.uns.get(SAMPLE_KEY)
    if raw is None:
        msg = (
            f"This table has no uns[{SAMPLE_KEY!r}] (microns per pixel, spot diameter, element "
            "keys). Build samples with an `hx.io` reader (read_visium, read_st, read_hest, "
            "from_anndata), which records them."
        )
        raise KeyError(msg)
    fields = {k: raw[k] for k in SampleInfo.__dataclass_fields__ if k in raw}
    fields["microns_per_pixel"] = float(fields["microns_per_pixel"])
    fields["spot_diameter_um"] = float(fields["spot_diameter_um"])
    return SampleInfo(**fields)


def spot_centres(data: SpatialData | AnnData) -> np.ndarray:
    """Spot centres ``(n_spots, 2)`` as ``(x, y)`` in the sample's coordinate system."""
    table = get_table(data)
    if "spatial" not in table.obsm:
        msg = (
            "Expected spot centres in obsm['spatial'] (x = column, y = row, in full-resolution "
            "pixels); found none. Build the sample with an `hx.io` reader."
        )
        raise KeyError(msg)
    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
    if not np.isfinite(xy).all():
        msg = "obsm['spatial'] holds NaN or infinite spot centres; drop or fix those spots."
        raise ValueError(msg)
    return xy


def spot_centres_um(data: SpatialData | AnnData) -> np.ndarray:
    """Spot centres in microns (``obsm["spatial"]`` times microns per pixel)."""
    return spot_centres(data) * get_sample_info(data).microns_per_pixel


def as_sample_dict(samples: Any) -> dict[str, Any]:
    """``{name: sample}`` from one sample, a list or a mapping (names from ``uns["hespotex_sample"]``)."""
    if isinstance(samples, Mapping):
        return {str(k): v for k, v in samples.items()}
    if not isinstance(samples, (list, tuple)):
        samples = [samples]
    out: dict[str, Any] = {}
    for i, s in enumerate(samples):
        name = str(get_table(s).uns.get(SAMPLE_KEY, {}).get("sample_id", f"sample_{i}"))
        if name in out:
            name = f"{name}_{i}"
        out[name] = s
    if not out:
        msg = "Expected at least one sample, found none."
        raise ValueError(msg)
    return out
