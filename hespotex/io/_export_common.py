"""What the exporters share: opening a prediction store lazily, picking genes, reading their values by row chunks.

A *prediction* is the table ``key`` (default ``"hespotex"``) that :func:`hespotex.tl.predict` writes:
``layers[key]`` (spots x genes), ``obsm["spatial"]`` (spot centres in full-resolution pixels of the
slide, ``x`` = column, ``y`` = row) and ``uns["hespotex_sample"]`` (µm per pixel, spot diameter). It
is opened from the zarr store that streaming prediction writes (``hespotex predict`` writes
``OUT/<slide>.zarr``) without reading the layer: the layer stays a dask array over the zarr chunks,
and every exporter reads it a block of rows at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hespotex._constants import PREDICTION_KEY
from hespotex.tl.prediction._tables import recorded_params, resolve_prediction

logger = logging.getLogger("hespotex")

DEFAULT_KEY = PREDICTION_KEY
ROWS_PER_READ = 16_384  # spots read from the layer at a time


@dataclass
class Prediction:
    """A prediction table opened for export (everything in memory but the values)."""

    values: Any  # (n_spots, n_genes) dask or numpy array
    genes: list[str]
    spot_ids: np.ndarray  # (n_spots,) str
    centres: np.ndarray  # (n_spots, 2) x, y in full-resolution pixels
    microns_per_pixel: float
    spot_diameter_um: float
    sample_id: str
    slide: dict[str, Any]  # attrs["hespotex_slide"] of the store (may be empty)
    source: dict[str, Any]  # uns[key]["params"]["source"] (may be empty)
    store: Path | None

    @property
    def n_spots(self) -> int:
        return len(self.spot_ids)

    def gene_index(self, genes: Sequence[str] | str | None) -> tuple[list[str], np.ndarray]:
        """Names and column positions of ``genes`` (all genes when ``None``), refusing unknown names."""
        if genes is None:
            return list(self.genes), np.arange(len(self.genes))
        if isinstance(genes, str):
            genes = [genes]
        genes = [str(g) for g in genes]
        if not genes:
            msg = "Expected at least one gene to export, found an empty list."
            raise ValueError(msg)
        pos = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in pos]
        if missing:
            shown = ", ".join(self.genes[:10]) + (" ..." if len(self.genes) > 10 else "")
            msg = (
                f"The prediction has no genes {missing} ({len(self.genes)} predicted genes: {shown}). Pick "
                "predicted genes."
            )
            raise KeyError(msg)
        dupes = sorted({g for g in genes if genes.count(g) > 1})
        if dupes:
            msg = f"Genes must be distinct; repeated: {dupes}."
            raise ValueError(msg)
        return genes, np.array([pos[g] for g in genes], dtype=np.int64)

    def row_blocks(self, columns: np.ndarray, rows: int = ROWS_PER_READ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, values[start:start + rows, columns])`` as float32, a block of rows at a time."""
        for start in range(0, self.n_spots, rows):
            block = self.values[start : start + rows]
            block = block[:, columns] if not hasattr(block, "compute") else block[:, columns].compute()
            yield start, np.asarray(block, dtype=np.float32)

    def read(self, columns: np.ndarray) -> np.ndarray:
        """``values[:, columns]`` (n_spots x len(columns), float32), read a block of rows at a time."""
        out = np.empty((self.n_spots, len(columns)), dtype=np.float32)
        for start, block in self.row_blocks(columns):
            out[start : start + len(block)] = block
        return out

    def extent(self, image_shape: tuple[int, int] | None = None) -> tuple[int, int]:
        """``(height, width)`` of the slide's full-resolution level.

        From ``image_shape`` when given, else the slide record (``level_shapes`` written by
        :func:`hespotex.io.read_wsi` and kept by ``hespotex tile`` / ``predict``), else the header of the
        source slide file (TIFF).
        """
        if image_shape is not None:
            h, w = (int(v) for v in image_shape)
            if h < 1 or w < 1:
                msg = f"Expected a positive `image_shape` (height, width), found {image_shape}."
                raise ValueError(msg)
            return h, w
        shapes = self.slide.get("level_shapes")
        if shapes:
            return int(shapes[0][0]), int(shapes[0][1])
        path = self.slide.get("path") or self.source.get("path")
        if path and Path(path).is_file():
            import tifffile

            try:
                with tifffile.TiffFile(path) as tif:
                    series = tif.series[0]
                    axes, shape = series.axes, series.shape
                return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
            except (tifffile.TiffFileError, ValueError, OSError):
                pass
        msg = (
            "The size of the slide is unknown: the prediction records no `level_shapes` of its slide and its source "
            f"({path!r}) cannot be read. Pass `image_shape=(height, width)` in full-resolution pixels."
        )
        raise ValueError(msg)


def _root_attrs(path: Path) -> dict[str, Any]:
    import zarr

    return dict(zarr.open_group(path, mode="r", use_consolidated=False).attrs)


