"""Two-scale embeddings: the spot's patch and a wider context patch around it, through the same frozen encoder.

As TRIPLEX (Chung et al., CVPR 2024) describes a spot by its own tissue and its neighbourhood,
:func:`hespotex.pp.embed` ``(..., context_um=...)`` cuts two patches centred on every spot: the
spot patch of ``patch_um`` and a context patch of ``context_um`` (wider), resizes each to the
encoder input and stores the concatenation ``[spot features, context features]``
(``2 x num_features`` wide). The record of the embeddings holds ``context_um`` (and the context
crop's pyramid level and size); a model trained on them records it, and :func:`hespotex.tl.predict`
(in memory, streamed and per cohort slide) re-embeds new slides at the same two scales and refuses
embeddings made at other ones.

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


def check_context_um(context_um: Any, patch_um: float) -> float | None:
    """``context_um`` as a float wider than the spot patch ``patch_um``, or ``None`` (single scale)."""
    if context_um is None:
        return None
    ok = isinstance(context_um, int | float | np.integer | np.floating) and not isinstance(context_um, bool)
    if not ok or not math.isfinite(float(context_um)) or float(context_um) <= float(patch_um):
        msg = (
            f"Expected context_um to be a context patch side in µm wider than the spot patch ({patch_um:g} µm), e.g. "
            f"{2 * patch_um:g}, or None for single-scale embeddings; found {context_um!r}."
        )
        raise ValueError(msg)
    return float(context_um)


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
