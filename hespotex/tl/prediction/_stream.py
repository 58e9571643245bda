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

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._sample import SAMPLE_KEY, get_sample_info, get_table, spot_centres
from hespotex.io._zarr import table_write_options
from hespotex.tl.model._data import GraphData
from hespotex.tl.prediction._stream_stages import BATCH_SIZE, embed_stage, model_stages
from hespotex.tl.prediction._stream_store import (
    attach,
    clean_progress,
    delete,
    op,
    open_store,
    ours,
    progress_is_clean,
    read_result,
    resolve_out,
    slide_identity,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from hespotex.tl.model._model import HESpotEx

logger = logging.getLogger("hespotex")

FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 10_000  # spots per embedding chunk and graph block
_STEP_BYTES = 2**26  # at most ~64 MB of float32 predictions per step of expression rows
_ZARR_CHUNK_BYTES = 2**24  # ~16 MB zarr chunks of expression rows


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


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
    smooth: float | None = None,
) -> AnnData:
    """The streaming path of :func:`hespotex.tl.predict` (see the module docstring); returns the result table."""
    import dask.array as da
    import pandas as pd
    from anndata import AnnData

    from hespotex.pp._embed import embedding_cache_keys
    from hespotex.pp._encoders import encoder_from_record
    from hespotex.pp._patches import plan_patches
    from hespotex.pp._stain_norm import stain_key, stain_norm_entry
    from hespotex.tl.model._data import embeddings
    from hespotex.tl.prediction._checks import check_embedding
    from hespotex.tl.prediction._tables import prediction_params

    if isinstance(sdata, AnnData) or not hasattr(sdata, "tables"):
        msg = (
            "Streaming prediction (`out=`) writes a SpatialData zarr and needs the SpatialData sample, found "
            f"{type(sdata).__name__}."
        )
        raise TypeError(msg)
    table = get_table(sdata)
    info = get_sample_info(sdata)
    path, own = resolve_out(sdata, out)
    if key_added in sdata.tables and sdata.tables[key_added] is table:
        msg = f"key_added={key_added!r} names the sample's spot table; choose another `key_added`."
        raise ValueError(msg)
    if (
        key_added in sdata.tables
        and not overwrite
        and not ours(sdata.tables[key_added], key_added, model.model_id, path)
    ):
        msg = (
            f"The SpatialData already has a table {key_added!r}; pass `overwrite=True` to replace it, or another "
            "`key_added`."
        )
        raise ValueError(msg)
    n = int(table.n_obs)
    if n < model.config.decoder_neighbors + 1 and model.module_.decoder is not None:
        msg = (
            f"The slide has {n} spots; the model's {model.config.decoder_neighbors}-neighbour graph needs at least "
            f"{model.config.decoder_neighbors + 1}."
        )
        raise ValueError(msg)
    chunk_size = int(chunk_size) if chunk_size is not None else DEFAULT_CHUNK_SIZE
    if chunk_size < 1:
        msg = f"Expected a positive `chunk_size` (spots per streamed chunk), found {chunk_size}."
        raise ValueError(msg)

    embed_params = model.embedding
    has_image = info.image_key is not None and info.image_key in getattr(sdata, "images", {})
    stored_emb = embedding_key in table.obsm
    encoder = plan = ctx = None
    if has_image:
        if not stored_emb:
            encoder = encoder_from_record(
                {**embed_params, "encoder": embed_params.get("encoder") or "efficientnet_lite0.imagenet"}
            )
        out_px = encoder.input_size if encoder is not None else int(embed_params.get("input_size") or 224)
        plan = plan_patches(sdata, patch_um=embed_params.get("patch_um"), out_px=out_px)
        if embed_params.get("context_um") is not None:  # two-scale embeddings: the context crops of the same spots
            from hespotex.pp._context import context_plan

            ctx = context_plan(sdata, plan, float(embed_params["context_um"]))
    elif not stored_emb:
        msg = (
            f"This sample has neither image embeddings in obsm[{embedding_key!r}] nor its image to compute them. "
            "Read the sample with its image."
        )
        raise KeyError(msg)
    if stored_emb:
        from hespotex.tl.training._train import ensure_embeddings

        record = ensure_embeddings(sdata, embedding_key=embedding_key)
    else:
        norm = stain_norm_entry(embed_params.get("stain_norm"), plan, info.sample_id)
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
            "cache_key": embedding_cache_keys(
                plan, ctx, encoder, tta=bool(embed_params.get("tta")), stain_norm=norm and stain_key(norm["reference"])
            )[2],
            **({"tta": embed_params["tta"]} if embed_params.get("tta") else {}),
            **({"stain_norm": norm} if norm else {}),
        }
        if ctx is not None:
            from hespotex.pp._context import context_record

            record.update(context_record(ctx))
    check_embedding(model, record)

    slide = slide_identity(table, info.sample_id, plan)
    model_id = model.model_id
    root, progress = open_store(sdata, path, own, key=key_added, slide=slide, model_id=model_id, overwrite=overwrite)
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
                    "smooth": smooth,
                    "complete": False,
                }
            )
        )
    layout = dict(group.attrs["layout"])
    if group.attrs.get("smooth") != smooth:  # rows already written hold the other smoothing
        msg = (
            f"{path} holds (part of) the prediction {key_added!r} of this slide and model made with "
            f"smooth={group.attrs.get('smooth')!r}, not smooth={smooth!r}. Pass the same `smooth` to resume it, "
            "`overwrite=True` to start again, or another `key_added`."
        )
        raise ValueError(msg)
    if group.attrs.get("complete"):
        logger.info(
            "%s already holds the finished predictions %r of this slide and model; nothing to do.", path, key_added
        )
        if not progress_is_clean(group, path, key_added):  # a clean-up interrupted after the commit
            clean_progress(group, path)
        result = read_result(path, key_added)
        if key_added not in sdata.tables or ours(sdata.tables[key_added], key_added, model_id, path) or overwrite:
            attach(sdata, result, key_added)
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
        emb = embed_stage(
            group,
            plan,
            encoder,
            step=layout["embedding_step"],
            rows=layout["embedding_rows"],
            device=device,
            tta=bool(embed_params.get("tta")),
            stain_norm=(record["stain_norm"]["slide"], record["stain_norm"]["reference"])
            if record.get("stain_norm")
            else None,
            context=ctx,
        )
        del encoder
    # 2. graph blocks
    mpp = float(info.microns_per_pixel)
    sample = GraphData(str(info.sample_id), emb, spot_centres(table) * mpp)
    spread = agreement = None
    n_agreement = 0
    if hasattr(model, "members"):  # an ensemble: stages 2 and 3 per member, then mean and spread
        from hespotex.tl.prediction._stream_ensemble import ensemble_stages

        latent, attention, expr, spread, agreement, n_agreement = ensemble_stages(
            group, model, sample, layout=layout, device=device, smooth=smooth
        )
        del sample, emb
    else:  # 3. expression rows in table order
        latent, attention, expr = model_stages(group, model, sample, layout=layout, device=device, smooth=smooth)
        del sample, emb
    # 4. the table, written by spatialdata / anndata from the zarr rows
    from spatialdata.models import TableModel

    keep = [c for c in ("region", "spot_id") if c in table.obs]
    new = AnnData(obs=table.obs[keep].copy(), var=pd.DataFrame(index=pd.Index(model.genes, name=None)))
    new.obsm["spatial"] = np.asarray(table.obsm["spatial"]).copy()
    new.obsm[f"X_{key_added}"] = latent
    if attention is not None:
        new.obsp[f"{key_added}_attention"] = attention
    new.layers[key_added] = da.from_zarr(expr, chunks=(layout["expression_rows"], len(model.genes)))
    if spread is not None:
        new.layers[f"{key_added}_spread"] = da.from_zarr(spread, chunks=(layout["expression_rows"], len(model.genes)))
        new.var[f"{key_added}_agreement"] = agreement
    sample_info = dict(table.uns.get(SAMPLE_KEY, info.to_dict()))
    if not own:
        sample_info.pop("image_key", None)  # the image stays where it is: params["source"] says where
    new.uns[SAMPLE_KEY] = sample_info
    params = prediction_params(model, embed_params, key_added=key_added, attention=attention is not None, smooth=smooth)
    if spread is not None:  # as in memory: the members' standard deviation, per spot and gene, and agreement
        params.update(
            spread_layer=f"{key_added}_spread",
            agreement_key=f"{key_added}_agreement",
            agreement_spots=int(n_agreement),
            ensemble_members=len(model.members),
        )
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
    attach(target, new, key_added)
    # The commit. Until `complete` is set the progress arrays stay whole, so a run interrupted at any
    # write or delete below redoes the table from them; once it is set the table is whole on disk
    # and the progress arrays are only leftovers, which a rerun deletes.
    if on_disk:  # spatialdata refuses to overwrite an element inside the store it is backed by: remove it first
        op(delete, root["tables"], key_added)
    with table_write_options():
        op(target.write_element, key_added)
    op(group.attrs.update, {"complete": True})
    clean_progress(group, path)
    result = read_result(path, key_added)
    if own or key_added not in sdata.tables or overwrite or ours(sdata.tables[key_added], key_added, model_id, path):
        attach(sdata, result, key_added)
    logger.info("Predicted %d genes at %d spots into %s (table %r).", len(model.genes), n, path, key_added)
    return result
