"""The stages of a streamed prediction (see :mod:`hespotex.tl.prediction._stream`): embeddings in reading order,
graph blocks with halos through the network, and expression rows in table order, each written to the progress
group unit by unit with done markers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._settings import resolve_device, settings
from hespotex.pp._embed_chunks import (  # noqa: F401 (the embedding stage lives in pp, shared with hx.pp.embed)
    BATCH_SIZE,
    done_array,
    embed_stage,
    encoder_batch_size,
    progress_array,
)
from hespotex.tl.model._data import GraphData, spatial_blocks
from hespotex.tl.prediction._smoothing import smooth_rows, smoothing_matrix

if TYPE_CHECKING:
    from hespotex.tl.model._model import HESpotEx

logger = logging.getLogger("hespotex")


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


def graph_stage(
    group: Any, model: HESpotEx, sample: GraphData, *, block_size: int, device: str | None
) -> list[np.ndarray]:
    """Stage 2: blocks with halos through the network; each block's core results written, then marked done."""
    blocks = bounded_blocks(sample.coords_um, block_size)
    bgroup = group.require_group("blocks")
    done = done_array(group, "blocks_done", len(blocks))
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
    smooth: float | None = None,
    sample: GraphData | None = None,
):
    """Stage 3: expression in table order, whole zarr chunks per step, with done markers; with ``smooth``, each
    step's rows smoothed over their neighbours in ``sample``'s graph, whose unsmoothed rows are computed for it."""
    from tqdm.auto import tqdm

    from hespotex.tl.prediction._checks import check_finite_predictions

    n, n_genes = len(latent), len(model.genes)
    expr = progress_array(group, "expression", (n, n_genes), (rows, n_genes), done="expression_done")
    n_steps = -(-n // step)
    done = done_array(group, "expression_done", n_steps)
    todo = [int(j) for j in np.flatnonzero(~np.asarray(done[:n_steps], dtype=bool))]
    logger.info("Expression: %d of %d row chunks to compute (%d done before).", len(todo), n_steps, n_steps - len(todo))
    net, dev = model.module_, resolve_device(device)
    S = None if smooth is None else smoothing_matrix(sample, smooth)

    def heads(index):
        return gene_heads(net, latent[index], None if features is None else features[index], dev)

    was_training = net.training
    net.eval()
    net.to(dev)
    try:
        for j in tqdm(todo, desc="writing expression", unit="chunk", disable=not settings.progress):
            a, b = j * step, min(n, (j + 1) * step)
            rows = heads(slice(a, b)) if S is None else smooth_rows(S, a, b, heads)
            check_finite_predictions(rows, first_spot=a)  # never write (and mark done) NaN predictions
            expr[a:b] = rows
            done[j] = True
    finally:
        net.train(was_training)
    return expr


def model_stages(
    group: Any,
    model: HESpotEx,
    sample: GraphData,
    *,
    layout: dict[str, Any],
    device: str | None,
    smooth: float | None = None,
) -> tuple[np.ndarray, Any, Any]:
    """Stages 2 and 3 of one model into ``group``: ``(latent, attention, expression)``, the expression a zarr
    array of the group in table order (a single model's progress group, or an ensemble member's)."""
    blocks = graph_stage(group, model, sample, block_size=layout["chunk_size"], device=device)
    latent, features, attention = gather_blocks(group, int(sample.n), len(blocks))
    expr = expression_stage(
        group, model, latent, features, step=layout["expression_step"], rows=layout["expression_rows"], device=device,
        smooth=smooth, sample=sample,
    )  # fmt: skip
    return latent, attention, expr
