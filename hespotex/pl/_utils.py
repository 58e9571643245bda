"""Helpers shared by the views: finding predictions and measurements, and a display-sized H&E image.

Nothing here imports HoloViews or Panel: these helpers return arrays and tables that the views turn
into elements, so they are cheap to test and reuse.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from hespotex._constants import MEASURED_LAYER, PREDICTION_KEY, SAMPLE_KEY, attention_key
from hespotex._pixels import read_local
from hespotex._sample import get_sample_info
from hespotex.tl.prediction._tables import prediction_records, resolve_prediction

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("hespotex")

# sdata -> {(image key, max_px): (element, display image)}
_DISPLAY_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MAX_IMAGE_PX = 1200  # longest side of the background image drawn under the spots (frames are ~300-500 px)


@dataclass(frozen=True)
class Predictions:
    """Where a sample's predictions live: the table, the prediction layer and its recorded parameters."""

    table: AnnData
    layer: str
    params: dict[str, Any]
    table_key: str | None = None
    key: str = PREDICTION_KEY
    truth_layer: str = MEASURED_LAYER  # the layer of measured expression shown beside the predictions

    @property
    def sample_id(self) -> str:
        return str(self.table.uns.get(SAMPLE_KEY, {}).get("sample_id", "sample"))

    @property
    def attention_key(self) -> str | None:
        key = self.params.get("attention_key")
        if key:
            return str(key)
        default = attention_key(self.key)
        return default if default in self.table.obsp else None


def get_predictions(
    data: Any, *, key: str = PREDICTION_KEY, layer: str | None = None, table_key: str | None = None
) -> Predictions:
    """Find the prediction ``key`` (what ``hx.tl.predict(key_added=key)`` wrote) through the one lookup,
    :func:`hespotex.tl.prediction._tables.resolve_prediction`.

    Parameters
    ----------
    data
        A sample (SpatialData) or a prediction table (AnnData).
    key
        The prediction: its record ``uns[key]``, a bare ``layers[key]``, or a table of the SpatialData; for the
        default key with nothing stored under it, the first recorded prediction.
    layer
        Another layer of that table to show instead (``f"{key}_spread"``, a baseline).
    table_key
        Only this table of the SpatialData (used by the explorer to stay on one table).

    Returns
    -------
    The table (read, never changed), the layer name and the prediction parameters.
    """
    from anndata import AnnData

    source = data
    if table_key is not None and not isinstance(data, AnnData) and hasattr(data, "tables"):
        if table_key not in data.tables:
            msg = f"Expected a table {table_key!r} in the SpatialData, found tables {list(data.tables)}."
            raise KeyError(msg)
        source = data.tables[table_key]
    found = resolve_prediction(source, key, layer=layer, any_recorded=True)
    params = found.params
    if layer is not None:  # a layer with a record of its own (another prediction) keeps its record
        params = dict(prediction_records(found.table).get(layer, params))
    return Predictions(
        table=found.table,
        layer=found.layer,
        params=params,
        table_key=table_key if table_key is not None else found.table_key,
        key=key,
    )


def check_genes(pred: Predictions, genes: str | Sequence[str] | None) -> list[str]:
    """The genes to show (all predicted genes when ``None``), checked against the table."""
    names = pred.table.var_names
    if genes is None:
        return list(names)
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        msg = "Expected at least one gene, found an empty list."
        raise ValueError(msg)
    missing = [g for g in genes if g not in names]
    if missing:
        msg = (
            f"{len(missing)} gene(s) are not predicted in layers[{pred.layer!r}], e.g. {missing[:5]}; "
            f"the table has {len(names)} genes, e.g. {list(names[:5])}."
        )
        raise KeyError(msg)
    return genes


def _column(matrix: Any, idx: int) -> np.ndarray:
    col = matrix[:, idx]
    if sp.issparse(col):
        col = col.toarray()
    return np.asarray(col, dtype=np.float32).ravel()


