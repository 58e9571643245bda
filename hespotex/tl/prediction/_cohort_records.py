"""What a cohort run leaves per slide in its output folder: the slide's name, its output paths, the completion
marker written last (``{name}.done.json``, atomically) and the error record of a failed slide (see
:mod:`hespotex.tl.prediction._cohort`)."""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Suffix of the completion marker written beside each slide's zarr store.
DONE_SUFFIX = ".done.json"


ERROR_SUFFIX = ".error.txt"


#: Frames of the traceback kept in the returned table (the innermost ones).
TRACEBACK_FRAMES = 4


def slide_name(path: str | Path) -> str:
    """Name of a slide's outputs: the file name without its extension (``.ome.tif`` counts as one).

    ``TCGA-A1-A0SB-01Z-00-DX1.B34C267B.svs`` -> ``TCGA-A1-A0SB-01Z-00-DX1.B34C267B``;
    ``slide.ome.tiff`` -> ``slide``; a zarr store ``slide.zarr`` from ``hespotex tile`` -> ``slide``.
    """
    name = Path(path).name.rstrip("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    if stem.lower().endswith(".ome"):
        stem = stem[: -len(".ome")]
    return stem


def output_paths(out: str | Path, name: str) -> dict[str, Path]:
    """Where a slide called ``name`` writes under ``out``: ``zarr``, ``done`` marker, ``error`` file."""
    out = Path(out)
    return {"zarr": out / f"{name}.zarr", "done": out / f"{name}{DONE_SUFFIX}", "error": out / f"{name}{ERROR_SUFFIX}"}


def read_marker(out: str | Path, name: str) -> dict[str, Any] | None:
    """The completion marker of slide ``name`` under ``out`` (``None`` when it is not finished).

    A slide is finished when its marker can be read *and* its store records the predictions it
    names as complete, so a marker beside a store that was replaced or damaged does not count.
    """
    paths = output_paths(out, name)
    if not (paths["done"].is_file() and paths["zarr"].exists()):
        return None
    try:
        record = json.loads(paths["done"].read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a marker that cannot be read does not count as finished
    if not isinstance(record, dict) or not _store_complete(paths["zarr"], str(record.get("key_added", "hespotex"))):
        return None
    return record


def _store_complete(path: Path, key: str) -> bool:
    """Whether the streamed predictions ``key`` in the store ``path`` are committed (and their table is there)."""
    import zarr

    from hespotex.tl.prediction._stream_store import PROGRESS_GROUP

    try:
        root = zarr.open_group(path, mode="r", use_consolidated=False)
        group = root[PROGRESS_GROUP][key]
        return bool(group.attrs.get("complete")) and key in root["tables"]
    except (KeyError, OSError, ValueError, zarr.errors.ZarrError):
        return False


def write_json_atomic(path: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` as JSON through a sibling unique to the call, renamed into place (mode from the umask)."""
    from hespotex._ownership import write_text_atomic

    write_text_atomic(path, json.dumps(dict(record), indent=1, default=str))


def unlink_record(path: Path) -> None:
    """Delete a completion marker hespotex wrote (a JSON record of a slide); refuse any other file of that name."""
    if not path.exists():
        return
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not (isinstance(record, dict) and "slide" in record and "model_id" in record):
        msg = (
            f"{str(path)!r} is not a completion marker written by hespotex; it is never deleted. Move it away, or "
            "choose another `out`."
        )
        raise FileExistsError(msg)
    path.unlink()


def prepare_out(out: Path) -> None:
    """Create the cohort folder ``out`` (marked as hespotex's when it is new or empty); an existing file is refused."""
    from hespotex import _ownership

    if out.exists() and not out.is_dir():
        msg = f"The output folder {str(out)!r} is a file; expected a folder (created if needed). Choose another `out`."
        raise NotADirectoryError(msg)
    if not out.exists():
        out.mkdir(parents=True)
    if _ownership.marker(out) is None and not any(out.iterdir()):
        _ownership.mark(out, "cohort")


def traceback_summary(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-TRACEBACK_FRAMES)).rstrip()


def error_message(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"
