"""Embeddings written chunk by chunk into a zarr store (:func:`hespotex.pp.embed` ``(..., out=path)``), never the whole
``n_spots x n_features`` array in memory, and handed to the table as a lazy dask array over that store.

The store is a zarr group that hespotex owns (:mod:`hespotex._ownership` marker of kind ``"embeddings"``):

- ``embeddings``: ``n_spots x n_features`` float32, rows in the table's order, chunks of :data:`CHUNK_ROWS` rows;
- ``embeddings_done``: one done marker per step of rows (a step is written whole, then marked), and ``order``:
  the rows' order (the table's), as the streamed prediction's embedding stage writes them
  (:func:`hespotex.pp._embed_chunks.embed_stage`, shared with it);
- attributes ``hespotex_embed``: the embedding record that ``uns["hespotex_embed"][key_added]`` receives (cache key,
  encoder, µm/px, ...), ``n_obs`` and ``complete``.

A rerun with the same record (same cache key: image, spots, encoder, options) resumes: finished steps are kept, only
the missing ones are embedded (a complete store is only opened). Another record, or a zarr store hespotex did not
write as embeddings, is replaced only with ``overwrite=True``, and then crash-safely: the new store is written beside
under a temporary name and swapped in once complete (an error or interruption leaves the old store as it was, the
temporary one removed; such a replacement restarts from scratch). Anything that is not a zarr store (a user's
folder, a file) is never replaced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

    from hespotex.pp._encoders import Encoder
    from hespotex.pp._patches import PatchPlan

logger = logging.getLogger("hespotex")

#: Rows per zarr chunk of the stored embeddings (whole encoder batches).
CHUNK_ROWS = 1024
#: At most about this many bytes of float32 embeddings are held in memory per step (a step is written whole).
STEP_BYTES = 2**26
#: Attribute of the store's group that holds the embedding record.
RECORD_ATTR = "hespotex_embed"
WHAT = "embeddings store (zarr) of hx.pp.embed"


def jsonable(value: Any) -> Any:
    """``value`` as JSON types (numpy arrays and numbers as lists and Python numbers), as zarr attributes keep it."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _layout(n: int, width: int) -> tuple[int, int]:
    """``(rows per chunk, rows per step)``: steps are whole chunks, at most :data:`STEP_BYTES` of float32."""
    rows = max(1, min(CHUNK_ROWS, n))
    step = max(1, STEP_BYTES // (4 * width) // rows) * rows
    return rows, step


def _existing_store(path: Path, record: dict[str, Any], *, n: int, overwrite: bool, own_store: Path | None) -> Any:
    """The root group of the store at ``path`` when it holds embeddings with ``record``'s cache key (to resume or
    reuse), else ``None``: a new store is to be written. What holds nothing (an empty folder, a store of ours
    interrupted before its record) is removed; another store stays until its replacement is whole, and is
    replaced only with ``overwrite`` (a zarr store; never anything else)."""
    import zarr

    from hespotex import _ownership

    if own_store is not None and path.resolve() == Path(own_store).resolve():
        msg = (
            f"`out` {str(path)!r} is the sample's own SpatialData store; embeddings go to a store of their own "
            "(e.g. 'embeddings.zarr' beside it)."
        )
        raise ValueError(msg)
    if not path.exists() and not path.is_symlink():
        return None
    _ownership.check_zarr_replaceable(path, what=WHAT)  # a user's folder or a file: refused, overwrite or not
    ours = _ownership.owned(path, "embeddings")
    root = zarr.open_group(path, mode="r+", use_consolidated=False) if ours else None
    stored = dict(root.attrs.get(RECORD_ATTR, {}) or {}) if root is not None else {}
    if ours and stored.get("cache_key") == record["cache_key"] and root.attrs.get("n_obs") == n:
        done = "complete" if root.attrs.get("complete") else "partly written: resuming"
        logger.info("%s already holds these embeddings (%s).", path, done)
        return root
    if not any(path.iterdir()) or (ours and not stored):
        shutil.rmtree(path)  # nothing to lose: written anew in place
        return None
    if not overwrite:
        found = (
            f"other embeddings (cache key {stored.get('cache_key')}, encoder {stored.get('encoder')!r}; "
            f"these: cache key {record['cache_key']}, encoder {record.get('encoder')!r})"
            if ours
            else "a zarr store that hx.pp.embed did not write"
        )
        msg = f"{str(path)!r} holds {found}. Pass `overwrite=True` to replace it, or choose another `out`."
        raise FileExistsError(msg)
    return None


def _new_store(path: Path, record: dict[str, Any], *, n: int) -> Any:
    """A new store's root group at ``path`` (an empty folder, or nothing there): marked, with ``record``."""
    import zarr

    from hespotex import _ownership

    if not path.exists():
        _ownership.make_dir(path)
    _ownership.mark(path, "embeddings")  # first: a store interrupted before its record is ours, replaced freely
    root = zarr.open_group(path, mode="a", zarr_format=3)
    root.attrs.update({RECORD_ATTR: jsonable(record), "n_obs": int(n), "complete": False})
    return root


def embed_to_store(
    table: AnnData,
    out: str | Path,
    plan: PatchPlan,
    ctx: PatchPlan | None,
    encoder: Encoder,
    *,
    record: dict[str, Any],
    key_added: str,
    overwrite: bool,
    device: str | None,
    tta: bool = False,
    stain_norm: tuple[dict, dict] | None = None,
    own_store: str | Path | None = None,
) -> Any:
    """Embed every planned patch into the zarr store ``out``, step by step (resumable), and set ``obsm[key_added]``
    to a dask array over it; returns that array. ``record`` is the embedding record (``uns`` and the store's
    attributes); ``stain_norm`` = (slide stain, reference) as :func:`hespotex.pp._encode.encode_patches`.
    Writes the store, ``table.obsm[key_added]`` and ``table.uns["hespotex_embed"][key_added]``."""
    import dask.array as da

    from hespotex import _ownership
    from hespotex._constants import EMBED_RECORD_KEY
    from hespotex.pp._embed_chunks import embed_stage

    path = Path(out)
    n = table.n_obs
    width = encoder.num_features * (1 if ctx is None else 2)
    with contextlib.ExitStack() as stack:
        root = _existing_store(path, record, n=n, overwrite=overwrite, own_store=own_store)
        if root is None:  # a new store: in place (resumable), or, replacing another, beside until whole
            target = stack.enter_context(_ownership.written_beside(path, replace=True)) if path.exists() else path
            root = _new_store(target, record, n=n)
        if not root.attrs.get("complete"):
            rows, step = root.attrs.get("layout") or _layout(n, width)
            root.attrs["layout"] = [int(rows), int(step)]
            table_order = np.arange(n, dtype=np.int64)  # rows in the table's order: a dask array reads them as is
            flat = replace(plan, order=table_order)
            wide = None if ctx is None else replace(ctx, order=table_order)
            logger.info("Embedding %d patches with %s into %s, %d at a time.", n, encoder.name, path, step)
            embed_stage(
                root, flat, encoder, step=step, rows=rows, device=device, tta=tta, stain_norm=stain_norm, context=wide
            )
            root.attrs["complete"] = True
    # the stack closed: a replacement is at `path` now (on an error it was removed, the old store untouched)
    array = da.from_zarr(str(path), component="embeddings")
    if array.shape != (n, width):
        msg = f"Expected embeddings of shape {(n, width)} in {str(path)!r}, found {array.shape}; pass `overwrite=True`."
        raise ValueError(msg)
    table.obsm[key_added] = array
    table.uns.setdefault(EMBED_RECORD_KEY, {})[key_added] = record
    return array
