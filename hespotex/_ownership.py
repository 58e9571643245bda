"""What hespotex may replace: folders it wrote carry a small marker file, checked before anything is deleted.

Every folder hespotex creates as a whole (a saved model, a streamed prediction store, a cohort's output
folder) gets ``.hespotex.json`` (what kind of folder it is, the hespotex version, when). With
``overwrite=True`` hespotex replaces such a folder, and only such a folder: a folder without the marker
(a user's documents, a SpatialData store written by something else) or with another kind's marker is
refused, overwrite or not, with an error naming what is in it. Temporary siblings (a store being
written, a model folder being saved) get names unique to the run, so they never collide with a user's
folder, and everything is created with the user's umask (not the 0700 / 0600 of :mod:`tempfile`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Name of the marker file hespotex writes into every folder it creates as a whole.
MARKER = ".hespotex.json"
#: Kinds of folders: a saved model, a streamed prediction store, the output folder of a cohort, a data set
#: that :mod:`hespotex.datasets` wrote (e.g. a Visium HD fixture), the output folder of `hespotex demo`, the
#: embeddings store of `hx.pp.embed(..., out=...)`.
KINDS = ("model", "store", "cohort", "dataset", "demo", "embeddings")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hespotex")
    except Exception:  # metadata missing in a source checkout
        return "unknown"


def umask() -> int:
    """The process's file mode creation mask (read without changing it for more than an instant)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a sibling unique to this call, renamed into place; mode from the umask."""
    path = Path(path)
    tmp = temp_sibling(path, suffix=".tmp")
    try:
        with open(tmp, "x") as fh:  # created with 0666 & ~umask, like any file the user writes
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def mark(folder: str | Path, kind: str) -> None:
    """Write the marker of a folder of ``kind`` (one of :data:`KINDS`) that hespotex created."""
    if kind not in KINDS:
        msg = f"Expected a folder kind among {KINDS}, found {kind!r}."
        raise ValueError(msg)
    record = {
        "written_by": "hespotex",
        "kind": kind,
        "hespotex": _version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text_atomic(Path(folder) / MARKER, json.dumps(record, indent=1) + "\n")


def marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker record of ``folder``, or ``None`` when it has none (or one that is not hespotex's)."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("written_by") != "hespotex" or record.get("kind") not in KINDS:
        return None
    return record


def owned(folder: str | Path, kind: str) -> bool:
    """Whether ``folder`` is a folder of ``kind`` that hespotex wrote (it holds that kind's marker)."""
    record = marker(folder)
    return record is not None and record["kind"] == kind


def _contents(path: Path, limit: int = 5) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError as err:
        return f"(cannot be listed: {err.strerror})"
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"{len(names)} {'entry' if len(names) == 1 else 'entries'}: {shown}"


def refuse_non_folder(path: Path, *, what: str, option: str) -> None:
    """Raise :class:`FileExistsError` when ``path`` is a symbolic link or a file (never replaced). Reads only."""
    if path.is_symlink() or not path.is_dir():
        kind_found = "a symbolic link" if path.is_symlink() else "a file"
        msg = (
            f"{str(path)!r} is {kind_found}, not a {what}; hespotex never replaces it ({option} or not). "
            "Choose another path, or move it away yourself."
        )
        raise FileExistsError(msg)


def check_replaceable(
    path: str | Path, kind: str, *, what: str, option: str = "`overwrite=True`", legacy: Iterable[str] = ()
) -> None:
    """Raise :class:`FileExistsError` unless hespotex may replace ``path`` as a folder of ``kind``.

    Replaceable: nothing there, an empty folder, a folder with ``kind``'s marker, or a folder whose
    every entry is one of ``legacy`` (the files hespotex writes there, for folders written before
    markers existed). Anything else (a file, a folder of the user, of another tool, of another kind)
    is refused whatever ``overwrite`` says; the message names what is there. ``what`` names the
    folder in the message ("model folder", "prediction store"...), ``option`` the overwrite option.
    Reads only.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    refuse_non_folder(path, what=what, option=option)
    record = marker(path)
    if record is not None and record["kind"] == kind:
        return
    entries = {p.name for p in path.iterdir()}
    if not entries or (legacy and entries <= set(legacy)):
        return
    found = (
        f"a hespotex {record['kind']} folder, not a {what}"
        if record is not None
        else f"a folder that hespotex did not write (no {MARKER} marker): {_contents(path)}"
    )
    msg = (
        f"{str(path)!r} is {found}. It is not a {what}, so hespotex never deletes or replaces it, "
        f"{option} or not. Choose another path, or move it away yourself."
    )
    raise FileExistsError(msg)


#: Metadata files at the top of a zarr store (v3 ``zarr.json``; v2 ``.zgroup`` / ``.zarray`` / ``.zattrs`` and the
#: consolidated ``.zmetadata``).
ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")


def _zarr_node(path: Path) -> bool:
    return any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))


def check_zarr_replaceable(path: str | Path, *, what: str = "zarr store", option: str = "`overwrite=True`") -> None:
    """Raise :class:`FileExistsError` unless ``path`` may be replaced as a zarr store (by any writer).

    Replaceable: nothing there, an empty folder, or a zarr store: a folder with zarr metadata at its top
    (``zarr.json``, ``.zgroup`` or ``.zarray``) that holds nothing else than zarr metadata, hespotex's
    marker and zarr groups or arrays (a SpatialData store written by spatialdata, by hespotex or another
    tool; a zarr array with its chunks). Anything else (a file, a symbolic link, a user's folder, a folder
    with zarr metadata beside files that are not zarr's) is refused whatever ``overwrite`` says; the
    message names what is there. Reads only.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    refuse_non_folder(path, what=what, option=option)
    entries = list(path.iterdir())
    if not entries:
        return
    if (path / ".zarray").is_file() or _node_type(path / "zarr.json") == "array":
        return  # a zarr array: everything beside its metadata is its chunks
    if _zarr_node(path):
        foreign = sorted(
            p.name + ("/" if p.is_dir() else "")
            for p in entries
            if not (p.name in ZARR_METADATA or p.name in (MARKER, ".DS_Store") or (p.is_dir() and _zarr_node(p)))
        )
        if not foreign:
            return
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        found = f"a zarr store that also holds {len(foreign)} {'entry' if len(foreign) == 1 else 'entries'} that "
        found += f"zarr did not write: {shown}"
    else:
        found = f"a folder that is not a zarr store (no zarr.json or .zgroup at its top): {_contents(path)}"
    msg = (
        f"Expected a {what} (or nothing) at {str(path)!r}; found {found}. hespotex replaces nothing but a zarr "
        f"store ({option} or not), so nothing was deleted. Choose another path, or move it away yourself."
    )
    raise FileExistsError(msg)


def _node_type(path: Path) -> str | None:
    """``node_type`` of a zarr v3 ``zarr.json`` (``"group"`` / ``"array"``), ``None`` when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record.get("node_type") if isinstance(record, dict) else None


def remove(
    path: str | Path, kind: str, *, what: str, option: str = "`overwrite=True`", legacy: Iterable[str] = ()
) -> None:
    """Delete the folder ``path`` after :func:`check_replaceable` allowed it (nothing there: nothing done)."""
    path = Path(path)
    check_replaceable(path, kind, what=what, option=option, legacy=legacy)
    if path.is_dir():
        shutil.rmtree(path)


def temp_sibling(path: str | Path, *, suffix: str = ".partial") -> Path:
    """A path beside ``path`` that nothing uses and no one else will pick: ``.{name}.{random}{suffix}``.

    Nothing is created; the name is unique to the call (random), so a temporary folder or file of
    one run never collides with a user's file or another run's.
    """
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")
        if not tmp.exists() and not tmp.is_symlink():
            return tmp


def make_dir(path: str | Path) -> Path:
    """Create the folder ``path`` (parents too) with the user's umask; error if it exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()  # mode 0o777 & ~umask
    return path


def commit_dir(tmp: str | Path, path: str | Path) -> Path:
    """Move the finished folder ``tmp`` (a :func:`temp_sibling` of ``path``) into place, replacing ``path``.

    The caller has checked ``path`` with :func:`check_replaceable`. The old folder is first renamed
    aside, then ``tmp`` renamed into place, then the old one deleted: a crash leaves either the old
    folder or the new one at ``path`` (and at worst a hidden ``.old`` sibling), never a half-written one.
    """
    tmp, path = Path(tmp), Path(path)
    if path.exists():
        old = temp_sibling(path, suffix=".old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


@contextmanager
def written_beside(path: str | Path, *, replace: bool, create: bool = True) -> Iterator[Path]:
    """Write ``path`` crash-safely: yield a :func:`temp_sibling` to fill (an empty folder, or nothing there with
    ``create=False``, for writers that create it), then move it into place; nothing is written at ``path`` before.

    With ``replace`` an existing ``path`` (checked by the caller: :func:`check_replaceable` or
    :func:`check_zarr_replaceable`, and ``overwrite``) is swapped out by :func:`commit_dir`; without, the
    temporary folder is renamed to ``path`` and a folder that appeared there meanwhile (another writer's)
    is never replaced (an error). An error while filling (or an interruption) leaves ``path`` as it was
    and removes the temporary folder.
    """
    path = Path(path)
    tmp = make_dir(temp_sibling(path)) if create else temp_sibling(path)  # unique to this call; the user's umask
    try:
        yield tmp
        if replace:
            commit_dir(tmp, path)
        else:
            os.rename(tmp, path)  # refused when a folder with content (or a file) is there now: it is not ours
    finally:
        if tmp.exists() or tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def replacing_dir(
    path: str | Path, kind: str, *, what: str, overwrite: bool, legacy: Iterable[str] = ()
) -> Iterator[Path]:
    """Write a folder of ``kind`` at ``path`` crash-safely: yield an empty temporary sibling to fill, then mark it
    and move it into place with :func:`commit_dir` (:func:`written_beside`).

    An existing ``path`` is replaced only with ``overwrite`` and only when hespotex wrote it
    (:func:`check_replaceable`: a file, a user's or another tool's folder is refused whatever ``overwrite``
    says). An error while filling leaves ``path`` as it was and removes the temporary folder.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        check_replaceable(path, kind, what=what, legacy=legacy)
        if not overwrite:
            msg = f"{str(path)!r} already exists; pass `overwrite=True` to replace it, or choose another path."
            raise FileExistsError(msg)
    with written_beside(path, replace=True) as tmp:
        yield tmp
        mark(tmp, kind)
