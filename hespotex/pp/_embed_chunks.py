"""The embedding stage of a streamed run, shared by the streamed prediction
(:mod:`hespotex.tl.prediction._stream_stages`) and :func:`hespotex.pp.embed` ``(..., out=...)``
(:mod:`hespotex.pp._embed_store`): patches embedded ``step`` rows at a time into a zarr array of a progress group,
each step written whole and then marked done, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np

from hespotex._settings import settings
from hespotex.pp._encode import encode_two_scales

logger = logging.getLogger("hespotex")


BATCH_SIZE = 64  # patches per encoder forward, as hx.pp.embed


def encoder_batch_size(encoder: Any) -> int:
    """Patches per encoder forward: :data:`BATCH_SIZE` at 224 px inputs, more for smaller inputs (about the
    same pixels per forward, at most 4 x :data:`BATCH_SIZE`). Small patches (16 µm Visium HD bins at 32 px)
    spend most of a forward in per-layer overheads, which a larger batch spreads over more patches."""
    side = max(int(getattr(encoder, "input_size", 224) or 224), 1)
    return int(min(4 * BATCH_SIZE, max(BATCH_SIZE, BATCH_SIZE * (224 // side) ** 2)))


class ZarrRows:
    """Rows ``(n, width)`` of a zarr array stored in another order, read by integer index (a block at a time).

    ``position[i]`` is the stored row of row ``i``. Indexing with an integer array reads each touched
    zarr chunk once and returns a float32 array in the order asked.
    """

    def __init__(self, array: Any, position: np.ndarray) -> None:
        self.array = array
        self.position = np.asarray(position, dtype=np.int64)
        self.shape = (len(self.position), int(array.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        pos = self.position[np.asarray(idx)]
        order = np.argsort(pos, kind="stable")
        rows = np.asarray(self.array.get_orthogonal_selection((pos[order], slice(None))), dtype=np.float32)
        out = np.empty_like(rows)
        out[order] = rows
        return out


@contextlib.contextmanager
def quiet_progress():
    """Hide the per-chunk progress bars of inner loops (the stage has its own bar)."""
    saved = settings.progress
    settings.progress = False
    try:
        yield
    finally:
        settings.progress = saved


def done_array(group: Any, name: str, n: int) -> Any:
    """A bool array of ``n`` done markers, one zarr chunk (one small file) each: setting one writes only it."""
    if name in group:
        return group[name]
    return group.create_array(name, shape=(max(n, 1),), chunks=(1,), dtype=bool, fill_value=False)


def progress_array(
    group: Any, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any = np.float32, *, done: str
) -> Any:
    """The array ``name`` of the progress group, created when missing (or of another shape). A new array
    holds nothing yet, so done markers ``done`` left from an older one are deleted with it: a marker can
    never vouch for rows that are not there (they would read as zeros)."""
    if name in group:
        arr = group[name]
        if tuple(arr.shape) == tuple(shape):
            return arr
        del group[name]
    if done in group:
        del group[done]
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype)


def embed_stage(
    group: Any,
    plan: Any,
    encoder: Any,
    *,
    step: int,
    rows: int,
    device: str | None,
    tta: bool = False,
    stain_norm: tuple[dict, dict] | None = None,
    context: Any = None,
) -> ZarrRows:
    """Stage 1: embeddings in reading order, ``step`` spots at a time, with done markers (with ``context``, the plan
    of the same spots' context crops: two-scale embeddings, :mod:`hespotex.pp._context`)."""
    from tqdm.auto import tqdm

    n = len(plan.order)
    if "order" not in group:
        group.create_array("order", data=np.asarray(plan.order, dtype=np.int64), chunks=(max(n, 1),))
    order = np.asarray(group["order"][:])
    if not np.array_equal(order, plan.order):
        msg = (
            "The stored reading order of this slide's patches differs from the current one; pass `overwrite=True` "
            "to start over."
        )
        raise ValueError(msg)
    width = encoder.num_features * (1 if context is None else 2)
    emb = progress_array(group, "embeddings", (n, width), (rows, width), done="embeddings_done")
    n_steps = -(-n // step)
    done = done_array(group, "embeddings_done", n_steps)
    todo = [j for j in np.flatnonzero(~np.asarray(done[:n_steps], dtype=bool))]
    logger.info("Embedding: %d of %d chunks to compute (%d done before).", len(todo), n_steps, n_steps - len(todo))
    t0, n_done, first = time.perf_counter(), 0, {}
    for j in tqdm(todo, desc="embedding chunks", unit="chunk", disable=not settings.progress):
        timings = None if first else first  # the first chunk's first batch: the embedding's start-up
        embed_chunk(
            emb, done, plan, encoder, int(j), step=step, device=device, tta=tta, timings=timings,
            stain_norm=stain_norm, context=context,
        )  # fmt: skip
        n_done += len(plan.order[j * step : (j + 1) * step])
    if n_done:
        # the first batch (loader's first read, the encoder's first forward: a start-up paid once per slide)
        # apart from the rest, whose rate is the steady embedding throughput
        seconds = time.perf_counter() - t0
        t1, n1 = first.get("first_batch_at", t0) - t0, first.get("first_batch_n", 0)
        logger.info(
            "Embedded %d patches in %.2f s (%.1f patches/s); first batch of %d after %.2f s, then %.1f patches/s.",
            n_done, seconds, n_done / max(seconds, 1e-9), n1, t1, (n_done - n1) / max(seconds - t1, 1e-9),
        )  # fmt: skip
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    return ZarrRows(emb, position)


def embed_chunk(
    emb: Any,
    done: Any,
    plan: Any,
    encoder: Any,
    j: int,
    *,
    step: int,
    device: str | None,
    tta: bool = False,
    timings: dict | None = None,
    stain_norm: tuple[dict, dict] | None = None,
    context: Any = None,
) -> None:
    """Embed reading-order rows ``[j*step, (j+1)*step)``, write them, then mark step ``j`` done."""
    idx = plan.order[j * step : (j + 1) * step]
    sub = replace(plan, x0=plan.x0[idx], y0=plan.y0[idx], order=np.arange(len(idx)))
    wide = None if context is None else replace(context, x0=context.x0[idx], y0=context.y0[idx], order=sub.order)
    with quiet_progress():
        feats = encode_two_scales(
            sub, wide, encoder, batch_size=encoder_batch_size(encoder), device=device, tta=tta, timings=timings,
            stain_norm=stain_norm,
        )  # fmt: skip
    if not np.isfinite(feats).all():
        msg = f"The encoder {encoder.name!r} produced NaN or infinite embeddings; check its weights and the image."
        raise ValueError(msg)
    emb[j * step : j * step + len(idx)] = feats
    done[j] = True
