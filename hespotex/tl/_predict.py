"""``hx.tl.predict``: expression maps from the image alone, stored scverse style."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hespotex._sample import SAMPLE_KEY, get_table
from hespotex.pp._targets import TARGET_NORMS, target_expression
from hespotex.tl._data import EMBEDDING_KEY, graph_data
from hespotex.tl._model import HESpotEx
from hespotex.tl._train import _same_embedding, ensure_embeddings

logger = logging.getLogger("hespotex")


def _entry_text(record: dict[str, Any]) -> str:
    """Registry entry of an embedding record: ``'uni' of lazyslide-models 0.1.0 at 0.5 µm/px``."""
    entry = record.get("encoder_entry") or {}
    if not entry:
        return f"{record.get('encoder')!r} (no registry entry)"
    return f"{entry.get('name')!r} of {entry.get('source')} {entry.get('version')} at {entry.get('native_mpp')} µm/px"


def _check_embedding(model: HESpotEx, record: dict[str, Any]) -> None:
    expected = model.embedding
    if "unknown" in (record.get("encoder_id"), expected.get("encoder_id")):
        logger.warning("Cannot check that this slide was embedded like the training slides (no encoder record).")
        return
    if not _same_embedding(expected, record):
        entries = [_entry_text(r) for r in (expected, record)]
        msg = (
            (f"The model's encoder is {entries[0]}, this slide's {entries[1]}. " if entries[0] != entries[1] else "")
            + f"The model was trained on embeddings of {expected.get('encoder')!r} ({expected.get('encoder_id')}) at "
            f"{expected.get('patch_um')} µm patches; this slide's were made with {record.get('encoder')!r} "
            f"({record.get('encoder_id')}) at {record.get('patch_um')} µm. Re-embed it: "
            f"hx.pp.embed(sdata, encoder={expected.get('encoder')!r}, patch_um={expected.get('patch_um')}, key_added=..., overwrite=True)."
        )
        raise ValueError(msg)


def predict(
    data: Any,
    model: HESpotEx | str,
    *,
    key_added: str = "hespotex",
    embedding_key: str = EMBEDDING_KEY,
    overwrite: bool = False,
    device: str | None = "auto",
    max_nodes: int = 50_000,
    out: str | Path | None = None,
    chunk_size: int | None = None,
):
    """Predict the expression of the model's genes at every spot (or tile) from the H&E image.

    Needs only embeddings (computed here with the model's encoder when the sample has its image
    and none are stored) and spot centres; no counts.

    With ``out`` the prediction *streams*: patches are read lazily from the right pyramid level and
    embedded chunk by chunk, the slide is predicted block by block, and every result goes to zarr as
    soon as it exists, so peak memory does not grow with the number of genes × spots and an
    interrupted run, started again with the same arguments, resumes where it stopped (finished
    chunks are not recomputed). See :mod:`hespotex.tl._stream` for the design.

    Parameters
    ----------
    data
        A SpatialData sample or its table (AnnData with embeddings and ``obsm["spatial"]``).
    model
        A trained :class:`HESpotEx` or :class:`~hespotex.tl.HESpotExEnsemble`, the folder of a saved one, or a
        Hugging Face Hub id ``"hf-hub:owner/name"`` / ``"hf-hub:owner/name@revision"`` (see
        :func:`hespotex.tl.load_model`).
    key_added
        Name of the prediction layer, and prefix of the other keys.
    embedding_key
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
        from hespotex.tl._stream import predict_streaming

        return predict_streaming(
            data,
            model,
            out=out,
            key_added=key_added,
            embedding_key=embedding_key,
            overwrite=overwrite,
            device=device,
            chunk_size=chunk_size,
        )
    table = get_table(data)
    embed_params = model.embedding
    record = ensure_embeddings(
        data,
        embedding_key=embedding_key,
        encoder=embed_params.get("encoder"),
        weights=embed_params.get("weights"),
        patch_um=embed_params.get("patch_um"),
        input_size=embed_params.get("input_size"),
        tta=bool(embed_params.get("tta")),
        encoder_seed=int(embed_params.get("seed", 0)),
    )
    _check_embedding(model, record)
    sample = graph_data(
        table, str(table.uns.get(SAMPLE_KEY, {}).get("sample_id", "slide")), genes=None, embedding_key=embedding_key
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


def check_finite_predictions(expression: np.ndarray, latent: np.ndarray | None = None, *, first_spot: int = 0) -> None:
    """Refuse NaN or infinite predictions (or latents) before anything is stored: they would look like
    results. Finite weights (checked at load) and embeddings (checked before) can still overflow."""
    bad_rows = ~np.isfinite(expression).all(axis=1)
    if latent is not None:
        bad_rows |= ~np.isfinite(latent).all(axis=1)
    if bad_rows.any():
        n_genes = int((~np.isfinite(expression)).any(axis=0).sum())
        first = first_spot + int(np.flatnonzero(bad_rows)[0])
        msg = (
            f"The model's predictions are NaN or infinite at {int(bad_rows.sum())} spots ({n_genes} genes), e.g. spot {first}; "
            "nothing was stored. The weights overflow on these embeddings: check the embeddings (encoder, image) "
            "or retrain the model."
        )
        raise ValueError(msg)


def prediction_params(
    model: HESpotEx, embed_params: dict[str, Any], *, key_added: str, attention: bool
) -> dict[str, Any]:
    """``uns[key_added]["params"]`` of a prediction: model id, genes hash, encoder, patch size, seed, config, versions, keys."""
    setup = model.setup_dict()
    return {
        "model_id": model.model_id,
        "genes_hash": setup["gene_hash"],
        "n_genes": len(model.genes),
        "encoder": embed_params.get("encoder"),
        "encoder_id": embed_params.get("encoder_id"),
        "patch_um": embed_params.get("patch_um"),
        "seed": model.config.seed,
        "target_sum": model.target_sum,
        "target_norm": model.target_norm,
        "target": TARGET_NORMS[model.target_norm],
        "embedding_norm": model.embedding_norm,
        "tta": model.embedding.get("tta"),
        "stain_augment_views": int((model.stain_augment or {}).get("n_views", 0)),  # 0: trained on clean embeddings only
        "config": setup["config"],
        "versions": setup["versions"],
        "layer": key_added,
        "latent_key": f"X_{key_added}",
        "attention_key": f"{key_added}_attention" if attention else None,
    }


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
