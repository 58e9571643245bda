"""Running a frozen encoder over planned patches in batches (a loader thread reads the next batch while the encoder
runs), with test-time augmentation, stain-augmented views, stain normalisation and two patch scales: the numbers
behind :func:`hespotex.pp.embed`, in memory or chunk by chunk into a zarr store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._settings import resolve_device, settings
from hespotex.pp._fold_batchnorm import fold_batchnorm
from hespotex.pp._patches import PatchPlan, resize_batch

if TYPE_CHECKING:
    from hespotex.pp._encoders import Encoder


def dihedral_views(x):
    """The 8 flips and quarter-turn rotations of a batch ``(n, c, h, w)`` (the dihedral group of the square)."""
    import torch

    views = []
    for flipped in (x, torch.flip(x, dims=(-1,))):
        views += [torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4)]
    return views


def dihedral_mean(model: Any, x: Any) -> Any:
    """Test-time augmentation as :func:`hespotex.pp.embed` ``(..., tta=True)`` computes it (record ``"dihedral8"``):
    the float32 mean of ``model`` over the 8 :func:`dihedral_views` of ``x``, in their order. Differentiable in
    ``x`` (flips and quarter turns only move pixels), so :func:`hespotex.tl.explain` attributes through it."""
    return sum(model(v).float() for v in dihedral_views(x)) / 8.0


#: timm convolutional networks whose layers all accept a channels-last input (timm trains them so)
CHANNELS_LAST_MODELS = frozenset({"EfficientNet", "MobileNetV3", "ResNet", "ConvNeXt", "RegNet"})


def memory_format(model: Any):
    """``torch.channels_last`` for a timm convolutional network of :data:`CHANNELS_LAST_MODELS`, else
    ``torch.contiguous_format``.

    Channels-last (NHWC) lets oneDNN's convolutions, above all the depthwise ones of EfficientNet,
    skip their layout conversions: about 2-4 times the patches per second on CPU for EfficientNet-Lite0
    at 32 px (``benchmarks/results/visium_hd.md``), same features up to float rounding (~1e-5).
    Other modules (vision transformers, user modules that ``view`` their activations) keep the
    default layout.
    """
    import torch

    from hespotex.pp._layer_pool import LayerPool

    if isinstance(model, LayerPool):  # the network whose layers it pools decides
        return memory_format(model.model)
    known = type(model).__module__.startswith("timm.") and type(model).__name__ in CHANNELS_LAST_MODELS
    return torch.channels_last if known else torch.contiguous_format


def inference_model(model: Any, device: Any = "cpu") -> tuple[Any, Any]:
    """``model`` as the embedding runs it, and its input memory layout: moved to ``device`` in its
    :func:`memory_format` (in place, as before) and, for a timm convolutional network, a copy with its BatchNorm
    folded into the convolutions (:func:`hespotex.pp._fold_batchnorm.fold_batchnorm`: same features up to float
    rounding; EfficientNet-Lite0 1.5-1.7 times the patches per second on CPU, ``benchmarks/results/encoder_fold.md``).
    Benchmarks' bare-forward arms run this too, so they compare like with like."""
    fmt = memory_format(model)
    return fold_batchnorm(model.to(device, memory_format=fmt)).to(device, memory_format=fmt), fmt


