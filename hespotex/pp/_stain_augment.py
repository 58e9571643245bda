"""Stain augmentation of training patches for a frozen encoder: a few re-stained views per spot, embedded once.

A frozen encoder cannot learn to ignore stain; the model on top of it can, if it sees the same spot
under several stains. :func:`hespotex.pp.embed` with ``stain_augment=n`` embeds, besides the clean
patch, ``n`` views of it perturbed in HED colour space (scikit-image's colour deconvolution,
:func:`skimage.color.rgb2hed` / :func:`~skimage.color.hed2rgb`: per-stain gain and shift) with mild
brightness and contrast changes, all drawn from a seeded generator per (view, spot). The views are
stored beside the embeddings as ``obsm[f"{key_added}_stain_views"]`` (``n_spots x n_views x dim``)
and cached with them. :func:`hespotex.tl.train` with ``stain_augment=True`` then gives every
training spot, each epoch, one embedding drawn among the clean one and its views
(:func:`sample_views`); prediction uses the clean embeddings as always.

With ``scale_augment=a`` each view is also cut with its field of view scaled, about the spot centre, by a
factor drawn log-uniformly per (view, spot) in ``[1 / (1 + a), 1 + a]`` (:func:`zoom_factors`,
:func:`zoomed_views`) before it is resized and re-stained: the views then also cover a µm/px that is off
by up to ``a`` (scanners' calibrations and magnification labels disagree by about that much). With
``dihedral_augment=True`` each view is also turned by one of the 8 flips / quarter turns of the square, drawn per
(view, spot) (:func:`turn_choices`, :func:`turned`): tissue has no orientation, the frozen encoder's features do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

VIEWS_SUFFIX = "_stain_views"

#: ``scale_augment`` and ``dihedral_augment`` of the views :func:`hespotex.tl.train` embeds itself: fields of view
#: ±15 %, each view flipped / turned (``benchmarks/results/shift_zoom.md``)
DEFAULT_SCALE_AUGMENT = 0.15
DEFAULT_DIHEDRAL_AUGMENT = True

#: ranges of the random perturbation of one view (uniform): HED gain and shift per stain, brightness, contrast
STAIN_JITTER: dict[str, tuple[float, float]] = {
    "hed_gain": (0.7, 1.3),
    "hed_shift": (-0.04, 0.04),
    "brightness": (-0.08, 0.08),
    "contrast": (0.85, 1.15),
}


def views_key(key_added: str) -> str:
    """``obsm`` key of the stain-augmented views of the embeddings under ``key_added``."""
    return f"{key_added}{VIEWS_SUFFIX}"


def jitter_params(n_spots: int, n_views: int, seed: int) -> dict[str, np.ndarray]:
    """The perturbation of every (view, spot): arrays of shape ``(n_views, n_spots, ...)``, from ``seed`` alone."""
    rng = np.random.default_rng(seed)
    return {
        "hed_gain": rng.uniform(*STAIN_JITTER["hed_gain"], size=(n_views, n_spots, 3)),
        "hed_shift": rng.uniform(*STAIN_JITTER["hed_shift"], size=(n_views, n_spots, 3)),
        "brightness": rng.uniform(*STAIN_JITTER["brightness"], size=(n_views, n_spots)),
        "contrast": rng.uniform(*STAIN_JITTER["contrast"], size=(n_views, n_spots)),
    }


def stain_jitter(x: np.ndarray, params: dict[str, np.ndarray], view: int, spots: np.ndarray) -> np.ndarray:
    """Re-stain RGB patches ``x`` (``(n, 3, h, w)`` float in [0, 1]) as view ``view`` of ``spots`` says.

    In HED space each stain's optical density is scaled and shifted; back in RGB, contrast is
    scaled about the patch mean and brightness added. Returns float32 in [0, 1], same shape.
    """
    from skimage.color import hed2rgb, rgb2hed

    rgb = np.moveaxis(np.asarray(x, dtype=np.float64), 1, -1)  # (n, h, w, 3)
    hed = rgb2hed(rgb)
    gain = params["hed_gain"][view, spots][:, None, None, :]
    shift = params["hed_shift"][view, spots][:, None, None, :]
    out = np.clip(hed2rgb(hed * gain + shift), 0.0, 1.0)
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    contrast = params["contrast"][view, spots][:, None, None, None]
    out = (out - mean) * contrast + mean + params["brightness"][view, spots][:, None, None, None]
    return np.moveaxis(np.clip(out, 0.0, 1.0), -1, 1).astype(np.float32)


def zoom_factors(n_spots: int, n_views: int, seed: int, scale_augment: float) -> np.ndarray:
    """Field-of-view factor of every (view, spot), ``(n_views, n_spots)``, log-uniform in
    ``[1 / (1 + scale_augment), 1 + scale_augment]``; from its own stream of ``seed`` (the stain jitter of
    :func:`jitter_params` is the same with and without it)."""
    rng = np.random.default_rng([int(seed), 1])
    top = np.log1p(float(scale_augment))
    return np.exp(rng.uniform(-top, top, size=(n_views, n_spots)))


def zoomed_views(plan: Any, idx: np.ndarray, factors: np.ndarray, out_px: int) -> list[Any]:
    """Per view, the patches of spots ``idx`` of ``plan`` (a :class:`~hespotex.pp._patches.PatchPlan`) with their
    side scaled by ``factors[view, idx]`` about the same centre, resized to ``out_px``: a list of float tensors
    ``(len(idx), 3, out_px, out_px)`` in [0, 1]. One wider crop per spot is read for all views (white-padded
    beyond the image, as every patch is)."""
    import torch

    from hespotex.pp._patches import resize_batch

    wide = int(np.ceil(plan.size * float(factors.max())))
    wide = max(wide, plan.size)
    crops = plan.read_around(idx, wide)
    out = []
    for view in range(factors.shape[0]):
        sides = np.clip(np.round(plan.size * factors[view, idx]).astype(int), 1, wide)
        starts = (wide - sides) // 2
        out.append(
            torch.cat(
                [
                    resize_batch(np.ascontiguousarray(crops[i : i + 1, :, o : o + s, o : o + s]), out_px)
                    for i, (s, o) in enumerate(zip(sides, starts, strict=True))
                ]
            )
        )
    return out


def turn_choices(n_spots: int, n_views: int, seed: int) -> np.ndarray:
    """Which of the 8 dihedral transforms each (view, spot) gets, ``(n_views, n_spots)`` integers 0-7, from its own
    stream of ``seed`` (the stain jitter and the zoom factors are the same with and without it)."""
    return np.random.default_rng([int(seed), 2]).integers(0, 8, size=(n_views, n_spots))


def turned(x: Any, turns: np.ndarray) -> Any:
    """Patches ``x`` (torch ``(n, c, h, w)``) each in its dihedral transform ``turns[i]``: 0-3 quarter turns, 4-7 the
    mirrored patch's quarter turns (the order of :func:`hespotex.pp._encode.dihedral_views`)."""
    import torch

    out = []
    for patch, turn in zip(x, turns, strict=True):
        patch = torch.flip(patch, dims=(-1,)) if turn >= 4 else patch
        out.append(torch.rot90(patch, int(turn) % 4, dims=(-2, -1)))
    return torch.stack(out).contiguous()


