"""Frozen-encoder embeddings of the H&E patch under each spot, computed once and cached."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hespotex._constants import EMBED_RECORD_KEY, EMBEDDING_KEY, SAMPLE_KEY
from hespotex._pixels import read_local
from hespotex._sample import get_table
from hespotex._settings import settings
from hespotex.io._inputs import accepts_anndata
from hespotex.pp._context import check_context_um, combined_key, context_plan, context_record
from hespotex.pp._encode import (  # noqa: F401 (moved to _encode; imported from here elsewhere)
    CHANNELS_LAST_MODELS,
    dihedral_views,
    encode_patches,
    encode_two_scales,
    memory_format,
)
from hespotex.pp._encoder_base import DEFAULT_ENCODER
from hespotex.pp._patches import PatchPlan, plan_patches

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from hespotex.pp._encoders import Encoder

logger = logging.getLogger("hespotex")

EMBED_KEY = EMBED_RECORD_KEY


def image_fingerprint(plan: PatchPlan) -> str:
    """Identify the image a plan reads: every level's shape and placement, and 64 small windows
    of full-resolution pixels spread over the slide.

    Only the windows are read (a few chunks of the base level), so the cost stays small for
    in-memory and chunked slides alike, and no downsampled level is computed. When the plan cuts
    its patches from the base level, the windows are read through its cache of decoded chunks
    (the same pixels; the embedding then finds those chunks decoded). Computed once per plan (and
    the copies made of it with :func:`dataclasses.replace`).
    """
    import dask.array as da

    memo = getattr(plan, "memo", None)
    if memo is not None and "image_fingerprint" in memo:
        return memo["image_fingerprint"]

    base = plan.base
    arr = base.array.data
    h, w = base.shape
    digest = hashlib.sha256(repr((arr.shape, str(arr.dtype), base.scale, base.offset, plan.level.level)).encode())
    ys = np.linspace(0, max(h - 8, 0), 8).astype(int)
    xs = np.linspace(0, max(w - 8, 0), 8).astype(int)
    cache = getattr(plan, "cache", None)
    if cache is not None and cache.lazy and plan.level.level == base.level:
        stacked = np.stack([cache.read(y, min(y + 8, h), x, min(x + 8, w)) for y in ys for x in xs])
    else:
        windows = [arr[:3, y : y + 8, x : x + 8] for y in ys for x in xs]
        stacked = da.stack(windows) if isinstance(arr, da.Array) else np.stack(windows)
    digest.update(np.ascontiguousarray(read_local(stacked)).tobytes())
    if memo is not None:
        memo["image_fingerprint"] = digest.hexdigest()
    return digest.hexdigest()


def cache_key(
    plan: PatchPlan, encoder: Encoder, *, tta: bool = False, stain: dict | None = None, stain_norm: dict | None = None
) -> str:
    """Cache key of an embedding: image pixels, spot crops (centres and geometry), encoder, test-time
    augmentation, stain-augmented views (their number, seed and ranges) and stain normalisation (its
    reference, :func:`hespotex.pp._stain_norm.stain_key`)."""
    parts = {
        "image": image_fingerprint(plan),
        "patches": plan.fingerprint(),
        "encoder": encoder.encoder_id,
        "version": 1,
    }
    if tta:
        parts["tta"] = "dihedral8"
    if stain:
        parts["stain_augment"] = stain
    if stain_norm:
        parts["stain_norm"] = stain_norm
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def embedding_cache_keys(
    plan: PatchPlan,
    ctx: PatchPlan | None,
    encoder: Encoder,
    *,
    tta: bool = False,
    stain: dict | None = None,
    stain_norm: dict | None = None,
) -> tuple[str, str | None, str]:
    """``(spot key, context key, key of the whole embedding)``: :func:`cache_key` of each scale (the context
    key ``None`` without ``ctx``) and, with two scales, their :func:`~hespotex.pp._context.combined_key`."""
    key = cache_key(plan, encoder, tta=tta, stain=stain, stain_norm=stain_norm)
    if ctx is None:
        return key, None, key
    ctx_key = cache_key(ctx, encoder, tta=tta, stain=stain, stain_norm=stain_norm)
    return key, ctx_key, combined_key(key, ctx_key)


def _cache_path(key: str) -> Path:
    return Path(settings.cachedir) / "embeddings" / f"{key}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def _scale_features(
    plan: PatchPlan,
    enc: Encoder,
    key: str,
    *,
    n_obs: int,
    cache: bool,
    batch_size: int,
    device: str | None,
    tta: bool,
    stain_augment: int,
    seed: int,
    scale_augment: float = 0.0,
    dihedral_augment: bool = False,
    stain_norm: tuple[dict, dict] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The embeddings (and stain-augmented views) of one patch scale: from the disk cache under ``key`` when
    there, else computed (and cached); ``stain_norm`` = (slide stain, reference) as :func:`encode_patches`."""
    path = _cache_path(key)
    views_path = path.with_name(f"{key}_stain_views.npy")
    if cache and path.is_file() and (not stain_augment or views_path.is_file()):
        cached = np.load(path, allow_pickle=False)
        cached_views = np.load(views_path, allow_pickle=False) if stain_augment else None
        if cached.shape == (n_obs, enc.num_features) and (
            not stain_augment or cached_views.shape == (n_obs, stain_augment, enc.num_features)
        ):
            logger.info("Loaded %d cached embeddings from %s.", len(cached), path)
            return cached, cached_views
    logger.info(
        "Embedding %d patches of %.0f µm of %r with %s (level %d, %d px crops -> %d px).",
        n_obs, plan.patch_um, plan.level.image_key, enc.name, plan.level.level, plan.size, enc.input_size,
    )  # fmt: skip
    feats = encode_patches(
        plan, enc, batch_size=batch_size, device=device, tta=tta, stain_views=stain_augment, stain_seed=seed,
        scale_augment=scale_augment, dihedral_augment=dihedral_augment, stain_norm=stain_norm,
    )  # fmt: skip
    views = None
    if stain_augment:
        feats, views = feats
    if not np.isfinite(feats).all() or (views is not None and not np.isfinite(views).all()):
        msg = f"The encoder {enc.name!r} produced NaN or infinite embeddings; check its weights and the image."
        raise ValueError(msg)
    if cache:
        if stain_augment:
            _save_atomic(views_path, views)
        _save_atomic(path, feats)
    return feats, views


