"""Streaming prediction (``hx.tl.predict(..., out=...)``): bounded memory, written to zarr as it goes, resumable.

A slide of ``N`` spots (or tiles) goes through four stages. Each stage writes its results into a
progress group ``hespotex_progress/{key_added}`` of the output zarr and marks every finished unit
done, so a run that is interrupted (killed, out of time, Ctrl-C) and started again redoes at most
one unit of the stage it was in, and none of the finished ones:

1. **Embeddings.** Spots are cut in the patch plan's spatial reading order (one crop box read per
   batch of neighbouring spots, from the coarsest pyramid level that keeps the encoder's input
   resolution) and run through the model's encoder ``step`` spots at a time
   (:func:`hespotex.pp._embed.encode_patches`, whose loader thread reads the next batch while the
   encoder runs). Rows go to ``embeddings`` (``N × width`` float32) *in reading order*, so each step
   writes whole zarr chunks; ``embeddings_done[j]`` marks step ``j``. Skipped when the table already
   holds ``obsm[embedding_key]``.
2. **Graph.** The decoder's k-NN graph of all centres is built in memory (``N × k`` integers).
   Compact spatial blocks of at most ``chunk_size`` core spots run through the network with a halo
   of ``n_hops`` neighbour rings, so each block's result is exact; a block's embeddings are read
   from zarr and standardised on the fly (never a full standardised copy). Each block writes its
   core spots, latent ``ẑ``, the graph decoder's per-spot features (the input of its gene head,
   ``latent_dim × n_hops`` values for the default preset) and attention to ``blocks/{i}``, then
   ``blocks_done[i]``. The gene heads do not run here (see :meth:`HESpotEx.predict_graph`), so a
   block's memory does not depend on the number of genes.
3. **Expression.** Blocks are spatial, tables are in any order, and writing a block's rows into a
   table-ordered array would rewrite most zarr chunks once per block. So the latent and decoder
   features of all spots (about 1.3 kB per spot for the default preset, whatever the number of genes)
   are gathered in memory, and the two gene heads (direct and graph; their sum is the network's
   output) run on consecutive table rows, at most ``chunk_size`` and about 64 MB of predictions at a
   time: each step writes whole chunks of ``expression`` (``N × genes`` float32) and
   ``expression_done[j]``.
4. **Table.** A new table ``key_added`` (the spots, the model's genes) whose ``layers[key_added]`` is
   a dask array over ``expression``, with latent, sparse attention, centres and parameters, is
   written into the output SpatialData zarr by spatialdata / anndata, which stream the dask layer
   chunk by chunk. The group is then marked complete (the commit) and only then are the progress
   arrays deleted (done markers first), so a run interrupted at any write or delete redoes the table
   from whole progress arrays, or finds it finished and deletes the leftovers; a rerun returns the
   stored table. A done marker never outlives its data: an array created anew drops its markers.

Peak memory is one chunk of embeddings, one block's forward pass (core and halo × embedding width),
one step of expression rows (~64 MB), and ``O(N × latent)`` per-spot arrays, never the ``N × genes``
predictions or the ``N × width`` embeddings. The output zarr is either the sample's own store
(``out="auto"``): the table is added beside its image; or another path: a new SpatialData with the
spot shapes and the prediction table and no copy of the image (``uns[key_added]["params"]["source"]``
records where the image is, ``attrs["hespotex_slide"]`` is copied from the slide). Such a store
is created beside its path under a name unique to the run, carries hespotex's marker
(:mod:`hespotex._ownership`) and is the only kind of folder ``out`` may name when it exists: any
other folder is refused, ``overwrite`` or not. Another slide goes beside the elements already there;
``overwrite=True`` replaces only the table ``key_added`` (and its progress group).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._sample import SAMPLE_KEY, get_sample_info, get_table, spot_centres
from hespotex._settings import resolve_device, settings
from hespotex.tl.model._data import GraphData, spatial_blocks

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from hespotex.tl.model._model import HESpotEx

logger = logging.getLogger("hespotex")

PROGRESS_GROUP = "hespotex_progress"
FORMAT_VERSION = 1
BATCH_SIZE = 64  # patches per encoder forward, as hx.pp.embed
DEFAULT_CHUNK_SIZE = 10_000  # spots per embedding chunk and graph block
_STEP_BYTES = 2**26  # at most ~64 MB of float32 predictions per step of expression rows
_ZARR_CHUNK_BYTES = 2**24  # ~16 MB zarr chunks of expression rows


# ---------------------------------------------------------------------------------------------- helpers
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


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


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


# ---------------------------------------------------------------------------------------------- identity
def _slide_identity(table: AnnData, sample_id: str, plan: Any) -> dict[str, Any]:
    """What makes results belong to this slide: sample id, the spots (names and centres) and the image pixels."""
    from hespotex.pp._embed import image_fingerprint

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(spot_centres(table)).tobytes())
    h.update("\n".join(map(str, table.obs_names)).encode())
    return {
        "sample_id": str(sample_id),
        "n_spots": int(table.n_obs),
        "spots": h.hexdigest()[:16],
        "image": image_fingerprint(plan)[:16] if plan is not None else None,
    }


def _describe(slide: dict[str, Any]) -> str:
    return f"sample {slide.get('sample_id')!r}, {slide.get('n_spots')} spots"


# ---------------------------------------------------------------------------------------------- output store
def _resolve_out(sdata: SpatialData, out: str | Path) -> tuple[Path, bool]:
    """The output path and whether it is the sample's own zarr store."""
    own_path = getattr(sdata, "path", None)
    if isinstance(out, str) and out == "auto":
        if own_path is None:
            msg = (
                "out='auto' writes into the sample's own zarr store, but this SpatialData is not backed by one "
                "(sdata.path is None). Write it first (hx.io.write_zarr) and read it back, or pass a path as `out`."
            )
            raise ValueError(msg)
        return Path(own_path), True
    path = Path(out)
    own = own_path is not None and path.resolve() == Path(own_path).resolve()
    return path, own


