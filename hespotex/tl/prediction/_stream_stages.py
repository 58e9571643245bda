"""The stages of a streamed prediction (see :mod:`hespotex.tl.prediction._stream`): embeddings in reading order,
graph blocks with halos through the network, and expression rows in table order, each written to the progress
group unit by unit with done markers."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._settings import resolve_device, settings
from hespotex.tl.model._data import GraphData, spatial_blocks

if TYPE_CHECKING:
    from hespotex.tl.model._model import HESpotEx

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


def bounded_blocks(coords: np.ndarray, max_nodes: int) -> list[np.ndarray]:
    """:func:`~hespotex.tl.model._data.spatial_blocks`, with blocks of more than 1.5 × ``max_nodes`` spots
    (uneven tissue) split again, so every block's memory is bounded."""
    out = []
    for block in spatial_blocks(coords, max_nodes):
        if len(block) > 1.5 * max_nodes and len(block) < len(coords):
            out.extend(block[sub] for sub in bounded_blocks(coords[block], max_nodes))
        else:
            out.append(block)
    return out


@contextlib.contextmanager
def _quiet_progress():
    """Hide the per-chunk progress bars of inner loops (the stage has its own bar)."""
    saved = settings.progress
    settings.progress = False
    try:
        yield
    finally:
        settings.progress = saved


def _done_array(group: Any, name: str, n: int) -> Any:
    """A bool array of ``n`` done markers, one zarr chunk (one small file) each: setting one writes only it."""
    if name in group:
        return group[name]
    return group.create_array(name, shape=(max(n, 1),), chunks=(1,), dtype=bool, fill_value=False)


