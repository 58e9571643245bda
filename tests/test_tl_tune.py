"""Baselines tuned by leave-one-training-section-out (issue 9, item 7)."""

from __future__ import annotations

import numpy as np
import pytest

from hespotex.tl.evaluation._baselines import RetrievalBaseline, RidgeBaseline
from hespotex.tl.training._tune import _ridge_path, tune_baseline


def _sections(signal: float, seed: int = 0, n: int = 60):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(20, 6))
    out = {}
    for i in range(3):
        X = rng.normal(size=(n, 20))
        y = signal * X @ w + rng.normal(size=(n, 6))
        out[f"s{i}"] = (X, y, rng.uniform(0, 1000, size=(n, 2)))
    return out


def test_ridge_path_is_the_ridge_baseline():
    secs = _sections(1.0)
    X, y, _ = secs["s0"]
    Xh = secs["s1"][0]
    preds = list(_ridge_path(X, y, Xh, (1.0, 100.0), n_components=10, seed=0))
    for alpha, pred in zip((1.0, 100.0), preds, strict=True):
        ref = RidgeBaseline(n_components=10, alpha=alpha).fit(X, y).predict(Xh)
        # the baseline's lsqr solver stops at sklearn's tol=1e-4: agreement to ~1e-3 on values of order 1
        np.testing.assert_allclose(pred, ref, atol=1e-2)
    assert np.abs(preds[0] - preds[1]).max() > 0.1  # and α matters


def test_tuning_follows_the_signal():
    strong = tune_baseline("ridge", _sections(1.0), grid=(0.1, 1e5), n_components=10)
    noise = tune_baseline("ridge", _sections(0.0), grid=(0.1, 1e5), n_components=10)
    assert strong.tuning_["value"] == 0.1  # a real linear signal: little shrinkage wins
    assert strong.alpha_ == 0.1 and strong.tuning_["inner_folds"] == ["s0", "s1", "s2"]
    assert np.argmax(noise.tuning_["scores"]) == noise.tuning_["grid"].index(noise.tuning_["value"])
    ret = tune_baseline("retrieval", _sections(1.0), grid=(1, 30), smoothed=True)
    assert isinstance(ret, RetrievalBaseline) and ret.k in (1, 30) and ret.tuning_["smoothed"]
    assert ret.tuning_["value"] == 30  # averaging many neighbours beats copying one noisy spot


def test_tuning_bad_input():
    with pytest.raises(ValueError, match="Cannot tune baseline"):
        tune_baseline("mlp", _sections(1.0))
    with pytest.raises(ValueError, match="at least 2"):
        tune_baseline("ridge", {"a": _sections(1.0)["s0"]})


def test_cross_validate_tunes_baselines_on_the_training_folds():
    import hespotex as hx
    from hespotex.tl.model._data import graph_data

    hx.settings.progress = False
    samples = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        sdata = hx.datasets.synthetic(
            n_spots=60, n_genes=8, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=name
        )
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32)
        samples[name] = sdata.tables["table"]
    genes = list(samples["a"].var_names)
    table = hx.tl.cross_validate(
        samples, methods=["ridge", "retrieval"], genes=genes, tune_baselines=True, target_norm="library_modelled", k=4
    )
    assert set(table["method"]) == {"ridge", "ridge+smooth", "retrieval", "retrieval+smooth"}
    row = table[(table["fold"] == "c") & (table["method"] == "retrieval+smooth")].iloc[0]
    # the same choice as tuning by hand on the fold's training sections, with the model's targets
    data = {n: graph_data(samples[n], n, genes=genes, target_norm="library_modelled") for n in ("a", "b")}
    ref = tune_baseline("retrieval", {n: (d.emb, d.expr, d.coords_um) for n, d in data.items()}, smoothed=True)
    assert row["chosen"] == f"k={ref.tuning_['value']}"