def _check_existing(group: Any, path: Path, *, key: str, slide: dict[str, Any], model_id: str) -> str | None:
    """Why the progress in ``group`` cannot be resumed (another slide or model), or ``None``."""
    stored = dict(group.attrs)
    if stored.get("slide") != slide:
        return (
            f"{str(path)!r} already holds streamed predictions {key!r} of another slide ({_describe(stored.get('slide', {}))}; "
            f"this slide: {_describe(slide)})"
        )
    if stored.get("model_id") != model_id:
        return f"{str(path)!r} already holds streamed predictions {key!r} of another model ({stored.get('model_id')}; this model: {model_id})"
    return None


STORE_WHAT = "zarr store written by hx.tl.predict"


def _op(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one write or delete of the commit and clean-up (a single place, so tests can crash the run at each)."""
    return fn(*args, **kwargs)


def _delete(group: Any, name: str) -> None:
    del group[name]


def _open_store(
    sdata: SpatialData, path: Path, own: bool, *, key: str, slide: dict[str, Any], model_id: str, overwrite: bool
):
    """Open (or create) the output store and the progress group of ``key``; refuse another slide's or model's results.

    Another path than the sample's own store must be a store hespotex wrote (its marker), an empty
    folder or nothing: anything else is refused, ``overwrite`` or not. In a store of hespotex this
    slide is added beside the other elements; ``overwrite=True`` replaces only what ``key`` names.
    """
    import zarr
    from spatialdata import SpatialData

    from hespotex import _ownership

    existing = False
    if not own:
        if path.exists() or path.is_symlink():
            _ownership.check_replaceable(path, "store", what=STORE_WHAT)
            if not any(path.iterdir()):
                path.rmdir()
        existing = path.exists()
        if not existing:  # written beside (a name unique to this run) and renamed: a store that exists is whole
            info = get_sample_info(sdata)
            attrs = {k: v for k, v in dict(getattr(sdata, "attrs", {}) or {}).items() if k == "hespotex_slide"}
            tmp = _ownership.temp_sibling(path)
            try:
                SpatialData(shapes={info.shapes_key: sdata.shapes[info.shapes_key]}, attrs=attrs).write(tmp)
                _ownership.mark(tmp, "store")
                tmp.rename(path)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    progress = root.require_group(PROGRESS_GROUP)
    if key in progress and not progress[key].attrs.get("slide"):
        del progress[key]  # interrupted before it recorded what it holds
    if key in progress and progress[key].attrs.get("complete") and not ("tables" in root and key in root["tables"]):
        logger.warning("%s records finished predictions %r, but their table is gone: predicting again.", path, key)
        del progress[key]
    if key in progress:
        reason = _check_existing(progress[key], path, key=key, slide=slide, model_id=model_id)
        if reason and not overwrite:
            msg = f"{reason}. Pass `overwrite=True` to replace them, or another `out` or `key_added`."
            raise FileExistsError(msg)
        if overwrite:
            del progress[key]
    elif "tables" in root and key in root["tables"] and not overwrite:
        msg = f"{str(path)!r} already holds a table {key!r} that this streamed prediction did not write. Pass `overwrite=True` to replace it, or another `key_added`."
        raise FileExistsError(msg)
    if existing:  # checked above that nothing of `key` is refused: now add this slide's spots
        _add_spots(sdata, path, key=key, overwrite=overwrite)
    return root, progress


def _add_spots(sdata: SpatialData, path: Path, *, key: str, overwrite: bool) -> None:
    """Write this slide's spot shapes into an existing store of hespotex, beside the other slides' elements.

    Spots of the same name and geometry are kept; spots of another slide under the same name are
    replaced only with ``overwrite=True`` and only when no other table of the store annotates them.
    """
    import spatialdata
    from anndata.io import read_elem

    name = get_sample_info(sdata).shapes_key
    shapes = sdata.shapes[name]
    store = spatialdata.read_zarr(path, selection=("shapes",))
    if name in store.shapes:
        stored = store.shapes[name]
        if len(stored) == len(shapes) and bool(stored.geometry.reset_index(drop=True).geom_equals(shapes.geometry.reset_index(drop=True)).all()):
            return
        import zarr

        tables = zarr.open_group(path, mode="r", use_consolidated=False).get("tables")
        users = []
        for t, g in [] if tables is None else tables.groups():
            region = read_elem(g["uns"]).get("spatialdata_attrs", {}).get("region") if "uns" in g else None
            if t != key and name in np.atleast_1d(region if region is not None else []).tolist():
                users.append(t)
        if users:
            msg = (
                f"{str(path)!r} holds other spots named {name!r} (another slide), annotated by its table(s) {users}; "
                f"this slide's spots cannot be added under that name. Predict into another `out`."
            )
            raise FileExistsError(msg)
        if not overwrite:
            msg = f"{str(path)!r} holds other spots named {name!r} (another slide). Pass `overwrite=True` to replace them, or another `out`."
            raise FileExistsError(msg)
        store.delete_element_from_disk(name)
        del store.shapes[name]
    store.shapes[name] = shapes
    store.write_element(name)


def _clean_progress(group: Any, path: Path) -> None:
    """Delete the progress arrays of a finished prediction (done markers first), then consolidate the metadata."""

    names = sorted(list(group.array_keys()) + list(group.group_keys()), key=lambda n: (not n.endswith("_done"), n))
    for name in names:
        _op(_delete, group, name)
    if _consolidated(path) is not None:
        _op(_consolidate, path)


def _consolidated(path: Path) -> Any:
    """The store's consolidated metadata, or ``None`` when it has none."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=zarr.errors.ZarrUserWarning)  # not in the zarr v3 spec yet
        return zarr.open_group(path, mode="r").metadata.consolidated_metadata


def _consolidate(path: Path) -> None:
    """Rewrite the store's consolidated metadata (as spatialdata does after writing an element)."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=zarr.errors.ZarrUserWarning)  # parquet shapes are not zarr nodes
        zarr.consolidate_metadata(zarr.open_group(path, mode="r+", use_consolidated=False).store)


def _progress_is_clean(group: Any, path: Path, key: str) -> bool:
    """No progress arrays left of a finished prediction, and consolidated metadata (if any) not listing them."""

    if list(group.array_keys()) or list(group.group_keys()):
        return False
    consolidated = _consolidated(path)
    if consolidated is None:
        return True
    prefix = f"{PROGRESS_GROUP}/{key}"
    entries = consolidated.flattened_metadata
    if any(k.startswith(prefix + "/") for k in entries):
        return False
    own = entries.get(prefix)
    return own is None or bool(dict(own.attributes).get("complete"))


# ---------------------------------------------------------------------------------------------- stages
def _embed_stage(
    group: Any, plan: Any, encoder: Any, *, step: int, rows: int, device: str | None, tta: bool = False
) -> ZarrRows:
    """Stage 1: embeddings in reading order, ``step`` spots at a time, with done markers."""
    from tqdm.auto import tqdm

    n = len(plan.order)
    if "order" not in group:
        group.create_array("order", data=np.asarray(plan.order, dtype=np.int64), chunks=(max(n, 1),))
    order = np.asarray(group["order"][:])
    if not np.array_equal(order, plan.order):
        msg = "The stored reading order of this slide's patches differs from the current one; pass `overwrite=True` to start over."
        raise ValueError(msg)
    emb = _array(group, "embeddings", (n, encoder.num_features), (rows, encoder.num_features), done="embeddings_done")
    n_steps = -(-n // step)
    done = _done_array(group, "embeddings_done", n_steps)
    todo = [j for j in np.flatnonzero(~np.asarray(done[:n_steps], dtype=bool))]
    logger.info("Embedding: %d of %d chunks to compute (%d done before).", len(todo), n_steps, n_steps - len(todo))
    t0, n_done = time.perf_counter(), 0
    for j in tqdm(todo, desc="embedding chunks", unit="chunk", disable=not settings.progress):
        _embed_chunk(emb, done, plan, encoder, int(j), step=step, device=device, tta=tta)
        n_done += len(plan.order[j * step : (j + 1) * step])
    if n_done:
        seconds = time.perf_counter() - t0
        logger.info("Embedded %d patches in %.2f s (%.1f patches/s).", n_done, seconds, n_done / max(seconds, 1e-9))
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    return ZarrRows(emb, position)


def _embed_chunk(
    emb: Any, done: Any, plan: Any, encoder: Any, j: int, *, step: int, device: str | None, tta: bool = False
) -> None:
    """Embed reading-order rows ``[j*step, (j+1)*step)``, write them, then mark step ``j`` done."""
    from hespotex.pp._embed import encode_patches

    idx = plan.order[j * step : (j + 1) * step]
    sub = replace(plan, x0=plan.x0[idx], y0=plan.y0[idx], order=np.arange(len(idx)))
    with _quiet_progress():
        feats = encode_patches(sub, encoder, batch_size=BATCH_SIZE, device=device, tta=tta)
    if not np.isfinite(feats).all():
        msg = f"The encoder {encoder.name!r} produced NaN or infinite embeddings; check its weights and the image."
        raise ValueError(msg)
    emb[j * step : j * step + len(idx)] = feats
    done[j] = True


def _graph_stage(
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


def _gather_blocks(group: Any, n: int, n_blocks: int):
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


def _expression_stage(
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


# ---------------------------------------------------------------------------------------------- result table
def _read_result(path: Path, key: str) -> AnnData:
    """The prediction table ``key`` of the store at ``path``: everything in memory but ``layers[key]`` (dask, lazy)."""
    import dask.array as da
    import zarr
    from anndata import AnnData
    from anndata.io import read_elem

    g = zarr.open_group(path, mode="r", use_consolidated=False)["tables"][key]
    parts = {name: read_elem(g[name]) for name in ("obs", "var", "obsm", "obsp", "uns") if name in g}
    adata = AnnData(**parts)
    for name, arr in g["layers"].arrays():
        adata.layers[name] = da.from_zarr(arr)
    return adata


def _attach(sdata: SpatialData, table: AnnData, key: str) -> None:
    if key in sdata.tables:
        del sdata.tables[key]
    sdata.tables[key] = table


def _ours(table: AnnData, key: str, model_id: str, path: Path) -> bool:
    params = table.uns.get(key, {}).get("params", {})
    stream = params.get("stream", {})
    return params.get("model_id") == model_id and Path(str(stream.get("out", ""))).resolve() == path.resolve()


# ---------------------------------------------------------------------------------------------- entry point
def predict_streaming(
    sdata: SpatialData,
    model: HESpotEx,
    *,
    out: str | Path,
    key_added: str,
    embedding_key: str,
    overwrite: bool,
    device: str | None,
    chunk_size: int | None,
) -> AnnData:
    """The streaming path of :func:`hespotex.tl.predict` (see the module docstring); returns the result table."""
    import dask.array as da
    import pandas as pd
    from anndata import AnnData

    from hespotex.pp._embed import cache_key
    from hespotex.pp._encoders import load_encoder
    from hespotex.pp._patches import plan_patches
    from hespotex.tl.model._data import embeddings
    from hespotex.tl.prediction._checks import check_embedding
    from hespotex.tl.prediction._tables import prediction_params

    if isinstance(sdata, AnnData) or not hasattr(sdata, "tables"):
        msg = f"Streaming prediction (`out=`) writes a SpatialData zarr and needs the SpatialData sample, found {type(sdata).__name__}."
        raise TypeError(msg)
    table = get_table(sdata)
    info = get_sample_info(sdata)
    path, own = _resolve_out(sdata, out)
    if key_added in sdata.tables and sdata.tables[key_added] is table:
        msg = f"key_added={key_added!r} names the sample's spot table; choose another `key_added`."
        raise ValueError(msg)
    if (
        key_added in sdata.tables
        and not overwrite
        and not _ours(sdata.tables[key_added], key_added, model.model_id, path)
    ):
        msg = f"The SpatialData already has a table {key_added!r}; pass `overwrite=True` to replace it, or another `key_added`."
        raise ValueError(msg)
    n = int(table.n_obs)
    if n < model.config.decoder_neighbors + 1 and model.module_.decoder is not None:
        msg = f"The slide has {n} spots; the model's {model.config.decoder_neighbors}-neighbour graph needs at least {model.config.decoder_neighbors + 1}."
        raise ValueError(msg)
    chunk_size = int(chunk_size) if chunk_size is not None else DEFAULT_CHUNK_SIZE
    if chunk_size < 1:
        msg = f"Expected a positive `chunk_size` (spots per streamed chunk), found {chunk_size}."
        raise ValueError(msg)

    embed_params = model.embedding
    has_image = info.image_key is not None and info.image_key in getattr(sdata, "images", {})
    stored_emb = embedding_key in table.obsm
    encoder = plan = None
    if has_image:
        if not stored_emb:
            encoder = load_encoder(
                embed_params.get("encoder") or "efficientnet_lite0.imagenet",
                weights=embed_params.get("weights"),
                seed=int(embed_params.get("seed", 0)),
                input_size=embed_params.get("input_size"),
            )
        out_px = encoder.input_size if encoder is not None else int(embed_params.get("input_size") or 224)
        plan = plan_patches(sdata, patch_um=embed_params.get("patch_um"), out_px=out_px)
    elif not stored_emb:
        msg = f"This sample has neither image embeddings in obsm[{embedding_key!r}] nor its image to compute them. Read the sample with its image."
        raise KeyError(msg)
    if stored_emb:
        from hespotex.tl.training._train import ensure_embeddings

        record = ensure_embeddings(sdata, embedding_key=embedding_key)
    else:
        record = {
            "encoder": encoder.name,
            "encoder_id": encoder.encoder_id,
            "weights": embed_params.get("weights"),
            "seed": int(embed_params.get("seed", 0)),
            "patch_um": plan.patch_um,
            "input_size": encoder.input_size,
            "image_key": plan.level.image_key,
            "level": plan.level.level,
            "crop_px": plan.size,
            "cache_key": cache_key(plan, encoder, tta=bool(embed_params.get("tta"))),
            **({"tta": embed_params["tta"]} if embed_params.get("tta") else {}),
        }
    check_embedding(model, record)

    slide = _slide_identity(table, info.sample_id, plan)
    model_id = model.model_id
    root, progress = _open_store(sdata, path, own, key=key_added, slide=slide, model_id=model_id, overwrite=overwrite)
    group = progress.require_group(key_added)
    if not group.attrs.get("slide"):
        batch_rows = BATCH_SIZE * max(1, 1024 // BATCH_SIZE)  # embedding chunks: whole encoder batches
        emb_rows = min(batch_rows, -(-chunk_size // BATCH_SIZE) * BATCH_SIZE)
        expr_rows = max(1, min(chunk_size, _ZARR_CHUNK_BYTES // (4 * len(model.genes))))
        expr_step = max(1, min(chunk_size, _STEP_BYTES // (4 * len(model.genes))) // expr_rows) * expr_rows
        layout = {
            "chunk_size": chunk_size,
            "embedding_rows": emb_rows,
            "embedding_step": -(-chunk_size // emb_rows) * emb_rows,
            "expression_rows": expr_rows,
            "expression_step": expr_step,
        }
        group.attrs.update(
            _jsonable(
                {
                    "format_version": FORMAT_VERSION,
                    "slide": slide,
                    "model_id": model_id,
                    "key_added": key_added,
                    "embedding": {k: v for k, v in record.items() if v is not None},
                    "layout": layout,
                    "complete": False,
                }
            )
        )
    layout = dict(group.attrs["layout"])
    if group.attrs.get("complete"):
        logger.info(
            "%s already holds the finished predictions %r of this slide and model; nothing to do.", path, key_added
        )
        if not _progress_is_clean(group, path, key_added):  # a clean-up interrupted after the commit
            _clean_progress(group, path)
        result = _read_result(path, key_added)
        if key_added not in sdata.tables or _ours(sdata.tables[key_added], key_added, model_id, path) or overwrite:
            _attach(sdata, result, key_added)
        return result
    if layout["chunk_size"] != chunk_size:
        logger.info("Resuming with chunk_size=%d, the size this prediction was started with.", layout["chunk_size"])
    logger.info(
        "Streaming prediction of %d genes at %d spots into %s (chunks of %d spots).",
        len(model.genes),
        n,
        path,
        layout["chunk_size"],
    )
    # 1. embeddings
    if stored_emb:
        emb = embeddings(table, embedding_key)
    else:
        emb = _embed_stage(
            group, plan, encoder, step=layout["embedding_step"], rows=layout["embedding_rows"], device=device,
            tta=bool(embed_params.get("tta")),
        )
        del encoder
    # 2. graph blocks
    mpp = float(info.microns_per_pixel)
    sample = GraphData(str(info.sample_id), emb, spot_centres(table) * mpp)
    blocks = _graph_stage(group, model, sample, block_size=layout["chunk_size"], device=device)
    latent, features, attention = _gather_blocks(group, n, len(blocks))
    del sample, emb
    # 3. expression rows in table order
    expr = _expression_stage(
        group, model, latent, features, step=layout["expression_step"], rows=layout["expression_rows"], device=device
    )
    del features
    # 4. the table, written by spatialdata / anndata from the zarr rows
    from spatialdata.models import TableModel

    keep = [c for c in ("region", "spot_id") if c in table.obs]
    new = AnnData(obs=table.obs[keep].copy(), var=pd.DataFrame(index=pd.Index(model.genes, name=None)))
    new.obsm["spatial"] = np.asarray(table.obsm["spatial"]).copy()
    new.obsm[f"X_{key_added}"] = latent
    if attention is not None:
        new.obsp[f"{key_added}_attention"] = attention
    new.layers[key_added] = da.from_zarr(expr, chunks=(layout["expression_rows"], len(model.genes)))
    sample_info = dict(table.uns.get(SAMPLE_KEY, info.to_dict()))
    if not own:
        sample_info.pop("image_key", None)  # the image stays where it is: params["source"] says where
    new.uns[SAMPLE_KEY] = sample_info
    params = prediction_params(model, embed_params, key_added=key_added, attention=attention is not None)
    source = {
        "path": str(sdata.path) if getattr(sdata, "path", None) is not None else None,
        "image_key": info.image_key,
    }
    source.update(
        {
            k: v
            for k, v in dict(dict(getattr(sdata, "attrs", {}) or {}).get("hespotex_slide", {})).items()
            if k == "path"
        }
    )
    params["stream"] = {
        "out": str(path.resolve()),
        "chunk_size": layout["chunk_size"],
        "format_version": FORMAT_VERSION,
    }
    params["source"] = {k: v for k, v in source.items() if v is not None}
    new.uns[key_added] = {"params": {k: v for k, v in params.items() if v is not None}}
    attrs = table.uns.get("spatialdata_attrs")
    if attrs is not None:
        new = TableModel.parse(
            new, region=attrs["region"], region_key=attrs["region_key"], instance_key=attrs["instance_key"]
        )
    on_disk = "tables" in root and key_added in root["tables"]
    if own:
        target = sdata
    else:
        import spatialdata

        target = spatialdata.read_zarr(path, selection=("shapes",))
    _attach(target, new, key_added)
    # The commit. Until `complete` is set the progress arrays stay whole, so a run interrupted at any
    # write or delete below redoes the table from them; once it is set the table is whole on disk
    # and the progress arrays are only leftovers, which a rerun deletes.
    if on_disk:  # spatialdata refuses to overwrite an element inside the store it is backed by: remove it first
        _op(_delete, root["tables"], key_added)
    _op(target.write_element, key_added)
    _op(group.attrs.update, {"complete": True})
    _clean_progress(group, path)
    result = _read_result(path, key_added)
    if own or key_added not in sdata.tables or overwrite or _ours(sdata.tables[key_added], key_added, model_id, path):
        _attach(sdata, result, key_added)
    logger.info("Predicted %d genes at %d spots into %s (table %r).", len(model.genes), n, path, key_added)
    return result
