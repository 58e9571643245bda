"""``hx.tl.diagnostic_patches``: the H&E patches most characteristic of a label or an expression programme.

Two kinds of ranking, both reproducible (same input, same output; ties go to the spot that comes
first in the table):

- **By a label** (an ``obs`` column such as a pathologist's "invasive cancer" / "stroma"): a
  logistic-regression classifier on the image embeddings (or the latent) learns to tell the labels
  apart, *cross-fitted* so that the score of a spot always comes from a classifier that never saw
  that spot. A spot's score is the out-of-fold probability of its own label; the patches returned
  for a label are the spots carrying it whose image most clearly says so.
- **By an expression programme** (a gene, a gene list or a ``{gene: weight}`` signature): the score
  is the weighted mean of the genes' z-scored expression (predicted by default, else measured);
  group ``"high"`` returns the spots where the programme is highest, ``"low"`` where it is lowest.

The crops are exactly those the image encoder sees (:func:`hespotex.pp._patches.extract_patches`
with the patch size and input size recorded by :func:`hespotex.pp.embed`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hespotex._compat import renamed_arguments
from hespotex._constants import DIAGNOSTIC_KEY, EMBED_RECORD_KEY, PREDICTION_KEY
from hespotex._sample import get_sample_info, get_table, spot_centres
from hespotex.tl.explanation._diagnostic_scores import (
    IMAGE_REP,
    as_groups,
    find_rep,
    label_scores,
    parse_signature,
    programme_expression,
    rank_patches,
    zscore,
)
from hespotex.tl.prediction._tables import resolve_prediction, spot_tables

if TYPE_CHECKING:
    pass

logger = logging.getLogger("hespotex")

__all__ = ["DiagnosticPatches", "diagnostic_patches"]

SIGNATURE_GROUPS = ("high", "low")
MARKER_GENES = 10  # genes in the signature explained for a label (saliency of label patches)


@dataclass
class DiagnosticPatches:
    """The result of :func:`diagnostic_patches`.

    Attributes
    ----------
    table
        One row per chosen spot (index: its ``obs_name``), ordered by group then rank, with columns
        ``group``, ``rank`` (1 = most characteristic, within the group), ``score``, ``x``, ``y``
        (spot centre in full-resolution pixels) and ``sample_id``.
    images
        ``(n_rows, h, w, 3)`` uint8 crops in the order of ``table``: the patches the encoder sees.
    saliency
        ``(n_rows, h, w)`` float32 in ``[0, 1]`` (pixel attribution of the programme), or ``None``.
    params
        Every parameter that shaped the result (also stored in ``uns[key_added]["params"]``).
    """

    table: pd.DataFrame
    images: np.ndarray
    saliency: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g}: {c}" for g, c in self.table["group"].value_counts(sort=False).items())
        sal = "with" if self.saliency is not None else "without"
        return f"DiagnosticPatches({len(self)} patches of {self.images.shape[1]} px, {sal} saliency; {groups})"


# --------------------------------------------------------------------------------------------------
# the tool


@renamed_arguments("tl.diagnostic_patches")
def diagnostic_patches(
    data: Any,
    *,
    by: str | Sequence[str] | Mapping[str, float],
    n_patches: int = 16,
    key: str = PREDICTION_KEY,
    layer: str | None = None,
    groups: str | Sequence[str] | None = None,
    model: Any = None,
    saliency: bool = False,
    patch_um: float | None = None,
    size: int | None = None,
    use_rep: str | None = None,
    key_added: str = DIAGNOSTIC_KEY,
    overwrite: bool = False,
    seed: int = 0,
) -> DiagnosticPatches:
    """Rank the H&E patches most characteristic of a label or an expression programme and cut them out.

    Parameters
    ----------
    data
        A sample (SpatialData) with its H&E image. Labels, embeddings and expression are looked up in
        its spot table first, then in other tables of the same spots (``tables["hespotex"]`` written
        by :func:`hespotex.tl.predict` when the model's genes differ from the table's).
    by
        What to characterise:

        - an ``obs`` column of labels (categorical, string or boolean): per label, the spots carrying it
          whose image a cross-fitted logistic-regression classifier on ``obsm[use_rep]`` most
          confidently assigns to it. Score: the out-of-fold probability of the spot's own label
          (5-fold stratified, fewer when a label has fewer spots; inside each fold the features are
          reduced to at most 16 principal components, which are standardised). Unlabelled spots
          (NaN) get no score;
        - a numeric ``obs`` column (integer or float): used as the score itself;
        - a gene symbol, a list of genes or a ``{gene: weight}`` signature: the score is
          ``sum(weight * z) / sum(|weight|)`` with ``z`` each gene's expression z-scored over the
          spots of the section (genes constant over the section contribute 0). Genes absent from
          the expression are left out with a warning; all absent is an error.
    n_patches
        Patches per group (formerly ``n``).
    key
        The prediction read (for a gene programme, saliency markers, the latent ``obsm[f"X_{key}"]`` and
        the patch geometry): the ``key_added`` given to :func:`hespotex.tl.predict`.
    layer
        Expression for a gene programme: ``None`` uses the prediction ``key`` when the sample holds it
        (its recorded layer), else the log-normalised measured expression (log1p CP10k, library over all
        genes); ``"X"`` forces the measured expression; any other name is a layer.
    groups
        Which groups to return: labels of the ``by`` column (default all, in category order), or
        ``"high"`` / ``"low"`` for a programme or a numeric column (default ``"high"``).
    model
        A trained :class:`~hespotex.tl.HESpotEx`, needed only for ``saliency``.
    saliency
        Also compute pixel saliency (integrated gradients through the encoder,
        :func:`hespotex.tl.explanation._explain.patch_saliency`) of the programme on each patch. For a label, the
        programme explained is the label's ten marker genes (highest mean z-scored expression in the
        label vs the other spots, from ``layer`` restricted to the model's genes). For a model trained on two-scale
        embeddings (``hx.pp.embed(..., context_um=...)``) the attribution runs through both the spot and the context
        patch, and ``saliency`` is the spot patch's (the crops shown); :func:`hespotex.tl.explain` gives the context
        patch's too.
    patch_um, size
        Patch side in µm and output side in pixels. Default: the encoder geometry recorded by
        :func:`hespotex.pp.embed` for ``obsm["X_hespotex_image"]`` (else the prediction record, else
        the spot diameter and 224 px).
    use_rep
        ``obsm`` features of the label classifier (default ``"X_hespotex_image"``, else the latent
        ``obsm[f"X_{key}"]`` of the prediction).
    key_added
        Prefix of the ``obs`` columns and the ``uns`` key.
    overwrite
        Replace results stored before under ``key_added``.
    seed
        Seed of the cross-fitting folds.

    Returns
    -------
    A :class:`DiagnosticPatches` (table, crops, saliency, params). Writes to the sample's spot table:

    - ``obs[f"{key_added}_score"]``: the score of every spot (float, NaN where undefined);
    - ``obs[f"{key_added}_group"]``: the group for which a spot was chosen (categorical, NaN for the rest);
    - ``uns[key_added]``: ``params`` (every parameter, the genes used, where the expression or features
      came from) and ``table`` (the ranking, without the images).
    """
    from hespotex.pp._patches import default_patch_um, extract_patches

    table = get_table(data)
    score_key, group_key = f"{key_added}_score", f"{key_added}_group"
    if not overwrite:
        taken = [f"obs[{k!r}]" for k in (score_key, group_key) if k in table.obs] + (
            [f"uns[{key_added!r}]"] if key_added in table.uns else []
        )
        if taken:
            msg = f"{', '.join(taken)} already exist(s); pass `overwrite=True` to replace them, or another `key_added`."
            raise ValueError(msg)
    n = n_patches
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        msg = f"Expected `n_patches` a positive number of patches per group, found {n!r}."
        raise ValueError(msg)
    if n > table.n_obs:
        msg = f"Asked for {n} patches per group but the section has only {table.n_obs} spots; lower `n_patches`."
        raise ValueError(msg)
    info = get_sample_info(data)
    if info.image_key is None or info.image_key not in getattr(data, "images", {}):
        msg = (
            f"Diagnostic patches need the H&E image; this sample ({type(data).__name__}) has no image element "
            f"{info.image_key!r}. Pass the SpatialData sample read with its image."
        )
        raise KeyError(msg)
    if saliency and model is None:
        msg = "`saliency=True` needs the trained model: pass `model=`."
        raise ValueError(msg)
    if model is not None:
        from hespotex.tl.model._resolve import as_model

        model = as_model(model)  # a model, a saved folder or "hf-hub:owner/name"
    groups_list = as_groups(groups)

    # 1. scores and the candidate spots of each group
    params: dict[str, Any] = {
        "n_patches": int(n),
        "key": key,
        "seed": int(seed),
        "sample_id": info.sample_id,
        "saliency": bool(saliency),
    }
    label_col = None
    if isinstance(by, str):
        for _, t in spot_tables(data):
            if by in t.obs.columns:
                label_col = t.obs[by]
                break
    candidates: dict[str, np.ndarray] = {}
    descending: dict[str, bool] = {}
    signatures: dict[str, dict[str, float]] = {}
    if label_col is not None and (
        isinstance(label_col.dtype, pd.CategoricalDtype)
        or label_col.dtype == bool
        or not pd.api.types.is_numeric_dtype(label_col)
    ):
        labels = label_col.astype("category") if not isinstance(label_col.dtype, pd.CategoricalDtype) else label_col
        counts = labels.value_counts(sort=False)
        present = [str(c) for c in labels.cat.categories if counts.get(c, 0) > 0]
        features, rep = find_rep(data, use_rep, key)
        if len(features) != table.n_obs:
            msg = f"obsm[{rep!r}] has {len(features)} rows, expected one per spot ({table.n_obs})."
            raise ValueError(msg)
        small = [str(c) for c in counts.index if 0 < counts[c] < 2]
        if small:
            logger.warning("Labels with a single spot cannot be cross-fitted and are left out: %s.", small)
        str_labels = labels.astype(str).where(labels.notna() & ~labels.astype(str).isin(small))
        scores, clf_info = label_scores(features, str_labels.reset_index(drop=True), seed)
        usable = [c for c in present if c not in small]
        chosen = usable if groups_list is None else groups_list
        unknown = [g for g in chosen if g not in usable]
        if unknown:
            msg = f"Expected groups among the labels of obs[{by!r}] with two or more spots {usable}, found {unknown}."
            raise ValueError(msg)
        for g in chosen:
            candidates[g] = (str_labels == g).to_numpy()
            descending[g] = True
        params.update({"mode": "label", "by": by, "use_rep": rep, **clf_info})
    else:
        if label_col is not None:  # a numeric obs column: the score itself
            scores = pd.to_numeric(label_col, errors="coerce").to_numpy(dtype=np.float64)
            params.update({"mode": "score", "by": by})
        else:
            if isinstance(by, str) and not any(by in t.var_names for _, t in spot_tables(data)):
                found = list(table.obs.columns)
                msg = (
                    f"`by={by!r}` is neither an obs column ({found}) nor a gene of the sample. Pass an obs column "
                    "of labels or gene symbols."
                )
                raise KeyError(msg)
            sig = parse_signature(by)
            x, genes, source = programme_expression(data, list(sig), layer, key)
            w = np.array([sig[g] for g in genes])
            scores = zscore(x) @ w / np.abs(w).sum()
            constant = [g for g, s in zip(genes, x.std(axis=0), strict=True) if s == 0]
            if constant:
                logger.warning("Signature genes constant over the section contribute nothing: %s.", constant[:10])
            signatures = {"high": {g: sig[g] for g in genes}, "low": {g: -sig[g] for g in genes}}
            params.update(
                {
                    "mode": "signature",
                    "by": {g: sig[g] for g in sig},
                    "genes": genes,
                    **source,
                    "score": "sum(weight * zscore) / sum(|weight|)",
                }
            )
        chosen = ["high"] if groups_list is None else groups_list
        unknown = [g for g in chosen if g not in SIGNATURE_GROUPS]
        if unknown:
            msg = (
                f"Expected groups among {list(SIGNATURE_GROUPS)} for a programme or a numeric column, found {unknown}."
            )
            raise ValueError(msg)
        for g in chosen:
            candidates[g] = np.ones(table.n_obs, dtype=bool)
            descending[g] = g == "high"

    # 2. ranking
    rows = []
    for g in candidates:
        picked = rank_patches(scores, candidates[g], n, descending=descending[g])
        if len(picked) < n:
            logger.warning(
                "Group %r has %d scored spots, fewer than n_patches=%d; returning them all.", g, len(picked), n
            )
        rows += [(g, r + 1, int(i)) for r, i in enumerate(picked)]
    if not rows:
        msg = "No spot could be scored (all scores are NaN); check the labels or the expression."
        raise ValueError(msg)
    pos = np.array([i for _, _, i in rows], dtype=np.int64)
    xy = spot_centres(table)[pos]
    result = pd.DataFrame(
        {
            "group": pd.Categorical([g for g, _, _ in rows], categories=list(candidates)),
            "rank": np.array([r for _, r, _ in rows], dtype=np.int64),
            "score": scores[pos].astype(np.float64),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "sample_id": info.sample_id,
        },
        index=pd.Index(table.obs_names[pos], name=None),
    )

    # 3. crops (the encoder's geometry) and saliency
    embed_rec = table.uns.get(EMBED_RECORD_KEY, {}).get(IMAGE_REP, {})
    try:
        pred_rec = resolve_prediction(data, key).params
    except KeyError:
        pred_rec = {}
    patch_um = float(
        patch_um
        if patch_um is not None
        else embed_rec.get("patch_um") or pred_rec.get("patch_um") or default_patch_um(info)
    )
    size = int(size if size is not None else embed_rec.get("input_size") or 224)
    images = extract_patches(data, patch_um=patch_um, size=size, spots=pos)
    sal = None
    if saliency:
        sal = _saliency(
            data,
            model,
            result,
            candidates=candidates,
            signatures=signatures,
            layer=layer,
            key=key,
            size=size,
            params=params,
        )
    params.update({"groups": list(candidates), "patch_um": patch_um, "size": size, "key_added": key_added})

    # 4. store
    table.obs[score_key] = scores
    chosen_group = pd.Series(pd.NA, index=table.obs_names, dtype=object)
    chosen_group.iloc[pos] = result["group"].astype(str).to_numpy()  # a spot chosen twice keeps its last group
    table.obs[group_key] = pd.Categorical(chosen_group.to_numpy(), categories=list(candidates))
    stored = result.copy()
    stored.insert(0, "spot", stored.index.astype(str))
    stored = stored.reset_index(drop=True)
    stored["group"] = stored["group"].astype(str)
    table.uns[key_added] = {"params": _plain(params), "table": stored}
    logger.info(
        "Ranked %d patches in %d group(s) %s; scores in obs[%r].",
        len(result),
        len(candidates),
        list(candidates),
        score_key,
    )
    return DiagnosticPatches(table=result, images=images, saliency=sal, params=params)


def _plain(value: Any) -> Any:
    """Parameters as plain types that anndata writes (dicts of str / numbers / lists of str)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return "None" if value is None else value