@accepts_anndata()
def embed(
    data: SpatialData | AnnData,
    *,
    encoder: str | Any = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    layers: Sequence[str] | None = None,
    patch_um: float | None = None,
    input_size: int | None = None,
    batch_size: int = 64,
    cache: bool = True,
    seed: int = 0,
    device: str | None = None,
    key_added: str = EMBEDDING_KEY,
    overwrite: bool = False,
    tta: bool = False,
    stain_augment: int = 0,
    scale_augment: float = 0.0,
    dihedral_augment: bool = False,
    stain_norm: str | None = None,
    stain_reference: dict | None = None,
    image: Any = None,
    microns_per_pixel: float | None = None,
    library_id: str | None = None,
    context_um: float | Literal["auto"] | None = None,
    out: str | Path | None = None,
) -> None:
    """Embed the H&E patch under every spot with a frozen image encoder.

    Each patch is cut at ``patch_um`` microns around the spot centre from the coarsest pyramid
    level that keeps the encoder's input resolution, resized to the encoder input (antialiased),
    normalised as the encoder expects and passed through it in batches.

    Parameters
    ----------
    data
        A sample with its H&E image (SpatialData), or an AnnData in the scanpy / squidpy Visium or HEST
        convention (image and scale factors in ``uns["spatial"][library_id]``, ``obsm["spatial"]`` in
        full-resolution pixels; read through :func:`hespotex.io.from_scanpy`, highest resolution first). The
        AnnData itself receives what is written; without any image a ``ValueError`` names the three ways to
        supply one.
    encoder
        A timm architecture name (random init, seeded), ``"efficientnet_lite0.imagenet.multilayer"`` (the
        default: real ImageNet weights, offline, features pooled from 4 inner stages and the head, 1,984),
        ``"efficientnet_lite0.imagenet"`` (the head's 1,280 only), an ``hf-hub:`` id, a pathology encoder of
        LazySlide's zoo (``"uni"``, ``"virchow2"``, ...; :func:`hespotex.pp.list_encoders`), an
        :class:`~hespotex.pp._encoders.Encoder` or a ``torch.nn.Module``; see
        :func:`hespotex.pp.load_encoder`.
    weights
        Local checkpoint for a timm architecture (safetensors or a torch state dict), or the local
        weights of a zoo encoder (its checkpoint file or hub folder).
    layers
        Sub-modules of the encoder whose outputs' spatial means are put before its features (see
        :func:`hespotex.pp.load_encoder`); recorded, so a model trained on them embeds new slides the same way.
    patch_um
        Patch side in µm (default: a zoo encoder's input at its native µm/px, e.g. 224 px x 0.5 =
        112 µm; else the spot diameter).
    input_size
        Encoder input side in pixels (default: the encoder's own, e.g. 224).
    batch_size
        Patches per encoder forward.
    cache
        Reuse embeddings cached on disk (``hx.settings.cachedir``) under a key of the image
        pixels, spot crops and encoder; a second call with the same inputs runs no forward pass.
        Independently of ``cache``, a table whose ``obsm[key_added]`` already holds embeddings
        with the same key is left as it is.
    seed
        Seed of a randomly initialised encoder.
    device
        Torch device (``"auto"``/``None``: ``hx.settings.device``).
    key_added
        ``obsm`` key of the embeddings.
    overwrite
        Replace embeddings already stored under ``key_added`` with different parameters.
    tta
        Test-time augmentation: embed each patch in its 8 dihedral views (4 quarter turns, with
        and without a mirror flip) and store their mean (8 times the encoder work). H&E has no
        preferred orientation, so the mean is a more stable description of the patch. Recorded as
        ``"tta"`` in the embedding record; a model trained on TTA embeddings predicts with them.
    stain_augment
        Number of stain-augmented views to embed besides the clean patch (0: none), for training
        with :func:`hespotex.tl.train` ``(..., stain_augment=True)``: each view re-stains the patch
        in HED colour space with mild brightness/contrast changes, drawn from ``seed`` per (view,
        spot) (:mod:`hespotex.pp._stain_augment`). ``stain_augment + 1`` times the encoder work,
        once: the views are cached with the embeddings. ``obsm[key_added]`` stays the clean embedding.
    scale_augment
        With ``stain_augment``: also cut each view with its side scaled about the spot centre by a factor
        drawn per (view, spot), log-uniform in ``[1 / (1 + scale_augment), 1 + scale_augment]`` (0.15: ±15 %),
        so that training also sees the spot at a µm/px that is a little off. ``0`` (default): views at the
        patch's own scale. Recorded as the views' ``ranges["zoom"]``.
    dihedral_augment
        With ``stain_augment``: also turn each view by one of the 8 flips / quarter turns of the square, drawn per
        (view, spot) (tissue has no orientation; the frozen encoder's features do). Recorded as ``"+dihedral"`` in
        the views' method.
    stain_norm, stain_reference
        ``"macenko"``: map every patch to the reference stain ``stain_reference`` before the encoder
        (:mod:`hespotex.pp._stain_norm`). The reference is fitted on the *training* slides with
        :func:`hespotex.pp.stain_reference` (a trained model's ``model.embedding["stain_norm"]`` holds
        it too); this slide's own stain is estimated once from a seeded sample of its spot patches (not
        per patch). ``None`` (default): patches as scanned. A slide whose patches hold too little tissue
        to estimate its stain gets a ``ValueError``.
    image, microns_per_pixel, library_id
        AnnData input only (see :func:`hespotex.io.from_scanpy`): the full-resolution H&E image (path or
        array) in the pixels of ``obsm["spatial"]``, its µm per pixel when ``spot_diameter_fullres`` cannot
        give it, and the ``uns["spatial"]`` library to read when there are several.
    context_um
        Two-scale embeddings (as TRIPLEX): also cut a context patch of ``context_um`` µm (wider than
        ``patch_um``) centred on each spot, embed it with the same encoder (resized to its input) and store
        ``[spot features, context features]`` (twice the encoder's width). Recorded as ``"context_um"``;
        a model trained on them predicts new slides at the same two scales (:mod:`hespotex.pp._context`).
        Each scale is cached on its own. ``"auto"``: twice the spot patch as resolved (``patch_um``, or its
        default: 200 µm for 100 µm spots), what :func:`hespotex.tl.train` uses by default. ``None`` (default): the
        spot patch only.
    out
        A zarr store to write the embeddings into, chunk by chunk as they are encoded (never the whole array in
        memory: for Visium HD 8 µm bins, 600k+ per slide); ``obsm[key_added]`` is then a lazy
        ``dask.array.from_zarr`` array over it, which :func:`hespotex.tl.train` streams (``lazy=None``). The store
        (:mod:`hespotex.pp._embed_store`) holds the embedding record in its attributes; a rerun with the same record
        reuses it, or resumes it where an interrupted run stopped. A store of other embeddings (or a zarr store
        hx.pp.embed did not write) is replaced only with ``overwrite=True``, the new one written beside and swapped
        in once complete (a failed run leaves the old one as it was); a folder that is not a zarr store never.
        The disk cache (``cache``) is not used. ``stain_augment`` views need the in-memory path (``out=None``).

    Returns
    -------
    ``None``. Writes ``obsm[key_added]`` (``n_spots x n_features`` float32) and
    ``uns["hespotex_embed"][key_added]`` (encoder, encoder id, patch size in µm, µm/px seen by the
    encoder, input size, pyramid level, cache key and, for zoo encoders, ``encoder_entry``: name,
    source, version, native µm/px, hub id; for an encoder loaded with ``layers=``, ``layers``). With
    ``stain_augment``, also ``obsm[f"{key_added}_stain_views"]`` (``n_spots x stain_augment x n_features``) and
    ``"stain_augment"`` (views, seed, method, ranges) in the record. With ``stain_norm``, ``"stain_norm"``
    (method, the reference, this slide's own stain estimate) in the record. With ``context_um``, the features
    are ``2 x n_features`` wide (views likewise) and the record adds ``context_um``, ``context_level`` and
    ``context_crop_px``. These are all the entries written,
    to the SpatialData's table or to the AnnData passed (nothing else of it changes). With ``out``, also the store.
    """
    from hespotex.pp._encoders import load_encoder

    table = get_table(data)
    if out is not None and stain_augment:
        msg = "stain_augment views are embedded in memory only; embed them without `out`, or pass stain_augment=0."
        raise ValueError(msg)
    enc = load_encoder(encoder, weights=weights, seed=seed, input_size=input_size, layers=layers)
    native_mpp = enc.entry.get("native_mpp")
    if patch_um is None and native_mpp is not None:
        patch_um = enc.input_size * float(native_mpp)  # what the model saw in training: its input at its µm/px
    plan = plan_patches(data, patch_um=patch_um, out_px=enc.input_size)
    if native_mpp is not None and not 0.8 <= plan.patch_um / enc.input_size / native_mpp <= 1.25:
        logger.warning(
            "%s was trained at %.2f µm/px; %.0f µm patches at %d px are %.2f µm/px.",
            enc.name, native_mpp, plan.patch_um, enc.input_size, plan.patch_um / enc.input_size,
        )  # fmt: skip
    from hespotex.pp._stain_augment import check_dihedral_augment, check_scale_augment, stain_record, views_key

    if not isinstance(stain_augment, int | np.integer) or isinstance(stain_augment, bool) or stain_augment < 0:
        msg = f"Expected stain_augment to be a number of views (0, 1, 2, ...), found {stain_augment!r}."
        raise ValueError(msg)
    scale_augment = check_scale_augment(scale_augment, stain_augment)
    dihedral_augment = check_dihedral_augment(dihedral_augment, stain_augment)
    stain = stain_record(stain_augment, seed, scale_augment, dihedral_augment) if stain_augment else None
    norm_key, norm = None, None
    if stain_norm is not None or stain_reference is not None:
        from hespotex.pp._stain_norm import as_reference, check_stain_norm, slide_stain, stain_key
        from hespotex.pp._stain_norm import stain_record as stain_norm_record

        check_stain_norm(stain_norm)
        if stain_norm is None:
            msg = "stain_reference is given without stain_norm; pass stain_norm='macenko' with it, or neither."
            raise ValueError(msg)
        reference = as_reference(stain_reference, stain_norm)
        norm_key = stain_key(reference)
    context_um = check_context_um(context_um, plan.patch_um)
    ctx = context_plan(data, plan, context_um) if context_um is not None else None
    key, ctx_key, full_key = embedding_cache_keys(plan, ctx, enc, tta=tta, stain=stain, stain_norm=norm_key)
    stored = table.uns.get(EMBED_KEY, {}).get(key_added)
    if key_added in table.obsm:
        if stored is not None and stored.get("cache_key") == full_key and out is None:
            logger.info("obsm[%r] already holds these embeddings; nothing to do.", key_added)
            return
        if not overwrite:
            msg = (
                f"obsm[{key_added!r}] already holds other embeddings; pass `overwrite=True` to replace them, or "
                "another `key_added`."
            )
            raise ValueError(msg)
    if norm_key is not None:  # once per slide, before any cache look-up: a blank slide is refused either way
        sample_id = table.uns.get(SAMPLE_KEY, {}).get("sample_id", "this slide")
        slide = slide_stain(plan, what=f"slide {sample_id!r}")
        norm = stain_norm_record(reference, slide)
    pair = None if norm is None else (norm["slide"], norm["reference"])  # the context patches share the slide's stain
    record = _record(enc, plan, ctx, weights=weights, seed=seed, key=full_key, tta=tta, stain=stain, norm=norm)
    if out is not None:
        from hespotex.pp._embed_store import embed_to_store

        own = getattr(data, "path", None)
        embed_to_store(
            table, out, plan, ctx, enc, record=record, key_added=key_added, overwrite=overwrite, device=device,
            tta=tta, stain_norm=pair, own_store=own,
        )  # fmt: skip
        if views_key(key_added) in table.obsm:
            del table.obsm[views_key(key_added)]  # views of the embeddings replaced (kept when embedding failed)
        return
    options = {"batch_size": batch_size, "device": device, "tta": tta, "stain_augment": stain_augment, "seed": seed}
    options.update(scale_augment=scale_augment, dihedral_augment=dihedral_augment)
    options.update(n_obs=table.n_obs, cache=cache, stain_norm=pair)
    feats, views = _scale_features(plan, enc, key, **options)
    if ctx is not None:  # the context scale, cached on its own (a single-scale embedding at context_um reuses it)
        wide, wide_views = _scale_features(ctx, enc, ctx_key, **options)
        feats = np.concatenate([feats, wide], axis=1)
        views = np.concatenate([views, wide_views], axis=2) if views is not None else None
    table.obsm[key_added] = feats
    if views is not None:
        table.obsm[views_key(key_added)] = views
    elif views_key(key_added) in table.obsm:
        del table.obsm[views_key(key_added)]  # views of the embeddings just replaced
    table.uns.setdefault(EMBED_KEY, {})[key_added] = record


def _record(
    enc: Encoder,
    plan: PatchPlan,
    ctx: PatchPlan | None,
    *,
    weights: Any,
    seed: int,
    key: str,
    tta: bool,
    stain: dict | None,
    norm: dict | None,
) -> dict[str, Any]:
    """The embedding record of ``uns["hespotex_embed"][key_added]`` (and of an ``out`` store's attributes)."""
    from hespotex.pp._layer_pool import recorded_layers

    params = {
        "encoder": enc.name,
        "encoder_id": enc.encoder_id,
        "weights": str(weights) if weights is not None else None,
        "seed": seed,
        "patch_um": plan.patch_um,
        "input_size": enc.input_size,
        "image_key": plan.level.image_key,
        "level": plan.level.level,
        "crop_px": plan.size,
        "cache_key": key,
        "mpp": plan.patch_um / enc.input_size,
        **(context_record(ctx) if ctx is not None else {}),
        "encoder_entry": dict(enc.entry) or None,
        "tta": "dihedral8" if tta else None,
        "stain_augment": stain,
        "stain_norm": norm,
        "layers": recorded_layers(enc),
    }
    return {k: v for k, v in params.items() if v is not None}
