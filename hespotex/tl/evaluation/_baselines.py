"""Baseline predictors of spot expression from image embeddings, and spatial smoothing of predictions.

All baselines share one interface (:class:`Baseline`): ``fit(X, y)`` on training embeddings
``X`` ``(n_spots, n_features)`` and expression ``y`` ``(n_spots, n_genes)``, then ``predict(X)`` for new
spots. They work on arrays (``numpy``; ``scipy.sparse`` for ``y``), never on AnnData, and are
deterministic given their parameters (and ``seed`` where they draw random numbers).

- :class:`RidgeBaseline`: the HEST-Benchmark linear probe (standardise, PCA to 256, ridge).
- :class:`MLPBaseline`: an ST-Net-style image-only head, a small MLP trained with MSE in torch.
- :class:`RetrievalBaseline`: BLEEP-style retrieval, a weighted average of the expression of the
  nearest training spots in embedding space.
- :func:`smooth`: the spatially smoothed variant of any prediction over a spot graph.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy import sparse

from hespotex.tl.evaluation._baseline_base import Baseline
from hespotex.tl.evaluation._baseline_mlp import MLPBaseline
from hespotex.tl.evaluation._baseline_retrieval import RetrievalBaseline
from hespotex.tl.evaluation._baseline_ridge import RidgeBaseline

logger = logging.getLogger("hespotex")

__all__ = [
    "BASELINES",
    "Baseline",
    "MLPBaseline",
    "RetrievalBaseline",
    "RidgeBaseline",
    "make_baseline",
    "smooth",
]


# --------------------------------------------------------------------------------------------------
# spatial smoothing
# --------------------------------------------------------------------------------------------------


def smooth(pred: Any, connectivities: Any, *, self_weight: float | None = None) -> np.ndarray:
    """Spatially smoothed predictions: each spot's prediction averaged with its graph neighbours'.

    With ``A`` the connectivity matrix with its diagonal removed:

    - ``self_weight=None`` (default): ``S = rownorm(A + I)``, i.e. the diagonal is set to 1 and each
      row is divided by its sum. For a binary graph (e.g. squidpy's
      ``obsp["spatial_connectivities"]``) a spot with ``d`` neighbours gets the plain mean of its own
      prediction and its neighbours' (each weight ``1 / (d + 1)``); for weighted graphs neighbours
      keep their relative weights and the spot itself counts with weight 1.
    - ``self_weight=s`` in ``[0, 1]``: ``S = s * I + (1 - s) * rownorm(A)``: the spot keeps weight
      ``s`` and its neighbours share ``1 - s`` in proportion to their connectivities.

    Spots without neighbours keep their prediction. One step is applied: the result is ``S @ pred``.

    Parameters
    ----------
    pred
        Predictions ``(n_spots, n_genes)`` (or ``(n_spots,)``), dense or sparse (read, not modified).
    connectivities
        Square ``(n_spots, n_spots)`` non-negative matrix, rows and columns in the order of ``pred``;
        sparse (a dense array is converted). Rows are targets: row ``i`` lists the spots that smooth ``i``.
    self_weight
        See above.

    Returns
    -------
    Dense smoothed predictions, same shape as ``pred`` (``float32`` for ``float32`` input, else ``float64``).

    Writes nothing; inputs are not changed.
    """
    squeeze = False
    if not sparse.issparse(pred):
        pred = np.asarray(pred)
        if pred.ndim == 1:
            pred, squeeze = pred[:, None], True
    n, dtype = pred.shape[0], np.result_type(pred.dtype, np.float32)
    if pred.ndim != 2:
        msg = f"`pred` must be 2-D (n_spots, n_genes); found shape {pred.shape}."
        raise ValueError(msg)
    S = smoothing_operator(connectivities, n, self_weight=self_weight)
    out = S @ pred
    out = out.toarray() if sparse.issparse(out) else np.asarray(out)
    out = out.astype(dtype, copy=False)
    return out[:, 0] if squeeze else out


def smoothing_operator(connectivities: Any, n: int, *, self_weight: float | None = None) -> sparse.csr_matrix:
    """The ``(n, n)`` CSR matrix ``S`` that :func:`smooth` applies (``smooth(pred, ...) == S @ pred``), from a
    connectivity matrix of ``n`` spots (see :func:`smooth` for ``self_weight``); rows of ``S`` sum to 1."""
    A = sparse.csr_matrix(connectivities, dtype=np.float64, copy=True)
    if A.shape != (n, n):
        msg = (
            f"`connectivities` must be ({n}, {n}) to match the {n} spots of `pred`; found {A.shape}. "
            "Use the graph built on the same spots, in the same order."
        )
        raise ValueError(msg)
    if A.nnz and (A.data < 0).any():
        msg = "`connectivities` must be non-negative; found negative weights."
        raise ValueError(msg)
    A.setdiag(0.0)
    A.eliminate_zeros()
    eye = sparse.identity(n, format="csr", dtype=np.float64)
    if self_weight is None:
        M = A + eye
        S = sparse.diags(1.0 / np.asarray(M.sum(axis=1)).ravel()) @ M
    else:
        if not 0.0 <= self_weight <= 1.0:
            msg = f"`self_weight` must lie in [0, 1] or be None; found {self_weight}."
            raise ValueError(msg)
        deg = np.asarray(A.sum(axis=1)).ravel()
        has = deg > 0
        inv = np.zeros(n)
        inv[has] = (1.0 - self_weight) / deg[has]
        diag = np.where(has, self_weight, 1.0)
        S = sparse.diags(inv) @ A + sparse.diags(diag)
    return S.tocsr()


# --------------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------------

BASELINES: dict[str, type[Baseline]] = {
    "ridge": RidgeBaseline,
    "mlp": MLPBaseline,
    "retrieval": RetrievalBaseline,
}


def make_baseline(name: str, **kwargs: Any) -> Baseline:
    """Construct a baseline by name: ``"ridge"``, ``"mlp"`` or ``"retrieval"``; ``kwargs`` go to its class.

    Writes nothing.
    """
    key = str(name).lower()
    if key not in BASELINES:
        msg = f"Unknown baseline {name!r}; choose one of {sorted(BASELINES)}."
        raise ValueError(msg)
    return BASELINES[key](**kwargs)