def _open_table(path: Path, key: str):
    """The table ``key`` of the zarr store at ``path``: everything in memory but its layers (dask, lazy)."""
    import dask.array as da
    import zarr
    from anndata import AnnData
    from anndata.io import read_elem

    root = zarr.open_group(path, mode="r", use_consolidated=False)
    tables = root.get("tables")
    if tables is None or key not in tables:
        found = [] if tables is None else sorted(tables.group_keys())
        msg = (
            f"{str(path)!r} holds no prediction table {key!r} (tables: {found}). Pass the store written by "
            "`hespotex predict` (OUT/<slide>.zarr) or hx.tl.predict(..., out=...), and its table as `key`."
        )
        raise KeyError(msg)
    g = tables[key]
    parts = {name: read_elem(g[name]) for name in ("obs", "var", "obsm", "uns") if name in g}
    adata = AnnData(**parts)
    if "layers" in g:
        for name, arr in g["layers"].arrays():
            adata.layers[name] = da.from_zarr(arr)
    return adata


def open_prediction(data: Any, *, key: str = DEFAULT_KEY, layer: str | None = None) -> Prediction:
    """Open a prediction: a zarr store path (its table ``key``), or a SpatialData / AnnData holding the prediction
    ``key`` (found through :func:`hespotex.tl.prediction._tables.resolve_prediction`: the spot table's layer and
    record, or the table ``key`` that ``hx.tl.predict`` writes when the genes differ).

    Reads everything but the predicted values, which stay lazy. ``layer`` defaults to the recorded layer of ``key``.
    """
    from anndata import AnnData

    from hespotex._sample import SAMPLE_KEY

    slide: dict[str, Any] = {}
    store = None
    if isinstance(data, (str, Path)):
        store = Path(data)
        if not store.exists():
            msg = f"Expected a prediction zarr store at {str(store)!r}, found nothing there."
            raise FileNotFoundError(msg)
        table = _open_table(store, key)
        slide = dict(_root_attrs(store).get("hespotex_slide", {}) or {})
    elif isinstance(data, AnnData) or hasattr(data, "tables"):
        # the one lookup: layer + record of `key` in the spot table, or the table `key` (genes differ, streamed)
        found = resolve_prediction(data, key, layer=layer)
        table, layer = found.table, found.layer
        params = dict(found.params)
    else:
        msg = f"Expected a prediction zarr store path, a SpatialData or an AnnData, found {type(data).__name__}."
        raise TypeError(msg)
    if hasattr(data, "tables"):
        slide = dict(dict(getattr(data, "attrs", {}) or {}).get("hespotex_slide", {}) or {})
        if getattr(data, "path", None) is not None:
            store = Path(data.path)
    layer = layer or key
    if layer not in table.layers:
        msg = (
            f"The table has no layer {layer!r} of predictions (layers: {list(table.layers)}). Pass the layer as "
            "`layer`."
        )
        raise KeyError(msg)
    info = table.uns.get(SAMPLE_KEY) or (recorded_params(table, layer) or {}).get("sample")
    if info is None or "spatial" not in table.obsm:
        msg = (
            f"The table lacks spot centres (obsm['spatial']) or uns[{SAMPLE_KEY!r}] (µm per pixel, spot diameter); "
            "export tables written by hx.tl.predict."
        )
        raise KeyError(msg)
    centres = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
    if isinstance(data, (str, Path)):
        params = dict(recorded_params(table, key) or {})
    return Prediction(
        values=table.layers[layer],
        genes=[str(g) for g in table.var_names],
        spot_ids=np.asarray(table.obs_names.astype(str)),
        centres=centres,
        microns_per_pixel=float(info["microns_per_pixel"]),
        spot_diameter_um=float(info["spot_diameter_um"]),
        sample_id=str(info.get("sample_id", "")),
        slide=slide,
        source=dict(params.get("source", {}) or {}),
        store=store,
    )


def check_output(path: str | Path, *, overwrite: bool) -> Path:
    """``path`` as a Path, its folder created; an existing file is refused unless ``overwrite``."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            msg = f"{str(path)!r} already exists. Pass `overwrite=True` (--overwrite) to replace it, or another path."
            raise FileExistsError(msg)
        if path.is_dir():
            msg = f"{str(path)!r} is a folder; pass a file path."
            raise IsADirectoryError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def footprint_px(pred: Prediction, *, shape: str, size_um: float | None) -> float:
    """Side (square) or diameter (circle) of each spot's footprint in full-resolution pixels."""
    if shape not in ("circle", "square"):
        msg = f"Expected shape 'circle' or 'square', found {shape!r}."
        raise ValueError(msg)
    size_um = pred.spot_diameter_um if size_um is None else float(size_um)
    if not size_um > 0:
        msg = f"Expected a positive spot size in µm, found {size_um}."
        raise ValueError(msg)
    return size_um / pred.microns_per_pixel