def predicted_values(pred: Predictions, gene: str) -> np.ndarray:
    """Predicted expression of one gene at every spot."""
    return _column(pred.table.layers[pred.layer], int(pred.table.var_names.get_loc(gene)))


def column_values(pred: Predictions, layer: str, gene: str) -> np.ndarray:
    """Values of one gene at every spot in another layer of the prediction's table (e.g. its spread)."""
    return _column(pred.table.layers[layer], int(pred.table.var_names.get_loc(gene)))


def has_measured(pred: Predictions) -> bool:
    """Whether measured expression of the predicted genes is available (``layers["measured"]`` or counts in ``X``)."""
    table = pred.table
    if pred.truth_layer in table.layers:
        return True
    x = table.X
    if x is None or 0 in x.shape:
        return False
    return bool(x.nnz > 0) if sp.issparse(x) else bool(np.any(np.asarray(x) != 0))


def measured_values(pred: Predictions, gene: str) -> np.ndarray:
    """Measured expression of one gene, normalised like the predictions.

    ``layers["measured"]`` when present, else the table's counts normalised as the predictions were
    (``target_norm`` and ``target_sum`` of their ``params``; see :mod:`hespotex.pp._targets`).
    """
    from hespotex.pp._targets import target_expression

    table = pred.table
    if pred.truth_layer in table.layers:
        return _column(table.layers[pred.truth_layer], int(table.var_names.get_loc(gene)))
    if not has_measured(pred):
        msg = "This table has no measured expression (no layers['measured'] and no counts in X); pass `truth=False`."
        raise ValueError(msg)
    target_sum = float(pred.params.get("target_sum", 1e4))
    target_norm = str(pred.params.get("target_norm", "library_all"))
    if target_norm == "library_modelled":  # the library over the predicted genes (this table's)
        y = target_expression(table, list(table.var_names), target_norm=target_norm, target_sum=target_sum)
        return y[:, int(table.var_names.get_loc(gene))]
    return target_expression(table, [gene], target_norm=target_norm, target_sum=target_sum).ravel()


def resolve_measured(pred: Predictions, truth: bool | str | None) -> bool:
    """Whether to show measured expression: ``"auto"`` when available; ``True`` insists on it; a layer name
    (see :func:`with_truth`) is shown; ``False`` / ``None`` never."""
    if truth is None:
        return False
    if truth == "auto":
        return has_measured(pred)
    if isinstance(truth, str):
        if truth not in pred.table.layers:
            msg = (
                f"Expected measured expression in layers[{truth!r}], found layers {list(pred.table.layers)}; pass "
                "`truth=` 'auto', True, False or an existing layer."
            )
            raise KeyError(msg)
        return True
    if truth is True and not has_measured(pred):
        msg = (
            "`truth=True` but the table has no measured expression (no layers['measured'], no counts in X); use "
            "truth='auto'."
        )
        raise ValueError(msg)
    if not isinstance(truth, bool):
        msg = f"Expected `truth` to be True, False, 'auto' or a layer name; found {truth!r}."
        raise ValueError(msg)
    return truth


def with_truth(pred: Predictions, truth: Any) -> Predictions:
    """``pred`` reading its measured expression from the layer ``truth`` when it names one (not ``"auto"``)."""
    from dataclasses import replace

    if isinstance(truth, str) and truth != "auto":
        return replace(pred, truth_layer=truth)
    return pred


def robust_limits(*arrays: np.ndarray, quantiles: tuple[float, float] = (0.01, 0.99)) -> tuple[float, float]:
    """Shared colour limits of several value arrays (quantiles of their union, finite values only)."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.quantile(values, quantiles))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


# ---------------------------------------------------------------------------------------------- image


@dataclass(frozen=True)
class DisplayImage:
    """An RGB array ``(h, w, 3)`` uint8, row 0 at the smallest y, and its extent in the sample's coordinates."""

    rgb: np.ndarray
    bounds: tuple[float, float, float, float]  # (left, top, right, bottom) = (x0, y0, x1, y1), y down
    level: int