def _saliency(
    data: Any,
    model: Any,
    result: pd.DataFrame,
    *,
    candidates: dict[str, np.ndarray],
    signatures: dict[str, dict[str, float]],
    layer: str | None,
    key: str,
    size: int,
    params: dict[str, Any],
) -> np.ndarray:
    """Saliency of each chosen patch for its group's programme, resized to the crops."""
    from hespotex.tl.explanation._explain import patch_saliency

    if not signatures:  # labels: explain each label's marker genes (from the model's genes)
        genes = list(model.genes)
        x, genes, _ = programme_expression(data, genes, layer, key)
        z = zscore(x)
        for g, mask in candidates.items():
            diff = z[mask].mean(axis=0) - z[~mask].mean(axis=0)
            top = np.lexsort((np.arange(len(genes)), -diff))[:MARKER_GENES]
            signatures[g] = {genes[i]: 1.0 for i in top}
        params["saliency_signatures"] = {g: list(s) for g, s in signatures.items()}
    smooth = prediction_smooth(data, key)
    params["saliency_smooth"] = smooth
    out = np.zeros((len(result), size, size), dtype=np.float32)
    group = result["group"].astype(str).to_numpy()
    model_genes = set(model.genes)
    for g in pd.unique(group):
        rows = np.flatnonzero(group == g)
        sig = {k: v for k, v in signatures[g].items() if k in model_genes}
        if not sig:
            msg = f"None of the programme genes of group {g!r} is predicted by the model; saliency needs model genes."
            raise ValueError(msg)
        _, sal = patch_saliency(
            data, model, spots=list(result.index[rows]), genes=None, signature=sig, n_steps=32, smooth=smooth
        )
        sal = np.asarray(sal, dtype=np.float32)
        if sal.shape[1:] != (size, size):
            from skimage.transform import resize

            sal = resize(sal, (len(rows), size, size), order=1, anti_aliasing=True, preserve_range=True).astype(
                np.float32
            )
        out[rows] = np.clip(sal, 0.0, 1.0)
    params["saliency_method"] = (
        "integrated gradients through the encoder (hespotex.tl.explanation._explain.patch_saliency, n_steps=32) of "
        "the prediction smoothed as recorded (saliency_smooth)"
    )
    return out


def prediction_smooth(data: Any, key: str) -> float | None:
    """The smoothing the sample's prediction ``key`` was made with (``params["smooth"]``; ``None`` when it recorded
    none), so saliency explains the map the patches were chosen from; ``hx.tl.predict``'s default without one."""
    from hespotex.tl.prediction._smoothing import DEFAULT_SMOOTH
    from hespotex.tl.prediction._tables import resolve_prediction

    try:
        found = resolve_prediction(data, key)
    except KeyError:
        return DEFAULT_SMOOTH
    return found.params.get("smooth")
