"""Stain normalisation of H&E patches before the encoder: Macenko's method, through torchstain.

A frozen encoder sees a slide stained or scanned unlike the training slides through shifted colours.
Macenko normalisation (Macenko et al., ISBI 2009) describes a slide's stain by its two stain
vectors (haematoxylin and eosin optical densities, a 3 x 2 *stain matrix*) and the 99th percentile
of each stain's concentration, and re-renders every pixel with the concentrations it has on its
own slide but the stain vectors and concentration scale of a *reference*:

- the **reference** is fitted once on the training slides only (a seeded sample of their spot
  patches, pooled; :func:`stain_reference`) and recorded with the embeddings (so in the model);
- each slide's **own stain** is estimated once per slide from a seeded sample of its spot patches
  (:func:`slide_stain`), never per patch: one patch holds too few pixels of each stain for a stable
  estimate;
- every patch is then mapped to the reference (:func:`normalize_patches`) after it is resized to
  the encoder input and before the encoder.

The stain matrices are estimated by torchstain's ``MacenkoNormalizer`` (numpy backend, its default
``Io=240, alpha=1, beta=0.15``); the per-pixel mapping is torchstain's ``normalize`` with the
source matrices fixed to the slide's (torchstain re-estimates them on every image it normalises,
which here would be every patch). :func:`hespotex.pp.embed` ``(..., stain_norm="macenko",
stain_reference=...)`` applies it and records it; :func:`hespotex.tl.train` ``(..., stain_norm=
"macenko")`` fits the reference on its samples; :func:`hespotex.tl.predict` (in memory and streamed)
re-applies the model's reference to every new slide.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hespotex.pp._patches import PatchPlan

logger = logging.getLogger("hespotex")

STAIN_NORMS: dict[str, str] = {
    "macenko": "Macenko stain normalisation (torchstain): per-slide stain matrix mapped to a training reference",
}
#: torchstain's defaults: transmitted light intensity, angle percentile, optical-density threshold of tissue
IO, ALPHA, BETA = 240.0, 1.0, 0.15
#: patches read per slide, pixels kept per slide (seeded), fewest tissue pixels accepted for an estimate
N_PATCHES, MAX_PIXELS, MIN_TISSUE_PIXELS = 64, 250_000, 5_000


def check_stain_norm(stain_norm: str | None) -> str | None:
    """``stain_norm`` if known (or ``None``), else a ``ValueError`` listing the choices."""
    if stain_norm is not None and stain_norm not in STAIN_NORMS:
        msg = f"Unknown stain_norm {stain_norm!r}; expected None or one of {sorted(STAIN_NORMS)}."
        raise ValueError(msg)
    return stain_norm


def _od(rgb: np.ndarray) -> np.ndarray:
    """Optical density of uint8-scale RGB values, as torchstain computes it."""
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / IO)


def sample_pixels(plan: PatchPlan, *, n_patches: int = N_PATCHES, max_pixels: int = MAX_PIXELS, seed: int = 0):
    """RGB pixels ``(m, 3)`` uint8 of a seeded sample of ``n_patches`` spot patches of ``plan``, resized to the
    encoder input as they will be normalised, then ``max_pixels`` of them drawn at random (seeded)."""
    from hespotex.pp._patches import resize_batch

    n = len(plan.order)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, n_patches), replace=False))
    x = resize_batch(plan.read(idx), plan.out_px).numpy()
    rgb = np.clip(np.moveaxis(x, 1, -1).reshape(-1, 3) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if len(rgb) > max_pixels:
        rgb = rgb[np.sort(rng.choice(len(rgb), size=max_pixels, replace=False))]
    return rgb


def fit_stain(rgb: np.ndarray, *, what: str) -> dict[str, Any]:
    """Macenko stain matrix and maximal concentrations of the pixels ``rgb`` (``(m, 3)`` uint8), by torchstain.

    ``what`` names the pixels in the error raised when too few of them are tissue (optical density at
    least ``BETA`` in every channel, torchstain's own criterion).
    """
    try:
        import torchstain
    except ImportError as err:
        msg = "Stain normalisation needs torchstain: pip install 'hespotex[stain]' (or torchstain)."
        raise ImportError(msg) from err

    tissue = int((_od(rgb) >= BETA).all(axis=1).sum())
    if tissue < MIN_TISSUE_PIXELS:
        msg = (
            f"Cannot estimate the stain of {what}: {tissue} of {len(rgb)} sampled pixels are tissue (optical density "
            f">= {BETA} in every channel), {MIN_TISSUE_PIXELS} are needed. The patches under its spots look blank "
            "(background, or an image that is not H&E); check the image and the spot coordinates, or embed without "
            "stain_norm."
        )
        raise ValueError(msg)
    normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    with np.errstate(all="ignore"):
        normalizer.fit(np.ascontiguousarray(rgb).reshape(1, -1, 3), Io=IO, alpha=ALPHA, beta=BETA)
    matrix = np.asarray(normalizer.HERef, dtype=np.float64)
    max_c = np.asarray(normalizer.maxCRef, dtype=np.float64)
    if matrix.shape != (3, 2) or not np.isfinite(matrix).all() or not (np.isfinite(max_c) & (max_c > 0)).all():
        msg = (
            f"The Macenko stain estimate of {what} is degenerate (stain matrix {matrix.round(3).tolist()}, maximal "
            f"concentrations {max_c.round(3).tolist()}); its tissue pixels hold fewer than two distinct stains. "
            "Embed without stain_norm."
        )
        raise ValueError(msg)
    return {"stain_matrix": matrix.tolist(), "max_concentrations": max_c.tolist(), "tissue_pixels": tissue}


def slide_stain(plan: PatchPlan, *, what: str = "this slide", seed: int = 0) -> dict[str, Any]:
    """One slide's own Macenko stain (matrix, maximal concentrations), from a seeded sample of its spot patches."""
    return fit_stain(sample_pixels(plan, seed=seed), what=what)


def stain_reference(
    samples: Any,
    *,
    method: str = "macenko",
    patch_um: float | None = None,
    input_size: int = 224,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the reference stain of :func:`hespotex.pp.embed` ``(..., stain_norm=method)`` on training samples.

    Pools the same number of pixels from a seeded sample of each sample's spot patches (cut at
    ``patch_um``, resized to ``input_size``) and fits Macenko's stain matrix and maximal stain
    concentrations to them with torchstain. Fit it on the training slides only; every slide embedded
    with it (training and new ones) is then mapped to this one stain.

    Parameters
    ----------
    samples
        A SpatialData sample with its H&E image, or a list or ``{name: sample}`` mapping of them.
    method
        ``"macenko"``.
    patch_um, input_size
        Patch side in µm (default: the spot diameter) and the side it is resized to before sampling.
    seed
        Seed of the patch and pixel samples.

    Returns
    -------
    ``{"method", "stain_matrix" (3 x 2, columns haematoxylin and eosin optical densities),
    "max_concentrations" (2), "fitted_on" (sample names), "tissue_pixels", "library", "io", "alpha",
    "beta"}``, to pass as ``stain_reference``. Nothing in the samples changes.
    """
    from importlib.metadata import version

    from hespotex._sample import as_sample_dict
    from hespotex.pp._patches import plan_patches

    check_stain_norm(method)
    if method is None:
        msg = "Expected a stain normalisation method for the reference, e.g. method='macenko'; found None."
        raise ValueError(msg)
    named = as_sample_dict(samples)
    pixels = []
    for name, sample in named.items():
        if not hasattr(sample, "images"):
            msg = f"Sample {name!r} is an AnnData without its image; pass the SpatialData samples to fit a stain."
            raise TypeError(msg)
        plan = plan_patches(sample, patch_um=patch_um, out_px=input_size)
        pixels.append(sample_pixels(plan, max_pixels=MAX_PIXELS // max(1, min(len(named), 4)), seed=seed))
        fit_stain(pixels[-1], what=f"sample {name!r}")  # every slide must show tissue, not only the pool
    fitted = fit_stain(np.concatenate(pixels), what=f"the samples {list(named)}")
    logger.info("Fitted the %s reference stain on %d samples.", method, len(named))
    return {
        "method": method,
        **fitted,
        "fitted_on": list(named),
        "library": f"torchstain {version('torchstain')}",
        "io": IO,
        "alpha": ALPHA,
        "beta": BETA,
    }


def as_reference(stain_reference: Any, stain_norm: str) -> dict[str, Any]:
    """The reference of ``stain_reference`` (a :func:`stain_reference` result, or an embedding record's
    ``stain_norm`` entry holding one), checked; a ``ValueError`` saying what to pass otherwise."""
    if stain_reference is None:
        msg = (
            f"stain_norm={stain_norm!r} needs the reference stain of the training slides: pass "
            "stain_reference=hx.pp.stain_reference(training_samples), or a trained model's "
            "model.embedding['stain_norm'] to embed a new slide as the model expects."
        )
        raise ValueError(msg)
    ref = stain_reference.get("reference", stain_reference) if isinstance(stain_reference, dict) else None
    problem = reference_problem(ref)
    if problem is not None:
        msg = f"Expected stain_reference from hx.pp.stain_reference (or a model's record); {problem}."
        raise ValueError(msg)
    if ref["method"] != stain_norm:
        msg = f"The stain reference was fitted for {ref['method']!r}, not stain_norm={stain_norm!r}."
        raise ValueError(msg)
    return dict(ref)


def reference_problem(ref: Any) -> str | None:
    """What is wrong with a stain reference (``None`` when it is a valid one): method, 3 x 2 finite stain matrix,
    two positive maximal concentrations."""
    if not isinstance(ref, dict):
        return f"found {type(ref).__name__}"
    if ref.get("method") not in STAIN_NORMS:
        return f"its method {ref.get('method')!r} is not one of {sorted(STAIN_NORMS)}"
    try:
        matrix = np.asarray(ref.get("stain_matrix"), dtype=np.float64)
        max_c = np.asarray(ref.get("max_concentrations"), dtype=np.float64)
    except (TypeError, ValueError):
        return "its stain_matrix / max_concentrations are not numbers"
    if matrix.shape != (3, 2) or not np.isfinite(matrix).all():
        return f"its stain_matrix should be 3 x 2 finite numbers, found {np.shape(ref.get('stain_matrix'))}"
    if max_c.shape != (2,) or not (np.isfinite(max_c) & (max_c > 0)).all():
        return f"its max_concentrations should be 2 positive numbers, found {ref.get('max_concentrations')!r}"
    return None


def same_stain(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two embedding records' ``stain_norm`` entries map to the same reference (or both are absent)."""
    if not a or not b:
        return not a and not b
    ra, rb = a.get("reference") or {}, b.get("reference") or {}
    return (
        ra.get("method") == rb.get("method")
        and np.allclose(ra.get("stain_matrix", np.nan), rb.get("stain_matrix", np.nan), rtol=0, atol=1e-6)
        and np.allclose(ra.get("max_concentrations", np.nan), rb.get("max_concentrations", np.nan), rtol=0, atol=1e-6)
    )


def stain_text(entry: dict[str, Any] | None) -> str:
    """``'no stain normalisation'`` or ``'macenko to the reference fitted on [...]'``."""
    if not entry:
        return "no stain normalisation"
    ref = entry.get("reference") or {}
    return f"{ref.get('method')} normalisation to the reference fitted on {ref.get('fitted_on')}"


def normalize_patches(x: Any, source: dict[str, Any], reference: dict[str, Any]) -> Any:
    """Map RGB patches ``x`` (torch ``(n, 3, h, w)`` float in [0, 1]) from the ``source`` stain to the ``reference``.

    Torchstain's Macenko ``normalize`` with the source stain matrix and concentrations fixed: each
    pixel's stain concentrations are solved in the source stain matrix (least squares), scaled by the
    reference / source maximal concentrations and re-rendered with the reference stain matrix.
    Returns float32 in [0, 1], same shape, on ``x``'s device; differentiable in ``x`` (:func:`hespotex.tl.explain`
    attributes through it; zero gradient where the output is clipped).
    """
    import torch

    src = np.asarray(source["stain_matrix"], dtype=np.float64)
    unmix = torch.from_numpy(np.linalg.pinv(src)).float().to(x.device)  # (2, 3): least-squares concentrations
    ratio = np.asarray(reference["max_concentrations"], dtype=np.float64) / np.asarray(
        source["max_concentrations"], dtype=np.float64
    )
    scale = torch.from_numpy(ratio).float().to(x.device)
    ref = torch.from_numpy(np.asarray(reference["stain_matrix"], dtype=np.float64)).float().to(x.device)  # (3, 2)
    od = -torch.log((x.float() * 255.0 + 1.0) / IO)
    conc = torch.einsum("sc,nchw->nshw", unmix, od) * scale.view(1, 2, 1, 1)
    out = IO * torch.exp(-torch.einsum("cs,nshw->nchw", ref, conc))
    return out.clamp_(0.0, 255.0).div_(255.0)


def stain_record(reference: dict[str, Any], slide: dict[str, Any]) -> dict[str, Any]:
    """The ``stain_norm`` entry of an embedding record: the method, the reference and this slide's own estimate."""
    return {"method": reference["method"], "reference": dict(reference), "slide": dict(slide)}


def stain_key(reference: dict[str, Any]) -> dict[str, Any]:
    """The part of an embedding cache key that says how patches were normalised (the slide's estimate follows from
    the image)."""
    return {
        "method": reference["method"],
        "stain_matrix": np.round(np.asarray(reference["stain_matrix"], dtype=np.float64), 8).tolist(),
        "max_concentrations": np.round(np.asarray(reference["max_concentrations"], dtype=np.float64), 8).tolist(),
        "estimate": {"n_patches": N_PATCHES, "max_pixels": MAX_PIXELS, "io": IO, "alpha": ALPHA, "beta": BETA},
    }


def training_reference(named: dict[str, Any], embedding_key: str, stain_norm: str, **kwargs: Any) -> dict[str, Any]:
    """The reference for :func:`hespotex.tl.train` ``(..., stain_norm=...)``: the one the samples' embeddings were
    made with when they have some (all must then be stain-normalised), else one fitted on the samples to embed."""
    from hespotex._constants import EMBED_RECORD_KEY
    from hespotex._sample import get_table

    check_stain_norm(stain_norm)
    embedded = {n: s for n, s in named.items() if embedding_key in get_table(s).obsm}
    refs = []
    for n, s in embedded.items():
        entry = (get_table(s).uns.get(EMBED_RECORD_KEY, {}).get(embedding_key) or {}).get("stain_norm")
        if not entry:
            msg = (
                f"stain_norm={stain_norm!r}, but sample {n!r} already holds embeddings made without stain "
                f"normalisation in obsm[{embedding_key!r}]. Delete them (`del table.obsm[{embedding_key!r}]`) so "
                "train embeds every sample with one reference, or embed all samples yourself with "
                "hx.pp.embed(..., stain_norm=..., stain_reference=hx.pp.stain_reference(samples), overwrite=True)."
            )
            raise ValueError(msg)
        refs.append(entry["reference"])
    if refs:
        return refs[0]  # the others are checked against it with the rest of the embedding record
    return stain_reference(named, method=stain_norm, **kwargs)


def stain_norm_entry(model_entry: dict[str, Any] | None, plan: PatchPlan, sample_id: Any) -> dict[str, Any] | None:
    """The ``stain_norm`` record of a new slide embedded for a model whose embedding record holds ``model_entry``
    (``None`` when the model was trained without stain normalisation): the model's reference and the slide's own
    stain, estimated once from ``plan``'s patches, as :func:`hespotex.pp.embed` does."""
    if not model_entry:
        return None
    reference = as_reference(model_entry, model_entry.get("method"))
    return stain_record(reference, slide_stain(plan, what=f"slide {str(sample_id)!r}"))
