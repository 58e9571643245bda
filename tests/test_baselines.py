"""Baseline predictors (ridge, MLP, retrieval) and spatial smoothing, on synthetic data with known truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from hespotex.tl.evaluation._baselines import (
    MLPBaseline,
    RetrievalBaseline,
    RidgeBaseline,
    make_baseline,
    smooth,
)
from hespotex.tl.evaluation._metrics import pearson_per_gene

N_TRAIN, N_VAL, N_TEST, N_FEAT, N_GENES = 500, 100, 200, 48, 12
FAST = {
    "ridge": {},
    "mlp": {"hidden": (64,), "epochs": 60, "patience": 8},
    "retrieval": {"k": 15},
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The MLPs here are tiny: one thread avoids contention overhead on busy 2-core machines."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    """Embeddings on a low-dimensional manifold and three targets: linear, non-linear, independent."""
    rng = np.random.default_rng(0)
    n = N_TRAIN + N_VAL + N_TEST
    latent = rng.normal(size=(n, 6))
    X = np.tanh(latent @ rng.normal(size=(6, N_FEAT))) + 0.1 * rng.normal(size=(n, N_FEAT))
    W = rng.normal(size=(N_FEAT, N_GENES)) / np.sqrt(N_FEAT)
    signal = X @ W
    targets = {
        "linear": signal + 0.5 * signal.std() * rng.normal(size=(n, N_GENES)),
        "nonlinear": np.log1p(np.exp(2 * signal)) + 0.3 * rng.normal(size=(n, N_GENES)),  # softplus
        "independent": rng.normal(size=(n, N_GENES)),
    }
    split = {
        "train": slice(0, N_TRAIN),
        "val": slice(N_TRAIN, N_TRAIN + N_VAL),
        "test": slice(N_TRAIN + N_VAL, n),
    }
    return X.astype(np.float32), targets, split


def _fit(name, X, y, split, **kw):
    model = make_baseline(name, **{**FAST[name], **kw})
    tr, va = split["train"], split["val"]
    if name == "mlp":
        model.fit(X[tr], y[tr], validation=(X[va], y[va]))
    else:
        model.fit(X[tr], y[tr])
    return model


@pytest.mark.parametrize("name", ["ridge", "mlp", "retrieval"])
@pytest.mark.parametrize("target", ["linear", "nonlinear"])
def test_baseline_beats_mean_predictor(data, name, target):
    X, targets, split = data
    y = targets[target]
    model = _fit(name, X, y, split)
    te = split["test"]
    pred = model.predict(X[te])
    assert pred.shape == (N_TEST, N_GENES)
    assert pred.dtype == np.float32
    mean_pred = np.broadcast_to(y[split["train"]].mean(axis=0), pred.shape)
    mse_model = ((pred - y[te]) ** 2).mean()
    mse_mean = ((mean_pred - y[te]) ** 2).mean()
    assert mse_model < 0.7 * mse_mean
    r = pearson_per_gene(y[te], pred)
    assert np.nanmean(r) > 0.5
    assert (r > 0.2).all()


@pytest.mark.parametrize("name", ["ridge", "mlp", "retrieval"])
def test_baseline_fails_on_independent_target(data, name):
    X, targets, split = data
    y = targets["independent"]
    pred = _fit(name, X, y, split).predict(X[split["test"]])
    r = pearson_per_gene(y[split["test"]], pred)
    assert abs(np.nanmean(r)) < 0.08
    mse_mean = ((y[split["train"]].mean(axis=0) - y[split["test"]]) ** 2).mean()
    assert ((pred - y[split["test"]]) ** 2).mean() > 0.97 * mse_mean  # no better than the mean


@pytest.mark.parametrize("name", ["ridge", "mlp", "retrieval"])
def test_baselines_deterministic(data, name):
    X, targets, split = data
    y = targets["nonlinear"]
    te = split["test"]
    a = _fit(name, X, y, split).predict(X[te])
    b = _fit(name, X, y, split).predict(X[te])
    np.testing.assert_array_equal(a, b)
    if name == "mlp":
        c = _fit(name, X, y, split, seed=1).predict(X[te])
        assert not np.array_equal(a, c)


def test_mlp_early_stopping_and_rng_isolation(data):
    import torch

    X, targets, split = data
    y = targets["independent"]  # validation loss cannot improve for long
    state = torch.get_rng_state()
    model = MLPBaseline(hidden=(32,), epochs=200, patience=5, seed=0).fit(
        X[split["train"]], y[split["train"]], validation=(X[split["val"]], y[split["val"]])
    )
    assert torch.equal(torch.get_rng_state(), state)  # the user's global RNG is untouched
    n_epochs = len(model.history_["train_loss"])
    assert n_epochs < 200
    assert n_epochs == len(model.history_["val_loss"]) == model.best_epoch_ + 5
    assert model.history_["val_loss"][model.best_epoch_ - 1] == min(model.history_["val_loss"])
    # the kept weights are those of the best epoch
    with torch.inference_mode():
        xv = (X[split["val"]] - model.x_mean_) / model.x_scale_
        yv = (y[split["val"]].astype(np.float32) - model.y_mean_) / model.y_scale_
        loss = torch.nn.functional.mse_loss(model.module_(torch.from_numpy(xv)), torch.from_numpy(yv))
    assert float(loss) == pytest.approx(min(model.history_["val_loss"]), rel=1e-5)


def test_ridge_follows_hest_protocol(data):
    X, targets, split = data
    y = targets["linear"][split["train"]]
    Xtr = X[split["train"]]
    model = RidgeBaseline().fit(Xtr, y)
    assert model.n_components_ == N_FEAT  # fewer features than 256
    assert model.alpha_ == pytest.approx(100 / (N_FEAT * N_GENES))
    assert set(model.pipeline_.named_steps) == {"scaler", "pca", "ridge"}
    small = RidgeBaseline(n_components=8).fit(Xtr, y)
    assert small.n_components_ == 8
    assert small.alpha_ == pytest.approx(100 / (8 * N_GENES))
    # intercept: predictions are centred on the training mean (HEST without intercept centres them on 0)
    np.testing.assert_allclose(model.predict(Xtr).mean(axis=0), y.mean(axis=0), atol=1e-4)
    assert RidgeBaseline(n_components=None, alpha=3.0).fit(Xtr, y).alpha_ == 3.0


def test_retrieval_weights_and_sparse_targets(data):
    X, targets, split = data
    tr = split["train"]
    y = np.abs(targets["linear"][tr])
    y[y < 0.5] = 0
    dense = RetrievalBaseline(k=5).fit(X[tr], y)
    sp = RetrievalBaseline(k=5).fit(X[tr], sparse.csr_matrix(y))
    np.testing.assert_allclose(dense.predict(X[:20]), sp.predict(X[:20]), rtol=1e-6)
    W = dense.neighbor_weights(X[split["test"]])
    assert (W.getnnz(axis=1) == 5).all()
    np.testing.assert_allclose(W.sum(axis=1), 1.0)
    # a training spot retrieves itself exactly with distance weighting
    np.testing.assert_allclose(dense.predict(X[tr][:10]), y[:10], rtol=1e-6)
    # uniform weighting is the plain mean of the k nearest training spots
    uni = RetrievalBaseline(k=5, weights="uniform").fit(X[tr], y)
    _, idx = uni.index_.kneighbors(uni._transform(X[split["test"]][:3].astype(np.float64)))
    np.testing.assert_allclose(uni.predict(X[split["test"]][:3]), y[idx].mean(axis=1), rtol=1e-5)
    assert RetrievalBaseline(k=10_000).fit(X[tr], y).k_ == N_TRAIN


def test_predict_checks(data):
    X, targets, _ = data
    with pytest.raises(RuntimeError, match="not fitted"):
        RidgeBaseline().predict(X)
    model = RidgeBaseline().fit(X, targets["linear"])
    with pytest.raises(ValueError, match="features"):
        model.predict(X[:, :10])
    with pytest.raises(ValueError, match="aligned"):
        RidgeBaseline().fit(X, targets["linear"][:10])
    with pytest.raises(ValueError, match="Unknown baseline"):
        make_baseline("forest")
    assert isinstance(make_baseline("RIDGE", n_components=4), RidgeBaseline)
    assert make_baseline("mlp", hidden=(8,)).get_params()["hidden"] == [8]


# --------------------------------------------------------------------------------------------------
# smoothing
# --------------------------------------------------------------------------------------------------


def test_smooth_formula_on_a_path():
    # path 0 - 1 - 2 plus isolated spot 3; a stored diagonal is ignored
    A = sparse.csr_matrix(np.array([[5, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=float))
    pred = np.array([[0.0, 1.0], [3.0, 1.0], [6.0, 1.0], [9.0, 1.0]], dtype=np.float32)
    before = (pred.copy(), A.copy())
    out = smooth(pred, A)
    np.testing.assert_allclose(out[:, 0], [1.5, 3.0, 4.5, 9.0])
    np.testing.assert_allclose(out[:, 1], 1.0)
    assert out.dtype == np.float32
    half = smooth(pred, A, self_weight=0.5)
    np.testing.assert_allclose(half[:, 0], [1.5, 3.0, 4.5, 9.0])
    quarter = smooth(pred, A, self_weight=0.25)
    np.testing.assert_allclose(quarter[:, 0], [0.75 * 3, 3.0, 0.25 * 6 + 0.75 * 3, 9.0])
    np.testing.assert_allclose(smooth(pred, A, self_weight=1.0), pred)
    np.testing.assert_allclose(smooth(sparse.csr_matrix(pred), A), out)
    np.testing.assert_array_equal(pred, before[0])
    assert (A - before[1]).count_nonzero() == 0
    with pytest.raises(ValueError, match="match"):
        smooth(pred[:3], A)
    with pytest.raises(ValueError, match="non-negative"):
        smooth(pred, -A)


def test_smooth_raises_correlation_for_smooth_truth():
    from sklearn.neighbors import radius_neighbors_graph

    rng = np.random.default_rng(0)
    side = 30
    rows, cols = np.divmod(np.arange(side * side), side)
    coords = np.c_[cols, rows].astype(float)
    graph = radius_neighbors_graph(coords, radius=1.5, mode="connectivity", include_self=False)  # 8 neighbours
    freqs = rng.uniform(0.1, 0.4, size=(2, 20))
    truth = np.sin(coords[:, :1] * freqs[0]) + np.cos(coords[:, 1:] * freqs[1])
    pred = truth + rng.normal(scale=1.0, size=truth.shape)
    r_raw = pearson_per_gene(truth, pred)
    r_smooth = pearson_per_gene(truth, smooth(pred, graph))
    assert (r_smooth > r_raw).all()
    assert np.mean(r_smooth) > np.mean(r_raw) + 0.1
    # noise-only predictions stay uncorrelated after smoothing
    noise = rng.normal(size=truth.shape)
    assert abs(np.mean(pearson_per_gene(truth, smooth(noise, graph)))) < 0.1
