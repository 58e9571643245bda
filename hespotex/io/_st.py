"""Read legacy Spatial Transcriptomics (ST; her2st, STUtility layouts) as a hespotex sample.

Legacy ST arrays print spots of 100 µm on a square grid with 200 µm between centres. A section is
described by three files:

- a count table (TSV, optionally gzipped): one row per spot, indexed ``"{x}x{y}"`` (array
  coordinates), the header row holding gene symbols;
- a spot table (TSV, the ST spot detector's ``*_selection.tsv``): ``x``, ``y`` (array
  coordinates), ``pixel_x`` (image **column**), ``pixel_y`` (image **row**), ``selected`` (1 under
  tissue) and possibly ``new_x``, ``new_y``;
- the H&E image the pixel coordinates refer to.

Join policy. Only spots with ``selected == 1`` are kept; count rows of unselected spots (outside
the tissue) are dropped. A count row with no spot, or a selected spot with no count row, is a
disagreement between the two files: ``join="exact"`` (default) raises, naming how many and which;
``join="inner"`` keeps the spots present in both and records the dropped ids in
``uns["hespotex_io"]``. (The public her2st files list 1-3 selected spots per section that have no
count row, 8 of 918 in all; :func:`hespotex.datasets.her2st` reads them with ``join="inner"``.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from hespotex.io._anndata import check_sample_id, is_integer_valued, sample_id_from_path
from hespotex.io._build import build_sample
from hespotex.io._image import open_image

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def read_st(
    counts: str | Path | pd.DataFrame,
    spots: str | Path | pd.DataFrame,
    image: Any,
    *,
    sample_id: str | None = None,
    spot_diameter_um: float = 100.0,
    microns_per_pixel: float | None = None,
    spot_pitch_um: float = 200.0,
    join: Literal["exact", "inner"] = "exact",
    counts_are_raw: bool | None = None,
) -> SpatialData:
    """Read one legacy ST section (count table, spot table, H&E image) as a sample.

    Reads the three inputs; writes nothing.

    Parameters
    ----------
    counts
        Count table: a TSV(.gz) path or a DataFrame, spots × genes, index ``"{x}x{y}"``, columns
        gene symbols. Duplicated gene names or spot ids raise an error.
    spots
        Spot table: a TSV path or a DataFrame with columns ``x``, ``y``, ``pixel_x`` (image column),
        ``pixel_y`` (image row) and optionally ``selected``.
    image
        The H&E image: a file path (JPEG/PNG; TIFF read lazily) or an ``(h, w, c)`` array, or ``None``.
    sample_id
        Names the elements and the coordinate system; default: the count file name without suffixes.
    spot_diameter_um
        Spot diameter (100 µm for legacy ST).
    microns_per_pixel
        Microns per image pixel. Default: ``spot_pitch_um`` divided by the pixels per array step of
        a least-squares fit of the pixel coordinates on the array coordinates (logged).
    spot_pitch_um
        Distance between adjacent spot centres on the array (200 µm for legacy ST).
    join
        What to do when count and spot tables disagree (see the module notes): ``"exact"`` raises,
        ``"inner"`` keeps the spots present in both.
    counts_are_raw
        Whether the table holds raw counts; ``None`` detects integer values.

    Returns
    -------
    A sample (:class:`spatialdata.SpatialData`): image ``{sample_id}_image``, circles
    ``{sample_id}_spots`` and table ``"table"`` with ``X`` (CSR ``float32``), ``obs`` (the spot
    table's columns except ``selected``), ``obsm["spatial"]`` = (``pixel_x``, ``pixel_y``),
    ``uns["hespotex_sample"]`` and ``uns["hespotex_io"]`` (reader, join, fitted scale, dropped spots).
    """
    if join not in ("exact", "inner"):
        msg = f"Expected join='exact' or join='inner', found {join!r}."
        raise ValueError(msg)
    if sample_id is None:
        sample_id = sample_id_from_path(counts) if isinstance(counts, (str, Path)) else "sample"
    sample_id = check_sample_id(sample_id)
    table = read_count_table(counts) if not isinstance(counts, pd.DataFrame) else counts
    spot_table = read_spot_table(spots) if not isinstance(spots, pd.DataFrame) else spots
    _check_unique(table.columns, "genes", "the count table's header")
    _check_unique(table.index, "spot ids", "the count table's index")
    spot_table = _prepare_spots(spot_table)

    selected = spot_table[spot_table["selected"] == 1] if "selected" in spot_table else spot_table
    unselected_ids = pd.Index(spot_table.index.difference(selected.index))
    row_ids = pd.Index(table.index.astype(str))
    outside = row_ids.isin(unselected_ids)
    if outside.any():
        logger.info(
            "read_st %s: dropping %d count rows of spots outside the tissue (selected != 1).",
            sample_id,
            int(outside.sum()),
        )
    rows_without_spot = row_ids[~outside & ~row_ids.isin(selected.index)]
    spots_without_counts = selected.index[~selected.index.isin(row_ids)]
    if len(rows_without_spot) or len(spots_without_counts):
        detail = (
            f"{len(rows_without_spot)} count rows have no spot in the spot table (e.g. {list(rows_without_spot[:5])}) "
            f"and {len(spots_without_counts)} selected spots have no count row (e.g. {list(spots_without_counts[:5])})"
        )
        if join == "exact":
            msg = (
                f"The count table and the spot table of {sample_id!r} disagree: {detail}. Expected the same "
                "'{x}x{y}' spot ids in both. Check that the files belong to the same section, or pass "
                "join='inner' to keep only the spots present in both."
            )
            raise ValueError(msg)
    keep = row_ids.isin(selected.index)
    if len(rows_without_spot) or len(spots_without_counts):
        logger.warning(
            "read_st %s: %s; keeping the %d spots present in both (join='inner').", sample_id, detail, int(keep.sum())
        )
    table = table.loc[keep]
    row_ids = row_ids[keep]
    obs = selected.loc[row_ids].drop(columns=["selected"], errors="ignore")
    if len(obs) == 0:
        msg = (
            f"The section {sample_id!r} is empty: none of its {len(spot_table)} spots is both selected (under "
            f"tissue) and in the count table ({len(keep)} rows). Check the files."
        )
        raise ValueError(msg)

    fit = None
    if microns_per_pixel is None:
        fit = fit_array_scale(obs, spot_pitch_um=spot_pitch_um)
        microns_per_pixel = fit["microns_per_pixel"]
        logger.info(
            "read_st %s: %.1f px per array step (x %.1f, y %.1f) -> %.4f µm/px for a %g µm spot pitch.",
            sample_id,
            fit["px_per_step"],
            fit["px_per_step_x"],
            fit["px_per_step_y"],
            microns_per_pixel,
            spot_pitch_um,
        )
    x = table.to_numpy()
    if counts_are_raw is None:
        counts_are_raw = is_integer_valued(x)
        if not counts_are_raw:
            logger.warning(
                "read_st %s: the count table is not integer-valued; treating it as normalised (counts=False).",
                sample_id,
            )
    uns = {
        "hespotex_io": {
            "reader": "read_st",
            "join": join,
            "spot_pitch_um": float(spot_pitch_um),
            "n_rows_without_spot": len(rows_without_spot),
            "n_spots_without_counts": len(spots_without_counts),
            "rows_without_spot": [str(s) for s in rows_without_spot],
            "spots_without_counts": [str(s) for s in spots_without_counts],
            **({k: float(v) for k, v in fit.items()} if fit is not None else {}),
        }
    }
    obs.index = obs.index.astype(str)
    obs.index.name = None
    return build_sample(
        open_image(image) if image is not None else None,
        obs[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64),
        x,
        obs=obs,
        var=pd.DataFrame(index=pd.Index(table.columns.astype(str))),
        sample_id=sample_id,
        microns_per_pixel=float(microns_per_pixel),
        spot_diameter_um=float(spot_diameter_um),
        counts=bool(counts_are_raw),
        uns=uns,
    )


def read_count_table(path: str | Path) -> pd.DataFrame:
    """Read an ST count table (TSV, optionally compressed) without renaming duplicated genes.

    pandas would silently rename a repeated header ``"A"`` to ``"A.1"``; the header is read raw so
    that duplicates stay visible (and are rejected by :func:`read_st`).
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Expected a count table (TSV) at {str(path)!r}, found no file."
        raise FileNotFoundError(msg)
    header = _read_header(path)
    table = pd.read_csv(path, sep="\t", header=None, skiprows=1, index_col=0)
    if table.shape[1] != len(header) - 1:
        msg = (
            f"Expected {len(header) - 1} gene columns in {path.name} (its header), found {table.shape[1]} in the "
            "rows. Expected a spots × genes TSV whose header row starts with an empty cell."
        )
        raise ValueError(msg)
    table.columns = pd.Index(header[1:])
    table.index = pd.Index(table.index.astype(str))
    return table


def _read_header(path: Path) -> list[str]:
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    with opener(path, "rt") as handle:
        return handle.readline().rstrip("\r\n").split("\t")


def read_spot_table(path: str | Path) -> pd.DataFrame:
    """Read an ST spot table (``*_selection.tsv``)."""
    path = Path(path)
    if not path.is_file():
        msg = f"Expected a spot table (TSV) at {str(path)!r}, found no file."
        raise FileNotFoundError(msg)
    return pd.read_csv(path, sep="\t")


def fit_array_scale(spots: pd.DataFrame, *, spot_pitch_um: float = 200.0) -> dict[str, float]:
    """Fit pixel coordinates on array coordinates (least squares, affine) and derive microns per pixel.

    Returns pixels per array step along x and y, their mean, the RMS residual (px) and
    ``microns_per_pixel = spot_pitch_um / px_per_step``.
    """
    a = np.column_stack([spots["x"].to_numpy(float), spots["y"].to_numpy(float), np.ones(len(spots))])
    b = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    if len(spots) < 3 or np.linalg.matrix_rank(a) < 3:
        msg = (
            f"Cannot derive microns per pixel from {len(spots)} spots that do not span two array directions. "
            "Pass `microns_per_pixel=` explicitly."
        )
        raise ValueError(msg)
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)  # rows: d/dx, d/dy, offset; columns: pixel_x, pixel_y
    step_x, step_y = float(np.hypot(*coef[0])), float(np.hypot(*coef[1]))
    if min(step_x, step_y) <= 0 or max(step_x, step_y) / min(step_x, step_y) > 1.1:
        logger.warning("The array steps along x (%.1f px) and y (%.1f px) differ by more than 10%%.", step_x, step_y)
    step = (step_x + step_y) / 2.0
    residual = b - a @ coef
    return {
        "px_per_step_x": step_x,
        "px_per_step_y": step_y,
        "px_per_step": step,
        "fit_rms_px": float(np.sqrt((residual**2).sum(axis=1).mean())),
        "microns_per_pixel": float(spot_pitch_um) / step,
    }


