"""What :func:`hespotex.tl.explain` and :func:`~hespotex.tl.explanation._explain.patch_saliency` read: the score
(genes or a signature), the target spots, the model's encoder and the patch plans it embedded the slide with (the spot
patch's and, for two-scale embeddings, the context patch's), the stain normalisation the patches were mapped with,
and the checks of the integration options."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hespotex._constants import EMBED_RECORD_KEY, SAMPLE_KEY
from hespotex._sample import get_sample_info
from hespotex.tl.model._model import HESpotEx

if TYPE_CHECKING:
    from anndata import AnnData

    from hespotex.pp._encoders import Encoder
    from hespotex.pp._patches import PatchPlan

logger = logging.getLogger("hespotex")


BASELINES = ("white", "black", "blur")


def resolve_score(model: HESpotEx, genes: Any, signature: Any) -> tuple[list[str], np.ndarray]:
    """Genes and weights (``sum |w| = 1``) of the score from ``genes`` or ``signature``."""
    if (genes is None) == (signature is None):
        msg = (
            "Pass exactly one of `genes` (a gene or list of genes) and `signature` (a list of genes or a dict gene "
            "-> weight)."
        )
        raise ValueError(msg)
    spec = genes if genes is not None else signature
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Mapping):
        names = [str(g) for g in spec]
        weights = np.array([float(spec[g]) for g in spec], dtype=np.float64)
    elif isinstance(spec, Sequence | np.ndarray | pd.Index):
        names = [str(g) for g in spec]
        weights = np.ones(len(names), dtype=np.float64)
    else:
        msg = f"Expected genes as a string, a list of strings or a dict gene -> weight, found {type(spec).__name__}."
        raise TypeError(msg)
    if not names:
        msg = "Expected at least one gene, found none."
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = f"Genes are listed more than once: {sorted({g for g in names if names.count(g) > 1})}."
        raise ValueError(msg)
    known = set(model.genes)
    unknown = [g for g in names if g not in known]
    if unknown:
        import difflib

        hints = {g: difflib.get_close_matches(g, model.genes, n=3) for g in unknown[:5]}
        msg = (
            f"The model does not predict {len(unknown)} of the requested genes: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''} (close matches: {hints}). Choose genes from `model.genes`."
        )
        raise KeyError(msg)
    if not np.isfinite(weights).all() or np.abs(weights).sum() == 0:
        msg = "Expected finite signature weights that are not all zero."
        raise ValueError(msg)
    return names, weights / np.abs(weights).sum()


def spot_positions(table: AnnData, spots: Any) -> np.ndarray:
    """Table positions of ``spots`` (obs names, or integer positions)."""
    if isinstance(spots, str):
        spots = [spots]
    arr = np.asarray(list(spots))
    if arr.size == 0:
        msg = "Expected at least one spot, found an empty selection."
        raise ValueError(msg)
    if arr.dtype.kind in "iu":
        idx = arr.astype(np.int64)
        bad = arr[(idx < 0) | (idx >= table.n_obs)]
    else:
        idx = table.obs_names.get_indexer(arr.astype(str))
        bad = arr[idx < 0]
    if len(bad):
        msg = (
            f"{len(bad)} requested spots are not in the table: {list(bad[:10])}. Pass obs names of the table "
            f"(e.g. {list(table.obs_names[:3])}) or positions below {table.n_obs}."
        )
        raise KeyError(msg)
    if len(set(idx.tolist())) != len(idx):
        msg = "Each spot may be explained once; remove the duplicates from `spots`."
        raise ValueError(msg)
    return idx


def has_slide_image(data: Any) -> bool:
    if not hasattr(data, "images"):
        return False
    try:
        key = get_sample_info(data).image_key
    except KeyError:
        return False
    return key is not None and key in data.images


def check_baseline(baseline: str) -> None:
    if baseline not in BASELINES:
        msg = f"Expected `baseline` to be one of {BASELINES}, found {baseline!r}."
        raise ValueError(msg)


def check_steps(n_steps: int, internal_batch_size: int | None) -> None:
    if not isinstance(n_steps, (int, np.integer)) or n_steps < 2:
        msg = f"Expected `n_steps` to be an integer of at least 2, found {n_steps!r}."
        raise ValueError(msg)
    if internal_batch_size is not None and internal_batch_size < 1:
        msg = f"Expected a positive `internal_batch_size` (or None), found {internal_batch_size!r}."
        raise ValueError(msg)


def load_model_encoder(model: HESpotEx) -> Encoder:
    """The model's frozen encoder, loaded as :func:`hespotex.pp.embed` loads it from the same record (one encoder for
    both patches of two-scale embeddings)."""
    from hespotex.pp._encoders import encoder_from_record

    rec = model.embedding
    name = rec.get("encoder")
    if name in (None, "unknown"):
        msg = (
            "The model has no record of its image encoder, so the pixels cannot be attributed. Explain the "
            "neighbours only (`pixels=False`)."
        )
        raise ValueError(msg)
    # the same arguments ensure_embeddings/predict hand to hx.pp.embed
    enc = encoder_from_record(rec)
    expected = rec.get("encoder_id")
    if expected not in (None, "unknown") and enc.encoder_id != expected:
        msg = (
            f"Loading the model's encoder {name!r} gave {enc.encoder_id!r}, but the model was trained on embeddings of "
            f"{expected!r}; the attributions would explain another network. Make the same weights available "
            f"(weights={rec.get('weights')!r})."
        )
        raise ValueError(msg)
    return enc


def patch_plan(data: Any, table: AnnData, model: HESpotEx, enc: Encoder, embedding_key: str) -> PatchPlan:
    """The crops the slide's embeddings were computed from (checked against the slide's embedding record)."""
    from hespotex.pp._patches import plan_patches

    plan = plan_patches(data, patch_um=model.embedding.get("patch_um"), out_px=enc.input_size)
    record = table.uns.get(EMBED_RECORD_KEY, {}).get(embedding_key)
    if record is not None:
        if record.get("encoder_id") != enc.encoder_id or not np.isclose(record.get("patch_um", np.nan), plan.patch_um):
            msg = (
                f"obsm[{embedding_key!r}] was made with {record.get('encoder_id')!r} at "
                f"{record.get('patch_um')} µm, the model "
                f"uses {enc.encoder_id!r} at {plan.patch_um} µm. Re-embed the slide with the model's encoder "
                "(hx.tl.predict does)."
            )
            raise ValueError(msg)
        if record.get("crop_px", plan.size) != plan.size or record.get("level", plan.level.level) != plan.level.level:
            msg = (
                f"The slide's embeddings were cut as {record.get('crop_px')} px crops from pyramid level "
                f"{record.get('level')}; "
                f"the image now gives {plan.size} px crops from level {plan.level.level}. The image changed "
                "since it was "
                "embedded: embed it again (hx.pp.embed(..., overwrite=True)) and predict again."
            )
            raise ValueError(msg)
    else:
        logger.warning(
            "obsm[%r] has no embedding record; cannot check that the patches are the ones it was computed from.",
            embedding_key,
        )
    return plan


def context_patch_plan(
    data: Any, table: AnnData, model: HESpotEx, plan: PatchPlan, embedding_key: str
) -> PatchPlan | None:
    """The context crops of a model trained on two-scale embeddings (``None`` for single-scale ones): the plan
    :func:`hespotex.pp.embed` cuts them with (:func:`hespotex.pp._context.context_plan`), checked against the slide's
    embedding record."""
    from hespotex.pp._context import context_plan

    context_um = model.embedding.get("context_um")
    if context_um is None:
        return None
    ctx = context_plan(data, plan, float(context_um))
    record = table.uns.get(EMBED_RECORD_KEY, {}).get(embedding_key)
    if record is None:
        return ctx  # patch_plan warned already
    if record.get("context_um") is None or not np.isclose(float(record["context_um"]), ctx.patch_um):
        msg = (
            f"The model was trained on two-scale embeddings with {ctx.patch_um:g} µm context, but "
            f"obsm[{embedding_key!r}] was made with context_um={record.get('context_um')!r}. Re-embed the slide with "
            f"the model's scales (hx.pp.embed(..., patch_um={plan.patch_um:g}, context_um={ctx.patch_um:g}, "
            "overwrite=True); hx.tl.predict does)."
        )
        raise ValueError(msg)
    found = (record.get("context_crop_px", ctx.size), record.get("context_level", ctx.level.level))
    if found != (ctx.size, ctx.level.level):
        msg = (
            f"The slide's context patches were cut as {found[0]} px crops from pyramid level {found[1]}; the image "
            f"now gives {ctx.size} px crops from level {ctx.level.level}. The image changed since it was embedded: "
            "embed it again (hx.pp.embed(..., overwrite=True)) and predict again."
        )
        raise ValueError(msg)
    return ctx


def stain_norm_pair(model: HESpotEx, table: AnnData, plan: PatchPlan, embedding_key: str) -> tuple[dict, dict] | None:
    """``(slide stain, reference)`` that :func:`hespotex.pp.embed` mapped the slide's patches with (``None`` for a
    model trained without stain normalisation): the slide's embedding record's (the stain the stored embeddings were
    made with; :func:`hespotex.tl.prediction._checks.check_embedding` has checked its reference is the model's), else
    the model's reference and the slide's own stain estimated from ``plan`` as :func:`hespotex.tl.predict` does."""
    from hespotex.pp._stain_norm import stain_norm_entry

    entry = model.embedding.get("stain_norm")
    if not entry:
        return None
    record = table.uns.get(EMBED_RECORD_KEY, {}).get(embedding_key) or {}
    norm = record.get("stain_norm")
    if not norm:  # no record (patch_plan warned): estimate the slide's stain as predict would
        norm = stain_norm_entry(entry, plan, table.uns.get(SAMPLE_KEY, {}).get("sample_id", "this slide"))
    return dict(norm["slide"]), dict(norm["reference"])
