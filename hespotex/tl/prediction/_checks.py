"""Checks shared by in-memory and streamed prediction: the slide was embedded like the training slides, and the
predictions are finite before anything is stored."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex.pp._context import scales_text
from hespotex.tl.training._train import same_embedding

if TYPE_CHECKING:
    from hespotex.tl.model._model import HESpotEx

logger = logging.getLogger("hespotex")


def entry_text(record: dict[str, Any]) -> str:
    """Registry entry of an embedding record: ``'uni' of lazyslide-models 0.1.0 at 0.5 µm/px``."""
    entry = record.get("encoder_entry") or {}
    if not entry:
        return f"{record.get('encoder')!r} (no registry entry)"
    return f"{entry.get('name')!r} of {entry.get('source')} {entry.get('version')} at {entry.get('native_mpp')} µm/px"


def check_embedding(model: HESpotEx, record: dict[str, Any]) -> None:
    """Refuse a slide embedded differently (encoder, patch size, context scale) from the model's training slides."""
    expected = model.embedding
    if "unknown" in (record.get("encoder_id"), expected.get("encoder_id")):
        logger.warning("Cannot check that this slide was embedded like the training slides (no encoder record).")
        return
    if not same_embedding(expected, record) and same_embedding(
        expected, {**record, "stain_norm": expected.get("stain_norm")}
    ):  # only the stain normalisation differs
        from hespotex.pp._stain_norm import stain_text

        msg = (
            f"The model was trained on embeddings made with {stain_text(expected.get('stain_norm'))}; this slide's "
            f"were made with {stain_text(record.get('stain_norm'))}. Re-embed it as the model expects: "
            "hx.pp.embed(sdata, stain_norm=model.embedding['stain_norm']['method'] (or None), "
            "stain_reference=model.embedding['stain_norm'], key_added=..., overwrite=True), or delete its "
            "embeddings and let hx.tl.predict embed it."
        )
        raise ValueError(msg)
    if not same_embedding(expected, record):
        entries = [entry_text(r) for r in (expected, record)]
        msg = (
            (f"The model's encoder is {entries[0]}, this slide's {entries[1]}. " if entries[0] != entries[1] else "")
            + f"The model was trained on embeddings of {expected.get('encoder')!r} ({expected.get('encoder_id')}) at "
            f"{scales_text(expected)}; this slide's were made with {record.get('encoder')!r} "
            f"({record.get('encoder_id')}) at {scales_text(record)}"
            + (
                f"; test-time augmentation (tta): the model's {expected.get('tta')!r}, this slide's "
                f"{record.get('tta')!r}"
                if expected.get("tta") != record.get("tta")
                else ""
            )
            + ". Re-embed it: "
            f"hx.pp.embed(sdata, encoder={expected.get('encoder')!r}, patch_um={expected.get('patch_um')}, "
            + (f"context_um={expected['context_um']}, " if expected.get("context_um") is not None else "")
            + ("tta=True, " if expected.get("tta") else "")
            + "key_added=..., overwrite=True)."
        )
        raise ValueError(msg)


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
            f"The model's predictions are NaN or infinite at {int(bad_rows.sum())} spots ({n_genes} genes), "
            f"e.g. spot {first}; "
            "nothing was stored. The weights overflow on these embeddings: check the embeddings (encoder, image) "
            "or retrain the model."
        )
        raise ValueError(msg)
