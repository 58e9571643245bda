"""Checks and resolvers of :func:`hespotex.tl.train`'s embedding inputs: stain views, lazy reading, test-time
augmentation."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from hespotex._sample import get_table
from hespotex.pp._embed import EMBED_KEY

logger = logging.getLogger("hespotex")


def stain_views(tables: dict[str, Any], records: dict[str, dict[str, Any]], embedding_key: str) -> dict[str, Any]:
    """Check every training table has stain-augmented views of its embeddings; return their record (with the obsm
    key)."""
    from hespotex.pp._stain_augment import views_key

    key = views_key(embedding_key)
    missing = [n for n, t in tables.items() if key not in t.obsm]
    if missing:
        msg = (
            f"stain_augment=True needs stain-augmented views in obsm[{key!r}]; samples {missing} have none. "
            f"Run `hx.pp.embed(sdata, stain_augment=4, key_added={embedding_key!r}, overwrite=True)` on them first."
        )
        raise KeyError(msg)
    counts = {n: t.obsm[key].shape[1] if np.ndim(t.obsm[key]) == 3 else None for n, t in tables.items()}
    if len(set(counts.values())) != 1 or None in counts.values():
        msg = (
            f"Expected obsm[{key!r}] of shape (n_spots, n_views, dim) with the same n_views in every sample, found "
            f"{counts}."
        )
        raise ValueError(msg)
    first = next(iter(records.values())).get("stain_augment") or {
        "n_views": next(iter(counts.values())),
        "method": "unknown",
    }
    return {**dict(first), "key": key}


def resolve_lazy(lazy: bool | None, tables: dict[str, Any], use_rep: str) -> bool:
    """What :func:`train` ``(..., lazy=None)`` does: stream when some table's embeddings are not in memory."""
    from hespotex.tl.model._lazy import is_in_memory

    if lazy is None:
        lazy = any(not is_in_memory(t.obsm[use_rep]) for t in tables.values())
        if lazy:
            logger.info("obsm[%r] is not in memory: training reads it block by block (lazy=True).", use_rep)
    if not isinstance(lazy, bool | np.bool_):
        msg = f"Expected `lazy` to be None, True or False; found {lazy!r}."
        raise ValueError(msg)
    return bool(lazy)


def lazy_views(table: Any, key: str) -> Any:
    """A :class:`~hespotex.tl.model._lazy.LazyRows` reader of the stain views ``obsm[key]``, checked."""
    from hespotex.tl.model._lazy import LazyRows, check_finite

    rows = LazyRows(table.obsm[key], name=f"obsm[{key!r}]")
    if rows.ndim != 3 or len(rows) != table.n_obs:
        msg = f"Expected obsm[{key!r}] of shape ({table.n_obs}, n_views, width), found {rows.shape}."
        raise ValueError(msg)
    check_finite(rows, f"obsm[{key!r}]")
    return rows


def check_tta(named: dict[str, Any], embedding_key: str, tta: bool) -> None:
    """Refuse samples already embedded with (``tta=False``) or without (``tta=True``) test-time augmentation."""
    if not isinstance(tta, bool | np.bool_):
        msg = f"Expected `tta` to be True, False or None; found {tta!r}."
        raise ValueError(msg)
    wrong = []
    for n, s in named.items():
        table = get_table(s)
        if embedding_key in table.obsm:
            record = table.uns.get(EMBED_KEY, {}).get(embedding_key) or {}
            if bool(record.get("tta")) != bool(tta):
                wrong.append(n)
    if wrong:
        made = "without" if tta else "with"
        msg = (
            f"tta={bool(tta)} but samples {wrong} were already embedded in obsm[{embedding_key!r}] {made} test-time "
            f"augmentation. Re-embed them with `hx.pp.embed(sdata, tta={bool(tta)}, key_added={embedding_key!r}, "
            "overwrite=True)`, or pass tta=None to train on the embeddings they have."
        )
        raise ValueError(msg)