def _level_bounds(level: Any, x0: int, y0: int, x1: int, y1: int) -> tuple[float, float, float, float]:
    """Extent in coordinate units of level pixels ``[x0, x1) x [y0, y1)`` (pixel edges)."""
    (sx, sy), (ox, oy) = level.scale, level.offset
    return ((x0 - ox) / sx, (y0 - oy) / sy, (x1 - ox) / sx, (y1 - oy) / sy)


def _to_rgb(array: Any) -> np.ndarray:
    rgb = read_local(array.transpose("y", "x", "c") if hasattr(array, "transpose") else array)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    rgb = rgb[..., :3]
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def image_levels_of(sdata: Any) -> list[Any] | None:
    """Pyramid levels of the sample's H&E image, or ``None`` for a table or a sample without image."""
    from hespotex.pp._patches import image_levels

    if not hasattr(sdata, "images"):
        return None
    info = get_sample_info(sdata)
    if info.image_key is None or info.image_key not in sdata.images:
        return None
    return image_levels(sdata, info)


def overview_image(sdata: Any, *, max_px: int = MAX_IMAGE_PX) -> DisplayImage | None:
    """The whole H&E image at display size, from the finest pyramid level whose longest side is at most ``max_px``.

    Reads one coarse level (never the full-resolution slide when a pyramid exists); a single-level
    image larger than ``max_px`` is read with a stride. The result is kept while the image element
    lives (read-only: do not modify its array). ``None`` when the sample has no image.
    """
    levels = image_levels_of(sdata)
    if not levels:
        return None
    key = (levels[0].image_key, max_px)
    element = sdata.images[key[0]]
    try:  # read once per image element and size (views are rebuilt for every served page)
        cached = _DISPLAY_CACHE.setdefault(sdata, {})
    except TypeError:
        cached = {}
    if key not in cached or cached[key][0] is not element:  # a replaced image element is read again
        cached[key] = (element, _read_overview(levels, max_px))
    return cached[key][1]


def _read_overview(levels: list[Any], max_px: int) -> DisplayImage:
    fitting = [lv for lv in levels if max(lv.shape) <= max_px]
    level = fitting[0] if fitting else levels[-1]
    h, w = level.shape
    stride = max(1, int(np.ceil(max(h, w) / max_px)))
    if stride > 1:
        logger.info(
            "The coarsest level of %r is %dx%d px; reading every %d-th pixel for display.",
            level.image_key,
            w,
            h,
            stride,
        )
    rgb = _to_rgb(level.array[:, ::stride, ::stride])
    x1, y1 = rgb.shape[1] * stride, rgb.shape[0] * stride
    return DisplayImage(rgb, _level_bounds(level, 0, 0, x1, y1), level.level)


def crop_image(sdata: Any, window: tuple[float, float, float, float], *, max_px: int = 600) -> DisplayImage | None:
    """The image inside ``window = (x0, y0, x1, y1)`` (sample coordinates), from the coarsest level that still
    gives the window ``max_px`` pixels across (or its full resolution when smaller). ``None`` without image."""
    levels = image_levels_of(sdata)
    if not levels:
        return None
    x0, y0, x1, y1 = window
    span = max(x1 - x0, y1 - y0, 1e-9)
    want = min(max_px, span * min(levels[0].scale))  # pixels across the window
    ok = [lv for lv in levels if span * min(lv.scale) >= want * 0.999]
    level = ok[-1] if ok else levels[0]
    (sx, sy), (ox, oy) = level.scale, level.offset
    h, w = level.shape
    px0, px1 = int(np.clip(np.floor(x0 * sx + ox), 0, w)), int(np.clip(np.ceil(x1 * sx + ox), 0, w))
    py0, py1 = int(np.clip(np.floor(y0 * sy + oy), 0, h)), int(np.clip(np.ceil(y1 * sy + oy), 0, h))
    if px1 <= px0 or py1 <= py0:
        return None
    rgb = _to_rgb(level.array[:, py0:py1, px0:px1])
    return DisplayImage(rgb, _level_bounds(level, px0, py0, px1, py1), level.level)
