"""Stain and scanner robustness at prediction time: per-slide standardisation of image embeddings.

A frozen encoder maps a slide stained or scanned differently from the training slides to shifted
embeddings; a model that standardises every slide with the *training* statistics then sees every
spot of the new slide moved in the same direction. Per-slide standardisation
(``embedding_norm="slide"`` in :func:`hespotex.tl.train`) centres and scales each slide's
embeddings with statistics of that slide alone (its own image, no expression), so what the model
sees is how each spot differs from the rest of its slide.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EMBEDDING_NORMS: dict[str, str] = {
    "training": "embeddings standardised with the training spots' mean and scale",
    "slide": "embeddings standardised with each slide's own mean and scale (its image only)",
}


def check_embedding_norm(embedding_norm: str) -> str:
    """``embedding_norm`` if known, else a ``ValueError`` listing the choices."""
    if embedding_norm not in EMBEDDING_NORMS:
        msg = f"Unknown embedding_norm {embedding_norm!r}; expected one of {sorted(EMBEDDING_NORMS)}."
        raise ValueError(msg)
    return embedding_norm


def slide_statistics(emb: Any, *, chunk: int = 10_000, floor: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of one slide's embeddings, read ``chunk`` rows at a time.

    ``emb`` is an array or any reader of rows (``shape``, ``len``, slicing by integer arrays, e.g. a
    zarr-backed one while streaming). The scale is the standard deviation floored at ``floor`` times
    the median over the features that vary on this slide (so standardised values do not change when
    the whole slide's embeddings are scaled), as for the training statistics
    (:func:`hespotex.tl.model._data.embedding_scale`).
    """
    n, d = emb.shape
    if n < 2:
        msg = f"Per-slide standardisation needs at least 2 spots; found {n}. Use embedding_norm='training'."
        raise ValueError(msg)
    total = np.zeros(d, dtype=np.float64)
    squares = np.zeros(d, dtype=np.float64)
    for start in range(0, n, chunk):
        rows = np.asarray(emb[np.arange(start, min(start + chunk, n))], dtype=np.float64)
        total += rows.sum(axis=0)
        squares += (rows**2).sum(axis=0)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    positive = std[std > 0]
    median = float(np.median(positive)) if positive.size else 1.0  # of the features that vary: equivariant to scaling
    scale = np.maximum(std, floor * median)
    return mean.astype(np.float32), scale.astype(np.float32)