def _prepare_spots(spot_table: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in _SPOT_COLUMNS if c not in spot_table.columns]
    if missing:
        msg = (
            f"Expected spot table columns {list(_SPOT_COLUMNS)} (+ 'selected'), found {list(spot_table.columns)}; "
            f"missing {missing}."
        )
        raise ValueError(msg)
    spot_table = spot_table.copy()
    for col in ("x", "y"):
        values = pd.to_numeric(spot_table[col], errors="coerce").to_numpy(float)
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            msg = (
                f"Expected integer array coordinates in spot table column {col!r}, found "
                f"{spot_table[col].head().tolist()}."
            )
            raise ValueError(msg)
        spot_table[col] = values.astype(int)
    for col in ("pixel_x", "pixel_y"):
        spot_table[col] = pd.to_numeric(spot_table[col], errors="coerce").astype(float)
        bad = ~np.isfinite(spot_table[col].to_numpy())
        if bad.any():
            msg = (
                f"Expected numeric pixel coordinates in spot table column {col!r}, found {int(bad.sum())} missing "
                "or non-numeric."
            )
            raise ValueError(msg)
    spot_table.index = pd.Index(spot_table["x"].astype(str) + "x" + spot_table["y"].astype(str))
    _check_unique(spot_table.index, "spot ids", "the spot table ('{x}x{y}' from columns x, y)")
    return spot_table


def _check_unique(names: pd.Index, what: str, where: str) -> None:
    dup = names[names.duplicated()]
    if len(dup):
        msg = (
            f"Expected unique {what} in {where}, found {len(dup)} duplicated, e.g. {list(dup[:5])}. Deduplicate "
            "them first."
        )
        raise ValueError(msg)
