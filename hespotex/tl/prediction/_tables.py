"""Prediction tables: what ``hx.tl.predict`` records with a prediction (``uns[key_added]["params"]``) and how
every reader (attention, diagnostic patches, evaluation, plots) finds the prediction table, layer and record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hespotex._constants import PREDICTION_KEY, attention_key
from hespotex._sample import get_table
from hespotex.pp._targets import TARGET_NORMS

if TYPE_CHECKING:
    from anndata import AnnData

    from hespotex.tl.model._model import HESpotEx

__all__ = ["PREDICTION_KEY", "Resolved", "find_prediction", "resolve_attention", "resolve_prediction"]


def prediction_params(
    model: HESpotEx, embed_params: dict[str, Any], *, key_added: str, attention: bool, smooth: float | None = None
) -> dict[str, Any]:
    """``uns[key_added]["params"]`` of a prediction: model id, genes hash, encoder, patch size, seed, config, versions,
    spatial smoothing (``hx.tl.predict(..., smooth=)``), keys."""
    setup = model.setup_dict()
    return {
        "model_id": model.model_id,
        "genes_hash": setup["gene_hash"],
        "n_genes": len(model.genes),
        "encoder": embed_params.get("encoder"),
        "encoder_id": embed_params.get("encoder_id"),
        "patch_um": embed_params.get("patch_um"),
        "context_um": embed_params.get("context_um"),  # None: single-scale embeddings
        "seed": model.config.seed if getattr(model, "seed", None) is None else model.seed,  # an ensemble's own
        "target_sum": model.target_sum,
        "target_norm": model.target_norm,
        "target": TARGET_NORMS[model.target_norm],
        "embedding_norm": model.embedding_norm,
        "tta": model.embedding.get("tta"),
        "stain_norm": (model.embedding.get("stain_norm") or {}).get("method"),  # None: patches as scanned
        "stain_augment_views": int(
            (model.stain_augment or {}).get("n_views", 0)
        ),  # 0: trained on clean embeddings only
        "smooth": smooth,  # None: the model's predictions as they are
        "config": setup["config"],
        "versions": setup["versions"],
        "layer": key_added,
        "latent_key": f"X_{key_added}",
        "attention_key": attention_key(key_added) if attention else None,
    }


def recorded_params(table: AnnData, key: str = PREDICTION_KEY) -> dict[str, Any] | None:
    """``uns[key]["params"]``: what ``hx.tl.predict(..., key_added=key)`` recorded in ``table``, or ``None``."""
    entry = table.uns.get(key)
    params = entry.get("params") if isinstance(entry, dict) else None
    return params if isinstance(params, dict) else None


def prediction_records(table: AnnData) -> dict[str, dict[str, Any]]:
    """Every prediction recorded in ``table``: its name -> the parameters recorded with it.

    A prediction is an ``uns`` entry with a ``params`` dict whose ``layer`` (default: the entry's key)
    is a layer of the table, or whose ``obsm`` names an ``obsm`` DataFrame of the table (spots x the
    model's genes, written by ``hx.tl.predict`` when the table's genes are not the model's), whatever
    ``key_added`` it was written under.
    """
    records: dict[str, dict[str, Any]] = {}
    for key, value in table.uns.items():
        params = value.get("params") if isinstance(value, dict) else None
        if not isinstance(params, dict):
            continue
        frame = params.get("obsm")
        if frame is not None and frame in table.obsm:
            name = str(params.get("layer") or frame)
        else:
            name = str(params.get("layer") or key)
            if name not in table.layers:
                continue
        # the record hx.tl.predict wrote (uns key = layer) wins over others naming the layer (e.g. evaluate's)
        if name not in records or key == name:
            records[name] = params
    return records


def find_prediction(table: AnnData, layer: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """The prediction of ``table`` (its name) and a copy of the parameters recorded for it, or ``None``.

    ``layer`` given: that prediction or layer (with its record when there is one). ``None``: the
    prediction under :data:`PREDICTION_KEY`, else the first recorded one, else a bare
    ``layers[PREDICTION_KEY]``. Read the values with :func:`prediction_table`.
    """
    records = {name: dict(params) for name, params in prediction_records(table).items()}
    if layer is not None:
        if layer in records:
            return layer, records[layer]
        if layer in table.layers:
            return layer, {"layer": layer}
        return None
    if PREDICTION_KEY in records:
        return PREDICTION_KEY, records[PREDICTION_KEY]
    if records:
        key = next(iter(records))
        return key, records[key]
    if PREDICTION_KEY in table.layers:
        return PREDICTION_KEY, {"layer": PREDICTION_KEY}
    return None


def frame_view(table: AnnData, name: str, params: dict[str, Any]) -> AnnData:
    """The prediction stored as ``obsm[params["obsm"]]`` (spots x model genes) as a table of the same spots
    and the model's genes, like the one ``hx.tl.predict`` returns: ``layers[name]``, ``layers["measured"]``
    and ``layers[f"{name}_spread"]`` when recorded, the spot centres, latent, attention and records.

    A new AnnData holding copies of the values; writing to it leaves ``table`` unchanged.
    """
    import numpy as np
    import pandas as pd
    from anndata import AnnData

    from hespotex._sample import SAMPLE_KEY

    frame = table.obsm[params["obsm"]]
    genes = pd.Index([str(g) for g in frame.columns])
    view = AnnData(obs=table.obs.copy(), var=pd.DataFrame(index=genes))
    view.layers[name] = np.asarray(frame, dtype=np.float32)
    for kind, layer in (("measured_key", "measured"), ("spread_key", f"{name}_spread")):
        key = params.get(kind)
        if key is not None and key in table.obsm:
            view.layers[layer] = np.asarray(table.obsm[key].loc[:, genes], dtype=np.float32)
    for key in ("spatial", params.get("latent_key")):
        if key is not None and key in table.obsm:
            view.obsm[key] = np.asarray(table.obsm[key])
    att = params.get("attention_key")
    if att is not None and att in table.obsp:
        view.obsp[att] = table.obsp[att]
    sample = table.uns.get(SAMPLE_KEY) or params.get("sample")
    if sample:
        view.uns[SAMPLE_KEY] = dict(sample)
    for key, value in table.uns.items():  # records of this prediction (e.g. hx.tl.evaluate's) come along
        if key != name and isinstance(value, dict) and (value.get("params") or {}).get("layer") == name:
            view.uns[key] = value
    spread = {"spread_layer": f"{name}_spread"} if f"{name}_spread" in view.layers else {}
    view.uns[name] = {"params": {**params, "layer": name, "obsm": None, **spread}}
    return view


def prediction_table(table: AnnData, layer: str | None = None) -> tuple[AnnData, str, dict[str, Any]] | None:
    """Where to read a prediction of ``table`` by gene name: ``(t, name, params)`` with the values in
    ``t.layers[name]`` and ``t.var_names`` the predicted genes, or ``None`` when ``table`` holds none.

    ``t`` is ``table`` itself for a layer over its own genes, or :func:`frame_view` for a prediction
    stored as an ``obsm`` DataFrame (the table's genes were not the model's); ``layer`` and the default
    are as in :func:`find_prediction`.
    """
    found = find_prediction(table, layer)
    if found is None:
        return None
    name, params = found
    if params.get("obsm") is not None and params["obsm"] in table.obsm:
        return frame_view(table, name, params), name, params
    return table, name, params


def spot_tables(data: Any, *, same_spots: bool = True, prefer: str | None = None) -> list[tuple[str, AnnData]]:
    """The tables a prediction may be in: the sample's spot table first (named ``"table"``), then the other
    tables of the SpatialData (e.g. ``tables["hespotex"]``, written by predict when the genes differ).

    ``same_spots``: only tables of the same spots (same ``obs_names``). ``prefer``: that table right after
    the spot table. A table held under several names appears once.
    """
    main = get_table(data)
    out = [("table", main)]
    if hasattr(data, "tables"):
        others = [
            (str(name), t)
            for name, t in data.tables.items()
            if t is not main and (not same_spots or (t.n_obs == main.n_obs and t.obs_names.equals(main.obs_names)))
        ]
        if prefer is not None:
            others.sort(key=lambda item: item[0] != prefer)  # stable: the rest keep their order
        for name, t in others:
            if all(t is not u for _, u in out):
                out.append((name, t))
    return out


@dataclass(frozen=True)
class Resolved:
    """A prediction found by :func:`resolve_prediction`: its table, layer, record and where the table is."""

    table: AnnData
    layer: str
    params: dict[str, Any]
    key: str
    table_key: str | None = None  # the SpatialData table name; None for an AnnData given directly
    source: AnnData | None = None  # the stored table results are written to (``table`` may be a frame view)

    @property
    def target(self) -> AnnData:
        """The table a reader writes its results into: the stored table, never a temporary view."""
        return self.source if self.source is not None else self.table


def resolve_prediction(
    data: Any, key: str = PREDICTION_KEY, *, layer: str | None = None, any_recorded: bool = False
) -> Resolved:
    """The prediction ``hx.tl.predict(..., key_added=key)`` wrote, wherever it is: the one lookup every reader uses.

    ``data`` is a SpatialData (its spot table first, then its other tables, ``tables[key]`` right after it) or
    a table (AnnData). In each table, ``key`` names the record ``uns[key]["params"]`` with its layer, or a
    bare ``layers[key]`` (a baseline, the spread); ``key`` may also name a table of the SpatialData (then its
    recorded prediction). ``layer`` overrides the layer read from that table (e.g. ``f"{key}_spread"``). A
    prediction over other genes than the spot table's is read from ``tables[key]`` when the SpatialData has it,
    else from the spot table's ``obsm[key]`` DataFrame (as a view; ``Resolved.target`` is the stored table).
    ``any_recorded`` (the views of ``hx.pl``): for the default key, when nothing is stored under it, the first
    recorded prediction is shown instead; the tools never guess (they write results named after ``key``).
    """
    from anndata import AnnData

    if isinstance(data, AnnData):
        tables: list[tuple[str | None, AnnData]] = [(None, data)]
    elif hasattr(data, "tables"):
        try:
            tables = [(name, t) for name, t in spot_tables(data, same_spots=False, prefer=key)]
        except KeyError:  # no spot table "table" among several (e.g. a store of predictions only)
            tables = sorted(((str(n), t) for n, t in data.tables.items()), key=lambda item: item[0] != key)
        names = {id(t): n for n, t in data.tables.items()}  # real names (the spot table may not be "table")
        tables = [(names.get(id(t), n), t) for n, t in tables]
    else:
        msg = f"Expected a SpatialData sample or an AnnData table holding predictions, found {type(data).__name__}."
        raise TypeError(msg)

    def pick(name: str | None, table: AnnData, found: tuple[str, dict[str, Any]] | None) -> Resolved | None:
        if found is None:
            return None
        name_layer, params = found
        source = table
        frame = params.get("obsm")
        if frame is not None and frame in table.obsm:  # other genes than the table's: the obsm DataFrame, by gene
            table = frame_view(table, name_layer, params)
            params = dict(table.uns[name_layer]["params"])
        if layer is not None:
            if layer not in table.layers:
                return None
            name_layer = layer
        return Resolved(table=table, layer=name_layer, params=params, key=key, table_key=name, source=source)

    framed = None  # a prediction held as an obsm DataFrame: used when no table holds it as a layer of its genes
    for name, table in tables:  # the record uns[key] (or a bare layer named key)
        params = recorded_params(table, key)
        if params is not None and str(params.get("layer", key)) in table.layers:
            hit = pick(name, table, (str(params.get("layer", key)), dict(params)))
        else:
            hit = pick(name, table, find_prediction(table, key))
        if hit is not None and hit.source is not hit.table:
            framed = framed or hit
        elif hit is not None:
            return hit
    if framed is not None:
        return framed
    for name, table in tables:  # key names a table of the SpatialData
        if name is not None and name == key:
            hit = pick(name, table, find_prediction(table, layer))
            if hit is not None:
                return hit
    if any_recorded and key == PREDICTION_KEY:  # views only: any recorded prediction
        for name, table in tables:
            hit = pick(name, table, find_prediction(table, layer))
            if hit is not None:
                return hit
    where = "the table" if tables[0][0] is None else f"tables {[n for n, _ in tables]}"
    what = f"layers[{layer!r}] of " if layer is not None else ""
    found = sorted({str(k) for _, t in tables for k in prediction_records(t)})
    msg = (
        f"Expected {what}the prediction {key!r} (uns[{key!r}]['params'] with its layer, or layers[{key!r}]) in "
        f"{where}; "
        f"found predictions {found}. Pass `key=` as given to `hx.tl.predict(..., key_added=...)`, or predict first."
    )
    raise KeyError(msg)


def resolve_attention(found: Resolved) -> str | None:
    """``obsp`` key of the decoder attention of a resolved prediction (its record, else ``f"{key}_attention"``)."""
    att = found.params.get("attention_key")
    if att:
        return str(att)
    default = attention_key(found.key)
    return default if default in found.table.obsp else None
