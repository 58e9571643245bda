"""Resolve "whatever the user passed" into what :func:`hespotex.pp.embed` and :func:`hespotex.tl.predict` need.

Both take a SpatialData sample. An AnnData is accepted too:

- one that already carries the embeddings the function reads is passed through unchanged;
- one in the scanpy / squidpy Visium or HEST convention (an image in ``uns["spatial"]``, or a
  full-resolution ``image=`` argument) becomes a sample with :func:`hespotex.io.from_scanpy`; the
  function runs on that sample and everything it wrote to the sample's table (``obsm``, ``layers``,
  ``obsp``, ``uns`` entries, new or replaced, and deletions; new or replaced ``var`` columns) is
  written back to the AnnData the user passed, which is returned where the function returns that
  table; a function with a ``copy`` argument given ``copy=True`` writes into a copy of that AnnData
  instead and returns the copy (the AnnData passed is left untouched), or, when it wrote nothing to
  the table (e.g. a streamed prediction, which lives in its store), its own result;
- any other AnnData gets an error naming the three ways to supply an image.

:func:`accepts_anndata` wraps the function; it reads its ``data``, ``image``, ``microns_per_pixel`` and
``library_id`` arguments.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger("hespotex")

IMAGE_ARGS = ("image", "microns_per_pixel", "library_id")


def _is_anndata(data: Any) -> bool:
    from anndata import AnnData

    return isinstance(data, AnnData)


def _snapshot(mapping: Mapping) -> dict[str, Any]:
    """Identity of every entry, nested through dicts (what a writer replaces gets a new identity)."""
    return {k: (_snapshot(v), id(v)) if isinstance(v, Mapping) else id(v) for k, v in mapping.items()}


def _write_back(source: Mapping, target: Any, before: dict[str, Any], *, nested: bool) -> int:
    """Copy the entries of ``source`` that are new or replaced since ``before`` into ``target``; mirror deletions.

    Returns the number of entries written or deleted."""
    changed = 0
    for key in [k for k in before if k not in source]:
        if key in target:
            del target[key]
            changed += 1
    for key, value in source.items():
        old = before.get(key)
        if old is None:
            target[key] = value
            changed += 1
        elif nested and isinstance(value, Mapping) and isinstance(old, tuple):
            if not isinstance(target.get(key), Mapping):
                target[key] = value
                changed += 1
                continue
            sub = target[key] if isinstance(target[key], dict) else dict(target[key])
            n = _write_back(value, sub, old[0], nested=True)
            if n:
                target[key] = sub
                changed += n
        elif (old[1] if isinstance(old, tuple) else old) != id(value):
            target[key] = value
            changed += 1
    return changed


def accepts_anndata(*, reads: str | None = None) -> Callable:
    """Let a function of a SpatialData sample take a scanpy-style AnnData (see the module notes).

    ``reads`` names the function's argument holding the ``obsm`` key of the embeddings it can use
    instead of the image: an AnnData holding them is passed through.
    """

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            data = bound.arguments.get("data")
            given = {k: bound.arguments.get(k) for k in IMAGE_ARGS if bound.arguments.get(k) is not None}
            if not _is_anndata(data):
                if given and hasattr(data, "images"):
                    msg = (
                        f"{sorted(given)} apply to an AnnData input; a SpatialData carries its image and scale. "
                        "Drop them, or add the image to the SpatialData with an `hx.io` reader."
                    )
                    raise ValueError(msg)
                return func(*args, **kwargs)
            key = bound.arguments.get(reads, signature.parameters[reads].default) if reads else None
            if key is not None and key in data.obsm:
                if given:
                    logger.info("obsm[%r] already holds embeddings; %s not used.", key, sorted(given))
                return func(*bound.args, **{**bound.kwargs, **dict.fromkeys(given)})
            from hespotex.io._scanpy import from_scanpy

            sample = from_scanpy(data, keep_uns_images=False, **given)
            table = sample.tables["table"]
            before = {name: _snapshot(getattr(table, name)) for name in ("obsm", "layers", "obsp", "uns")}
            var_before = table.var.copy()
            copy = bool(bound.arguments.get("copy", False))
            if copy:
                data = data.copy()
                bound.arguments["copy"] = False
            bound.arguments["data"] = sample
            for k in given:
                bound.arguments[k] = None
            result = func(*bound.args, **bound.kwargs)
            changed = 0
            for name in ("obsm", "layers", "obsp", "uns"):
                changed += _write_back(getattr(table, name), getattr(data, name), before[name], nested=name == "uns")
            for column in table.var.columns:  # new or replaced var columns (e.g. predict's mask of predicted genes)
                if column not in var_before or not table.var[column].equals(var_before[column]):
                    data.var[column] = table.var[column].reindex(data.var_names).to_numpy()
                    changed += 1
            if copy and (changed or result is table):
                return data
            return data if result is table else result

        return wrapper

    return decorate
