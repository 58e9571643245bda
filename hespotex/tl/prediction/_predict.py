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
from hespotex.tl.prediction._placement import check_free, clear, copy_data, same_genes, spot_keys, write_frame
from hespotex.tl.prediction._smoothing import DEFAULT_SMOOTH, check_smooth
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
    copy: bool = False,
    smooth: float | None = DEFAULT_SMOOTH,
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
    smooth
        A weight ``w`` in [0, 1] (default 0.5): each spot's predicted expression becomes ``w`` times the model's
        output at the spot plus ``1 - w`` times the mean of its 6 nearest spots' outputs (the symmetric 6-NN graph
        of the spot centres; one step, :mod:`hespotex.tl.prediction._smoothing`), applied to every ensemble member
        before the mean and spread, in memory and streaming alike; recorded as ``params["smooth"]``. ``None``: the
        model's output as it is. On held-out her2st sections ``w = 0.5`` raised the mean per-gene Pearson by
        0.005-0.015 over the unsmoothed output under every emulated shift, for every seed, while the plain mean of a
        spot and its neighbours lost up to 0.024 on the top-50 genes (``benchmarks/results/shift_smooth.md``).
        :func:`hespotex.tl.explain` explains the smoothed prediction by default too.
    copy
        Leave ``data`` untouched and return a new object holding everything listed below: a copy of the
        AnnData, or a new SpatialData (sharing the image and shape elements, which predict never
        changes, and holding copies of the tables), like scanpy's ``copy``. With ``out`` the store is
        written all the same (it is what ``out`` asks for): a SpatialData's copy gets
        ``tables[key_added]``; an AnnData, never modified by streaming, gets the streamed table returned.

    Returns
    -------
    ``copy=False``: the AnnData holding the predictions in ``layers[key_added]`` over the model's genes
    (the table itself when its genes are the model's, else a new table of the same spots and the
    model's genes, see below), as before. ``copy=True``: the new AnnData / SpatialData.

    Where the predictions go
    ------------------------
    Whatever the gene sets, the object passed (or, with ``copy=True``, the one returned) holds the
    predictions after the call, and nothing it had under these keys is replaced without
    ``overwrite=True`` (every key is checked before anything is computed).

    *The table's genes are the model's* (the same set, in any order): the table gets

    - ``layers[key_added]``: predicted log1p(counts per ``target_sum``), spots × genes, in the table's
      gene order;
    - ``layers[f"{key_added}_spread"]`` (ensembles only): the members' standard deviation per spot and
      gene (of their smoothed predictions with ``smooth``). It grows with how much a gene's prediction varies,
      and on held-out sections it hardly says which spots of a gene are predicted worse
      (``benchmarks/results/shift_defaults.md``): read it as the members' disagreement, not as an error bar;
    - ``var[f"{key_added}_agreement"]`` (ensembles only): per gene, the members' mean pairwise Pearson
      across spots (1: they agree on its spatial pattern), computed on this slide, no truth needed. On
      held-out her2st sections it ranks genes by how well they are predicted (Spearman 0.62 with the
      gene's Pearson on clean sections, 0.52 re-stained), though less well than the standard deviation
      of the prediction across spots does (0.68 / 0.65; ``benchmarks/results/shift_defaults.md``);
    - ``obsm[f"X_{key_added}"]``: the latent ``ẑ`` of each spot (an ensemble's first member);
    - ``obsp[f"{key_added}_attention"]``: decoder attention (rows = target spot) when the model has it;
    - ``uns[key_added]["params"]``: model id (weights fingerprint), genes hash, encoder, patch size in µm,
      seed, configuration, versions, the keys above, and what the values are: ``"target_norm"`` (the
      model's target normalisation, see :mod:`hespotex.pp._targets`) with ``"target"`` in words.

    *Other genes* (model genes a subset or a superset of the table's, a partial overlap, no shared
    gene, or an image-only table without genes): the spot table (the AnnData passed, or the
    SpatialData's spot table) gets

    - ``obsm[key_added]``: the full prediction, a :class:`pandas.DataFrame` spots × model genes (index
      ``obs_names``, columns the model's genes), the scverse convention for per-spot tables (as
      cell2location and tangram store theirs): ``adata.obsm["hespotex"]["ERBB2"]``;
    - ``var[f"{key_added}_predicted"]``: which of the table's genes the model predicts (and, for an
      ensemble, ``var[f"{key_added}_agreement"]`` over them, NaN for the others);
    - ``layers[key_added]``: the same values over the table's own genes, only when the model predicts every
      one of them (its genes include the table's). Otherwise no layer: padding the unpredicted genes would
      make a dense, mostly-NaN matrix (785 predicted of her2st's 15,842 genes; 0.6 GB for 4,000 Visium spots
      × 36,601 genes). Plot and export the DataFrame by gene name with ``hx.pl.spatial`` / ``hx.io.write_*``, or
      copy a column: ``adata.obs["ERBB2_pred"] = adata.obsm["hespotex"]["ERBB2"]`` for ``sc.pl.spatial``;
    - ``obsm[f"{key_added}_measured"]`` (when the table measured every model gene): the measured
      counts normalised like the predictions (DataFrame, same columns), for evaluation;
    - ``obsm[f"{key_added}_spread"]`` (and ``layers[f"{key_added}_spread"]`` when the layer is written;
      ensembles only), laid out like the prediction;
    - ``obsm[f"X_{key_added}"]`` and ``obsp[f"{key_added}_attention"]`` as above;
    - ``uns[key_added]["params"]``: the record above, plus where everything is (``"obsm"``, ``"layer"``
      (``None`` when not written), ``"predicted_mask"``, ``"measured_key"``, ``"spread_key"``,
      ``"table"``: the SpatialData table holding the same prediction, ``"sample"``).

    The returned table (``copy=False``) is a new AnnData of the same spots and the model's genes with
    ``layers[key_added]``, ``layers["measured"]`` (when the source table measured every predicted
    gene), the spread, latent, attention and record; for a SpatialData it is also stored as
    ``sdata.tables[key_added]`` (as before), so the spot table and that table agree.

    All readers (:func:`~hespotex.tl.evaluate`, :func:`~hespotex.tl.attention`,
    :func:`~hespotex.tl.diagnostic_patches`, ``hx.pl.spatial`` / ``explorer`` / ``evaluation`` and the
    ``hx.io.write_*`` exporters) find a prediction stored either way, by gene name.

    *Streaming* (``out``) always writes a new table ``key_added`` to the store (no
    ``layers["measured"]``), whose ``layers[key_added]`` (and, for an ensemble, ``layers[f"{key_added}_spread"]``,
    the same values as in memory) is read lazily (dask) from the store; it is
    returned and put in ``sdata.tables[key_added]``. ``uns[key_added]["params"]`` adds ``"stream"``
    (store, chunk size) and ``"source"`` (where the image is). The spot table is not modified
    (embeddings computed while streaming are not stored in its ``obsm``). Streaming needs a
    SpatialData: an AnnData in the scanpy convention is streamed from a sample built from it (``out``
    must then be a path) and is not modified; the prediction is the store and the returned table.

    Embedding on the fly (in memory, no ``obsm[use_rep]`` yet) also writes to the table (the
    sample's, or the AnnData passed), with the model's encoder and patch size (see :func:`hespotex.pp.embed`):

    - ``obsm[use_rep]``: the image embeddings, spots × encoder features (float32);
    - ``uns["hespotex_embed"][use_rep]``: their record (encoder, encoder id, patch size in µm,
      µm/px seen, input size, pyramid level, cache key, registry entry, TTA and, for a model trained on
      stain-normalised embeddings, ``"stain_norm"``: the model's reference and this slide's own stain, to which
      every patch was mapped, see :mod:`hespotex.pp._stain_norm`).

    For an AnnData in the scanpy convention the prediction runs on a sample built from it and every
    entry listed here (``obsm``, ``layers``, ``obsp``, ``uns``, the ``var`` mask) is written back to the
    AnnData passed; when its genes are the model's it is the AnnData returned.
    """
    from hespotex.tl.model._resolve import as_model

    model = as_model(model)  # a model, a saved folder or "hf-hub:owner/name"
    model._check_trained()
    smooth = check_smooth(smooth)
    if copy:
        data = copy_data(data)
    if out is not None:
        from hespotex.tl.prediction._stream import predict_streaming

        result = predict_streaming(
            data,
            model,
            out=out,
            key_added=key_added,
            embedding_key=use_rep,
            overwrite=overwrite,
            device=device,
            chunk_size=chunk_size,
            smooth=smooth,
        )
        return data if copy else result
    table = get_table(data)
    same = same_genes(table, model.genes)
    keys = spot_keys(table, model.genes, key_added=key_added, ensemble=hasattr(model, "members"))
    if not same and hasattr(data, "tables"):
        if key_added in data.tables and data.tables[key_added] is table:
            msg = f"key_added={key_added!r} names the sample's spot table; choose another `key_added`."
            raise ValueError(msg)
        if key_added in data.tables and not overwrite:
            msg = (
                f"The SpatialData already has a table {key_added!r}; pass `overwrite=True` to replace it, or "
                "another `key_added`."
            )
            raise ValueError(msg)
    check_free(table, keys, overwrite=overwrite)
    embed_params = model.embedding
    record = ensure_embeddings(
        data,
        embedding_key=use_rep,
        encoder=embed_params.get("encoder"),
        weights=embed_params.get("weights"),
        layers=embed_params.get("layers"),
        patch_um=embed_params.get("patch_um"),
        input_size=embed_params.get("input_size"),
        tta=bool(embed_params.get("tta")),
        context_um=embed_params.get("context_um"),
        encoder_seed=int(embed_params.get("seed", 0)),
        stain_norm=(embed_params.get("stain_norm") or {}).get("method"),
        stain_reference=embed_params.get("stain_norm"),
    )
    check_embedding(model, record)
    sample = graph_data(
        table, str(table.uns.get(SAMPLE_KEY, {}).get("sample_id", "slide")), genes=None, embedding_key=use_rep
    )
    min_spots = model.config.decoder_neighbors + 1
    if sample.n < min_spots and model.module_.decoder is not None:
        msg = (
            f"The slide has {sample.n} spots; the model's {model.config.decoder_neighbors}-neighbour graph needs "
            f"at least {min_spots}."
        )
        raise ValueError(msg)
    result = model.predict_graph(sample, device=device, max_nodes=max_nodes, smooth=smooth)
    check_finite_predictions(result["expression"], result["latent"])
    params = prediction_params(
        model, embed_params, key_added=key_added, attention=result["attention"] is not None, smooth=smooth
    )
    if SAMPLE_KEY in table.uns:  # for readers of an AnnData holding no sample record of its own (scanpy input)
        params["sample"] = dict(table.uns[SAMPLE_KEY])
    if result.get("spread") is not None:  # an ensemble: the members' standard deviation, per spot and gene
        params.update(
            spread_layer=f"{key_added}_spread",
            agreement_key=f"{key_added}_agreement",
            agreement_spots=int(sample.n),
            ensemble_members=len(model.members),
        )
    if overwrite:
        clear(table, keys)
    if same:
        target = _write_layers(table, model, result, key_added=key_added, params=params)
    else:
        measured = None
        if table.n_vars and set(model.genes) <= set(table.var_names):
            measured = target_expression(table, model.genes, target_norm=model.target_norm, target_sum=model.target_sum)
        target = _new_table(table, model, measured)
        _write_layers(target, model, result, key_added=key_added, params=params)
        table_key = key_added if hasattr(data, "tables") else None
        write_frame(
            table, model.genes, result, key_added=key_added, params=params, measured=measured, table_key=table_key
        )
        if hasattr(data, "tables"):
            _store_table(data, target, key_added=key_added, overwrite=overwrite)
    logger.info("Predicted %d genes at %d spots (key_added=%r).", len(model.genes), sample.n, key_added)
    return data if copy else target


def _write_layers(target, model: HESpotEx, result: dict[str, Any], *, key_added: str, params: dict[str, Any]):
    """The prediction as a layer of ``target``, whose genes are the model's (in any order)."""
    order = pd.Index(model.genes).get_indexer(target.var_names)
    target.layers[key_added] = result["expression"][:, order]
    target.obsm[f"X_{key_added}"] = result["latent"]
    if result.get("spread") is not None:
        target.layers[f"{key_added}_spread"] = result["spread"][:, order]
    if result.get("agreement") is not None:
        target.var[f"{key_added}_agreement"] = np.asarray(result["agreement"], dtype=np.float64)[order]
    if result["attention"] is not None:
        target.obsp[f"{key_added}_attention"] = result["attention"]
    target.uns[key_added] = {"params": dict(params)}
    return target


def _new_table(table, model: HESpotEx, measured: np.ndarray | None):
    """A table of the same spots and the model's genes (what predict returns when the genes differ)."""
    from anndata import AnnData

    keep = [c for c in ("region", "spot_id") if c in table.obs]
    new = AnnData(obs=table.obs[keep].copy(), var=pd.DataFrame(index=pd.Index(model.genes, name=None)))
    new.obsm["spatial"] = np.asarray(table.obsm["spatial"]).copy()
    if SAMPLE_KEY in table.uns:
        new.uns[SAMPLE_KEY] = dict(table.uns[SAMPLE_KEY])
    if "spatialdata_attrs" in table.uns:
        new.uns["spatialdata_attrs"] = dict(table.uns["spatialdata_attrs"])
    if measured is not None:
        new.layers["measured"] = measured
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
