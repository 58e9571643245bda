"""Baselines tuned honestly: hyper-parameters chosen by leave-one-training-section-out.

A baseline's penalty (ridge α) or neighbourhood (retrieval k) decides much of its accuracy on a
new section; a fixed default makes a weak comparison. :func:`tune_baseline` picks it among a grid
by inner cross-validation on the *training* sections only (each training section held out in
turn, the others fitted), scored by mean per-gene Pearson on the same targets the model learns,
raw or after spatial smoothing, then refits on every training section. A smoothed baseline also has its
smoothing weight chosen the same way (the weight each spot keeps of its own prediction, jointly with the parameter):
the model's prediction is smoothed by default (``hx.tl.predict(..., smooth=0.5)``), and a baseline smoothed with a
weight fixed in advance would be a weaker comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger("hespotex")

__all__ = ["DEFAULT_GRIDS", "DEFAULT_SMOOTH_WEIGHTS", "tune_baseline"]

DEFAULT_GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "ridge": ("alpha", (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7)),
    "retrieval": ("k", (5, 10, 25, 50, 100, 200, 400)),
}


#: Candidate weights a smoothed baseline keeps of each spot's own prediction (``None``: the plain mean of the spot and
#: its neighbours, 1/7 for 6 neighbours); see :func:`hespotex.tl.evaluation._baselines.smooth`.
DEFAULT_SMOOTH_WEIGHTS: tuple[float | None, ...] = (None, 0.25, 0.5, 0.75)


def _score(y: np.ndarray, pred: np.ndarray) -> float:
    from hespotex.tl.evaluation._metrics import pearson_per_gene

    r = pearson_per_gene(y, pred)
    return float(np.nanmean(r)) if np.isfinite(r).any() else 0.0


def _ridge_path(X, y, Xh, alphas, *, n_components: int | None, seed: int):
    """Predictions of :class:`~hespotex.tl.evaluation._baselines.RidgeBaseline` for every α (exact ridge on the PCA
    scores).

    The same standardisation and PCA as the baseline; the ridge with intercept is solved in closed
    form from one SVD of the centred scores, so a grid of α costs one fit.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    Z, Zh = scaler.transform(X), scaler.transform(Xh)
    if n_components is not None:
        pca = PCA(n_components=min(n_components, *Z.shape), random_state=seed).fit(Z)
        Z, Zh = pca.transform(Z), pca.transform(Zh)
    z_mean, y_mean = Z.mean(axis=0), y.mean(axis=0)
    U, S, Vt = np.linalg.svd(Z - z_mean, full_matrices=False)
    Uty = U.T @ (y - y_mean)
    for alpha in alphas:
        coef = Vt.T @ ((S / (S**2 + float(alpha)))[:, None] * Uty)
        yield ((Zh - z_mean) @ coef + y_mean).astype(np.float32)