def _array(
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
    emb = _array(group, "embeddings", (n, width), (rows, width), done="embeddings_done")
    n_steps = -(-n // step)
    done = _done_array(group, "embeddings_done", n_steps)
    todo = [j for j in np.flatnonzero(~np.asarray(done[:n_steps], dtype=bool))]
    logger.info("Embedding: %d of %d chunks to compute (%d done before).", len(todo), n_steps, n_steps - len(todo))
    t0, n_done, first = time.perf_counter(), 0, {}
    for j in tqdm(todo, desc="embedding chunks", unit="chunk", disable=not settings.progress):
        timings = None if first else first  # the first chunk's first batch: the embedding's start-up
        _embed_chunk(
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


def _embed_chunk(
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
    from hespotex.pp._encode import encode_two_scales

    idx = plan.order[j * step : (j + 1) * step]
    sub = replace(plan, x0=plan.x0[idx], y0=plan.y0[idx], order=np.arange(len(idx)))
    wide = None if context is None else replace(context, x0=context.x0[idx], y0=context.y0[idx], order=sub.order)
    with _quiet_progress():
        feats = encode_two_scales(
            sub, wide, encoder, batch_size=encoder_batch_size(encoder), device=device, tta=tta, timings=timings,
            stain_norm=stain_norm,
        )  # fmt: skip
    if not np.isfinite(feats).all():
        msg = f"The encoder {encoder.name!r} produced NaN or infinite embeddings; check its weights and the image."
        raise ValueError(msg)
    emb[j * step : j * step + len(idx)] = feats
    done[j] = True


def graph_stage(
    group: Any, model: HESpotEx, sample: GraphData, *, block_size: int, device: str | None
) -> list[np.ndarray]:
    """Stage 2: blocks with halos through the network; each block's core results written, then marked done."""
    blocks = bounded_blocks(sample.coords_um, block_size)
    bgroup = group.require_group("blocks")
    done = _done_array(group, "blocks_done", len(blocks))
    saved = set(bgroup.group_keys())
    todo = [i for i, d in enumerate(np.asarray(done[: len(blocks)], dtype=bool)) if not (d and str(i) in saved)]
    logger.info("Graph: %d of %d blocks to predict (%d done before).", len(todo), len(blocks), len(blocks) - len(todo))
    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="predicting blocks", unit="block", disable=not settings.progress)

        def on_block(i: int, core: np.ndarray, result: dict[str, Any]) -> None:
            _save_block(bgroup, done, todo[i], core, result)
            bar.update()

        try:
            model.predict_graph(sample, device=device, blocks=[blocks[i] for i in todo], on_block=on_block)
        finally:
            bar.close()
    return blocks


def _save_block(bgroup: Any, done: Any, b: int, core: np.ndarray, result: dict[str, Any]) -> None:
    """Write one block's core results to ``blocks/{b}``, then mark it done."""
    g = bgroup.require_group(str(b))
    for name in list(g.array_keys()):
        del g[name]
    g.create_array("core", data=np.asarray(core, dtype=np.int64))
    g.create_array("latent", data=result["latent"])
    if result["features"] is not None:
        g.create_array("features", data=result["features"])
    if result["attention"] is not None:
        rows, cols, vals = result["attention"]
        g.create_array("attention_index", data=np.vstack([rows, cols]).astype(np.int64))
        g.create_array("attention_value", data=np.asarray(vals, dtype=np.float32))
    done[b] = True


def gather_blocks(group: Any, n: int, n_blocks: int):
    """Latent, decoder features and attention of every spot from the finished blocks (in table order)."""
    import scipy.sparse as sp

    bgroup = group["blocks"]
    latent = features = None
    att: list[np.ndarray] = []
    for b in range(n_blocks):
        g = bgroup[str(b)]
        core = np.asarray(g["core"][:])
        lat = np.asarray(g["latent"][:])
        if latent is None:
            latent = np.empty((n, lat.shape[1]), dtype=np.float32)
        latent[core] = lat
        if "features" in g:
            feat = np.asarray(g["features"][:])
            if features is None:
                features = np.empty((n, feat.shape[1]), dtype=np.float32)
            features[core] = feat
        if "attention_index" in g:
            att.append((np.asarray(g["attention_index"][:]), np.asarray(g["attention_value"][:])))
    attention = None
    if att:
        index = np.concatenate([a[0] for a in att], axis=1)
        attention = sp.csr_matrix((np.concatenate([a[1] for a in att]), (index[0], index[1])), shape=(n, n))
    return latent, features, attention


def gene_heads(net: Any, latent: np.ndarray, features: np.ndarray | None, device: Any) -> np.ndarray:
    """Expression of spots from their latent ``ẑ`` and graph-decoder features: the network's last step
    (``direct_head(ẑ) + decoder.gene_head(features)``, as :meth:`HESpotExNet.forward` adds them)."""
    import torch

    with torch.inference_mode():
        y = net.direct_head(torch.from_numpy(latent).to(device))
        if net.decoder is not None:
            y = y + net.decoder.gene_head(torch.from_numpy(features).to(device))
    return y.float().cpu().numpy()


def expression_stage(
    group: Any,
    model: HESpotEx,
    latent: np.ndarray,
    features: np.ndarray | None,
    *,
    step: int,
    rows: int,
    device: str | None,
):
    """Stage 3: expression in table order, whole zarr chunks per step, with done markers."""
    from tqdm.auto import tqdm

    from hespotex.tl.prediction._checks import check_finite_predictions

    n, n_genes = len(latent), len(model.genes)
    expr = _array(group, "expression", (n, n_genes), (rows, n_genes), done="expression_done")
    n_steps = -(-n // step)
    done = _done_array(group, "expression_done", n_steps)
    todo = [int(j) for j in np.flatnonzero(~np.asarray(done[:n_steps], dtype=bool))]
    logger.info("Expression: %d of %d row chunks to compute (%d done before).", len(todo), n_steps, n_steps - len(todo))
    net, dev = model.module_, resolve_device(device)
    was_training = net.training
    net.eval()
    net.to(dev)
    try:
        for j in tqdm(todo, desc="writing expression", unit="chunk", disable=not settings.progress):
            a, b = j * step, min(n, (j + 1) * step)
            rows = gene_heads(net, latent[a:b], None if features is None else features[a:b], dev)
            check_finite_predictions(rows, first_spot=a)  # never write (and mark done) NaN predictions
            expr[a:b] = rows
            done[j] = True
    finally:
        net.train(was_training)
    return expr


def model_stages(
    group: Any, model: HESpotEx, sample: GraphData, *, layout: dict[str, Any], device: str | None
) -> tuple[np.ndarray, Any, Any]:
    """Stages 2 and 3 of one model into ``group``: ``(latent, attention, expression)``, the expression a zarr
    array of the group in table order (a single model's progress group, or an ensemble member's)."""
    blocks = graph_stage(group, model, sample, block_size=layout["chunk_size"], device=device)
    latent, features, attention = gather_blocks(group, int(sample.n), len(blocks))
    expr = expression_stage(
        group, model, latent, features, step=layout["expression_step"], rows=layout["expression_rows"], device=device
    )
    return latent, attention, expr
