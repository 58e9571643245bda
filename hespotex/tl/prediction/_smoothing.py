"""Spatial smoothing of predicted expression (``hx.tl.predict(..., smooth=w)``): each spot keeps weight ``w`` of its
own prediction and takes ``1 - w`` from its 6 nearest spots, equally.

The same operator as the baselines' ``+smooth`` (:func:`hespotex.tl.evaluation._baselines.smooth` with
``self_weight=w`` on the 6-nearest-neighbour graph of the spot centres, symmetric). Applied to each model's
expression (an ensemble's members before their mean and spread), in memory or row chunk by row chunk when streaming.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from hespotex.tl.model._data import GraphData

SMOOTH_NEIGHBORS = 6

#: Default of ``hx.tl.predict(..., smooth=)`` (and of ``hx.tl.explain``, ``hx.tl.cross_validate``): on held-out her2st
#: sections under every emulated shift, for every seed, ``0.5`` raised the mean per-gene Pearson by 0.005-0.015 over
#: the unsmoothed prediction, while the plain mean of the spot and its 6 neighbours lost up to 0.024 on the top-50 genes
#: (``benchmarks/results/shift_smooth.md``).
DEFAULT_SMOOTH = 0.5


def check_smooth(smooth: float | None) -> float | None:
    """``smooth`` as a float in ``[0, 1]``, or ``None`` (no smoothing); a clear error otherwise."""
    if smooth is None:
        return None
    if isinstance(smooth, bool) or not isinstance(smooth, int | float | np.floating | np.integer):
        msg = f"Expected `smooth` to be None or the weight a spot keeps, in [0, 1]; found {smooth!r}."
        raise TypeError(msg)
    if not 0.0 <= float(smooth) <= 1.0:
        msg = (
            f"Expected `smooth` in [0, 1] (the weight each spot keeps of its own prediction; 1: no smoothing), "
            f"found {smooth}."
        )
        raise ValueError(msg)
    return float(smooth)


def smoothing_matrix(sample: GraphData, smooth: float) -> sp.csr_matrix:
    """``S`` (spots x spots, rows summing to 1): the spot at weight ``smooth``, its :data:`SMOOTH_NEIGHBORS` nearest
    spots sharing ``1 - smooth`` equally, on the sample's symmetric k-NN graph (:meth:`GraphData.graph`, built once
    per sample and the graph decoder's own at its default 6 neighbours); a slide too small for it is left as it is."""
    from hespotex.tl.evaluation._baselines import smoothing_operator

    n = sample.n
    if n <= SMOOTH_NEIGHBORS:
        return sp.identity(n, format="csr", dtype=np.float64)
    source, target = sample.graph(SMOOTH_NEIGHBORS)
    connectivities = sp.csr_matrix((np.ones(len(source)), (target, source)), shape=(n, n))
    return smoothing_operator(connectivities, n, self_weight=smooth)


def smooth_rows(S: sp.csr_matrix, start: int, stop: int, rows_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Smoothed expression of spots ``start:stop`` from ``rows_of(index)`` (the unsmoothed expression of the spots
    ``index``, sorted): only the rows those spots read are computed. Those are the step's own rows and their
    neighbours': about the step when the table is in spatial order, up to 7 times it when it is shuffled."""
    block = S[start:stop]
    needed = np.unique(block.indices)
    local = block[:, needed]
    return np.asarray(local @ rows_of(needed), dtype=np.float32)
