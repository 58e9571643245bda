"""Where :func:`hespotex.tl.predict` puts the predictions in the object the user passed.

The rules are documented once, in the ``predict`` docstring ("Where the predictions go"); this module
implements them: which keys a prediction writes into the spot table (so that ``overwrite`` can guard
every one of them before anything is computed), the ``obsm`` DataFrame / partial layer layout used
when the table's genes are not the model's, and ``copy=True``.
"""

from __future__ import annotations

import copy as _copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("hespotex")


def same_genes(table: AnnData, genes: Sequence[str]) -> bool:
    """Whether the table's genes are exactly the model's, in any order (then the layer goes on the table)."""
    names = table.var_names
    return names.is_unique and len(names) == len(genes) and set(names) == set(genes)


def spot_keys(table: AnnData, genes: Sequence[str], *, key_added: str, ensemble: bool) -> dict[str, list[str]]:
    """The keys a prediction writes into the spot table, per slot (``layers``, ``obsm``, ``obsp``, ``var``, ``uns``)."""
    keys: dict[str, list[str]] = {
        "layers": [key_added],
        "obsm": [f"X_{key_added}"],
        "obsp": [f"{key_added}_attention"],
        "var": [],
        "uns": [key_added],
    }
    if ensemble:
        keys["layers"].append(f"{key_added}_spread")
        keys["var"].append(f"{key_added}_agreement")
    if not same_genes(table, genes):
        keys["obsm"] += [key_added, f"{key_added}_measured"] + ([f"{key_added}_spread"] if ensemble else [])
        keys["var"].append(f"{key_added}_predicted")
    return keys


def taken(table: AnnData, keys: dict[str, list[str]]) -> list[str]:
    """The keys of ``keys`` that ``table`` already holds, as ``slot[key]``."""
    found = []
    for slot, names in keys.items():
        have = table.var.columns if slot == "var" else getattr(table, slot)
        found += [f"{slot}[{name!r}]" for name in names if name in have]
    return found


def check_free(table: AnnData, keys: dict[str, list[str]], *, overwrite: bool) -> None:
    """Refuse to replace anything the table holds under ``keys`` unless ``overwrite``."""
    found = taken(table, keys)
    if found and not overwrite:
        more = f" (and {', '.join(found[1:])})" if len(found) > 1 else ""
        msg = f"{found[0]} already exists{more}; pass `overwrite=True` to replace it, or another `key_added`."
        raise ValueError(msg)


def clear(table: AnnData, keys: dict[str, list[str]]) -> None:
    """Remove an earlier prediction's entries under ``keys`` (``overwrite=True``), so none is left stale."""
    for slot, names in keys.items():
        for name in names:
            if slot == "var":
                if name in table.var.columns:
                    del table.var[name]
            elif name in getattr(table, slot):
                del getattr(table, slot)[name]


def write_frame(
    table: AnnData,
    genes: Sequence[str],
    result: dict[str, Any],
    *,
    key_added: str,
    params: dict[str, Any],
    measured: np.ndarray | None,
    table_key: str | None,
) -> dict[str, Any]:
    """Write a prediction over other genes than the table's into the spot table; returns its record.

    ``obsm[key_added]`` (DataFrame spots x model genes), ``layers[key_added]`` over the table's genes (only
    when the model predicts every one of them), ``var[f"{key_added}_predicted"]`` (and, for an ensemble,
    ``var[f"{key_added}_agreement"]``),
    and the latent, attention, spread and measured entries (see the predict docstring).
    """
    genes = [str(g) for g in genes]
    index = table.obs_names.copy()
    columns = pd.Index(genes)
    table.obsm[key_added] = pd.DataFrame(
        np.asarray(result["expression"], dtype=np.float32), index=index, columns=columns
    )
    pos = pd.Index(genes).get_indexer(table.var_names)
    predicted = pos >= 0
    table.var[f"{key_added}_predicted"] = predicted
    layer = None
    if table.n_vars and predicted.all():  # every table gene predicted: a layer without gaps
        layer = key_added
        table.layers[layer] = np.asarray(result["expression"], dtype=np.float32)[:, pos]
    table.obsm[f"X_{key_added}"] = np.asarray(result["latent"])
    if result.get("attention") is not None:
        table.obsp[f"{key_added}_attention"] = result["attention"]
    spread_key = spread_layer = None
    if result.get("spread") is not None:
        spread_key = f"{key_added}_spread"
        table.obsm[spread_key] = pd.DataFrame(
            np.asarray(result["spread"], dtype=np.float32), index=index, columns=columns
        )
        if layer is not None:
            spread_layer = spread_key
            table.layers[spread_layer] = np.asarray(result["spread"], dtype=np.float32)[:, pos]
    if result.get("agreement") is not None:  # per table gene; NaN for genes the model does not predict
        agreement = np.asarray(result["agreement"], dtype=np.float64)
        table.var[f"{key_added}_agreement"] = np.where(predicted, agreement[np.maximum(pos, 0)], np.nan)
    measured_key = None
    if measured is not None:
        measured_key = f"{key_added}_measured"
        table.obsm[measured_key] = pd.DataFrame(np.asarray(measured, dtype=np.float32), index=index, columns=columns)
    record = {
        **params,
        "layer": layer,
        "obsm": key_added,
        "predicted_mask": f"{key_added}_predicted",
        "n_predicted_in_layer": int(predicted.sum()),
        "measured_key": measured_key,
        "spread_key": spread_key,
        "spread_layer": spread_layer,
        "table": table_key,
    }
    table.uns[key_added] = {"params": record}
    return record


def copy_data(data: Any) -> Any:
    """``copy=True``: an AnnData's copy, or a new SpatialData sharing the (read-only) elements and
    holding copies of the tables, so predicting into it leaves ``data`` untouched."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data.copy()
    if not hasattr(data, "tables"):
        return data  # refused by the caller with its usual message
    from spatialdata import SpatialData

    new = SpatialData(
        images=dict(data.images),
        labels=dict(data.labels),
        points=dict(data.points),
        shapes=dict(data.shapes),
        tables={name: t.copy() for name, t in data.tables.items()},
        attrs=_copy.deepcopy(dict(data.attrs or {})),
    )
    if getattr(data, "path", None) is not None:
        new.path = data.path  # `out="auto"` streams into the same store
    return new
