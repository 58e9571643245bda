"""``hx.tl.explain``: what drives a predicted gene or gene programme at a spot.

Two attributions, both by integrated gradients (:class:`captum.attr.IntegratedGradients`) of a
*score*, the weighted mean of the predicted log expression of the chosen genes at the target spot, as
:func:`hespotex.tl.predict` predicts it: with its default spatial smoothing (``smooth=0.5``) the score is half the
network's score at the target and half the mean of its 6 nearest spots' (a linear mix of the network's outputs, so
attributions stay complete), and the target's patch and neighbours act on it through every spot the smoothing reads:

- **pixels**: through the frozen image encoder, the model's embedding standardisation and
  :class:`~hespotex.models.HESpotExNet`, on exactly the patch the encoder saw when the slide was
  embedded (same crop geometry, resizing and normalisation as :func:`hespotex.pp.embed`). The
  neighbours' embeddings stay at their stored values; only the target's patch varies, from a
  baseline patch (white glass by default) to the real one. For a model trained on two-scale embeddings
  (:func:`hespotex.pp.embed` ``(..., context_um=...)``) the target's embedding is recomputed from *both* its
  patches, the spot patch and the wider context patch (cut, resized and normalised by the same plans as
  ``hx.pp.embed``, :mod:`hespotex.pp._context`), concatenated ``[spot features, context features]``, and both
  patches are attributed in one integration, each from its own baseline patch. The embedding record's other steps are
  repeated inside the differentiated forward pass too, so the recomputed embedding is the stored one and the
  attributions stay w.r.t. the patch as scanned, in its own pixel frame: test-time augmentation (``"tta":
  "dihedral8"``: the mean of the encoder over the patch's 8 flips and quarter turns, the same torch transforms
  and averaging, :func:`hespotex.pp._encode.dihedral_mean`) and stain normalisation (``"stain_norm"``: Macenko's
  per-pixel mapping from the slide's recorded stain to the model's reference, the same torch function,
  :func:`hespotex.pp._stain_norm.normalize_patches`, differentiable). Stain-augmented views are training-only: the
  model predicts from the clean embedding, which is what is attributed.
- **neighbouring spots**: with respect to the standardised embeddings of every spot that can reach
  the target through the decoder's ``n_hops`` graph layers, from the all-zero baseline (every spot
  at the training mean embedding); attributions are summed over embedding dimensions per source spot.

Integrated gradients are complete: the attributions sum to ``score(input) - score(baseline)`` up to
the integration error, which captum reports as the convergence delta (stored); with two patches, the
attributions of both together.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hespotex._compat import renamed_arguments
from hespotex._sample import get_table
from hespotex._settings import resolve_device
from hespotex.tl.explanation._attributions import (
    Scorer,
    frozen_modules,
    neighbour_attributions,
    normalise_per_patch,
    pixel_attributions,
)
from hespotex.tl.explanation._explain_inputs import (
    EMBED_RECORD_KEY,
    check_baseline,
    check_steps,
    context_patch_plan,
    has_slide_image,
    load_model_encoder,
    patch_plan,
    resolve_score,
    spot_positions,
    stain_norm_pair,
)
from hespotex.tl.model._data import EMBEDDING_KEY
from hespotex.tl.model._model import HESpotEx
from hespotex.tl.prediction._smoothing import DEFAULT_SMOOTH, check_smooth

if TYPE_CHECKING:
    pass

logger = logging.getLogger("hespotex")

__all__ = ["Explanation", "explain", "patch_saliency"]


@dataclass
class Explanation:
    """Attributions of a gene score at a few spots (returned by :func:`explain`).

    The *score* at a spot is ``sum_g w_g * y_g`` with ``y_g`` the predicted log1p expression and the
    weights ``w`` normalised to ``sum_g |w_g| = 1`` (a plain mean for a list of genes).

    Attributes
    ----------
    spots
        ``obs_names`` of the explained spots, in the order of every per-spot array.
    genes, weights
        The genes of the score and their normalised weights.
    score
        ``(n_spots,)`` the model's score at each spot (from a whole-slide prediction, smoothed as ``params["smooth"]``
        says, as :func:`hespotex.tl.predict` smooths it).
    patches
        ``(n_spots, h, w, 3)`` uint8: the (spot) patch each spot's embedding was computed from, at the encoder
        input size, as scanned (before any stain normalisation: the pixels attributed); ``None`` without pixel
        attribution.
    saliency
        ``(n_spots, h, w)`` float32: absolute integrated-gradients attribution of the (spot) patch summed over the
        colour channels (not normalised); ``None`` without pixel attribution.
    context_patches, context_saliency
        Two-scale models only (trained on ``hx.pp.embed(..., context_um=...)`` embeddings; ``None`` otherwise):
        the context patch of each spot (``context_um`` wide, centred on the spot, resized to the encoder input:
        ``(n_spots, h, w, 3)`` uint8) and its saliency (``(n_spots, h, w)`` float32, as :attr:`saliency`), from the
        same integration as the spot patch's. Pixel ``(r, c)`` of a context patch lies ``context_um / patch_um``
        times farther from the spot centre than pixel ``(r, c)`` of the spot patch.
    pixel_attribution_sum
        ``(n_spots,)`` sum of the signed pixel attributions (over pixels and channels; over both patches for a
        two-scale model).
    context_attribution_sum
        ``(n_spots,)`` the context patch's part of ``pixel_attribution_sum`` (two-scale models; else ``None``).
    pixel_score, pixel_baseline_score
        ``(n_spots,)`` the score with the real patch(es) (recomputed through the encoder: equals ``score``
        when the stored embeddings came from this image and encoder) and with the baseline patch(es).
    pixel_delta
        ``(n_spots,)`` captum's convergence delta: ``pixel_attribution_sum - (pixel_score - pixel_baseline_score)``.
    neighbours
        Tidy table, one row per (target, source) pair: ``target``, ``source`` (obs names), ``hop`` (distance in
        the decoder graph; 0 for the spot itself, -1 for a spot only the smoothing reaches, in a model without
        decoder; with smoothing the sources reach one ring further than the decoder's ``n_hops``), ``attribution``
        (signed, summed over embedding dimensions), ``share`` (``|attribution|`` over the target's total
        ``|attribution|``) and ``attention`` (the decoder's attention of target on source; NaN beyond one hop or for
        decoders without attention).
        ``None`` without neighbour attribution.
    agreement
        Per target (index): ``spearman`` rank correlation of ``|attribution|`` and attention over the
        target's one-hop sources (itself included), ``top_attribution`` and ``top_attention`` (the strongest
        one-hop neighbour, self excluded, by each), ``top_match`` (whether they agree), ``self_share``,
        ``self_attention``, and ``delta`` (the convergence delta of the neighbour attribution).
    params
        Every parameter that shaped the result (model id, encoder, patch size, baseline, steps, ...), among them the
        embedding steps repeated in the pixel forward pass (``tta``: ``"dihedral8"`` or ``None``; ``stain_norm``: the
        method or ``None``), ``attributed_to`` (``"patch as scanned"``: before stain normalisation and
        augmentation, which are differentiated through) and ``smooth`` (the spatial smoothing of the score explained,
        as ``hx.tl.predict``'s; ``None``: the network's output at the spot).
    """

    spots: list[str]
    genes: list[str]
    weights: np.ndarray
    score: np.ndarray
    patches: np.ndarray | None = None
    saliency: np.ndarray | None = None
    pixel_attribution_sum: np.ndarray | None = None
    pixel_score: np.ndarray | None = None
    pixel_baseline_score: np.ndarray | None = None
    pixel_delta: np.ndarray | None = None
    context_patches: np.ndarray | None = None
    context_saliency: np.ndarray | None = None
    context_attribution_sum: np.ndarray | None = None
    neighbours: pd.DataFrame | None = None
    agreement: pd.DataFrame | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        parts = [f"{len(self.spots)} spots", f"{len(self.genes)} genes"]
        if self.saliency is not None:
            parts.append(f"pixel saliency {self.saliency.shape[1]}x{self.saliency.shape[2]}")
        if self.context_saliency is not None:
            parts.append("context saliency")
        if self.neighbours is not None:
            parts.append(f"{len(self.neighbours)} neighbour attributions")
        return f"Explanation({', '.join(parts)})"

    def normalised_saliency(self, context: bool = False) -> np.ndarray:
        """:attr:`saliency` (``context=True``: :attr:`context_saliency`) scaled to [0, 1] per patch (each patch divided
        by its maximum)."""
        if self.saliency is None:
            msg = "This explanation has no pixel saliency: explain a SpatialData with its image (`pixels=True`)."
            raise ValueError(msg)
        if context and self.context_saliency is None:
            msg = (
                "This explanation has no context saliency: the model was trained on single-scale embeddings (only "
                "models trained on hx.pp.embed(..., context_um=...) embeddings see a context patch)."
            )
            raise ValueError(msg)
        return normalise_per_patch(self.context_saliency if context else self.saliency)


# ---------------------------------------------------------------------------------------------- public API


def _prepare(
    data: Any,
    model: HESpotEx | str,
    genes: Any,
    signature: Any,
    embedding_key: str,
    device: str | None,
    smooth: float | None,
):
    from hespotex.tl.model._resolve import as_model
    from hespotex.tl.prediction._checks import check_embedding

    smooth = check_smooth(smooth)
    model = as_model(model)  # a model, a saved folder or "hf-hub:owner/name"
    model._check_trained()
    table = get_table(data)
    if hasattr(model, "members"):  # an ensemble: its members' mean, attributed as one model
        from hespotex.tl.explanation._ensemble_scoring import EnsembleScoring

        model = EnsembleScoring(model, table, embedding_key)
    names, weights = resolve_score(model, genes, signature)
    record = table.uns.get(EMBED_RECORD_KEY, {}).get(embedding_key)
    if record is not None:
        check_embedding(model, record)
    scorer = Scorer(model, table, embedding_key, names, weights, resolve_device(device), smooth=smooth)
    return model, table, names, weights, scorer


def _attribute_pixels(
    data: Any, table: Any, model: Any, scorer: Scorer, positions: np.ndarray, *, embedding_key: str, **options: Any
) -> dict[str, np.ndarray]:
    """:func:`~hespotex.tl.explanation._attributions.pixel_attributions` through the model's encoder, on the patches
    the slide was embedded from, with the test-time augmentation and stain normalisation of the model's embedding
    record (both differentiable, inside the forward pass: the attributions are w.r.t. the patch as scanned)."""
    enc = load_model_encoder(model)
    plan = patch_plan(data, table, model, enc, embedding_key)
    context = context_patch_plan(data, table, model, plan, embedding_key)
    stain_norm = stain_norm_pair(model, table, plan, embedding_key)
    tta = bool(model.embedding.get("tta"))
    with frozen_modules(model.module_, enc.model, device=scorer.device):
        return pixel_attributions(
            scorer, enc, plan, positions, embedding_key=embedding_key, context=context, tta=tta, stain_norm=stain_norm,
            **options,
        )  # fmt: skip


def patch_saliency(
    data: Any,
    model: HESpotEx | str,
    *,
    spots: Any,
    genes: str | Sequence[str] | None = None,
    signature: Sequence[str] | Mapping[str, float] | None = None,
    n_steps: int = 32,
    baseline: str = "white",
    internal_batch_size: int | None = 16,
    embedding_key: str = EMBEDDING_KEY,
    device: str | None = "cpu",
    smooth: float | None = DEFAULT_SMOOTH,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel saliency of a gene score at some spots: the patch each spot was embedded from and where it matters.

    Integrated gradients (captum) of the score (weighted mean predicted log expression of
    ``genes`` / ``signature``) with respect to the patch's pixels, through the frozen encoder, the
    model's embedding standardisation and the network, the neighbours' embeddings held at their
    stored values. See :func:`explain` for the full explanation; this is its pixel part. For a model trained on
    two-scale embeddings both the spot and the context patch are attributed (as :func:`explain` does) and the spot
    patch's part is returned (the context patch's is :attr:`Explanation.context_saliency` of :func:`explain`).

    Parameters
    ----------
    data
        A SpatialData sample with its H&E image and embeddings (``obsm[embedding_key]``, e.g. after
        :func:`hespotex.tl.predict`).
    model
        A trained :class:`HESpotEx` or :class:`~hespotex.tl.HESpotExEnsemble` (its members' mean, see
        :func:`explain`), or the folder of a saved one.
    spots
        ``obs_names`` (or integer positions) of the spots.
    genes, signature
        The score: one gene or a list (mean), or a list / dict gene -> weight (weighted mean, weights
        normalised to ``sum |w| = 1``). Pass exactly one.
    n_steps
        Integration steps.
    baseline
        ``"white"`` (glass, default), ``"black"`` or ``"blur"`` (the patch blurred with a Gaussian of
        1/16 of its side).
    internal_batch_size
        Integration steps per forward pass (bounds memory; ``None``: all at once).
    embedding_key
        ``obsm`` key of the slide's image embeddings.
    device
        Torch device.
    smooth
        The spatial smoothing of the prediction explained, as :func:`hespotex.tl.predict`'s (default 0.5; ``None``:
        the network's output at the spot alone).

    Returns
    -------
    ``(patches, saliency)``: uint8 ``(n_spots, h, w, 3)`` patches at the encoder input size, in the
    order of ``spots``, and float32 ``(n_spots, h, w)`` saliency (absolute attribution summed over
    channels) scaled to [0, 1] per patch: the spot patch's for a two-scale model. Writes nothing.
    """
    model, table, _, _, scorer = _prepare(data, model, genes, signature, embedding_key, device, smooth)
    check_baseline(baseline)
    check_steps(n_steps, internal_batch_size)
    positions = spot_positions(table, spots)
    if not has_slide_image(data):
        msg = (
            "Pixel saliency needs the H&E image: pass the SpatialData sample with its image element, not the table "
            f"alone (found {type(data).__name__}{' without its image' if hasattr(data, 'images') else ''})."
        )
        raise ValueError(msg)
    res = _attribute_pixels(
        data, table, model, scorer, positions, n_steps=n_steps, internal_batch_size=internal_batch_size,
        baseline=baseline, embedding_key=embedding_key,
    )  # fmt: skip
    return res["patches"], normalise_per_patch(res["saliency"])