def encode_patches(
    plan: PatchPlan,
    encoder: Encoder,
    *,
    batch_size: int = 64,
    device: str | None = None,
    tta: bool = False,
    stain_views: int = 0,
    stain_seed: int = 0,
    scale_augment: float = 0.0,
    dihedral_augment: bool = False,
    timings: dict | None = None,
    stain_norm: tuple[dict, dict] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Run ``encoder`` over every planned patch; returns ``(n_spots, num_features)`` float32.

    Reading and resizing the next batch runs in a background thread while the encoder runs on
    the current one. With ``tta`` each patch is embedded in its 8 dihedral views (flips and
    quarter turns) and the 8 embeddings are averaged (8 times the encoder work). With
    ``stain_views`` > 0 each patch is also embedded in that many stain-augmented views
    (:mod:`hespotex.pp._stain_augment`, seeded by ``stain_seed``) and ``(embeddings, views)`` is
    returned, views ``(n_spots, stain_views, num_features)``; with ``scale_augment`` each view is cut with its
    field of view scaled too (:func:`hespotex.pp._stain_augment.zoomed_views`), with ``dihedral_augment`` turned by
    a random flip / quarter turn (:func:`~hespotex.pp._stain_augment.turned`). A ``timings`` dict receives
    ``first_batch_s`` (seconds from the call to the first batch's embeddings: the loader's first read
    and the encoder's first forward, which sets up its kernels), ``first_batch_at`` (the same moment, as
    ``time.perf_counter()``) and ``first_batch_n`` (its patches). With ``stain_norm`` = ``(slide stain, reference)``
    every resized patch is first mapped to the reference stain
    (:func:`hespotex.pp._stain_norm.normalize_patches`; the views are jittered from the normalised patch).
    """
    import time

    import torch
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    dev = resolve_device(device)
    model, fmt = inference_model(encoder.model, dev)
    n = len(plan.order)
    out = np.empty((n, encoder.num_features), dtype=np.float32)
    batches = list(plan.batches(batch_size))
    mean = torch.tensor(encoder.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, dtype=torch.float32).view(1, 3, 1, 1)

    views_out, params, zooms, turns = None, None, None, None
    if stain_views:
        from hespotex.pp import _stain_augment as aug_views

        views_out = np.empty((n, stain_views, encoder.num_features), dtype=np.float32)
        params = aug_views.jitter_params(n, stain_views, stain_seed)
        zooms = aug_views.zoom_factors(n, stain_views, stain_seed, scale_augment) if scale_augment else None
        turns = aug_views.turn_choices(n, stain_views, stain_seed) if dihedral_augment else None

    def load(idx: np.ndarray):
        """Read, resize and normalise one batch (in the loader thread; the main thread only runs the encoder)."""

        def normalised(patches):  # mapped to the reference stain, with stain_norm
            if stain_norm is None:
                return patches
            from hespotex.pp._stain_norm import normalize_patches

            return normalize_patches(patches, *stain_norm)

        x = normalised(resize_batch(plan.read(idx), encoder.input_size))
        bases = [x] * stain_views
        if zooms is not None:
            bases = [normalised(b) for b in aug_views.zoomed_views(plan, idx, zooms, encoder.input_size)]
        if turns is not None:
            bases = [aug_views.turned(b, turns[v, idx]) for v, b in enumerate(bases)]
        aug = [
            torch.from_numpy(aug_views.stain_jitter(b.numpy(), params, v, idx))
            .sub_(mean)
            .div_(std)
            .contiguous(memory_format=fmt)
            for v, b in enumerate(bases)
        ]
        return idx, x.sub_(mean).div_(std).contiguous(memory_format=fmt), aug

    def run(x):
        return dihedral_mean(model, x) if tta else model(x)

    # one torch thread for the loader, so it does not fight the encoder's threads for the cores
    with (
        ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(1,)) as pool,
        torch.inference_mode(),
    ):
        pending = pool.submit(load, batches[0]) if batches else None
        for b in tqdm(range(len(batches)), desc="embedding patches", unit="batch", disable=not settings.progress):
            idx, x, aug = pending.result()
            if b + 1 < len(batches):
                pending = pool.submit(load, batches[b + 1])
            out[idx] = run(x.to(dev, non_blocking=True)).float().cpu().numpy()
            for v, xa in enumerate(aug):
                views_out[idx, v] = run(xa.to(dev, non_blocking=True)).float().cpu().numpy()
            if b == 0 and timings is not None:
                now = time.perf_counter()
                timings.update(first_batch_s=now - t_start, first_batch_at=now, first_batch_n=len(idx))
    return out if views_out is None else (out, views_out)


def encode_two_scales(plan: PatchPlan, ctx: PatchPlan | None, encoder: Encoder, **kwargs: Any) -> Any:
    """:func:`encode_patches` of ``plan``, with ``ctx`` its context features concatenated
    after the spot features (and the stain-augmented views likewise, view by view: the same seeded re-staining of
    a spot is applied at both scales)."""
    out = encode_patches(plan, encoder, **kwargs)
    if ctx is None:
        return out
    wide = encode_patches(ctx, encoder, **{**kwargs, "timings": None})  # the start-up is the spot scale's first batch
    if isinstance(out, tuple):
        return np.concatenate([out[0], wide[0]], axis=1), np.concatenate([out[1], wide[1]], axis=2)
    return np.concatenate([out, wide], axis=1)
