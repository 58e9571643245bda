"""The interface every baseline shares (:class:`Baseline`: ``fit(X, y)``, ``predict(X)``, ``get_params``) and the
checks of its array inputs (see :mod:`hespotex.tl.evaluation._baselines`)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy import sparse


def check_X(X: Any, name: str = "X", dtype: type = np.float64) -> np.ndarray:
    if sparse.issparse(X):
        X = X.toarray()
    arr = np.asarray(X, dtype=dtype)
    if arr.ndim != 2:
        msg = f"`{name}` must be a 2-D array of embeddings (n_spots, n_features); found shape {arr.shape}."
        raise ValueError(msg)
    if arr.shape[0] == 0:
        msg = f"`{name}` has no spots (rows)."
        raise ValueError(msg)
    if not np.isfinite(arr).all():
        msg = f"`{name}` contains NaN or infinite values; remove or impute those spots first."
        raise ValueError(msg)
    return arr


def check_y(y: Any, n_spots: int, name: str = "y", *, keep_sparse: bool = False, dtype: type = np.float64) -> Any:
    if sparse.issparse(y):
        y = sparse.csr_matrix(y, dtype=dtype) if keep_sparse else y.toarray().astype(dtype)
    else:
        y = np.asarray(y, dtype=dtype)
        if y.ndim == 1:
            y = y[:, None]
    if y.ndim != 2:
        msg = f"`{name}` must be 2-D expression (n_spots, n_genes); found shape {y.shape}."
        raise ValueError(msg)
    if y.shape[0] != n_spots:
        msg = f"`{name}` has {y.shape[0]} spots (rows) but the embeddings have {n_spots}; they must be aligned."
        raise ValueError(msg)
    data = y.data if sparse.issparse(y) else y
    if not np.isfinite(data).all():
        msg = f"`{name}` contains NaN or infinite values."
        raise ValueError(msg)
    return y


class Baseline:
    """Common interface of the baselines: ``fit(X, y)`` then ``predict(X)``.

    Fitted state ends in ``_``: ``n_features_in_`` (embedding width) and ``n_genes_`` (targets) are
    set by every ``fit``; ``is_fitted_`` tells whether ``fit`` has run.
    """

    name: ClassVar[str] = "baseline"
    _param_names: ClassVar[tuple[str, ...]] = ()

    is_fitted_: bool = False

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, for provenance (``uns["hespotex"]["params"]``)."""
        params = {"name": self.name}
        for key in self._param_names:
            value = getattr(self, key)
            params[key] = list(value) if isinstance(value, tuple) else value
        return params

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def fit(self, X: Any, y: Any) -> Baseline:  # pragma: no cover - interface
        """Fit on training embeddings ``X`` and expression ``y``; returns ``self``."""
        raise NotImplementedError

    def predict(self, X: Any) -> np.ndarray:  # pragma: no cover - interface
        """Predicted expression ``(n_spots, n_genes_)`` for embeddings ``X``."""
        raise NotImplementedError

    def _set_shapes(self, X: np.ndarray, y: Any) -> None:
        self.n_features_in_ = X.shape[1]
        self.n_genes_ = y.shape[1]

    def _check_predict(self, X: Any, dtype: type = np.float64) -> np.ndarray:
        if not self.is_fitted_:
            msg = f"This {type(self).__name__} is not fitted; call `fit(X_train, y_train)` first."
            raise RuntimeError(msg)
        X = check_X(X, dtype=dtype)
        if X.shape[1] != self.n_features_in_:
            msg = (
                f"`X` has {X.shape[1]} features but this {type(self).__name__} was fitted on {self.n_features_in_}; "
                "use embeddings from the same encoder."
            )
            raise ValueError(msg)
        return X


def safe_scale(scale: np.ndarray) -> np.ndarray:
    """Standard deviations with zero (or NaN) replaced by 1, so constant features do not divide by zero."""
    scale = np.asarray(scale, dtype=np.float32).copy()
    scale[~(scale > 0)] = 1.0
    return scale