def tune_baseline(
    name: str,
    sections: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    grid: Sequence[float] | None = None,
    smoothed: bool = False,
    smooth_neighbors: int = 6,
    smooth_weights: Sequence[float | None] = DEFAULT_SMOOTH_WEIGHTS,
    seed: int = 0,
    **kwargs: Any,
):
    """Choose a baseline's hyper-parameter by leave-one-training-section-out and fit it on all sections.

    Parameters
    ----------
    name
        ``"ridge"`` (tunes ``alpha``) or ``"retrieval"`` (tunes ``k``).
    sections
        ``{name: (embeddings, targets, coordinates in µm)}`` of the training sections only (at least 2).
    grid
        Candidate values (default :data:`DEFAULT_GRIDS`).
    smoothed
        Score the inner folds after spatial smoothing over ``smooth_neighbors`` nearest spots (choose
        the value for the smoothed baseline).
    smooth_weights
        With ``smoothed``: candidate weights each spot keeps of its own prediction (``None``: the plain mean of the
        spot and its neighbours), chosen jointly with the parameter; apply the chosen one
        (``tuning_["smooth_weight"]``) with :func:`hespotex.tl.evaluation._baselines.smooth` ``(self_weight=...)``.
    seed
        Seed of the ridge's PCA and solver.
    kwargs
        Other parameters of the baseline class.

    Returns
    -------
    The baseline fitted on every section, with ``tuning_`` = ``{"param", "value", "grid", "scores",
    "smoothed", "smooth_weight", "smooth_weights", "inner_folds"}`` (``scores``: mean inner Pearson per grid value,
    at its best smoothing weight; ``smooth_weight``: the chosen weight, ``None`` for the plain mean or when not
    ``smoothed``).
    """
    from hespotex.pp._graph import knn_graph
    from hespotex.tl.evaluation._baselines import make_baseline, smooth

    if name not in DEFAULT_GRIDS:
        msg = f"Cannot tune baseline {name!r}; expected one of {sorted(DEFAULT_GRIDS)}."
        raise ValueError(msg)
    if len(sections) < 2:
        msg = f"Tuning holds out one training section at a time and needs at least 2; found {len(sections)}."
        raise ValueError(msg)
    param, default_grid = DEFAULT_GRIDS[name]
    values = list(default_grid if grid is None else grid)
    if not values:
        msg = "Expected a non-empty grid of candidate values."
        raise ValueError(msg)
    weights = _check_smooth_weights(smooth_weights) if smoothed else [None]
    extra = {"seed": seed} if name == "ridge" else {}
    names = list(sections)
    scores = np.zeros((len(values), len(weights)))
    for held in names:
        rest = [n for n in names if n != held]
        X = np.concatenate([sections[n][0] for n in rest])
        y = np.concatenate([sections[n][1] for n in rest])
        Xh, yh, xy = sections[held]
        conn = knn_graph(xy, smooth_neighbors)[0] if smoothed else None
        if name == "ridge":  # one PCA and one SVD per inner fold give the ridge solution for every α
            preds = _ridge_path(X, y, Xh, values, n_components=kwargs.get("n_components", 256), seed=seed)
        else:
            preds = (make_baseline(name, **{param: int(v)}, **kwargs).fit(X, y).predict(Xh) for v in values)
        for i, pred in enumerate(preds):
            for j, w in enumerate(weights):
                scores[i, j] += _score(yh, smooth(pred, conn, self_weight=w) if smoothed else pred) / len(names)
    best, best_w = np.unravel_index(int(np.argmax(scores)), scores.shape)
    value = int(values[best]) if param == "k" else float(values[best])
    weight = weights[best_w]
    logger.info(
        "%s%s: %s = %s%s chosen by leave-one-section-out (inner Pearson %.4f)",
        name,
        "+smooth" if smoothed else "",
        param,
        value,
        f", smoothing weight {'mean' if weight is None else weight}" if smoothed else "",
        scores[best, best_w],
    )
    model = make_baseline(name, **{param: value}, **extra, **kwargs)
    model.fit(np.concatenate([s[0] for s in sections.values()]), np.concatenate([s[1] for s in sections.values()]))
    model.tuning_ = {
        "param": param, "value": value, "grid": values, "scores": scores.max(axis=1).round(5).tolist(),
        "smoothed": smoothed, "smooth_weight": weight, "smooth_weights": weights if smoothed else None,
        "inner_folds": names,
    }  # fmt: skip
    return model


def _check_smooth_weights(weights: Sequence[float | None]) -> list[float | None]:
    """``weights`` checked one by one as ``hx.tl.predict``'s ``smooth`` (:func:`check_smooth`); at least one."""
    from hespotex.tl.prediction._smoothing import check_smooth

    try:
        out = [check_smooth(w) for w in weights]
    except (TypeError, ValueError) as err:
        raise type(err)(f"In `smooth_weights`: {err}") from None
    if not out:
        msg = "Expected `smooth_weights` to hold at least one weight in [0, 1] or None (the plain mean); found none."
        raise ValueError(msg)
    return out
