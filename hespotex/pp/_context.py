"""Two-scale embeddings: the spot's patch and a wider context patch around it, through the same frozen encoder.

As TRIPLEX (Chung et al., CVPR 2024) describes a spot by its own tissue and its neighbourhood,
:func:`hespotex.pp.embed` ``(..., context_um=...)`` cuts two patches centred on every spot: the
spot patch of ``patch_um`` and a context patch of ``context_um`` (wider), resizes each to the
encoder input and stores the concatenation ``[spot features, context features]``
(``2 x num_features`` wide). The record of the embeddings holds ``context_um`` (and the context
crop's pyramid level and size); a model trained on them records it, and :func:`hespotex.tl.predict`
(in memory, streamed and per cohort slide) re-embeds new slides at the same two scales and refuses
embeddings made at other ones. ``context_um="auto"`` is twice the spot patch as resolved (the spot diameter by
default); it is :func:`hespotex.tl.train`'s default for the samples it embeds (:func:`default_context_um`).

Each scale is one :class:`~hespotex.pp._patches.PatchPlan`; both plans index the same spots, so
any subset of spots (a streamed chunk) is cut at both scales with the same indices
(:func:`hespotex.pp._embed.encode_two_scales`).
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hespotex.pp._patches import PatchPlan


AUTO_CONTEXT_FACTOR = 2.0  # context_um="auto": a context patch this many times the spot patch's side


def check_context_um(context_um: Any, patch_um: float) -> float | None:
    """``context_um`` as a float wider than the spot patch ``patch_um``, or ``None`` (single scale); ``"auto"`` is
    ``AUTO_CONTEXT_FACTOR`` times ``patch_um`` (the spot patch as resolved, e.g. the spot diameter)."""
    if context_um is None:
        return None
    if isinstance(context_um, str) and context_um == "auto":
        return AUTO_CONTEXT_FACTOR * float(patch_um)
    ok = isinstance(context_um, int | float | np.integer | np.floating) and not isinstance(context_um, bool)
    if not ok or not math.isfinite(float(context_um)) or float(context_um) <= float(patch_um):
        msg = (
            f"Expected context_um to be a context patch side in µm wider than the spot patch ({patch_um:g} µm), e.g. "
            f"{2 * patch_um:g} ('auto': twice the spot patch), or None for single-scale embeddings; found "
            f"{context_um!r}."
        )
        raise ValueError(msg)
    return float(context_um)


def check_train_context_um(context_um: Any) -> None:
    """Refuse a ``context_um`` that :func:`hespotex.tl.train` cannot use: not ``"auto"``, ``None`` or a positive
    number (whether it is wider than the spot patch is checked when a sample is embedded with it)."""
    number = isinstance(context_um, int | float | np.integer | np.floating) and not isinstance(context_um, bool)
    if context_um is None or (isinstance(context_um, str) and context_um == "auto"):
        return
    if not number or not math.isfinite(float(context_um)) or float(context_um) <= 0:
        msg = (
            "Expected context_um to be 'auto' (two-scale embeddings: a context patch twice the spot patch), a context "
            f"patch side in µm wider than the spot patch (e.g. 200), or None (single scale); found {context_um!r}. "
            "Pass one of these (None, not the string 'none', for single-scale embeddings)."
        )
        raise ValueError(msg)


def default_context_um(named: dict[str, Any], embedding_key: str) -> float | str | None:
    """What :func:`hespotex.tl.train` ``(..., context_um="auto")`` asks :func:`hespotex.pp.embed` for on the samples
    it embeds (samples already carrying ``obsm[embedding_key]`` keep theirs, never re-embedded).

    ``"auto"`` (two-scale, a context patch twice each sample's spot patch as :func:`hespotex.pp.embed` resolves it:
    ``patch_um=55`` gives 110 µm) when no sample is embedded yet. When some are, the samples embedded here follow the
    first of them (its record's ``context_um``; ``None`` for single-scale or unrecorded embeddings), so that all
    samples end up embedded the same way, as :func:`hespotex.pp._stain_augment.default_stain_augment` does for
    stain views.
    """
    from hespotex._constants import EMBED_RECORD_KEY
    from hespotex._sample import get_table

    for sample in named.values():
        table = get_table(sample)
        if embedding_key in table.obsm:
            record = table.uns.get(EMBED_RECORD_KEY, {}).get(embedding_key) or {}
            context = record.get("context_um")
            return float(context) if context is not None else None
    return "auto"


def context_plan(data: Any, plan: PatchPlan, context_um: float) -> PatchPlan:
    """The context crops of the spots of ``plan`` (same spots, same output size, wider patch)."""
    from hespotex.pp._patches import plan_patches

    return plan_patches(data, patch_um=context_um, out_px=plan.out_px)


def combined_key(spot_key: str, context_key: str) -> str:
    """Cache key of a two-scale embedding from the keys of its two single-scale embeddings."""
    return hashlib.sha256(f"two-scale:{spot_key}:{context_key}".encode()).hexdigest()[:32]


def context_record(plan: PatchPlan) -> dict[str, Any]:
    """What the embedding record says about the context crops."""
    return {"context_um": plan.patch_um, "context_level": plan.level.level, "context_crop_px": plan.size}


def same_context(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two embedding records have the same context scale (both none, or the same µm)."""
    ca, cb = a.get("context_um"), b.get("context_um")
    if ca is None or cb is None:
        return ca is None and cb is None
    return bool(np.isclose(float(ca), float(cb)))


def scales_text(record: dict[str, Any]) -> str:
    """``'100 µm patches'`` or ``'100 µm patches with 200 µm context'``."""
    text = f"{record.get('patch_um')} µm patches"
    return text + (f" with {record['context_um']} µm context" if record.get("context_um") is not None else "")
