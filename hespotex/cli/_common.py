"""What the ``hespotex`` subcommands share: recognising inputs, checking outputs, argument types."""

from __future__ import annotations

import argparse
from pathlib import Path


def is_zarr_store(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup", ".zattrs"))


def is_visium_outs(path: Path) -> bool:
    return path.is_dir() and ((path / "spatial").is_dir() or any(path.glob("*filtered_feature_bc_matrix.h5")))


def output_problem(path: Path, flag: str, *, kind: str, beside: bool = False) -> str | None:
    """Why nothing can be written at ``path`` (``--out``), or ``None``: an existing file where a folder is
    expected, or a folder (or its nearest existing parent) this user cannot write to. ``beside``: the
    output is written next to ``path`` and renamed into place (a model folder), so its parent must be writable."""
    import os

    if path.exists() and not path.is_dir():
        return f"{flag} {str(path)!r} is an existing file; expected {kind} (created if needed). Choose another path."
    start = path.parent if beside else path
    parent = start if start.exists() else next((p for p in start.parents if p.exists()), Path("."))
    if not parent.is_dir():
        return f"{flag} {str(path)!r} is inside {str(parent)!r}, which is a file, not a folder. Choose another path."
    if not os.access(parent, os.W_OK | os.X_OK):
        return (
            f"{flag} {str(path)!r}: cannot write to {str(parent)!r} (permission denied or a read-only file "
            "system). Choose a folder you can write to."
        )
    return None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        msg = f"expected a positive number, found {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive whole number, found {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value