def stain_record(n_views: int, seed: int, scale_augment: float = 0.0, dihedral: bool = False) -> dict[str, Any]:
    """What the embedding record says about the views (also part of their cache key); with ``scale_augment`` the
    range of the field-of-view factor as ``ranges["zoom"]`` and ``"+zoom"`` in the method, with ``dihedral``
    ``"+dihedral"`` in it."""
    ranges = {k: list(v) for k, v in STAIN_JITTER.items()}
    if scale_augment:
        ranges["zoom"] = [1.0 / (1.0 + float(scale_augment)), 1.0 + float(scale_augment)]
    method = "hed_jitter" + ("+zoom" if scale_augment else "") + ("+dihedral" if dihedral else "")
    return {"n_views": int(n_views), "seed": int(seed), "method": method, "ranges": ranges}


def _check_has_views(name: str, value: Any, off: str, stain_augment: int) -> None:
    """A clear error when an option of the views (``name=value``) is asked for without any (``stain_augment=0``)."""
    if value and not stain_augment:
        msg = (
            f"{name}={value!r} acts on the augmented views, but stain_augment=0 makes none; pass stain_augment=4 "
            f"(say) with it, or {name}={off}."
        )
        raise ValueError(msg)


def check_dihedral_augment(dihedral_augment: Any, stain_augment: int) -> bool:
    """``dihedral_augment`` as a bool, or a clear error (also when it is asked for without views)."""
    if not isinstance(dihedral_augment, bool | np.bool_):
        msg = f"Expected dihedral_augment to be True or False, found {dihedral_augment!r}."
        raise ValueError(msg)
    _check_has_views("dihedral_augment", dihedral_augment, "False", stain_augment)
    return bool(dihedral_augment)


def check_scale_augment(scale_augment: Any, stain_augment: int) -> float:
    """``scale_augment`` as a float in [0, 1), or a clear error (also when it is given without views)."""
    if isinstance(scale_augment, bool) or not isinstance(scale_augment, int | float | np.floating | np.integer):
        msg = f"Expected scale_augment to be a number in [0, 1) (e.g. 0.15 for ±15 %), found {scale_augment!r}."
        raise ValueError(msg)
    if not 0.0 <= float(scale_augment) < 1.0:
        msg = f"Expected scale_augment in [0, 1) (e.g. 0.15 for ±15 %), found {scale_augment!r}."
        raise ValueError(msg)
    _check_has_views("scale_augment", scale_augment, "0", stain_augment)
    return float(scale_augment)


def sample_views(emb: np.ndarray, views: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One embedding per spot, drawn uniformly among the clean one (``emb``, ``(n, dim)``) and its
    ``views`` (``(n, n_views, dim)``): what a training epoch sees with ``stain_augment=True``."""
    if views.shape[0] != emb.shape[0] or views.shape[2] != emb.shape[1]:
        msg = (
            f"Expected stain views of shape ({emb.shape[0]}, n_views, {emb.shape[1]}) for embeddings {emb.shape}, "
            f"found {views.shape}."
        )
        raise ValueError(msg)
    choice = rng.integers(0, views.shape[1] + 1, size=emb.shape[0])
    out = emb.copy()
    aug = choice > 0
    out[aug] = views[np.flatnonzero(aug), choice[aug] - 1]
    return out


def default_stain_augment(named: dict[str, Any], embedding_key: str) -> bool:
    """What :func:`hespotex.tl.train` ``(..., stain_augment=None)`` does: augment when every sample is either embedded
    there (no ``obsm[embedding_key]`` yet: its views are made with it, once) or already carries stain views; train on
    clean embeddings when some sample was embedded beforehand without views (they cannot be made afterwards)."""
    from hespotex._sample import get_table

    tables = {n: get_table(s) for n, s in named.items()}
    return all(embedding_key not in t.obsm or views_key(embedding_key) in t.obsm for t in tables.values())
