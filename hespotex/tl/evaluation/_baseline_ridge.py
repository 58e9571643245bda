"""The HEST-Benchmark linear probe baseline (:class:`RidgeBaseline`: standardise, PCA, ridge)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from hespotex.tl.evaluation._baseline_base import Baseline, check_X, check_y

logger = logging.getLogger("hespotex")


class RidgeBaseline(Baseline):
    """HEST-Benchmark linear probe: standardise embeddings, PCA, ridge regression.

    Reproduces the protocol of HEST-Benchmark (Jaume et al., NeurIPS 2024; repository
    ``mahmoodlab/HEST``, ``src/hest/bench/benchmark.py`` and ``src/hest/bench/trainer.py``,
    ``train_test_reg``): a ``StandardScaler`` then ``PCA(n_components=256, random_state=seed)`` fitted
    on the training embeddings, then ``sklearn.linear_model.Ridge(solver="lsqr", max_iter=1000,
    random_state=seed)`` with the fixed penalty

    .. math:: \\alpha = \\frac{100}{M \\cdot C},

    where ``M`` is the number of regression inputs (PCA components) and ``C`` the number of genes.
    One deliberate difference: HEST fits without intercept (``fit_intercept=False``); here the intercept
    is fitted. As PCA scores of the training data are centred, the coefficients are the same and
    per-gene correlations are identical, but predictions sit at the training mean of each gene instead
    of at zero, so MSE is meaningful.

    Parameters
    ----------
    n_components
        PCA components; fewer when ``min(n_samples, n_features)`` is smaller. ``None`` skips PCA
        (regression on the standardised embeddings).
    alpha
        Ridge penalty; ``None`` uses HEST's ``100 / (M * C)``.
    seed
        Random state of PCA and of the ridge solver.

    Attributes
    ----------
    pipeline_
        The fitted ``sklearn.pipeline.Pipeline`` (``scaler``, optional ``pca``, ``ridge``).
    alpha_
        The penalty used.
    n_components_
        Number of PCA components used (``None`` without PCA).
    """

    name = "ridge"
    _param_names = ("n_components", "alpha", "seed")

    def __init__(self, n_components: int | None = 256, alpha: float | None = None, *, seed: int = 0) -> None:
        if n_components is not None and n_components < 1:
            msg = f"`n_components` must be a positive integer or None; found {n_components}."
            raise ValueError(msg)
        if alpha is not None and alpha < 0:
            msg = f"`alpha` must be non-negative or None (HEST's 100 / (M * C)); found {alpha}."
            raise ValueError(msg)
        self.n_components = n_components
        self.alpha = alpha
        self.seed = seed

    def fit(self, X: Any, y: Any) -> RidgeBaseline:
        """Fit scaler, PCA and ridge on training embeddings ``X`` and expression ``y``.

        ``X`` and ``y`` are read, not modified; returns ``self`` with ``pipeline_``, ``alpha_``,
        ``n_components_`` set.
        """
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        X = check_X(X)
        y = check_y(y, X.shape[0])
        steps: list[tuple[str, Any]] = [("scaler", StandardScaler())]
        n_inputs = X.shape[1]
        self.n_components_ = None
        if self.n_components is not None:
            n_inputs = min(self.n_components, X.shape[0], X.shape[1])
            if n_inputs < self.n_components:
                logger.debug("RidgeBaseline: %d PCA components (data too small for %d)", n_inputs, self.n_components)
            steps.append(("pca", PCA(n_components=n_inputs, random_state=self.seed)))
            self.n_components_ = n_inputs
        self.alpha_ = float(self.alpha) if self.alpha is not None else 100.0 / (n_inputs * y.shape[1])
        steps.append(
            (
                "ridge",
                Ridge(alpha=self.alpha_, solver="lsqr", fit_intercept=True, max_iter=1000, random_state=self.seed),
            )
        )
        self.pipeline_ = Pipeline(steps).fit(X, y)
        self._set_shapes(X, y)
        self.is_fitted_ = True
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predicted expression, ``float32`` ``(n_spots, n_genes_)``."""
        X = self._check_predict(X)
        pred = self.pipeline_.predict(X)
        return np.asarray(pred, dtype=np.float32).reshape(X.shape[0], self.n_genes_)