@renamed_arguments("tl.explain")
def explain(
    data: Any,
    model: HESpotEx | str,
    *,
    genes: str | Sequence[str] | None = None,
    signature: Sequence[str] | Mapping[str, float] | None = None,
    spots: Any = None,
    n_spots: int = 3,
    pixels: bool | None = None,
    neighbours: bool = True,
    n_steps: int = 32,
    internal_batch_size: int | None = 16,
    baseline: str = "white",
    use_rep: str = EMBEDDING_KEY,
    device: str | None = "cpu",
    smooth: float | None = DEFAULT_SMOOTH,
) -> Explanation:
    """Attribute a predicted gene or gene programme at some spots to the image patch and to neighbouring spots.

    The score is the weighted mean predicted log expression of ``genes`` / ``signature`` at a spot, as
    :func:`hespotex.tl.predict` gives it with the same ``smooth`` (by default half the network's output at the spot
    and half its 6 nearest spots' mean: the spot's patch also acts through its neighbours' outputs, and its neighbours'
    patches through theirs). Both attributions are integrated gradients (:class:`captum.attr.IntegratedGradients`):

    - *pixels*: through the frozen image encoder, the model's embedding standardisation and the
      network, on the exact patch the slide's embedding was computed from (same crop geometry,
      resizing and normalisation as :func:`hespotex.pp.embed`), from a ``baseline`` patch; the
      neighbours' embeddings stay at their stored values. Encoder and model weights are frozen. A model trained
      on two-scale embeddings (``hx.pp.embed(..., context_um=...)``) is attributed through both patches: the spot
      patch (``patches`` / ``saliency``, as for a single-scale model) and the context patch (``context_patches`` /
      ``context_saliency``), in one integration whose attributions together are complete. A model trained on
      test-time-augmented (``hx.pp.embed(..., tta=True)``) or stain-normalised (``stain_norm="macenko"``) embeddings
      is attributed through the same augmentation (mean over the 8 dihedral views) and normalisation (the slide's
      recorded stain to the model's reference) inside the forward pass: the attributions are w.r.t. the patch as
      scanned (``params["attributed_to"]``), and the baseline patch is normalised the same way.
    - *neighbours*: with respect to the standardised embeddings of every spot within the decoder's
      ``n_hops`` of the target or of a spot its smoothing reads (the target included), from the all-zero baseline
      (every spot at the training mean embedding; the slide's mean for a model with ``embedding_norm="slide"``, which
      standardises each slide by its own statistics here as in :func:`~hespotex.tl.predict`), summed per
      source spot; compared with the decoder's attention.

    Parameters
    ----------
    data
        A SpatialData sample with its image and embeddings (pixels and neighbours) or its table
        (AnnData with ``obsm[use_rep]`` and ``obsm["spatial"]``: neighbours only).
    model
        A trained :class:`HESpotEx` or :class:`~hespotex.tl.HESpotExEnsemble`, or the folder of a saved one.
        An ensemble is explained as one model: the score is the members' mean (as :func:`~hespotex.tl.predict`
        gives), attributed through one module averaging the members (integrated gradients are linear, so this
        equals the mean of the members' attributions with the same baselines and steps); the neighbour baseline
        is then the ensemble's mean training embedding (the mean of its members').
    spots
        ``obs_names`` (or integer positions) of the spots to explain; default: the ``n_spots`` spots with
        the highest score.
    n_spots
        Number of spots explained when ``spots`` is not given.
    pixels
        Attribute to pixels; default: when ``data`` has its image. ``True`` without an image is an error.
    neighbours
        Attribute to neighbouring spots.
    n_steps
        Integration steps of integrated gradients.
    internal_batch_size
        Integration steps per forward pass (bounds memory; ``None``: all at once).
    baseline
        Pixel baseline: ``"white"`` (glass, default), ``"black"`` or ``"blur"``.
    use_rep
        ``obsm`` key of the slide's image embeddings.
    device
        Torch device.
    smooth
        The spatial smoothing of the prediction explained: :func:`hespotex.tl.predict`'s ``smooth`` (default 0.5, its
        default; pass what you predicted with). ``None``: the network's output at the spot alone.

    Returns
    -------
    An :class:`Explanation` (patches, saliency, for a two-scale model context patches and context saliency,
    completeness checks, the tidy neighbour table and its agreement with attention, parameters). Writes nothing
    to ``data``; the model is left as it was.
    """
    check_baseline(baseline)
    check_steps(n_steps, internal_batch_size)
    if not isinstance(n_spots, (int, np.integer)) or n_spots < 1:
        msg = f"Expected `n_spots` to be a positive integer, found {n_spots!r}."
        raise ValueError(msg)
    has_image = has_slide_image(data)
    if pixels is None:
        pixels = has_image
        if not has_image:
            logger.info(
                "No H&E image in %s: explaining the neighbours only (pass the SpatialData for pixel saliency).",
                type(data).__name__,
            )
    elif pixels and not has_image:
        msg = (
            "Pixel attribution needs the H&E image: pass the SpatialData sample with its image element, not "
            f"{type(data).__name__}{' without its image' if hasattr(data, 'images') else ''}; or set `pixels=False`."
        )
        raise ValueError(msg)
    if not pixels and not neighbours:
        msg = "Nothing to explain: `pixels` and `neighbours` are both off."
        raise ValueError(msg)
    model, table, names, weights, scorer = _prepare(data, model, genes, signature, use_rep, device, smooth)
    positions = None if spots is None else spot_positions(table, spots)
    with frozen_modules(model.module_, device=scorer.device):
        all_scores = scorer.predict_all()
        if positions is None:
            positions = np.argsort(-all_scores, kind="stable")[: min(int(n_spots), table.n_obs)]
        result = Explanation(
            spots=[str(s) for s in table.obs_names[positions]],
            genes=names,
            weights=weights,
            score=all_scores[positions],
        )
        if pixels:
            res = _attribute_pixels(
                data, table, model, scorer, positions, n_steps=n_steps, internal_batch_size=internal_batch_size,
                baseline=baseline, embedding_key=use_rep,
            )  # fmt: skip
            for k, v in res.items():
                setattr(result, k, v)
        if neighbours:
            result.neighbours, result.agreement = neighbour_attributions(
                scorer, table, positions, n_steps=n_steps, internal_batch_size=internal_batch_size
            )
    emb = model.embedding
    result.params = {
        "model_id": model.model_id,
        "genes": names,
        "weights": weights.tolist(),
        "spots": result.spots,
        "pixels": bool(pixels),
        "neighbours": bool(neighbours),
        "n_steps": int(n_steps),
        "baseline": baseline,
        "neighbour_baseline": f"{'slide' if model.embedding_norm == 'slide' else 'training'} mean embedding "
        "(standardised zero)",
        "encoder": emb.get("encoder"),
        "encoder_id": emb.get("encoder_id"),
        "patch_um": emb.get("patch_um"),
        "context_um": emb.get("context_um"),
        "input_size": emb.get("input_size"),
        "tta": emb.get("tta"),
        "stain_norm": (emb.get("stain_norm") or {}).get("method"),
        "attributed_to": ("patch as scanned" if pixels else None),
        "use_rep": use_rep,
        "n_hops": scorer.hops,
        "smooth": scorer.smooth,
        "decoder_neighbors": int(model.config.decoder_neighbors),
    }
    return result
