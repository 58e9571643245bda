"""The BLEEP-style retrieval baseline (:class:`RetrievalBaseline`: a weighted average of the expression of the
nearest training spots in embedding space)."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from scipy import sparse

from hespotex.tl.evaluation._baseline_base import Baseline, check_X, check_y, safe_scale

logger = logging.getLogger("hespotex")


class RetrievalBaseline(Baseline):
    """BLEEP-style retrieval: the prediction for a spot is a weighted average of the expression of its
    ``k`` nearest training spots in embedding space (:class:`sklearn.neighbors.NearestNeighbors`).

    BLEEP (Xie et al., NeurIPS 2023) retrieves in a contrastively learned joint space; this baseline
    retrieves in the frozen encoder's embedding space (optionally standardised).

    Parameters
    ----------
    k
        Number of neighbours (at most the number of training spots).
    metric
        Any metric :class:`~sklearn.neighbors.NearestNeighbors` accepts; ``"cosine"`` by default.
    weights
        ``"distance"``: weights ``1 / d`` (when a query has neighbours at distance ``<= 1e-12``, only
        those count, equally), as :class:`sklearn.neighbors.KNeighborsRegressor`; ``"uniform"``: plain
        mean.
    standardize
        Centre and scale each embedding dimension with training statistics before retrieval (makes
        cosine similarity meaningful for non-negative embeddings such as post-ReLU features).

    Notes
    -----
    Predicting the training spots themselves retrieves each spot as its own nearest neighbour.
    """

    name = "retrieval"
    _param_names = ("k", "metric", "weights", "standardize")

    def __init__(
        self,
        k: int = 50,
        metric: str = "cosine",
        *,
        weights: Literal["distance", "uniform"] = "distance",
        standardize: bool = True,
    ) -> None:
        if k < 1:
            msg = f"`k` must be a positive number of neighbours; found {k}."
            raise ValueError(msg)
        if weights not in ("distance", "uniform"):
            msg = f"`weights` must be 'distance' or 'uniform'; found {weights!r}."
            raise ValueError(msg)
        self.k = k
        self.metric = metric
        self.weights = weights
        self.standardize = standardize

    def _transform(self, X: np.ndarray) -> np.ndarray:
        return (X - self.x_mean_) / self.x_scale_ if self.standardize else X

    def fit(self, X: Any, y: Any) -> RetrievalBaseline:
        """Index training embeddings ``X`` and keep expression ``y`` (dense or sparse; a copy is stored)."""
        from sklearn.neighbors import NearestNeighbors

        X = check_X(X)
        y = check_y(y, X.shape[0], keep_sparse=True, dtype=np.float32)
        self.x_mean_ = X.mean(axis=0)
        self.x_scale_ = safe_scale(X.std(axis=0)).astype(np.float64)
        algorithm = "brute" if self.metric == "cosine" else "auto"
        self.k_ = min(self.k, X.shape[0])
        if self.k_ < self.k:
            logger.info("RetrievalBaseline: k=%d > %d training spots, using k=%d", self.k, X.shape[0], self.k_)
        self.index_ = NearestNeighbors(n_neighbors=self.k_, metric=self.metric, algorithm=algorithm).fit(
            self._transform(X)
        )
        self.y_train_ = y.copy()
        self._set_shapes(X, y)
        self.is_fitted_ = True
        return self

    def neighbor_weights(self, X: Any) -> sparse.csr_matrix:
        """Row-stochastic sparse matrix ``(n_query, n_train)`` of retrieval weights for embeddings ``X``."""
        X = self._check_predict(X)
        dist, idx = self.index_.kneighbors(self._transform(X), n_neighbors=self.k_)
        if self.weights == "uniform":
            w = np.ones_like(dist)
        else:
            exact = dist <= 1e-12
            with np.errstate(divide="ignore"):
                w = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64), 1.0 / dist)
        w /= w.sum(axis=1, keepdims=True)
        n_q = X.shape[0]
        indptr = np.arange(0, n_q * self.k_ + 1, self.k_)
        return sparse.csr_matrix((w.ravel(), idx.ravel(), indptr), shape=(n_q, self.y_train_.shape[0]))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted expression, ``float32`` ``(n_spots, n_genes_)``."""
        pred = self.neighbor_weights(X) @ self.y_train_
        pred = pred.toarray() if sparse.issparse(pred) else np.asarray(pred)
        return pred.astype(np.float32, copy=False)
