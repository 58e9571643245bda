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

import copy
import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from scipy import sparse

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
# input checks
# --------------------------------------------------------------------------------------------------


def _check_X(X: Any, name: str = "X", dtype: type = np.float64) -> np.ndarray:
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


def _check_y(y: Any, n_spots: int, name: str = "y", *, keep_sparse: bool = False, dtype: type = np.float64) -> Any:
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


# --------------------------------------------------------------------------------------------------
# common base
# --------------------------------------------------------------------------------------------------


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
        X = _check_X(X, dtype=dtype)
        if X.shape[1] != self.n_features_in_:
            msg = (
                f"`X` has {X.shape[1]} features but this {type(self).__name__} was fitted on {self.n_features_in_}; "
                "use embeddings from the same encoder."
            )
            raise ValueError(msg)
        return X


# --------------------------------------------------------------------------------------------------
# ridge (HEST-Benchmark)
# --------------------------------------------------------------------------------------------------


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

        X = _check_X(X)
        y = _check_y(y, X.shape[0])
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


# --------------------------------------------------------------------------------------------------
# MLP (ST-Net-style image-only head)
# --------------------------------------------------------------------------------------------------


class MLPBaseline(Baseline):
    """ST-Net-style image-only regression head: an MLP from embedding to genes, trained with MSE.

    ST-Net (He et al., Nat Biomed Eng 2020) regresses expression from each spot's patch alone, with no
    neighbourhood information; here the frozen encoder's embeddings replace the fine-tuned CNN, and
    an MLP (``Linear -> GELU -> Dropout`` per hidden layer, then ``Linear`` to genes) is trained. Inputs
    are standardised and each gene's target is z-scored with statistics of the training data, so every
    gene weighs alike in the loss; predictions are returned on the original scale.

    Parameters
    ----------
    hidden
        Widths of the hidden layers; ``()`` gives a linear model.
    epochs
        Maximum number of passes over the training spots.
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay.
    dropout
        Dropout after each hidden layer.
    batch_size
        Spots per optimisation step.
    patience
        Early stopping: with validation data, stop after this many epochs without improvement of the
        validation loss and restore the best weights.
    seed
        Seeds weight initialisation, shuffling and dropout (the global torch RNG state is restored after
        fitting). Same seed, same result on CPU.
    device
        Torch device (``"auto"`` follows :data:`hespotex.settings`).

    Attributes
    ----------
    module_
        The trained ``torch.nn.Module``, in eval mode, on ``device``.
    history_
        ``{"train_loss": [...], "val_loss": [...]}`` per epoch (standardised-target MSE).
    best_epoch_
        Epoch (1-based) whose weights were kept.
    """

    name = "mlp"
    _param_names = (
        "hidden",
        "epochs",
        "lr",
        "weight_decay",
        "dropout",
        "batch_size",
        "patience",
        "seed",
        "device",
    )

    def __init__(
        self,
        hidden: Sequence[int] = (256,),
        *,
        epochs: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        dropout: float = 0.1,
        batch_size: int = 128,
        patience: int = 20,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if isinstance(hidden, int):
            hidden = (hidden,)
        if any(int(h) < 1 for h in hidden):
            msg = f"`hidden` must be positive layer widths; found {hidden}."
            raise ValueError(msg)
        if epochs < 1 or batch_size < 1 or patience < 1:
            msg = f"`epochs`, `batch_size` and `patience` must be >= 1; found {epochs}, {batch_size}, {patience}."
            raise ValueError(msg)
        if not 0 <= dropout < 1:
            msg = f"`dropout` must lie in [0, 1); found {dropout}."
            raise ValueError(msg)
        self.hidden = tuple(int(h) for h in hidden)
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.batch_size = batch_size
        self.patience = patience
        self.seed = seed
        self.device = device

    def _build(self, n_in: int, n_out: int):
        from torch import nn

        layers: list[nn.Module] = []
        width = n_in
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(self.dropout)]
            width = h
        layers.append(nn.Linear(width, n_out))
        return nn.Sequential(*layers)

    def fit(self, X: Any, y: Any, *, validation: tuple[Any, Any] | None = None) -> MLPBaseline:
        """Train on embeddings ``X`` and expression ``y``.

        Parameters
        ----------
        X, y
            Training embeddings ``(n, n_features)`` and expression ``(n, n_genes)`` (read, not modified).
        validation
            Optional ``(X_val, y_val)`` used only for early stopping: spots held out from training and
            **never the test spots**. Without it, all ``epochs`` run and the last weights are kept.

        Returns
        -------
        ``self``, with ``module_``, ``history_``, ``best_epoch_`` and the standardisation statistics set.
        """
        import torch

        from hespotex._settings import resolve_device

        X = _check_X(X, dtype=np.float32)
        y = _check_y(y, X.shape[0], dtype=np.float32)
        dev = resolve_device(self.device)

        self.x_mean_ = X.mean(axis=0)
        self.x_scale_ = _safe_scale(X.std(axis=0))
        self.y_mean_ = y.mean(axis=0)
        self.y_scale_ = _safe_scale(y.std(axis=0))
        xt = torch.from_numpy((X - self.x_mean_) / self.x_scale_)
        yt = torch.from_numpy((y - self.y_mean_) / self.y_scale_)
        val = None
        if validation is not None:
            if len(validation) != 2:
                msg = "`validation` must be a pair (X_val, y_val) of held-out spots (never test spots)."
                raise ValueError(msg)
            xv = _check_X(validation[0], "X_val", dtype=np.float32)
            if xv.shape[1] != X.shape[1]:
                msg = f"`X_val` has {xv.shape[1]} features but `X` has {X.shape[1]}."
                raise ValueError(msg)
            yv = _check_y(validation[1], xv.shape[0], "y_val", dtype=np.float32)
            if yv.shape[1] != y.shape[1]:
                msg = f"`y_val` has {yv.shape[1]} genes but `y` has {y.shape[1]}."
                raise ValueError(msg)
            val = (
                torch.from_numpy((xv - self.x_mean_) / self.x_scale_).to(dev),
                torch.from_numpy((yv - self.y_mean_) / self.y_scale_).to(dev),
            )

        fork = {"devices": [dev.index or 0], "device_type": "cuda"} if dev.type == "cuda" else {"devices": []}
        with torch.random.fork_rng(**fork):
            torch.manual_seed(self.seed)
            module = self._build(X.shape[1], y.shape[1]).to(dev)
            gen = torch.Generator().manual_seed(self.seed)
            opt = torch.optim.AdamW(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
            best_loss, best_state, best_epoch, stale = np.inf, None, self.epochs, 0
            n = X.shape[0]
            for epoch in range(1, self.epochs + 1):
                module.train()
                perm = torch.randperm(n, generator=gen)
                total = 0.0
                for start in range(0, n, self.batch_size):
                    idx = perm[start : start + self.batch_size]
                    xb, yb = xt[idx].to(dev), yt[idx].to(dev)
                    loss = torch.nn.functional.mse_loss(module(xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                history["train_loss"].append(total / n)
                if val is None:
                    continue
                module.eval()
                with torch.inference_mode():
                    vloss = float(torch.nn.functional.mse_loss(module(val[0]), val[1]))
                history["val_loss"].append(vloss)
                if vloss < best_loss:
                    best_loss, best_epoch, stale = vloss, epoch, 0
                    best_state = copy.deepcopy(module.state_dict())
                else:
                    stale += 1
                    if stale >= self.patience:
                        logger.debug("MLPBaseline: early stop at epoch %d (best %d)", epoch, best_epoch)
                        break
            if best_state is not None:
                module.load_state_dict(best_state)
        module.eval()
        self.module_ = module
        self.history_ = history
        self.best_epoch_ = best_epoch if val is not None else len(history["train_loss"])
        self._set_shapes(X, y)
        self.is_fitted_ = True
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predicted expression, ``float32`` ``(n_spots, n_genes_)``, computed in batches."""
        import torch

        X = self._check_predict(X, dtype=np.float32)
        xs = torch.from_numpy((X - self.x_mean_) / self.x_scale_)
        dev = next(self.module_.parameters()).device
        out = np.empty((X.shape[0], self.n_genes_), dtype=np.float32)
        step = max(self.batch_size, 1024)
        with torch.inference_mode():
            for start in range(0, X.shape[0], step):
                out[start : start + step] = self.module_(xs[start : start + step].to(dev)).cpu().numpy()
        return out * self.y_scale_ + self.y_mean_


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float32).copy()
    scale[~(scale > 0)] = 1.0
    return scale


# --------------------------------------------------------------------------------------------------
# retrieval (BLEEP-style)
# --------------------------------------------------------------------------------------------------


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

        X = _check_X(X)
        y = _check_y(y, X.shape[0], keep_sparse=True, dtype=np.float32)
        self.x_mean_ = X.mean(axis=0)
        self.x_scale_ = _safe_scale(X.std(axis=0)).astype(np.float64)
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
    out = S.tocsr() @ pred
    out = out.toarray() if sparse.issparse(out) else np.asarray(out)
    out = out.astype(dtype, copy=False)
    return out[:, 0] if squeeze else out


# --------------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------------

BASELINES: dict[str, type[Baseline]] = {
    "ridge": RidgeBaseline,
    "mlp": MLPBaseline,
    "retrieval": RetrievalBaseline,
}


def make_baseline(name: str, **kwargs: Any) -> Baseline:
    """Construct a baseline by name: ``"ridge"``, ``"mlp"`` or ``"retrieval"``; ``kwargs`` go to its class."""
    key = str(name).lower()
    if key not in BASELINES:
        msg = f"Unknown baseline {name!r}; choose one of {sorted(BASELINES)}."
        raise ValueError(msg)
    return BASELINES[key](**kwargs)
