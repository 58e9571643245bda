"""``hx.tl.predict``: expression maps from the image alone, stored scverse style."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hespotex._compat import renamed_arguments
from hespotex._constants import PREDICTION_KEY
from hespotex._sample import SAMPLE_KEY, get_table
from hespotex.io._inputs import accepts_anndata
from hespotex.pp._targets import target_expression
from hespotex.tl.model._data import EMBEDDING_KEY, graph_data
from hespotex.tl.model._model import HESpotEx
from hespotex.tl.prediction._checks import check_embedding, check_finite_predictions
from hespotex.tl.prediction._tables import prediction_params
from hespotex.tl.training._train import ensure_embeddings

logger = logging.getLogger("hespotex")


@renamed_arguments("tl.predict")
@accepts_anndata(reads="use_rep")
def predict(
    data: Any,
    model: HESpotEx | str,
    *,
    key_added: str = PREDICTION_KEY,
    use_rep: str = EMBEDDING_KEY,
    overwrite: bool = False,
    device: str | None = "auto",
    max_nodes: int = 50_000,
    out: str | Path | None = None,
    chunk_size: int | None = None,
    image: Any = None,
    microns_per_pixel: float | None = None,
    library_id: str | None = None,
):
    """Predict the expression of the model's genes at every spot (or tile) from the H&E image.

    Needs only embeddings (computed here with the model's encoder when the sample has its image
    and none are stored) and spot centres; no counts.

    With ``out`` the prediction *streams*: patches are read lazily from the right pyramid level and
    embedded chunk by chunk, the slide is predicted block by block, and every result goes to zarr as
    soon as it exists, so peak memory does not grow with the number of genes × spots and an
    interrupted run, started again with the same arguments, resumes where it stopped (finished
    chunks are not recomputed). See :mod:`hespotex.tl.prediction._stream` for the design.

    Parameters
    ----------
    data
        A SpatialData sample; or an AnnData: one carrying embeddings in ``obsm[use_rep]`` and
        ``obsm["spatial"]`` (used as is), or one in the scanpy / squidpy Visium or HEST convention (image
        and scale factors in ``uns["spatial"][library_id]``, ``obsm["spatial"]`` in full-resolution
        pixels; embedded on the fly through :func:`hespotex.io.from_scanpy`, highest resolution first). An
        AnnData without embeddings or image gets a ``ValueError`` naming the three ways to supply one.
    model
        A trained :class:`HESpotEx` or :class:`~hespotex.tl.HESpotExEnsemble`, the folder of a saved one, or a
        Hugging Face Hub id ``"hf-hub:owner/name"`` / ``"hf-hub:owner/name@revision"`` (see
        :func:`hespotex.tl.load_model`).
    key_added
        Name of the prediction layer, and prefix of the other keys.
    use_rep
        ``obsm`` key of the image embeddings.
    overwrite
        Replace earlier predictions stored under the same keys.
    device, max_nodes
        Torch device and the most spots per forward block (large slides run block by block; in
        memory only: streaming uses ``chunk_size``).
    out
        Stream the prediction into a SpatialData zarr store: ``"auto"`` is the sample's own store
        (a SpatialData read from zarr), where the table is added beside the image; another path gets
        a new store with the spot shapes and the prediction table, and no copy of the image (its
        location is recorded). A store holding another slide's or another model's predictions
        under ``key_added`` is refused unless ``overwrite=True``. ``None`` (default): in memory.
    chunk_size
        Streaming only: spots per chunk of embeddings and per graph block (before its halo),
        default 10,000; expression rows are written at most ``chunk_size`` and ~64 MB at a time. A
        resumed run keeps the chunk size it was started with.
    image, microns_per_pixel, library_id
        AnnData input without embeddings only (see :func:`hespotex.io.from_scanpy`): the full-resolution
        H&E image (path or array) in the pixels of ``obsm["spatial"]``, its µm per pixel when
        ``spot_diameter_fullres`` cannot give it, and the ``uns["spatial"]`` library to read.

    Returns
    -------
    The AnnData holding the predictions. When the table's genes are exactly the model's genes it is
    the table itself; otherwise (an image-only slide, or other genes) it is a new table of the same
    spots with the model's genes, stored as ``sdata.tables[key_added]`` for a SpatialData. Written:

    - ``layers[key_added]``: predicted log1p(counts per ``target_sum``), spots × genes;
    - ``layers["measured"]`` (new table only, when the source table measured every predicted gene):
      the same normalisation of the measured counts, for evaluation and side-by-side views;
    - ``layers[f"{key_added}_spread"]`` (ensembles only): the members' standard deviation per spot and
      gene, an uncertainty that ranks absolute errors (see ``benchmarks/results/shift.md``);
    - ``obsm[f"X_{key_added}"]``: the latent ``ẑ`` of each spot (an ensemble's first member);
    - ``obsp[f"{key_added}_attention"]``: decoder attention (rows = target spot) when the model has it;
    - ``uns[key_added]["params"]``: model id (weights fingerprint), genes hash, encoder, patch size in µm,
      seed, configuration, versions, and what the values are: ``"target_norm"`` (the model's target
      normalisation, see :mod:`hespotex.pp._targets`) with ``"target"`` describing it in words.

    Streaming (``out``) always writes a new table ``key_added`` (no ``layers["measured"]``), whose
    ``layers[key_added]`` is read lazily (dask) from the store; it is returned and put in
    ``sdata.tables[key_added]``. ``uns[key_added]["params"]`` adds ``"stream"`` (store, chunk size)
    and ``"source"`` (where the image is). The source table is not modified (embeddings computed
    while streaming are not stored in its ``obsm``).

    Embedding on the fly (in memory, no ``obsm[use_rep]`` yet) also writes to the table (the
    sample's, or the AnnData passed), with the model's encoder and patch size (see :func:`hespotex.pp.embed`):

    - ``obsm[use_rep]``: the image embeddings, spots × encoder features (float32);
    - ``uns["hespotex_embed"][use_rep]``: their record (encoder, encoder id, patch size in µm,
      µm/px seen, input size, pyramid level, cache key, registry entry, TTA).

    For an AnnData in the scanpy convention the prediction runs on a sample built from it and every
    entry listed here is written back to the AnnData passed; when its genes are the model's it is the
    AnnData returned.
    """
    from hespotex.tl.model._resolve import as_model

    model = as_model(model)  # a model, a saved folder or "hf-hub:owner/name"
    model._check_trained()
    if out is not None and hasattr(model, "members"):
        msg = (
            "Streaming prediction (`out=`) of an ensemble is not supported yet; predict it in memory (out=None), "
            "or stream each member (`model.members[i]`) on its own."
        )
        raise NotImplementedError(msg)
    if out is not None:
        from hespotex.tl.prediction._stream import predict_streaming

        return predict_streaming(
            data,
            model,
            out=out,
            key_added=key_added,
            embedding_key=use_rep,
            overwrite=overwrite,
            device=device,
            chunk_size=chunk_size,
        )
    table = get_table(data)
    embed_params = model.embedding
    record = ensure_embeddings(
        data,
        embedding_key=use_rep,
        encoder=embed_params.get("encoder"),
        weights=embed_params.get("weights"),
        patch_um=embed_params.get("patch_um"),
        input_size=embed_params.get("input_size"),
        tta=bool(embed_params.get("tta")),
        encoder_seed=int(embed_params.get("seed", 0)),
    )
    check_embedding(model, record)
    sample = graph_data(
        table, str(table.uns.get(SAMPLE_KEY, {}).get("sample_id", "slide")), genes=None, embedding_key=use_rep
    )
    min_spots = model.config.decoder_neighbors + 1
    if sample.n < min_spots and model.module_.decoder is not None:
        msg = f"The slide has {sample.n} spots; the model's {model.config.decoder_neighbors}-neighbour graph needs at least {min_spots}."
        raise ValueError(msg)
    out = model.predict_graph(sample, device=device, max_nodes=max_nodes)
    check_finite_predictions(out["expression"], out["latent"])
    target = _target_table(data, table, model, key_added=key_added, overwrite=overwrite)
    order = pd.Index(model.genes).get_indexer(target.var_names)
    target.layers[key_added] = out["expression"][:, order]
    target.obsm[f"X_{key_added}"] = out["latent"]
    spread_key = None
    if out.get("spread") is not None:  # an ensemble: the members' standard deviation, per spot and gene
        spread_key = f"{key_added}_spread"
        if spread_key in target.layers and not overwrite:
            msg = f"layers[{spread_key!r}] already exists; pass `overwrite=True` to replace it, or another `key_added`."
            raise ValueError(msg)
        target.layers[spread_key] = out["spread"][:, order]
    if out["attention"] is not None:
        target.obsp[f"{key_added}_attention"] = out["attention"]
    target.uns[key_added] = {
        "params": prediction_params(model, embed_params, key_added=key_added, attention=out["attention"] is not None)
    }
    if spread_key is not None:
        target.uns[key_added]["params"].update(spread_layer=spread_key, ensemble_members=len(model.members))
    if target is not table and hasattr(data, "tables"):
        _store_table(data, target, key_added=key_added, overwrite=overwrite)
    logger.info("Predicted %d genes at %d spots into layers[%r].", len(model.genes), sample.n, key_added)
    return target


def _target_table(data: Any, table, model: HESpotEx, *, key_added: str, overwrite: bool):
    from anndata import AnnData

    if set(table.var_names) == set(model.genes):
        if key_added in table.layers and not overwrite:
            msg = f"layers[{key_added!r}] already exists; pass `overwrite=True` to replace it, or another `key_added`."
            raise ValueError(msg)
        return table
    if hasattr(data, "tables") and key_added in data.tables and not overwrite:
        msg = f"The SpatialData already has a table {key_added!r}; pass `overwrite=True` to replace it, or another `key_added`."
        raise ValueError(msg)
    keep = [c for c in ("region", "spot_id") if c in table.obs]
    new = AnnData(obs=table.obs[keep].copy(), var=pd.DataFrame(index=pd.Index(model.genes, name=None)))
    new.obsm["spatial"] = np.asarray(table.obsm["spatial"]).copy()
    if SAMPLE_KEY in table.uns:
        new.uns[SAMPLE_KEY] = dict(table.uns[SAMPLE_KEY])
    if "spatialdata_attrs" in table.uns:
        new.uns["spatialdata_attrs"] = dict(table.uns["spatialdata_attrs"])
    if table.n_vars and set(model.genes) <= set(table.var_names):
        new.layers["measured"] = target_expression(
            table, model.genes, target_norm=model.target_norm, target_sum=model.target_sum
        )
    return new


def _store_table(sdata, table, *, key_added: str, overwrite: bool) -> None:
    from spatialdata.models import TableModel

    attrs = table.uns.pop("spatialdata_attrs", None)
    if attrs is not None:
        table = TableModel.parse(
            table, region=attrs["region"], region_key=attrs["region_key"], instance_key=attrs["instance_key"]
        )
    if key_added in sdata.tables:
        if not overwrite:  # checked before predicting too; kept here for direct callers
            msg = f"The SpatialData already has a table {key_added!r}; pass `overwrite=True`."
            raise ValueError(msg)
        del sdata.tables[key_added]
    sdata.tables[key_added] = table
